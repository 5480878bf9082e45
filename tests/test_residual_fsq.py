"""Residual FSQ: the soft clamp, the residual recursion over FSQ depths, quantize dropout, decoding.

The backward (straight through every depth's rounding, a surrogate) is checked against a torch
autograd reference written from the equations of vqref/core/residual_fsq.py
(vqref.testing.torch_reference.fsq), with ``.detach()`` where the math has sg[.]; the soft clamp
(smooth) against finite differences.
vector-quantize-pytorch itself is compared in tests/conformance/test_fsq_conformance.py.

Symbols: N = 11 rows, d = 3 channels (LEVELS), dim = 7 when projected, Q = 4 depths.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from vqref import ResidualFSQ
from vqref.core.residual_fsq import residual_fsq_forward
from vqref.ops.fsq import soft_clamp_backward, soft_clamp_forward
from vqref.testing import check_vjp, rel_error
from vqref.testing.torch_reference.fsq import residual_fsq_grads as torch_residual

LEVELS = (8, 5, 2)  # the symmetric grid of every depth allows a level of 2
N, Q = 11, 4


def test_soft_clamp_matches_finite_differences_and_saturates(bk64, rng):
    x = bk64.asarray(3 * rng.standard_normal((N, 3)))
    c = bk64.asarray(np.array([1.2, 0.5, 2.0]))
    check_vjp(lambda x: soft_clamp_forward(x, c)[0], lambda dout, x: (soft_clamp_backward(dout, soft_clamp_forward(x, c)[1]),),
              [x], seed=1, rtol=1e-8)  # fmt: skip
    y = bk64.np(soft_clamp_forward(bk64.asarray(np.array([[1e3, -1e3, 1e-3]])), c)[0])
    np.testing.assert_allclose(y, [[1.2, -0.5, 1e-3]], rtol=1e-6)
    broken = check_vjp(lambda x: soft_clamp_forward(x, c)[0], lambda dout, x: (dout / c,), [x], seed=1,
                       raise_on_failure=False)  # fmt: skip
    assert not broken.passed


CONFIGS = {
    "default": dict(),
    "projected": dict(dim=7),
    "tanh-no-clamp": dict(bound_hard_clamp=False),
    "tanh-soft": dict(bound_hard_clamp=False, soft_clamp_input_value=[1.5, 0.8, 2.0]),
    "one-depth": dict(num_quantizers=1, dim=5),
    "noisy": dict(noise_dropout=0.3),
}


def _soft(module: ResidualFSQ):
    if module.bound_hard_clamp:
        return 1 + 1 / (np.asarray(module.levels, dtype=np.float64) - 1)
    return module.soft_clamp_input_value


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backward_matches_torch_autograd(bk64, rng, name):
    pytest.importorskip("torch")
    kw = {"num_quantizers": Q, **CONFIGS[name]}
    rq = ResidualFSQ(levels=LEVELS, xp=bk64.module, dtype="float64", seed=2, **kw)
    x, g = 1.5 * rng.standard_normal((N, rq.dim)), rng.standard_normal((N, rq.dim))
    noise = None
    if rq.noise_dropout:
        gen = rq.state.rngs[0]  # replay the draws of the next forward
        noise = [(gen.random((N, 3)) < 0.3, gen.random((N, 3)) - 0.5) for _ in range(rq.num_quantizers)]
    state = {k: bk64.np(v) for k, v in rq.state_dict().items()}
    q_ref, dx_ref, grads_ref = torch_residual(x, g, LEVELS, rq.num_quantizers, state=state, soft=_soft(rq),
                                              hard=rq.bound_hard_clamp, noise=noise)  # fmt: skip
    q, idx = rq(bk64.asarray(x))
    assert idx.shape == (N, rq.num_quantizers) and bk64.np(idx).min() >= 0
    dx = rq.backward(bk64.asarray(g))
    np.testing.assert_allclose(bk64.np(q), q_ref, rtol=0, atol=1e-13)
    assert rel_error(bk64.np(dx), dx_ref) < 1e-10
    assert sorted(rq.grads) == sorted(grads_ref)
    for k, v in grads_ref.items():
        assert rel_error(bk64.np(rq.grads[k]), v) < 1e-10, k


def test_each_depth_refines_the_reconstruction_with_the_hard_clamp(rng):
    x = rng.uniform(-1, 1, (2000, 3))  # within the first grid's range
    scales = ResidualFSQ(levels=[5, 5, 5], num_quantizers=4, dtype="float64").scales
    errors = {}
    for hard in (True, False):
        errors[hard] = [
            np.abs(residual_fsq_forward(x, (5, 5, 5), scales, num_active=depth, hard_clamp=hard)[0].quantized - x).max()
            for depth in range(1, 5)
        ]
    # half of depth l's grid step, 2/(L-1) L^-l: the error shrinks L-fold per depth
    np.testing.assert_array_less(errors[True], 0.25 * 5.0 ** -np.arange(4) + 1e-12)
    assert errors[True][-1] > 0.2 * 0.25 * 5.0**-3  # and that bound is attained, not loose
    # with tanh in the bound, depth 0 quantizes tanh(x) rather than x; the error stalls
    assert errors[False][-1] > 0.2


def test_scales_are_powers_of_the_levels():
    rq = ResidualFSQ(levels=[8, 5], num_quantizers=3, dtype="float64")
    np.testing.assert_allclose(rq.scales, [[1, 1], [1 / 8, 1 / 5], [1 / 64, 1 / 25]], rtol=1e-15)


def test_quantize_dropout_keeps_a_prefix_of_depths(rng):
    x = rng.standard_normal((N, 3))
    rq = ResidualFSQ(levels=LEVELS, num_quantizers=5, quantize_dropout=True, quantize_dropout_multiple_of=2,
                     dtype="float64", seed=1)  # fmt: skip
    seen = set()
    for _ in range(40):
        q, idx = rq(x)
        kept = int((idx[0] >= 0).sum())
        assert np.all(idx[:, :kept] >= 0) and np.all(idx[:, kept:] == -1)
        seen.add(kept)
        # the output is that of the kept depths alone
        ref, _ = residual_fsq_forward(x, LEVELS, rq.scales, num_active=kept, soft_clamp=np.asarray(_soft(rq)))
        np.testing.assert_array_equal(q, ref.quantized)
        assert rq.stats["used_codes"][kept:] == (0,) * (5 - kept)
        rq.backward(rng.standard_normal((N, 3)))
    # the last kept depth l drawn from [0, 5), rounded up as round_up(l + 1, 2) - 1: 2, 4 or all 5 depths
    assert seen == {2, 4, 5}
    _, idx = rq.eval()(x)
    assert np.all(idx >= 0)  # eval runs every depth


def test_quantize_dropout_cutoff(rng):
    rq = ResidualFSQ(levels=LEVELS, num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=2, seed=0)
    kept = {int((rq(rng.standard_normal((3, 3)))[1][0] >= 0).sum()) for _ in range(30)}
    assert kept == {3, 4}


@pytest.mark.parametrize("dim", [3, 7])
def test_decoding_from_indices_gives_the_eval_output(bk, rng, dim):
    rq = ResidualFSQ(levels=LEVELS, num_quantizers=Q, dim=dim, xp=bk.module, dtype=bk.dtype_name, seed=3).eval()
    q, idx = rq(bk.asarray(rng.standard_normal((2, 5, dim))))
    assert idx.shape == (2, 5, Q) and idx.dtype == bk.xp.int64
    codes = rq.get_codes_from_indices(idx)
    assert codes.shape == (Q, 2, 5, 3)
    tol = 2e-6 if bk.dtype_name == "float32" else 1e-14
    np.testing.assert_allclose(bk.np(rq.get_output_from_indices(idx)), bk.np(q), rtol=0, atol=tol)
    cb = bk.np(rq.codebooks)
    assert cb.shape == (Q, 80, 3) and np.all(cb[0] == cb[-1])
    # depth l's codes are depth 0's grid shrunk by L^-l
    np.testing.assert_allclose(bk.np(codes)[2], cb[0][bk.np(idx)[..., 2]] * np.asarray(LEVELS, dtype=float) ** -2.0,
                               rtol=1e-6)  # fmt: skip


def test_decoding_coarse_and_skipped_depths(rng):
    rq = ResidualFSQ(levels=LEVELS, num_quantizers=Q, quantize_dropout=True, dtype="float64").eval()
    _, idx = rq(rng.standard_normal((N, 3)))
    coarse = rq.get_output_from_indices(idx[:, :2])  # the first two depths only
    masked = idx.copy()
    masked[:, 2:] = -1
    np.testing.assert_array_equal(coarse, rq.get_output_from_indices(masked))
    two = ResidualFSQ(levels=LEVELS, num_quantizers=2, dtype="float64").eval()
    np.testing.assert_array_equal(coarse, two.get_output_from_indices(idx[:, :2]))  # the first two depths alone
    plain = ResidualFSQ(levels=LEVELS, num_quantizers=Q)
    with pytest.raises(ValueError, match="fewer depths only with quantize_dropout"):
        plain.get_codes_from_indices(idx[:, :2])
    with pytest.raises(ValueError, match=r"\[0, 80\)"):
        plain.get_codes_from_indices(np.full((2, Q), 80))
    with pytest.raises(TypeError, match="integer"):
        plain.get_codes_from_indices(np.zeros((2, Q)))


def test_channel_first_inputs_and_indices(rng):
    x = rng.standard_normal((2, 3, 6))  # (B, d, N)
    cf = ResidualFSQ(levels=LEVELS, num_quantizers=Q, is_channel_first=True, dtype="float64")
    last = ResidualFSQ(levels=LEVELS, num_quantizers=Q, dtype="float64")
    q, idx = cf(x)
    ql, il = last(np.moveaxis(x, 1, -1))
    np.testing.assert_array_equal(q, np.moveaxis(ql, -1, 1))
    np.testing.assert_array_equal(idx, np.moveaxis(il, -1, 1))  # (B, Q, N), as vector-quantize-pytorch
    g = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(cf.backward(g), np.moveaxis(last.backward(np.moveaxis(g, 1, -1)), -1, 1))


def test_stats_are_per_depth_and_backends_agree(rng):
    import array_api_strict as xs

    x = rng.standard_normal((N, 7))
    a = ResidualFSQ(levels=LEVELS, num_quantizers=Q, dim=7, dtype="float64", seed=4)
    b = ResidualFSQ(levels=LEVELS, num_quantizers=Q, dim=7, dtype="float64", seed=4, xp=xs)
    qa, ia = a(x)
    qb, ib = b(xs.asarray(x))
    np.testing.assert_array_equal(qa, np.asarray(qb))
    np.testing.assert_array_equal(ia, np.asarray(ib))
    assert a.stats == b.stats and len(a.stats["perplexity"]) == Q
    for level in range(Q):
        assert a.stats["used_codes"][level] == len(np.unique(ia[:, level]))
    g = rng.standard_normal((N, 7))
    np.testing.assert_allclose(a.backward(g), np.asarray(b.backward(xs.asarray(g))), rtol=1e-13)
    one = ResidualFSQ(levels=LEVELS, num_quantizers=1)
    one(x[:, :3])
    assert isinstance(one.stats["perplexity"], tuple)  # a depth axis even for one depth


def test_float32_matches_float64(rng):
    x, g = rng.standard_normal((N, 7)), rng.standard_normal((N, 7))
    out = {}
    for dt in ("float32", "float64"):
        rq = ResidualFSQ(levels=LEVELS, num_quantizers=Q, dim=7, dtype=dt, seed=0)
        q, idx = rq(x.astype(dt))
        out[dt] = (q, idx, rq.backward(g.astype(dt)))
        assert q.dtype == dt and out[dt][2].dtype == dt
    agree = (out["float32"][1] == out["float64"][1]).all(axis=1)
    assert agree.mean() > 0.8  # deep depths sit on fine grids: a rounding difference may flip one
    assert rel_error(out["float32"][2][agree], out["float64"][2][agree]) < 1e-5


def test_save_load_pickle(rng, tmp_path):
    rq = ResidualFSQ(levels=LEVELS, num_quantizers=Q, dim=7, bound_hard_clamp=False, soft_clamp_input_value=2.0)
    assert rq.config()["soft_clamp_input_value"] == [2.0, 2.0, 2.0]
    path = str(tmp_path / "rfsq.npz")
    rq.save(path)
    x = rng.standard_normal((N, 7)).astype(np.float32)
    q, idx = rq(x)
    for other in (ResidualFSQ.from_file(path), pickle.loads(pickle.dumps(rq)), copy.deepcopy(rq)):
        np.testing.assert_array_equal(other(x)[0], q)


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        (dict(levels=[8, 1]), ValueError, r"levels\[1\] must be >= 2"),
        (dict(num_quantizers=0), ValueError, "num_quantizers must be >= 1"),
        (dict(soft_clamp_input_value=1.5), ValueError, "must be None with bound_hard_clamp=True"),
        (dict(bound_hard_clamp=False, soft_clamp_input_value=[1.0, 2.0]), ValueError, "must hold len"),
        (dict(bound_hard_clamp=False, soft_clamp_input_value=-1.0), ValueError, "soft_clamp_input_value must be >="),
        (dict(quantize_dropout=True, quantize_dropout_cutoff_index=4), ValueError, "must be < num_quantizers=4"),
        (dict(quantize_dropout_multiple_of=0), ValueError, "multiple_of must be >= 1"),
        (dict(noise_dropout=-0.1), ValueError, "noise_dropout must be >= 0"),
        (dict(levels=[9, 2], num_quantizers=33), ValueError, r"scaled by 9\^-32 .* use fewer depths"),
    ],
)
def test_bad_configuration(kw, err, msg):
    with pytest.raises(err, match=msg):
        ResidualFSQ(**{"levels": LEVELS, "num_quantizers": 4, **kw})


def test_the_deepest_scale_stays_in_range(rng):
    rq = ResidualFSQ(levels=[9, 2], num_quantizers=32)  # 9^-31 = 2.6e-30: the deepest allowed
    q, idx = rq(rng.standard_normal((N, 2)).astype(np.float32))
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(rq.backward(np.ones_like(q))))
