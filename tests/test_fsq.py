"""Finite scalar quantization: the ops, the composition, the module.

The smooth steps (the bounds, the scales, the soft clamp, the noise's clamp) are checked against
float64 finite differences; every backward that goes through a rounding (a surrogate) against a
torch autograd reference written from the equations (vqref.testing.torch_reference.fsq), with
``.detach()`` where the math has sg[.]; the module against that reference with every option.
vector-quantize-pytorch itself is compared in tests/conformance/test_fsq_conformance.py.

Symbols: N = 11 rows, d = 5 channels (LEVELS), C codebooks, dim = 7 when projected.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from vqref import FSQ
from vqref.core.fsq import Projection, fsq_backward, fsq_forward, fsq_layer_backward, fsq_layer_forward
from vqref.ops.fsq import (
    bound_backward,
    bound_constants,
    bound_forward,
    codes_to_indices,
    indices_to_codes,
    noise_dropout_backward,
    noise_dropout_forward,
    scale_backward,
    scale_forward,
    symmetric_bound_backward,
    symmetric_bound_forward,
    symmetric_scale_backward,
    symmetric_scale_forward,
)
from vqref.testing import check_vjp, rel_error
from vqref.testing.torch_reference.fsq import fsq_layer_grads as torch_layer
from vqref.testing.torch_reference.fsq import fsq_rows_torch as torch_rows

LEVELS = (8, 5, 3, 4, 7)  # odd and even; d = 5
SYM_LEVELS = (2, 5, 3, 4, 8)  # the symmetric grid allows a level of 2
N = 11  # distinct from d, from dim = 7 and from every level
GRIDS = [(False, LEVELS), (True, SYM_LEVELS)]  # (preserve_symmetry, levels)
GRID_IDS = ["paper", "symmetric"]


def _grid(L: int, symmetric: bool = False, dtype: str = "float64") -> np.ndarray:
    """The values a channel with L levels can take, written independently of the code under test.

    The symmetric grid is eq. (6) evaluated in ``dtype``: ``k * fl(2/(L-1)) - 1`` is within an
    ulp of ``linspace(-1, 1, L)`` but not always the nearest float32 to it (-0.3333333 for L = 4).
    """
    if symmetric:
        step = np.asarray(2 / (L - 1), dtype=dtype)
        return np.arange(L).astype(dtype) * step - np.asarray(1, dtype=dtype)
    w = L // 2
    return ((np.arange(L) - w) / w).astype(dtype)


def _hits_every_code(levels: tuple, symmetric: bool = False) -> np.ndarray:
    """One input per grid point, in index order: the inverse of the bound at each level index."""
    size = int(np.prod(levels))
    L = np.asarray(levels)
    k = (np.arange(size)[:, None] // np.cumprod([1] + list(levels[:-1]))) % L  # (K, d)
    if symmetric:
        return np.arctanh(np.clip(2 * k / (L - 1) - 1, -0.999, 0.999))  # tanh(z) at the point (ends saturated)
    half_l, offset, shift = bound_constants(levels)
    return np.arctanh((k - L // 2 + offset) / half_l) - shift  # (K, d)


# ---------------------------------------------------------------- the grids and the indices


@pytest.mark.parametrize("hard", [False, True], ids=["tanh", "clamp"])
@pytest.mark.parametrize("symmetric, levels", GRIDS, ids=GRID_IDS)
def test_every_output_is_a_grid_point_and_the_ends_are_reached(bk, rng, symmetric, levels, hard):
    x = bk.asarray(3 * rng.standard_normal((N, len(levels))))
    out, _ = fsq_forward(x, levels, preserve_symmetry=symmetric, hard_clamp=hard)
    q, idx = bk.np(out.quantized), bk.np(out.indices)
    assert out.quantized.dtype == bk.dtype and q.shape == (N, len(levels))
    assert idx.shape == (N,) and idx.dtype == np.int64
    for j, L in enumerate(levels):
        assert np.all(np.isin(q[:, j], _grid(L, symmetric, bk.dtype_name))), (L, q[:, j])
    assert np.abs(_grid(4, True, "float32") - np.linspace(-1, 1, 4)).max() < 1e-7
    # large inputs reach the ends of the grid, and no further
    ends, _ = fsq_forward(bk.asarray(np.array([[-50.0] * 5, [50.0] * 5])), levels, preserve_symmetry=symmetric,
                          hard_clamp=hard)  # fmt: skip
    np.testing.assert_array_equal(bk.np(ends.quantized), [[-1.0] * 5, [_grid(L, symmetric)[-1] for L in levels]])
    np.testing.assert_array_equal(bk.np(ends.indices), [0, int(np.prod(levels)) - 1])


@pytest.mark.parametrize("symmetric, levels", GRIDS, ids=GRID_IDS)
def test_indices_round_trip_and_every_code_is_reachable(bk, symmetric, levels):
    size = int(np.prod(levels))
    all_idx = bk.asarray(np.arange(size), dtype=bk.xp.int64)
    codes = indices_to_codes(all_idx, levels, dtype=bk.dtype, preserve_symmetry=symmetric)  # (K, d)
    assert codes.shape == (size, len(levels)) and codes.dtype == bk.dtype
    assert len(np.unique(bk.np(codes), axis=0)) == size  # a bijection onto the grid
    np.testing.assert_array_equal(bk.np(codes_to_indices(codes, levels, preserve_symmetry=symmetric)), np.arange(size))
    # an input aimed at each grid point lands on it: all prod(levels) codes are reachable
    out, _ = fsq_forward(bk.asarray(_hits_every_code(levels, symmetric)), levels, preserve_symmetry=symmetric)
    np.testing.assert_array_equal(bk.np(out.indices), np.arange(size))
    np.testing.assert_array_equal(bk.np(out.quantized), bk.np(codes))
    # channel 0 is the least significant digit (vector-quantize-pytorch's order)
    np.testing.assert_array_equal(bk.np(codes)[1], [_grid(L, symmetric)[int(j == 0)] for j, L in enumerate(levels)])


def test_the_symmetric_grid_is_symmetric_and_the_paper_grid_is_not_for_even_levels():
    def grid(L: int, symmetric: bool) -> np.ndarray:
        return indices_to_codes(np.arange(L), (L,), preserve_symmetry=symmetric)[:, 0]

    for L in (2, 4, 5, 8):
        sym = grid(L, True)
        np.testing.assert_allclose(sym, -sym[::-1], atol=1e-15)
        assert len(sym) == L and sym[0] == -1 and sym[-1] == 1
        if L > 2:
            paper = grid(L, False)
            assert (L % 2 == 1) == np.allclose(paper, -paper[::-1])


@pytest.mark.parametrize("hard", [False, True], ids=["tanh", "clamp"])
def test_zero_maps_to_zero_on_the_paper_grid(bk, hard):
    # the shift s = phi^-1(o / h) puts z = 0 at z_b = 0 for odd and even levels alike
    bounded, _ = bound_forward(bk.asarray(np.zeros((1, 5))), LEVELS, hard_clamp=hard)
    np.testing.assert_allclose(bk.np(bounded), 0, atol=1e-6 if bk.dtype_name == "float32" else 1e-15)
    out, _ = fsq_forward(bk.asarray(np.zeros((1, 5))), LEVELS, hard_clamp=hard)
    np.testing.assert_array_equal(bk.np(out.quantized), 0)


def test_levels_beyond_1000_would_leave_the_paper_grid():
    # why FSQ refuses them without preserve_symmetry: saturated inputs round past the last point
    for L, inside in ((999, True), (1000, True), (1003, False), (1004, False)):
        z = np.array([[60.0], [-60.0]])
        q, _ = scale_forward(np.round(bound_forward(z, (L,))[0]), (L,))
        assert np.all(np.isin(q, _grid(L))) == inside, L


# ---------------------------------------------------------------- gradients of the smooth steps


def _away_from_kinks(rng, shape, shift=0.0) -> np.ndarray:
    """Inputs whose clamp argument ``z + shift`` stays 0.05 away from the kinks at +-1."""
    z = 1.6 * rng.standard_normal(shape)
    u = z + shift
    return np.where(np.abs(np.abs(u) - 1) < 0.05, z + 0.1, z)


@pytest.mark.parametrize("hard", [False, True], ids=["tanh", "clamp"])
def test_bounds_and_scales_match_finite_differences(bk64, rng, hard):
    _, _, shift = bound_constants(LEVELS, hard_clamp=hard)
    z = bk64.asarray(_away_from_kinks(rng, (N, 5), shift))
    check_vjp(lambda z: bound_forward(z, LEVELS, hard_clamp=hard)[0],
              lambda dout, z: (bound_backward(dout, bound_forward(z, LEVELS, hard_clamp=hard)[1]),),
              [z], seed=1, rtol=1e-7, atol=1e-9)  # fmt: skip
    zs = bk64.asarray(_away_from_kinks(rng, (N, 5)))
    check_vjp(lambda z: symmetric_bound_forward(z, SYM_LEVELS, hard_clamp=hard)[0],
              lambda dout, z: (symmetric_bound_backward(dout, symmetric_bound_forward(z, SYM_LEVELS,
                                                                                      hard_clamp=hard)[1]),),
              [zs], seed=2, rtol=1e-7, atol=1e-9)  # fmt: skip
    check_vjp(lambda z: scale_forward(z, LEVELS)[0], lambda dout, z: (scale_backward(dout, scale_forward(z, LEVELS)[1]),),
              [z], seed=3)  # fmt: skip
    check_vjp(lambda k: symmetric_scale_forward(k, SYM_LEVELS)[0],
              lambda dout, k: (symmetric_scale_backward(dout, symmetric_scale_forward(k, SYM_LEVELS)[1]),),
              [zs], seed=4)  # fmt: skip
    if hard:  # outside [-1, 1] the clamp is flat: the gradient is exactly zero there
        far = bk64.asarray(np.full((2, 5), 3.0))
        assert np.all(
            bk64.np(symmetric_bound_backward(far, symmetric_bound_forward(far, SYM_LEVELS, hard_clamp=True)[1])) == 0
        )


def test_noise_dropout_matches_finite_differences_and_stops_where_it_clamps(bk64, rng):
    codes = bk64.asarray(np.clip(rng.standard_normal((N, 5)) * 0.7, -0.9, 0.9))
    mask = bk64.asarray(rng.random((N, 5)) < 0.5, dtype=bk64.xp.bool)
    noise = rng.random((N, 5)) - 0.5
    moved = bk64.np(codes) + np.where(bk64.np(mask), noise, 0)
    noise = np.where(np.abs(np.abs(moved) - 1) < 0.02, noise * 0.5, noise)  # away from the kinks
    noise = bk64.asarray(noise)
    y, cache = noise_dropout_forward(codes, mask, noise)
    expected = np.clip(bk64.np(codes) + np.where(bk64.np(mask), bk64.np(noise), 0), -1, 1)
    np.testing.assert_array_equal(bk64.np(y), expected)
    check_vjp(lambda c: noise_dropout_forward(c, mask, noise)[0],
              lambda dout, c: (noise_dropout_backward(dout, noise_dropout_forward(c, mask, noise)[1]),),
              [codes], seed=5, rtol=1e-8, atol=1e-9)  # fmt: skip
    cut = np.abs(bk64.np(codes) + np.where(bk64.np(mask), bk64.np(noise), 0)) > 1
    assert cut.any() and np.all(bk64.np(cache.inside)[cut] == 0)


def test_negative_controls_broken_backwards_fail(bk64, rng):
    z = bk64.asarray(1.5 * rng.standard_normal((N, len(LEVELS))))

    def broken_tanh(dout, z):
        dphi, half_l = bound_forward(z, LEVELS)[1]
        return (dout * half_l * bk64.xp.sqrt(dphi),)  # sqrt(1 - t^2) instead of 1 - t^2

    def broken_symmetric(dout, z):
        dphi, half_span = symmetric_bound_forward(z, SYM_LEVELS)[1]
        return (dout * dphi,)  # the factor (L - 1)/2 forgotten

    for f, vjp in ((lambda z: bound_forward(z, LEVELS)[0], broken_tanh),
                   (lambda z: symmetric_bound_forward(z, SYM_LEVELS)[0], broken_symmetric)):  # fmt: skip
        assert not check_vjp(f, vjp, [z], seed=1, raise_on_failure=False).passed


def test_the_clamp_slope_counts_both_ends_as_torch_does(bk64):
    torch = pytest.importorskip("torch")
    _, _, shift = bound_constants(LEVELS, hard_clamp=True)
    u = np.array([[-1.0], [1.0], [-1.0 - 1e-12], [1.0 + 1e-12]])  # at the kinks and just outside
    z = np.repeat(u, 5, axis=1) - shift  # z + shift is exactly u
    z = bk64.np(bk64.asarray(z))
    zt = torch.tensor(z, requires_grad=True)
    torch_rows(zt, LEVELS, hard=True).sum().backward()
    out, cache = fsq_forward(bk64.asarray(z), LEVELS, hard_clamp=True)
    dz = bk64.np(fsq_backward(bk64.asarray(np.ones_like(z)), cache))
    np.testing.assert_array_equal(dz != 0, zt.grad.numpy() != 0)
    assert np.all(dz[:2] != 0) and np.all(dz[2:] == 0)


# ---------------------------------------------------------------- the full backward against torch autograd


@pytest.mark.parametrize("hard", [False, True], ids=["tanh", "clamp"])
@pytest.mark.parametrize("symmetric, levels", GRIDS, ids=GRID_IDS)
def test_core_backward_matches_torch_autograd(bk64, rng, symmetric, levels, hard):
    torch = pytest.importorskip("torch")
    z, g = 2 * rng.standard_normal((N, 5)), rng.standard_normal((N, 5))
    noise = (rng.random((N, 5)) < 0.4, rng.random((N, 5)) - 0.5) if symmetric else None
    zt = torch.tensor(z, requires_grad=True)
    q_ref = torch_rows(zt, levels, symmetric=symmetric, hard=hard, noise=noise)
    (q_ref * torch.tensor(g)).sum().backward()
    device_noise = None if noise is None else (bk64.asarray(noise[0], dtype=bk64.xp.bool), bk64.asarray(noise[1]))
    out, cache = fsq_forward(bk64.asarray(z), levels, preserve_symmetry=symmetric, hard_clamp=hard, noise=device_noise)
    dz = fsq_backward(bk64.asarray(g), cache)
    np.testing.assert_allclose(bk64.np(out.quantized), q_ref.detach().numpy(), rtol=0, atol=1e-15)
    assert rel_error(bk64.np(dz), zt.grad.numpy()) < 1e-12


def test_the_gradient_is_the_bounds_derivative_times_the_scale(rng):
    # eq. (4) and its symmetric form, written out from the constants
    z, g = 2 * rng.standard_normal((N, 5)), rng.standard_normal((N, 5))
    L = np.asarray(LEVELS, dtype=float)
    h, o = (L - 1) * 1.001 / 2, np.where(L % 2 == 0, 0.5, 0.0)
    _, cache = fsq_forward(z, LEVELS)
    np.testing.assert_allclose(fsq_backward(g, cache), g * h * (1 - np.tanh(z + np.arctanh(o / h)) ** 2) / (L // 2),
                               rtol=1e-13)  # fmt: skip
    _, cache = fsq_forward(z, SYM_LEVELS, preserve_symmetry=True)
    np.testing.assert_allclose(fsq_backward(g, cache), g * (1 - np.tanh(z) ** 2), rtol=1e-13)


OPTION_SETS = {
    "plain": dict(),
    "codebooks": dict(num_codebooks=2),
    "projected": dict(dim=7),
    "projected-nobias-2cb": dict(dim=7, num_codebooks=2, projection_has_bias=False),
    "symmetric-clamp": dict(levels=SYM_LEVELS, preserve_symmetry=True, bound_hard_clamp=True),
    "rotated": dict(orthogonal_rotation=True, dim=7),
    "noisy": dict(levels=SYM_LEVELS, preserve_symmetry=True, noise_dropout=0.3, num_codebooks=2),
}


def _reference_kwargs(fsq: FSQ, x_rows: int, bk) -> dict:
    """The module's parameters and this forward's noise, as the torch reference takes them."""
    s = {k: bk.np(v) for k, v in fsq.state_dict().items()}
    kw = dict(C=fsq.num_codebooks, symmetric=fsq.preserve_symmetry, hard=fsq.bound_hard_clamp)
    kw.update(W_in=s.get("project_in.W"), b_in=s.get("project_in.b"), W_out=s.get("project_out.W"),
              b_out=s.get("project_out.b"), R=s.get("orthogonal_rot"))  # fmt: skip
    if fsq.noise_dropout > 0:  # replay the module's generator: the draws its next forward makes
        gen = fsq.state.rngs[0]
        shape = (x_rows * fsq.num_codebooks, fsq.codebook_dim)
        kw["noise"] = (gen.random(shape) < fsq.noise_dropout, gen.random(shape) - 0.5)
    return kw


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_module_backward_matches_torch_autograd(bk64, rng, name):
    pytest.importorskip("torch")
    opts = dict(OPTION_SETS[name])
    levels = opts.pop("levels", LEVELS)
    fsq = FSQ(levels, xp=bk64.module, dtype="float64", seed=3, **opts)
    x = 2 * rng.standard_normal((3, 4, fsq.dim))
    g = rng.standard_normal((3, 4, fsq.dim))
    kw = _reference_kwargs(fsq, 12, bk64)
    q_ref, dx_ref, grads_ref = torch_layer(x.reshape(12, -1), levels, g.reshape(12, -1), **kw)
    q, idx = fsq(bk64.asarray(x))
    assert idx.shape == ((3, 4) if fsq.num_codebooks == 1 else (3, 4, fsq.num_codebooks))
    dx = fsq.backward(bk64.asarray(g))
    np.testing.assert_allclose(bk64.np(q).reshape(12, -1), q_ref, rtol=0, atol=1e-13)
    assert dx.dtype == bk64.dtype and rel_error(bk64.np(dx).reshape(12, -1), dx_ref) < 1e-10
    assert sorted(fsq.grads) == sorted(grads_ref) == sorted(fsq.learnable_names())
    for k, v in grads_ref.items():
        assert rel_error(bk64.np(fsq.grads[k]), v) < 1e-10, k


def test_projection_out_gradients_match_finite_differences(bk64, rng):
    # quantized = codes W + b is linear in (W, b) with the codes held fixed: a true derivative
    x = bk64.asarray(rng.standard_normal((N, 7)))
    fsq = FSQ(LEVELS, dim=7, dtype="float64", xp=bk64.module, seed=1)
    W_in, b_in, W_out, b_out = (fsq.params[k] for k in ("project_in.W", "project_in.b", "project_out.W",
                                                        "project_out.b"))  # fmt: skip

    def f(W, b):
        return fsq_layer_forward(x, LEVELS, project_in=Projection(W_in, b_in), project_out=Projection(W, b))[
            0
        ].quantized

    def vjp(dout, W, b):
        _, cache = fsq_layer_forward(x, LEVELS, project_in=Projection(W_in, b_in), project_out=Projection(W, b))
        grads = fsq_layer_backward(dout, cache)[1]
        return grads["project_out.W"], grads["project_out.b"]

    check_vjp(f, vjp, [W_out, b_out], seed=2, rtol=1e-8)
    bad = check_vjp(f, lambda dout, W, b: (vjp(dout, W, b)[0] * 0.5, vjp(dout, W, b)[1]), [W_out, b_out], seed=2,
                    raise_on_failure=False)  # fmt: skip
    assert not bad.passed


def test_float32_matches_float64(rng):
    x, g = 2 * rng.standard_normal((N, 7)), rng.standard_normal((N, 7))
    res = {}
    for dt in ("float64", "float32"):
        fsq = FSQ(LEVELS, dim=7, num_codebooks=2, dtype=dt, seed=0)
        q, i = fsq(x.astype(dt))
        res[dt] = (q, i, fsq.backward(g.astype(dt)), fsq.grads["project_in.W"])
        assert q.dtype == dt and res[dt][2].dtype == dt and res[dt][3].dtype == dt
    np.testing.assert_array_equal(res["float32"][1], res["float64"][1])
    assert rel_error(res["float32"][2], res["float64"][2]) < 1e-5
    assert rel_error(res["float32"][3], res["float64"][3]) < 1e-5


def test_numpy_and_strict_agree_with_every_option(rng):
    import array_api_strict as xs

    x, g = 2 * rng.standard_normal((N, 7)), rng.standard_normal((N, 7))
    opts = dict(dim=7, num_codebooks=2, preserve_symmetry=True, noise_dropout=0.25, orthogonal_rotation=True)
    a, b = FSQ(SYM_LEVELS, dtype="float64", seed=5, **opts), FSQ(SYM_LEVELS, dtype="float64", xp=xs, seed=5, **opts)
    qa, ia = a(x)
    qb, ib = b(xs.asarray(x))
    np.testing.assert_array_equal(qa, np.asarray(qb))
    np.testing.assert_array_equal(ia, np.asarray(ib))
    np.testing.assert_allclose(a.backward(g), np.asarray(b.backward(xs.asarray(g))), rtol=1e-13)
    assert a.stats == b.stats


# ---------------------------------------------------------------- the module's options


def test_noise_dropout_moves_about_its_share_of_entries_off_the_grid_in_training_only(rng):
    fsq = FSQ(SYM_LEVELS, preserve_symmetry=True, noise_dropout=0.3, dtype="float64", seed=2)
    x = rng.standard_normal((2000, 5))
    q_eval, i_eval = fsq.eval()(x)
    q, i = fsq.train()(x)
    np.testing.assert_array_equal(i, i_eval)  # indices are those of the grid points, before the noise
    off = q != q_eval
    assert 0.2 < off.mean() < 0.3  # about 0.3, less the entries whose noise the clamp cancels
    again = FSQ(SYM_LEVELS, preserve_symmetry=True, noise_dropout=0.3, dtype="float64", seed=2)
    np.testing.assert_array_equal(again(x)[0], q)  # reproducible per seed
    assert not np.array_equal(fsq(x)[0], q)  # a new draw every forward


@pytest.mark.parametrize("keep", [None, True])
def test_indices_layout_keep_num_codebooks_dim_and_return_indices(rng, keep):
    x = rng.standard_normal((2, 3, 5))
    q, idx = FSQ(LEVELS, keep_num_codebooks_dim=keep)(x)
    assert idx.shape == ((2, 3) if keep is None else (2, 3, 1))
    q2, none = FSQ(LEVELS, return_indices=False)(x)
    assert none is None
    np.testing.assert_array_equal(q, q2)


def test_channel_first_and_images_are_read_as_vector_quantize_pytorch_reads_them(rng):
    img = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)  # (B, dim, H, W): four axes are channel-first
    g = rng.standard_normal(img.shape).astype(np.float32)
    fsq, last = FSQ(LEVELS), FSQ(LEVELS)
    q, idx = fsq(img)

    def seq(a):  # (B, dim, H, W) -> (B, H W, dim), the three-axis channel-last layout
        return np.moveaxis(a, 1, -1).reshape(2, 12, 5)

    ql, il = last(seq(img))
    assert q.shape == img.shape and idx.shape == (2, 3, 4)
    np.testing.assert_array_equal(seq(q), ql)
    np.testing.assert_array_equal(idx.reshape(2, 12), il)
    np.testing.assert_array_equal(seq(fsq.backward(g)), last.backward(seq(g)))
    np.testing.assert_array_equal(fsq.indices_to_codes(idx), q)  # decoded channel-first too
    three = rng.standard_normal((2, 5, 6))  # three axes: channel-first only when asked
    q3, i3 = FSQ(LEVELS, channel_first=True)(three)
    assert q3.shape == (2, 5, 6) and i3.shape == (2, 6)
    with pytest.raises(ValueError, match=r"\(\.\.\., dim\) with dim=5"):
        FSQ(LEVELS)(three)
    with pytest.raises(ValueError, match=r"\(B, dim, \.\.\.\) with dim=5"):
        FSQ(LEVELS)(np.moveaxis(img, 1, -1))  # four axes, channel-last: refused, as in vector-quantize-pytorch


@pytest.mark.parametrize("name", ["plain", "projected-nobias-2cb", "rotated", "symmetric-clamp"])
def test_indices_to_codes_decodes_the_eval_output(bk, rng, name):
    opts = dict(OPTION_SETS[name])
    levels = opts.pop("levels", LEVELS)
    fsq = FSQ(levels, xp=bk.module, dtype=bk.dtype_name, seed=4, **opts).eval()
    q, idx = fsq(bk.asarray(2 * rng.standard_normal((N, fsq.dim))))
    tol = 0 if name in ("plain", "symmetric-clamp") else 1e-5 if bk.dtype_name == "float32" else 1e-12
    np.testing.assert_allclose(bk.np(fsq.indices_to_codes(idx)), bk.np(q), rtol=0, atol=tol)
    with pytest.raises(ValueError, match=rf"\[0, {fsq.codebook_size}\)"):
        fsq.indices_to_codes(bk.asarray(np.full(idx.shape, fsq.codebook_size), dtype=bk.xp.int64))


def test_codes_to_indices_takes_one_codebooks_channels(bk, rng):
    fsq = FSQ(LEVELS, num_codebooks=2, xp=bk.module, dtype=bk.dtype_name)
    q, idx = fsq(bk.asarray(2 * rng.standard_normal((N, 10))))
    rows = bk.xp.reshape(q, (N, 2, 5))  # (..., C, d), as vector-quantize-pytorch takes them
    np.testing.assert_array_equal(bk.np(fsq.codes_to_indices(rows)), bk.np(idx))
    assert bk.np(fsq.implicit_codebook).shape == (fsq.codebook_size, 5)
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\)"):
        fsq.codes_to_indices(q)


def test_the_implicit_codebook_is_materialised_only_when_small():
    fsq = FSQ([7, 5], num_codebooks=3)
    np.testing.assert_array_equal(
        fsq.implicit_codebook, fsq.indices_to_codes(np.arange(35)[:, None] * [1, 0, 0])[:, :2]
    )
    with pytest.raises(ValueError, match="decode indices instead"):
        FSQ([1000] * 3).implicit_codebook


def test_stats_after_every_forward_per_codebook(rng):
    x = rng.standard_normal((40, 10))
    fsq = FSQ(LEVELS, num_codebooks=2)
    assert fsq.stats == {}
    _, idx = fsq.eval()(x)
    for c in range(2):
        _, counts = np.unique(idx[:, c], return_counts=True)
        p = counts / 40
        assert fsq.stats["perplexity"][c] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
        assert fsq.stats["usage"][c] == pytest.approx(len(counts) / fsq.codebook_size)
    fsq.train()(x[:1])  # training commits them too; one row: one code
    assert fsq.stats == {"perplexity": (1.0, 1.0), "usage": (1 / np.prod(LEVELS),) * 2, "used_codes": (1, 1)}
    one = FSQ(LEVELS)
    one(x[:, :5])
    assert isinstance(one.stats["perplexity"], float)


def test_projections_train_through_params_and_grads(rng):
    x = rng.standard_normal((64, 7))
    fsq = FSQ(LEVELS, dim=7, seed=0, dtype="float64")
    assert fsq.learnable_names() == ("project_in.W", "project_in.b", "project_out.W", "project_out.b")
    losses = []
    for _ in range(30):
        q, _ = fsq(x)
        losses.append(float(((q - x) ** 2).mean()))
        fsq.backward(2 * (q - x) / q.size)
        for k, g in fsq.grads.items():
            fsq.params[k] -= 0.5 * g
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(ValueError, match=r"project_in\.W must have shape \(7, 5\)"):
        fsq.params["project_in.W"] = np.zeros((5, 7))


def test_initial_projections_follow_torch_linear_default():
    fsq = FSQ((5,) * 4, dim=400, seed=0, dtype="float64")
    W = fsq.params["project_in.W"]  # fan_in 400: U(-1/20, 1/20)
    assert W.shape == (400, 4) and np.abs(W).max() <= 0.05 and np.abs(W).max() > 0.049
    assert abs(W.std() - 0.05 / np.sqrt(3)) < 0.003
    R = FSQ(LEVELS, orthogonal_rotation=True, seed=1, dtype="float64").state_dict()["orthogonal_rot"]
    np.testing.assert_allclose(R @ R.T, np.eye(5), atol=1e-12)
    assert not np.array_equal(R, FSQ(LEVELS, orthogonal_rotation=True, seed=2).state_dict()["orthogonal_rot"])


def test_eval_forward_keeps_no_cache_and_backward_is_consumed(rng):
    fsq = FSQ(LEVELS).eval()
    x = rng.standard_normal((N, 5))
    fsq(x)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        fsq.backward(x)
    fsq.train()
    fsq(x)
    with pytest.raises(ValueError, match="shape"):
        fsq.backward(rng.standard_normal((N, 4)))  # refused: the cache survives
    fsq.backward(x)
    with pytest.raises(RuntimeError):
        fsq.backward(x)


def test_save_load_copy_and_move(rng, tmp_path):
    import array_api_strict as xs

    fsq = FSQ(LEVELS, dim=7, num_codebooks=2, dtype="float64", orthogonal_rotation=True)
    assert sorted(fsq.state_spec()) == ["orthogonal_rot", "project_in.W", "project_in.b", "project_out.W",
                                        "project_out.b"]  # fmt: skip
    assert FSQ(LEVELS).state_dict() == {}
    path = str(tmp_path / "fsq.npz")
    fsq.save(path)
    back = FSQ.from_file(path)
    assert back.config() == fsq.config() and back.dtype == np.float64
    x = rng.standard_normal((N, 7))
    q, idx = fsq(x)
    np.testing.assert_array_equal(back(x)[0], q)
    other = FSQ(LEVELS, dim=7, num_codebooks=2, orthogonal_rotation=True, dtype="float64", seed=9)
    other.load(path)
    np.testing.assert_array_equal(other(x)[0], q)
    with pytest.raises(ValueError, match="different configuration"):
        FSQ((8, 5, 3, 4, 5), dim=7, num_codebooks=2, orthogonal_rotation=True).load(path)
    for twin in (copy.deepcopy(fsq), pickle.loads(pickle.dumps(fsq))):
        np.testing.assert_array_equal(twin(x)[1], idx)
    moved = copy.deepcopy(fsq).to(xs)
    np.testing.assert_allclose(np.asarray(moved(xs.asarray(x))[0]), q, rtol=1e-14)


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        (dict(levels=[8, 1]), ValueError, r"levels\[1\] must be >= 2"),
        (dict(levels=[8, 2.5]), TypeError, r"levels\[1\] must be an integer"),
        (dict(levels=[]), ValueError, "at least one"),
        (dict(levels="855"), TypeError, "list or tuple"),
        (dict(levels=[8, 2]), ValueError, "preserve_symmetry=True"),
        (dict(levels=[1001, 5]), ValueError, "above 1000"),
        (dict(levels=[8, 5], num_codebooks=0), ValueError, "num_codebooks must be >= 1"),
        (dict(levels=[8, 5], num_codebooks=2, keep_num_codebooks_dim=False), ValueError, "keep_num_codebooks_dim"),
        (dict(levels=[8, 5], noise_dropout=0.1), ValueError, "noise_dropout=0.1 needs preserve_symmetry"),
        (dict(levels=[8, 5], preserve_symmetry=True, noise_dropout=1.5), ValueError, "noise_dropout must be <= 1"),
        (dict(levels=[8, 5], channel_first=1), TypeError, "channel_first must be True or False"),
        (dict(levels=[8, 5], dim=0), ValueError, "dim must be >= 1"),
        (dict(levels=[1 << 40] * 2, preserve_symmetry=True), ValueError, "int64"),
    ],
)
def test_bad_configuration(kw, err, msg):
    with pytest.raises(err, match=msg):
        FSQ(**kw)


def test_level_2_and_large_levels_are_fine_on_the_symmetric_grid(rng):
    q, idx = FSQ([2, 1001], preserve_symmetry=True)(rng.standard_normal((N, 2)) * 3)
    assert set(np.unique(q[:, 0])) <= {-1.0, 1.0} and idx.max() < 2002


def test_bad_input_is_rejected(rng):
    fsq = FSQ(LEVELS)
    with pytest.raises(ValueError, match=r"\(\.\.\., dim\) with dim=5"):
        fsq(rng.standard_normal((N, 4)))
    with pytest.raises(TypeError, match="floating"):
        fsq(np.ones((N, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        fsq(np.full((N, 5), np.nan))
