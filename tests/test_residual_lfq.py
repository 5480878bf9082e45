"""Residual lookup-free quantization: the stack against a torch autograd reference, finite
differences of its losses, decoding from indices, and the module's options.

Sizes: N = 11 tokens, dim = 5, d = 3 bits per depth (K = 8), Q = 3 depths with scales 2^-l.
"""

from __future__ import annotations

import numpy as np
import pytest

from vqref import ResidualLFQ
from vqref.core.lfq import LFQOptions, LFQParams, residual_lfq_backward, residual_lfq_forward
from vqref.testing import check_vjp, rel_error
from vqref.testing.torch_reference.lfq import residual_lfq_grads as torch_residual_lfq

N, DIM, d, Q = 11, 5, 3, 3
K = 2**d


def host_codes(d: int, value: float) -> np.ndarray:
    bits = np.array([[(k >> (d - 1 - j)) & 1 for j in range(d)] for k in range(2**d)], dtype=np.float64)
    return value * (2 * bits - 1)  # (K, d) in index order


CONFIGS = {
    "projected": dict(dim=DIM),
    "spherical-clamped": dict(dim=d, spherical=True, soft_clamp_input_value=1.5, commitment_loss_weight=0.3),
    "rotated-softplus": dict(dim=DIM, orthogonal_rotation=True, experimental_softplus_entropy_loss=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backward_matches_torch_autograd(bk, rng, name):
    kw = CONFIGS[name]
    rq = ResidualLFQ(num_quantizers=Q, codebook_size=K, seed=2, xp=bk.module, dtype=bk.dtype_name, **kw)
    x, g = rng.standard_normal((N, kw["dim"])), rng.standard_normal((N, kw["dim"]))
    dl = np.array([0.4, 1.3, -0.7])
    q, idx, losses = rq(bk.asarray(x))
    dx = rq.backward(bk.asarray(g), bk.asarray(dl))
    assert q.dtype == bk.dtype and dx.dtype == bk.dtype and idx.shape == (N, Q) and losses.shape == (Q,)
    host = {k: np.asarray(bk.np(v), dtype=np.float64) for k, v in rq.state_dict().items()}
    params = {k: v for k, v in host.items() if k.startswith("project_")}
    rotations = [host[f"layers.{level}.orthogonal_rot"] for level in range(Q)] if rq.orthogonal_rotation else None
    ref = torch_residual_lfq(x.astype(bk.dtype_name).astype(np.float64), g, dl, params=params, Q=Q, d=d,
                             spherical=rq.spherical, clamp=rq.soft_clamp_input_value, w_commit=rq.commitment_loss_weight,
                             softplus=5.0 if rq.experimental_softplus_entropy_loss else None, rotations=rotations)  # fmt: skip
    tol = 1e-10 if bk.is64 else 2e-4
    assert rel_error(bk.np(q), ref["quantized"]) < tol and rel_error(bk.np(losses), ref["losses"]) < tol
    assert rel_error(bk.np(dx), ref["dx"]) < tol
    assert set(rq.grads) == set(params)
    for k in params:
        assert rel_error(bk.np(rq.grads[k]), ref[k]) < tol, k


def test_indices_are_the_brute_force_residual_signs_and_the_decoder_gradient_reaches_x_per_depth(rng):
    rq = ResidualLFQ(dim=d, num_quantizers=Q, codebook_size=K, entropy_loss_weight=0.0, dtype="float64")
    x, g = rng.standard_normal((N, d)), rng.standard_normal((N, d))
    q, idx, losses = rq(x)
    r, expected, total = x.copy(), [], np.zeros_like(x)
    for level in range(Q):  # the nearest code of each depth's cube, by brute force over all K codes
        codes = host_codes(d, 2.0**-level)
        k = np.argmin(((r[:, None, :] - codes[None]) ** 2).sum(-1), axis=1)
        expected.append(k)
        total += codes[k]
        r = r - codes[k]
    np.testing.assert_array_equal(idx, np.stack(expected, axis=1))
    np.testing.assert_array_equal(q, total)
    np.testing.assert_array_equal(losses, np.zeros(Q))
    np.testing.assert_array_equal(rq.backward(g), Q * g)  # straight through at every depth


def test_each_depth_halves_the_error_bound(rng):
    """Depth l quantizes to +-2^-l: entries of x in (-2, 2) are within 2^-(Q-1) after Q depths."""
    x = rng.uniform(-2, 2, size=(200, d))
    x[0] = 0.0  # the tie goes to -s at every depth: the bound is attained
    for depths in (1, 2, 5):
        rq = ResidualLFQ(dim=d, num_quantizers=depths, codebook_size=K, dtype="float64")
        err = np.abs(rq(x)[0] - x)
        assert err.max() <= 2.0 ** -(depths - 1) and err[0].max() == 2.0 ** -(depths - 1)


def test_loss_gradients_match_finite_differences(rng):
    """Each depth's losses are true derivatives of x (and of project_in) with the signs held fixed."""
    p = {k: rng.standard_normal(shape) for k, shape in
         dict(W_in=(DIM, d), b_in=(d,), W_out=(d, DIM), b_out=(DIM,)).items()}  # fmt: skip
    params = LFQParams(p["W_in"], p["b_in"], p["W_out"], p["b_out"])
    depth_params = [LFQParams()] * Q
    opts = [LFQOptions(num_codebooks=1, codebook_dim=d, codebook_scale=2.0**-level, spherical=True,
                       commitment_loss_weight=0.5, inv_temperature=3.0) for level in range(Q)]  # fmt: skip
    x = rng.standard_normal((N, DIM))
    zero_g = np.zeros((N, DIM))

    def run(x, W):
        return residual_lfq_forward(x, params._replace(project_in_W=W), depth_params, opts)

    def vjp(dl, x, W):
        dx, grads = residual_lfq_backward(zero_g, dl, run(x, W)[1])
        return dx, grads["project_in_W"]

    dl = np.array([0.4, 1.3, -0.7])
    check_vjp(lambda x, W: run(x, W)[0].losses, vjp, [x, np.asarray(params.project_in_W)], dout=dl,
              guard=lambda x, W: run(x, W)[0].indices)  # fmt: skip
    broken = lambda dl, x, W: vjp(dl[::-1].copy(), x, W)  # noqa: E731  the depths' upstream swapped
    res = check_vjp(lambda x, W: run(x, W)[0].losses, broken, [x, np.asarray(params.project_in_W)], dout=dl,
                    guard=lambda x, W: run(x, W)[0].indices, raise_on_failure=False)  # fmt: skip
    assert not res.passed


def test_decoding_from_indices(bk, rng):
    rq = ResidualLFQ(dim=DIM, num_quantizers=Q, codebook_size=K, spherical=True, orthogonal_rotation=True, seed=1,
                     xp=bk.module, dtype=bk.dtype_name).eval()  # fmt: skip
    x = bk.asarray(rng.standard_normal((2, 6, DIM)))
    q, idx, _, all_codes = rq(x, return_all_codes=True)
    assert idx.shape == (2, 6, Q) and all_codes.shape == (Q, 2, 6, d)
    assert rel_error(bk.np(rq.get_output_from_indices(idx)), bk.np(q)) < 10 * bk.rtol
    books = bk.np(rq.codebooks)  # (Q, K, d): each depth's codes on its sphere of radius 2^-l
    assert books.shape == (Q, K, d)
    np.testing.assert_allclose(np.linalg.norm(books, axis=-1), 2.0 ** -np.arange(Q)[:, None] * np.ones((Q, K)),
                               rtol=10 * bk.rtol)  # fmt: skip
    np.testing.assert_allclose(bk.np(all_codes)[1, 0, 0], books[1, int(bk.np(idx)[0, 0, 1])], rtol=10 * bk.rtol)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        rq.get_codes_from_indices(bk.asarray(np.zeros((4, 2)), dtype=bk.xp.int64))


def test_stats_frac_and_mask(rng):
    x = rng.standard_normal((N, d))
    rq = ResidualLFQ(dim=d, num_quantizers=Q, codebook_size=K, frac_per_sample_entropy=0.5, seed=9, dtype="float64")
    gen = rq.state.rngs[0]
    rows = [np.sort(gen.choice(N, size=5, replace=False)) for _ in range(Q)]  # one draw per depth, in order
    _, idx, losses = rq(x, mask=np.ones(N, bool))
    ref = torch_residual_lfq(x, np.zeros((N, d)), np.ones(Q), params={}, Q=Q, d=d, rows=rows)
    assert rel_error(losses, ref["losses"]) < 1e-12
    assert set(rq.stats) == {"perplexity", "usage", "used_codes"} and all(len(v) == Q for v in rq.stats.values())
    assert rq.stats["used_codes"] == tuple(len(np.unique(idx[:, level])) for level in range(Q))


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        (dict(codebook_size=12), ValueError, "power of 2"),
        (dict(num_quantizers=0), ValueError, "num_quantizers must be >= 1"),
        (dict(soft_clamp_input_value=0.5), ValueError, "must be >= 1"),
        (dict(frac_per_sample_entropy=0.0), ValueError, r"\(0, 1\]"),
        (dict(spherical="no"), TypeError, "spherical"),
    ],
)
def test_bad_configuration(kw, err, msg):
    base = dict(dim=DIM, num_quantizers=Q, codebook_size=K)
    with pytest.raises(err, match=msg):
        ResidualLFQ(**{**base, **kw})


def test_bad_calls(rng):
    rq = ResidualLFQ(dim=DIM, num_quantizers=Q, codebook_size=K)
    x = rng.standard_normal((N, DIM)).astype(np.float32)
    rq(x)
    with pytest.raises(ValueError, match="dlosses must have shape"):
        rq.backward(x, np.ones(Q + 1))
    with pytest.raises(ValueError, match="leading shape"):
        rq(x, mask=np.ones(N + 1, bool))
    rq.backward(x, np.ones(Q, np.float32))
