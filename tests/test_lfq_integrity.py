"""Integrity of ``LFQ`` and ``ResidualLFQ``: transactions, files, copies, and fuzzing.

* A refused call (bad input, bad mask, bad upstream gradient, an overflowing batch, a bad
  parameter or state) leaves the state, the generators, the statistics, the gradients and the
  pending backward bit-identical.
* save / load / from_file, pickle and deepcopy keep everything a later step depends on; ``to``
  moves between libraries.
* Changing the input or an output in place after a forward cannot change a gradient.
* Hypothesis draws options (codebooks, bits, projections, cosine projection, rotation, spherical,
  scale, soft clamp, losses, softplus, random subsets, residual depths) and hostile batches
  (zeros, duplicated rows, per-row magnitudes from 1e-30 to 1e15, a single token, masks): every
  output is finite, of the documented shape and dtype, codes are grid points, indices are in
  range, and an eval forward changes nothing but the statistics and decodes from its indices.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from conftest import fuzz_settings
from hypothesis import given, note
from hypothesis import strategies as st

from vqref import LFQ, ResidualLFQ
from vqref import backend as B

LIBS = ["numpy", "array_api_strict"]
N, D = 11, 5
KINDS = {
    "lfq-projected": (
        LFQ,
        dict(dim=D, codebook_size=8, num_codebooks=2, commitment_loss_weight=0.3, frac_per_sample_entropy=0.5),
    ),  # fmt: skip
    "lfq-cosine-sphere": (
        LFQ,
        dict(
            dim=D,
            codebook_size=8,
            cosine_sim_project_in=True,
            orthogonal_rotation=True,
            spherical=True,
            experimental_softplus_entropy_loss=True,
        ),
    ),  # fmt: skip
    "rlfq": (
        ResidualLFQ,
        dict(
            dim=D,
            codebook_size=8,
            num_quantizers=3,
            orthogonal_rotation=True,
            frac_per_sample_entropy=0.5,
            commitment_loss_weight=0.2,
        ),
    ),  # fmt: skip
}


def build(kind: str, lib: str = "numpy", dtype: str = "float64", seed: int = 0):
    cls, kw = KINDS[kind]
    return cls(**kw, seed=seed, xp=lib, dtype=dtype)


def arr(module, host, dtype=None):
    host = np.asarray(host)
    if dtype is None and np.issubdtype(host.dtype, np.floating):
        dtype = module.config()["dtype"]
    return B.from_numpy(host, module.xp, dtype=None if dtype is None else getattr(module.xp, dtype))


def host(a) -> np.ndarray:
    return np.array(B.to_numpy(a), copy=True)


def snapshot(module) -> dict:
    """Everything a refused call must leave bit-identical, the pending backward included (by the
    gradient a copy computes from it)."""
    s = module.state
    snap = {
        "arrays": {k: host(v) for k, v in module.state_dict().items()},
        "rngs": [g.bit_generator.state for g in s.rngs],
        "stats": module.stats,
        "grads": {k: host(v) for k, v in module.grads.items()},
        "training": module.training,
        "cache": s.cache is not None,
    }
    if s.cache is not None:
        twin = copy.deepcopy(module)
        shape, dtype = s.cache[1], s.cache[2]
        dx = twin.backward(B.from_numpy(np.random.default_rng(99).standard_normal(shape), twin.xp, dtype=dtype), 0.75)
        snap["pending"] = [host(dx)] + [host(twin.grads[k]) for k in sorted(twin.grads)]
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in ("arrays", "grads"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=f"{key}[{name}]")
    for u, v in zip(a.get("pending", []), b.get("pending", [])):
        np.testing.assert_array_equal(u, v, err_msg="the pending backward changed")
    assert all(a[k] == b[k] for k in ("rngs", "stats", "training", "cache"))


def train(module, steps: int = 2, seed: int = 1) -> list:
    gen = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        q, idx, loss = module(arr(module, gen.standard_normal((N, D)) * 2.0))[:3]
        dx = module.backward(arr(module, gen.standard_normal((N, D))))
        out += [host(q), host(idx), host(loss), host(dx)] + [host(module.grads[k]) for k in sorted(module.grads)]
    return out


def _bad_calls(module, kind: str) -> list:
    x = arr(module, np.random.default_rng(2).standard_normal((N, D)))
    calls = [
        ("wrong width", lambda: module(arr(module, np.ones((N, D + 1))))),
        ("NaN input", lambda: module(arr(module, np.full((N, D), np.nan)))),
        ("numpy into strict" if module.xp is not np else "list input", lambda: module(np.ones((N, D)).tolist())),
        ("mask of ints", lambda: module(x, mask=arr(module, np.ones(N, np.int64)))),
        ("mask shape", lambda: module(x, mask=arr(module, np.ones(N + 1, bool)))),
        ("backward shape", lambda: module.backward(arr(module, np.ones((N - 1, D))))),
        ("backward NaN", lambda: module.backward(arr(module, np.full((N, D), np.nan)))),
        ("backward loss shape", lambda: module.backward(x, arr(module, np.ones(7)))),
        ("NaN parameter", lambda: module.params.__setitem__("project_out.W", arr(module, np.full((D, D), np.nan)))),
        ("state shape", lambda: module.load_state_dict({k: np.ones(3) for k in module.state_spec()})),
    ]
    if kind.startswith("lfq"):
        calls.append(("inv_temperature", lambda: module(x, inv_temperature=-1.0)))
    if kind != "lfq-cosine-sphere":  # unit cosines on the sphere never overflow
        calls.append(("overflowing batch", lambda: module(arr(module, np.full((N, D), 3e37), "float32"))))
    return calls


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_refused_calls_change_nothing(kind, lib):
    module = build(kind, lib, dtype="float32")
    train(module, 1)
    module(arr(module, np.random.default_rng(3).standard_normal((N, D))))  # a pending backward
    for name, call in _bad_calls(module, kind):
        before = snapshot(module)
        with pytest.raises((ValueError, TypeError, KeyError)), np.errstate(all="ignore"):
            call()
        assert_same(before, snapshot(module))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_files_copies_and_pickles_keep_everything(kind, tmp_path):
    module = build(kind)
    train(module, 1)
    path = str(tmp_path / "m.npz")
    module.save(path)
    cls = type(module)
    loaded = cls.from_file(path, seed=0)
    assert loaded.config() == module.config()
    for k, v in module.state_dict().items():
        np.testing.assert_array_equal(host(loaded.state_dict()[k]), host(v))
    other = build(kind, seed=7)
    other.load(path)
    np.testing.assert_array_equal(host(other.state_dict()[sorted(module.state_spec())[0]]),
                                  host(module.state_dict()[sorted(module.state_spec())[0]]))  # fmt: skip
    with pytest.raises(ValueError, match="different configuration"):
        cls(**{**KINDS[kind][1], "dim": D + 1}).load(path)
    twins = [copy.deepcopy(module), pickle.loads(pickle.dumps(module))]
    expected = train(module, 2)
    for twin in twins:
        run = train(twin, 2)
        for u, v in zip(expected, run):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_move_between_libraries(kind):
    import array_api_strict as xs

    module = build(kind)
    x = np.random.default_rng(4).standard_normal((N, D))
    q = host(module.eval()(x)[0])
    moved = copy.deepcopy(module).to(xs)
    np.testing.assert_array_equal(host(moved(xs.asarray(x))[0]), q)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_changing_inputs_or_outputs_in_place_cannot_change_a_gradient(kind):
    module = build(kind)
    x = np.random.default_rng(5).standard_normal((N, D))
    q, idx = module(x)[:2]
    expected = snapshot(module)
    x[...] = 0.0
    idx[...] = 0  # the indices are the caller's: no cache refers to them
    with pytest.raises(ValueError, match="read-only"):  # the output may share memory with the cache
        q[...] = 0
    assert_same(expected, snapshot(module))


# ------------------------------------------------------------------ fuzzing

SCALES = (0.0, 1e-30, 1e-12, 1e-3, 1.0, 1e3, 1e8, 1e15)


@st.composite
def batches(draw, dim: int):
    """Host float64 inputs ``(*lead, dim)`` from hostile pieces, every entry finite and <= 1e15."""
    lead = draw(st.sampled_from([(1,), (2,), (7,), (3, 4), (2, 1, 3)]))
    n = int(np.prod(lead))
    gen = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = gen.standard_normal((n, dim))
    kind = draw(st.sampled_from(["normal", "zeros", "duplicates", "scaled", "signs"]))
    if kind == "zeros":
        x[: draw(st.integers(1, n))] = 0.0
    elif kind == "duplicates":
        x[:] = x[0]
    elif kind == "scaled":
        x *= np.array([draw(st.sampled_from(SCALES)) for _ in range(n)])[:, None]
    elif kind == "signs":
        x = np.sign(x) * draw(st.sampled_from(SCALES))
    return x.reshape(lead + (dim,))


@st.composite
def lfq_options(draw):
    d, C = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    proj = draw(st.booleans())
    scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    kw = dict(codebook_size=2**d, num_codebooks=C, dim=C * d + (draw(st.integers(1, 3)) if proj else 0),
              codebook_scale=scale, spherical=draw(st.booleans()), orthogonal_rotation=draw(st.booleans()),
              soft_clamp_input_value=draw(st.sampled_from([None, scale, 3 * scale])),
              commitment_loss_weight=draw(st.sampled_from([0.0, 0.25])),
              diversity_gamma=draw(st.sampled_from([0.0, 1.0, 2.5])),
              frac_per_sample_entropy=draw(st.sampled_from([1.0, 0.5, 0.01])),
              experimental_softplus_entropy_loss=draw(st.booleans()), channel_first=False)  # fmt: skip
    if proj:
        kw.update(cosine_sim_project_in=draw(st.booleans()), projection_has_bias=draw(st.booleans()))
    if C == 1:
        kw["keep_num_codebooks_dim"] = draw(st.booleans())
    return kw


def _check_step(module, x, q, idx, losses, K, grid: float | None):
    assert q.dtype == x.dtype and tuple(q.shape) == tuple(x.shape) and losses.dtype == x.dtype
    assert B.all_finite(q) and B.all_finite(losses), "non-finite output"
    hi = host(idx)
    assert hi.dtype == np.int64 and hi.min() >= 0 and hi.max() < K
    if grid is not None:  # without projections and rotation every entry is a grid point
        vals = np.abs(host(q))
        np.testing.assert_allclose(vals, grid, rtol=2e-6)


@fuzz_settings(ci=60, nightly=1500)
@given(options=lfq_options(), data=st.data())
def test_fuzz_lfq(options, data):
    lib, dtype = data.draw(st.sampled_from(LIBS)), data.draw(st.sampled_from(["float32", "float64"]))
    note(f"{options} {lib} {dtype}")
    module = LFQ(**options, seed=data.draw(st.integers(0, 99)), xp=lib, dtype=dtype)
    d, K = module.codebook_dim, module.codebook_size
    plain = not module.has_projections and not module.orthogonal_rotation
    grid = (module.codebook_scale / np.sqrt(d) if module.spherical else module.codebook_scale) if plain else None
    for _ in range(2):
        x = arr(module, data.draw(batches(module.dim)), dtype)
        mask = None
        if data.draw(st.booleans()):
            mask = arr(module, np.random.default_rng(0).random(tuple(x.shape[:-1])) < 0.5)
        tau = data.draw(st.sampled_from([0.1, 1.0, 100.0]))
        q, idx, aux = module(x, inv_temperature=tau, mask=mask)
        _check_step(module, x, q, idx, aux, K, grid)
        dx = module.backward(arr(module, np.random.default_rng(1).standard_normal(tuple(x.shape)), dtype), 0.5)
        assert B.all_finite(dx) and all(B.all_finite(g) for g in module.grads.values())
    before = snapshot(module)
    module.eval()
    q, idx, _ = module(x, inv_temperature=tau)
    after = snapshot(module)
    before["stats"] = after["stats"] = None  # eval commits its statistics, nothing else
    before["training"] = after["training"]
    assert_same(before, after)
    codes = host(module.indices_to_codes(idx))
    np.testing.assert_allclose(codes, host(q), rtol=1e-5, atol=1e-5 * (1 + np.abs(host(q)).max()))


@fuzz_settings(ci=30, nightly=800)
@given(data=st.data())
def test_fuzz_residual_lfq(data):
    d, Q = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    kw = dict(dim=d + data.draw(st.sampled_from([0, 2])), codebook_size=2**d, num_quantizers=Q,
              spherical=data.draw(st.booleans()), orthogonal_rotation=data.draw(st.booleans()),
              soft_clamp_input_value=data.draw(st.sampled_from([None, 1.0, 4.0])),
              commitment_loss_weight=data.draw(st.sampled_from([0.0, 0.5])),
              frac_per_sample_entropy=data.draw(st.sampled_from([1.0, 0.3])))  # fmt: skip
    lib, dtype = data.draw(st.sampled_from(LIBS)), data.draw(st.sampled_from(["float32", "float64"]))
    note(f"{kw} {lib} {dtype}")
    module = ResidualLFQ(**kw, seed=1, xp=lib, dtype=dtype)
    x = arr(module, data.draw(batches(module.dim)), dtype)
    q, idx, losses = module(x)
    assert tuple(idx.shape) == tuple(x.shape[:-1]) + (Q,) and tuple(losses.shape) == (Q,)
    _check_step(module, x, q, idx, losses, 2**d, None)
    dx = module.backward(arr(module, np.random.default_rng(1).standard_normal(tuple(x.shape)), dtype))
    assert B.all_finite(dx) and all(B.all_finite(g) for g in module.grads.values())
    module.eval()
    q, idx, _ = module(x)
    out = host(module.get_output_from_indices(idx))
    np.testing.assert_allclose(out, host(q), rtol=1e-5, atol=1e-5 * (1 + np.abs(host(q)).max()))
