"""Finite scalar quantization: the ops, the composition, the module, and conformance.

The bound (a smooth map) is checked against float64 finite differences; the full backward
(straight through the rounding, a surrogate) against a torch autograd reference written with
``.detach()``; the module against vector-quantize-pytorch's ``FSQ``.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from vqref import FSQ
from vqref.core.fsq import fsq_backward, fsq_forward
from vqref.ops.fsq import (
    bound_backward,
    bound_constants,
    bound_forward,
    codes_to_indices,
    indices_to_codes,
    scale_backward,
    scale_forward,
)
from vqref.testing import check_vjp, rel_error

LEVELS = (8, 5, 3, 4, 7)  # odd and even; d = 5
N = 11  # distinct from d and from every level


def _grid(L: int) -> np.ndarray:
    """The values channel with L levels can take, written independently of the code under test."""
    w = L // 2
    return (np.arange(L) - w) / w


def _hits_every_code(levels: tuple) -> np.ndarray:
    """One input per grid point, in index order: the inverse of the bound at each integer."""
    half_l, offset, shift = bound_constants(levels)
    w = np.asarray(levels) // 2
    size = int(np.prod(levels))
    k = (np.arange(size)[:, None] // np.cumprod([1] + list(levels[:-1]))) % np.asarray(levels)  # (K, d)
    zr = k - w  # the integers the bound must reach
    return np.arctanh((zr + offset) / half_l) - shift  # (K, d)


def _torch_fsq(x: np.ndarray, levels: tuple, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: FSQ in float64 torch, sg[.] written as .detach(); returns (quantized, dx)."""
    import torch

    z = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    L = torch.tensor(levels, dtype=torch.float64)
    zz = z.reshape(-1, len(levels))
    half_l = (L - 1) * (1 + 1e-3) / 2
    offset = torch.where(torch.tensor(levels) % 2 == 0, 0.5, 0.0).to(torch.float64)
    bounded = torch.tanh(zz + torch.atanh(offset / half_l)) * half_l - offset
    rounded = bounded + (torch.round(bounded) - bounded).detach()
    q = (rounded / torch.div(L, 2, rounding_mode="floor")).reshape(z.shape)
    (q * torch.tensor(g, dtype=torch.float64)).sum().backward()
    return q.detach().numpy(), z.grad.numpy()


# ---------------------------------------------------------------- the grid and the indices


def test_every_output_is_a_grid_point(bk, rng):
    x = bk.asarray(3 * rng.standard_normal((N, len(LEVELS))))
    out, _ = fsq_forward(x, LEVELS)
    q, idx = bk.np(out.quantized), bk.np(out.indices)
    assert out.quantized.dtype == bk.dtype and q.shape == (N, len(LEVELS))
    assert idx.shape == (N,) and idx.dtype == np.int64
    for j, L in enumerate(LEVELS):
        assert np.all(np.isin(q[:, j], _grid(L).astype(bk.dtype_name))), (L, q[:, j])
    # large inputs reach the ends of the grid, and no further
    ends, _ = fsq_forward(bk.asarray(np.array([[-50.0] * 5, [50.0] * 5])), LEVELS)
    np.testing.assert_array_equal(bk.np(ends.quantized), [[-1.0] * 5, [_grid(L)[-1] for L in LEVELS]])


def test_indices_round_trip_and_every_code_is_reachable(bk):
    size = int(np.prod(LEVELS))
    all_idx = bk.asarray(np.arange(size), dtype=bk.xp.int64)
    codes = indices_to_codes(all_idx, LEVELS, dtype=bk.dtype)  # (K, d)
    assert codes.shape == (size, len(LEVELS)) and codes.dtype == bk.dtype
    assert len(np.unique(bk.np(codes), axis=0)) == size  # a bijection onto the grid
    np.testing.assert_array_equal(bk.np(codes_to_indices(codes, LEVELS)), np.arange(size))
    # an input aimed at each grid point lands on it: all prod(levels) codes are reachable
    out, _ = fsq_forward(bk.asarray(_hits_every_code(LEVELS)), LEVELS)
    np.testing.assert_array_equal(bk.np(out.indices), np.arange(size))
    np.testing.assert_array_equal(bk.np(out.quantized), bk.np(codes))


# ---------------------------------------------------------------- gradients


def test_bound_backward_matches_finite_differences(bk64, rng):
    z = bk64.asarray(1.5 * rng.standard_normal((N, len(LEVELS))))
    check_vjp(
        lambda z: bound_forward(z, LEVELS)[0],
        lambda dout, z: (bound_backward(dout, bound_forward(z, LEVELS)[1]),),
        [z],
        seed=1,
        rtol=1e-7,
    )
    check_vjp(
        lambda z: scale_forward(z, LEVELS)[0], lambda dout, z: (scale_backward(dout, scale_forward(z, LEVELS)[1]),), [z]
    )


def test_negative_control_a_broken_bound_backward_fails(bk64, rng):
    z = bk64.asarray(1.5 * rng.standard_normal((N, len(LEVELS))))

    def broken(dout, z):
        t, half_l = bound_forward(z, LEVELS)[1]
        return (dout * half_l * (1 - t),)  # (1 - t) instead of (1 - t^2)

    res = check_vjp(lambda z: bound_forward(z, LEVELS)[0], broken, [z], seed=1, raise_on_failure=False)
    assert not res.passed


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_module_backward_matches_torch_autograd(bk64, rng, num_codebooks):
    dim = len(LEVELS) * num_codebooks
    x = 2 * rng.standard_normal((3, 4, dim))
    g = rng.standard_normal((3, 4, dim))
    fsq = FSQ(LEVELS, num_codebooks=num_codebooks, xp=bk64.module, dtype="float64")
    q, idx = fsq(bk64.asarray(x))
    assert idx.shape == ((3, 4) if num_codebooks == 1 else (3, 4, num_codebooks))
    dx = fsq.backward(bk64.asarray(g))
    tq, tdx = _torch_fsq(x, LEVELS, g)
    np.testing.assert_array_equal(bk64.np(q), tq)
    assert dx.dtype == bk64.dtype and rel_error(bk64.np(dx), tdx) < 1e-10
    # the core pair is the same computation
    out, cache = fsq_forward(bk64.asarray(x.reshape(-1, len(LEVELS))), LEVELS)
    dz = fsq_backward(bk64.asarray(g.reshape(-1, len(LEVELS))), cache)
    assert rel_error(bk64.np(dz), tdx.reshape(-1, len(LEVELS))) < 1e-10


def test_float32_matches_float64(rng):
    x, g = 2 * rng.standard_normal((N, 10)), rng.standard_normal((N, 10))
    res = {}
    for dt in ("float64", "float32"):
        fsq = FSQ(LEVELS, num_codebooks=2, dtype=dt)
        q, i = fsq(x.astype(dt))
        res[dt] = (q, i, fsq.backward(g.astype(dt)))
        assert q.dtype == dt and res[dt][2].dtype == dt
    np.testing.assert_array_equal(res["float32"][1], res["float64"][1])
    assert rel_error(res["float32"][2], res["float64"][2]) < 1e-6


# ---------------------------------------------------------------- conformance


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 4, 3)])
def test_conformance_with_vector_quantize_pytorch(rng, dtype, levels):
    torch = pytest.importorskip("torch")
    vqp = pytest.importorskip("vector_quantize_pytorch")
    x = (2 * rng.standard_normal((3, 9, len(levels)))).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    peer = vqp.FSQ(list(levels))
    xt = torch.tensor(x, requires_grad=True)
    qt, it = peer(xt)
    (qt * torch.tensor(g)).sum().backward()
    fsq = FSQ(levels, dtype=dtype)
    q, idx = fsq(x)
    dx = fsq.backward(g)
    np.testing.assert_array_equal(q, qt.detach().numpy())
    np.testing.assert_array_equal(idx, it.numpy())
    assert fsq.codebook_size == peer.codebook_size
    # vector-quantize-pytorch computes the bound's constants in float32 even for float64 input
    assert rel_error(dx, xt.grad.numpy()) < 1e-6
    # its implicit codebook is ours
    ours = fsq.indices_to_codes(np.arange(fsq.codebook_size)).astype(np.float32)  # the peer's is float32
    np.testing.assert_array_equal(ours, peer.implicit_codebook.numpy())


# ---------------------------------------------------------------- the module


def test_module_indices_codes_round_trip(bk, rng):
    fsq = FSQ(LEVELS, num_codebooks=2, xp=bk.module, dtype=bk.dtype_name)
    q, idx = fsq(bk.asarray(2 * rng.standard_normal((N, 10))))
    np.testing.assert_array_equal(bk.np(fsq.indices_to_codes(idx)), bk.np(q))
    np.testing.assert_array_equal(bk.np(fsq.codes_to_indices(q)), bk.np(idx))
    with pytest.raises(ValueError, match=r"\[0, 3360\)"):
        fsq.indices_to_codes(bk.asarray(np.full((2, 2), 3360), dtype=bk.xp.int64))


def test_numpy_and_strict_agree(rng):
    import array_api_strict as xs

    x, g = 2 * rng.standard_normal((N, 5)), rng.standard_normal((N, 5))
    a, b = FSQ(LEVELS, dtype="float64"), FSQ(LEVELS, dtype="float64", xp=xs)
    qa, ia = a(x)
    qb, ib = b(xs.asarray(x))
    np.testing.assert_array_equal(qa, np.asarray(qb))
    np.testing.assert_array_equal(ia, np.asarray(ib))
    np.testing.assert_array_equal(a.backward(g), np.asarray(b.backward(xs.asarray(g))))


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

    fsq = FSQ(LEVELS, num_codebooks=2, dtype="float64")
    assert fsq.state_spec() == {} and fsq.state_dict() == {} and fsq.learnable_names() == ()
    assert fsq.config() == {"levels": list(LEVELS), "dim": 10, "num_codebooks": 2, "dtype": "float64"}
    path = str(tmp_path / "fsq.npz")
    fsq.save(path)
    back = FSQ.from_file(path, dtype="float64")
    assert back.config() == fsq.config()
    FSQ(LEVELS, num_codebooks=2).load(path)
    with pytest.raises(ValueError, match="different configuration"):
        FSQ((8, 5, 3, 4, 5), num_codebooks=2).load(path)
    x = rng.standard_normal((N, 10))
    q, idx = fsq(x)
    for other in (copy.deepcopy(fsq), pickle.loads(pickle.dumps(fsq))):
        np.testing.assert_array_equal(other(x)[1], idx)
    moved = copy.deepcopy(fsq).to(xs)
    np.testing.assert_array_equal(np.asarray(moved(xs.asarray(x))[0]), q)


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        (dict(levels=[8, 1]), ValueError, r"levels\[1\] must be >= 2"),
        (dict(levels=[8, 2.5]), TypeError, r"levels\[1\] must be an integer"),
        (dict(levels=[]), ValueError, "at least one"),
        (dict(levels="855"), TypeError, "list or tuple"),
        (dict(levels=[8, 5], dim=6), ValueError, "projections.*not implemented yet"),
        (dict(levels=[8, 5], num_codebooks=0), ValueError, "num_codebooks must be >= 1"),
        (dict(levels=[1 << 40] * 2), ValueError, "int64"),
    ],
)
def test_bad_configuration(kw, err, msg):
    with pytest.raises(err, match=msg):
        FSQ(**kw)


def test_bad_input_is_rejected(rng):
    fsq = FSQ(LEVELS)
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\)"):
        fsq(rng.standard_normal((N, 4)))
    with pytest.raises(TypeError, match="floating"):
        fsq(np.ones((N, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        fsq(np.full((N, 5), np.nan))


def test_the_readme_fsq_snippet_runs_as_written():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "from vqref import FSQ" in b]
    assert len(blocks) == 1
    exec(blocks[0], {"__name__": "readme_snippet"})
