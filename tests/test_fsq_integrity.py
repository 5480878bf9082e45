"""Integrity and fuzzing of FSQ and ResidualFSQ (the guarantees tests/test_integrity.py and
tests/test_fuzz.py give VectorQuantize, for the scalar quantizers).

* A refused call -- bad input, backward without a forward, a bad parameter, a bad state dict, a
  bad file, a forward or backward that would overflow -- leaves the complete state bit-identical:
  arrays, generators, mode, library, stats, gradients and the pending backward (by the gradient a
  copy computes from it).
* Files, pickling and deepcopy round-trip; changing inputs or outputs in place cannot change a
  gradient; a concurrent call raises instead of losing an update.
* Hypothesis: every entry point fed hostile arguments either refuses cleanly or succeeds; and
  over levels, codebooks, projections, options, dtypes and backends, hostile inputs (zeros, huge,
  tiny, duplicated rows) give finite outputs on the grid, indices in range, finite gradients.

Symbols: N = 11 tokens, d = 3 channels (LEVELS), dim = 7 when projected, C = 2, Q = 3.
"""

from __future__ import annotations

import copy
import os
import pickle
import threading
import warnings

import numpy as np
import pytest
from conftest import fuzz_settings
from hypothesis import event, given, note
from hypothesis import strategies as st

from vqref import FSQ, ResidualFSQ, VectorQuantize
from vqref import backend as B
from vqref.quantizers import fsq as fsq_module

N, Q = 11, 3
LEVELS = (5, 4, 3)
LIBS = ("numpy", "array_api_strict")
ALLOWED = (ValueError, TypeError, KeyError, RuntimeError)

KINDS = {
    "fsq": lambda **kw: FSQ(LEVELS, **kw),
    "fsq-projected-2cb": lambda **kw: FSQ(LEVELS, dim=7, num_codebooks=2, **kw),
    "fsq-symmetric-noise-rotation": lambda **kw: FSQ(
        (2, 4, 3), dim=7, preserve_symmetry=True, noise_dropout=0.3, orthogonal_rotation=True, **kw
    ),
    "rfsq": lambda **kw: ResidualFSQ(levels=LEVELS, num_quantizers=Q, **kw),
    "rfsq-projected-dropout": lambda **kw: ResidualFSQ(
        levels=LEVELS, num_quantizers=Q, dim=7, quantize_dropout=True, noise_dropout=0.2, **kw
    ),
}


def build(kind: str, lib: str = "numpy", dtype: str = "float64", seed: int = 0):
    return KINDS[kind](xp=lib, dtype=dtype, seed=seed)


def lib_array(module, host, dtype: str | None = None):
    host = np.asarray(host)
    if dtype is None and np.issubdtype(host.dtype, np.floating):
        dtype = module.config()["dtype"]
    return B.from_numpy(host, module.xp, dtype=None if dtype is None else getattr(module.xp, dtype))


def host(a) -> np.ndarray:
    return np.array(B.to_numpy(a), copy=True)


def data(seed: int, shape: tuple) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * 2.0


def snapshot(module) -> dict:
    """Everything a refused call must leave bit-identical (see the module docstring)."""
    s = module.state
    snap = {
        "arrays": {k: host(v) for k, v in module.state_dict().items()},
        "rngs": [g.bit_generator.state for g in s.rngs],
        "training": module.training,
        "library": B.library_name(module.xp.zeros(1)),
        "stats": module.stats,
        "grads": {k: host(v) for k, v in module.grads.items()},
        "cache": s.cache is not None,
    }
    if s.cache is not None:
        twin = copy.deepcopy(module)
        shape, dtype = s.cache[1], s.cache[2]
        dq = B.from_numpy(np.random.default_rng(99).standard_normal(shape), twin.xp, dtype=dtype)
        snap["pending-dx"] = host(twin.backward(dq))
        snap["pending-grads"] = {k: host(v) for k, v in twin.grads.items()}
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key in ("arrays", "grads", "pending-grads"):
            assert a[key].keys() == b[key].keys(), key
            for name in a[key]:
                assert a[key][name].dtype == b[key][name].dtype, (key, name)
                np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=f"{key}[{name}]")
        elif key == "pending-dx":
            np.testing.assert_array_equal(a[key], b[key], err_msg="the pending cache's gradient changed")
        else:
            assert a[key] == b[key], key


def pending(kind: str, lib: str = "numpy", dtype: str = "float64"):
    """A module after one training step and with a pending backward."""
    module = build(kind, lib, dtype)
    module(lib_array(module, data(1, (N, module.dim))))
    module.backward(lib_array(module, data(2, (N, module.dim))))
    module(lib_array(module, data(3, (N, module.dim))))
    return module


# ================================================================== refused calls change nothing

BAD_CALLS = [
    ("x-shape", lambda m: m(lib_array(m, data(0, (N, m.dim + 1)))), ValueError, r"x must have shape"),
    ("x-int", lambda m: m(lib_array(m, np.ones((N, m.dim), dtype=np.int64))), TypeError, r"x must be a real float"),
    ("x-nan", lambda m: m(lib_array(m, np.full((N, m.dim), np.nan))), ValueError, r"x contains NaN"),
    ("x-empty", lambda m: m(lib_array(m, np.zeros((0, m.dim)))), ValueError, r"at least one vector"),
    ("x-list", lambda m: m(data(0, (N, m.dim)).tolist()), TypeError, r"x must be an array"),
    ("dq-shape", lambda m: m.backward(lib_array(m, data(0, (N + 1, m.dim)))), ValueError, r"dquantized must have"),
    ("dq-inf", lambda m: m.backward(lib_array(m, np.full((N, m.dim), np.inf))), ValueError, r"dquantized contains"),
    ("dq-huge64", lambda m: m.backward(lib_array(m, np.full((N, m.dim), 1e39), "float64")), ValueError,
     r"beyond the float32 range"),
    ("state-missing", lambda m: m.load_state_dict(dict(list(m.state_dict().items())[1:]) or {"evil": np.ones(2)}),
     KeyError, r"missing \[\S|unexpected \['evil"),
    ("state-extra", lambda m: m.load_state_dict({**m.state_dict(), "evil": np.ones(2)}), KeyError, r"unexpected"),
    ("param-unknown", lambda m: m.params.__setitem__("evil", np.ones(3)), KeyError, r"unknown parameter"),
]  # fmt: skip


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_refused_calls_change_nothing(case, kind, lib):
    _, call, err, msg = case
    module = pending(kind, lib, "float32")
    before = snapshot(module)
    with pytest.raises(err, match=msg):
        call(module)
    assert_same(before, snapshot(module))


@pytest.mark.parametrize("kind", ["fsq-projected-2cb", "rfsq-projected-dropout"])
def test_bad_parameters_and_state_dicts_change_nothing(kind):
    module = pending(kind, dtype="float32")
    before = snapshot(module)
    W = module.params["project_in.W"]
    for value, err, msg in [
        (W.T, ValueError, r"project_in\.W must have shape"),
        (W * np.nan, ValueError, r"project_in\.W contains NaN"),
        (W.astype(np.int64), TypeError, r"floating"),
        (np.full(W.shape, 1e39), ValueError, r"beyond the float32 range"),
    ]:
        with pytest.raises(err, match=msg):
            module.params["project_in.W"] = value
    state = module.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['project_out\.b'\] contains NaN"):
        module.load_state_dict({**state, "project_out.b": state["project_out.b"] * np.nan})
    assert_same(before, snapshot(module))
    module.params["project_in.W"] = W * 0.5  # a valid value is accepted (the refusals were about the values)
    assert not np.array_equal(module.params["project_in.W"], W)


def test_backward_without_forward_and_twice_is_refused():
    for kind in sorted(KINDS):
        module = build(kind)
        with pytest.raises(RuntimeError, match="training-mode forward"):
            module.backward(np.zeros((N, module.dim)))
        module = pending(kind)
        module.backward(np.zeros((N, module.dim)))
        before = snapshot(module)
        with pytest.raises(RuntimeError, match="training-mode forward"):
            module.backward(np.zeros((N, module.dim)))
        assert_same(before, snapshot(module))


@pytest.mark.parametrize("kind", ["fsq-projected-2cb", "rfsq-projected-dropout"])
def test_overflowing_projections_are_refused(kind):
    module = build(kind, dtype="float32")
    state = module.state_dict()
    state["project_in.W"] = np.full(state["project_in.W"].shape, 3e38, dtype=np.float32)
    module.load_state_dict(state)
    x = np.full((N, module.dim), 1e-38, dtype=np.float32)
    module(x)
    module.backward(x)
    module(x)  # a pending backward, with in-range projected values
    before = snapshot(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="too large for the projections"):
            module(np.full((N, module.dim), 10.0, dtype=np.float32))
    assert_same(before, snapshot(module))
    # float64 input through a float32 state: the projections' gradients would not fit the state
    module = pending(kind, dtype="float32")
    module(data(4, (N, module.dim)))  # float64 input
    before = snapshot(module)
    with pytest.raises(ValueError, match="overflows"):
        module.backward(np.full((N, module.dim), 1e38))  # codes^T dq: 11 rows of 1e38 exceed float32
    assert_same(before, snapshot(module))


def test_bad_files_change_nothing(tmp_path):
    module = pending("fsq-projected-2cb")
    good = str(tmp_path / "good.npz")
    module.save(good)
    vq_file = str(tmp_path / "vq.npz")
    VectorQuantize(5, 7).save(vq_file)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not a zip at all")
    paired = str(tmp_path / "paired.npz")
    FSQ(LEVELS, dim=7, num_codebooks=2, projection_has_bias=False).save(paired)
    before = snapshot(module)
    for path, msg in [
        (vq_file, "different configuration"),
        (str(garbage), "not a readable vqref .npz file"),
        (paired, "different configuration"),
        (str(tmp_path / "missing.npz"), "not a readable"),
    ]:
        with pytest.raises(ValueError, match=msg):
            module.load(path)
    assert_same(before, snapshot(module))
    with pytest.raises(ValueError, match="does not hold a FSQ"):
        FSQ.from_file(vq_file)
    with pytest.raises(ValueError, match="does not hold a ResidualFSQ"):
        ResidualFSQ.from_file(good)
    with pytest.raises(TypeError, match="path must be a file name"):
        FSQ.from_file(3)


def test_a_file_whose_configuration_is_invalid_is_refused(tmp_path):
    from vqref.quantizers import files

    path = str(tmp_path / "evil.npz")
    config = FSQ(LEVELS).config()
    for bad, msg in [({"levels": [8, 2]}, "preserve_symmetry"), ({"noise_dropout": 0.5}, "noise_dropout"),
                     ({"levels": [5] * 100}, "int64"), ({"dim": 10**9}, "dim must be <=")]:  # fmt: skip
        files.write(path, "FSQ", {**config, **bad}, {})
        with pytest.raises(ValueError, match=msg):
            FSQ.from_file(path)
    # an entry the configuration does not imply
    files.write(path, "FSQ", config, {"project_in.W": np.ones((3, 3))})
    with pytest.raises(ValueError, match="unexpected"):
        FSQ.from_file(path)


# ================================================================== round trips and caches


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_files_pickle_and_deepcopy_round_trip(kind, lib, tmp_path):
    module = pending(kind, lib)
    path = str(tmp_path / "m.npz")
    module.save(path)
    loaded = type(module).from_file(path, xp=lib, seed=0, dtype="float64")  # (a state without arrays has no dtype)
    for k, v in module.state_dict().items():
        np.testing.assert_array_equal(host(loaded.state_dict()[k]), host(v))
    assert loaded.config() == module.config()
    # deepcopy keeps the pending backward, generators and stats; pickling keeps all but the cache
    twin = copy.deepcopy(module)
    assert_same(snapshot(module), snapshot(twin))
    restored = pickle.loads(pickle.dumps(module))
    assert restored.state.cache is None and restored.stats == module.stats
    x = lib_array(module, data(8, (N, module.dim)))
    a, b = module(x), restored(x)
    np.testing.assert_array_equal(host(a[0]), host(b[0]))  # the same generator: the same noise and dropout
    twin.backward(lib_array(module, data(9, (N, module.dim))))
    assert module.state.cache is not None  # the copy is independent


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_changing_inputs_or_outputs_in_place_cannot_change_a_gradient(kind, lib):
    module = pending(kind, lib)
    x = lib_array(module, data(4, (N, module.dim)))
    q, idx = module(x)
    expected = snapshot(module)
    for a in (x, q, idx):
        try:
            a[...] = 0
        except (ValueError, TypeError):
            pass
    assert_same(expected, snapshot(module))


def test_an_overlapping_call_raises_instead_of_losing_an_update(monkeypatch):
    module = build("fsq-projected-2cb")
    gate, inside = threading.Event(), threading.Event()
    real = fsq_module.fsq_layer_forward

    def slow(*a, **k):
        inside.set()
        gate.wait(5)
        return real(*a, **k)

    monkeypatch.setattr(fsq_module, "fsq_layer_forward", slow)
    x = data(0, (N, 7))
    thread = threading.Thread(target=module, args=(x,))
    thread.start()
    assert inside.wait(5)
    with pytest.raises(RuntimeError, match="already changing its state"):
        module(x)
    with pytest.raises(RuntimeError, match="already changing its state"):
        module.params["project_in.W"] = module.params["project_in.W"]
    gate.set()
    thread.join()
    assert module.state.cache is not None  # the first call completed


def test_eval_changes_only_the_stats():
    for kind in sorted(KINDS):
        module = pending(kind).eval()
        before = snapshot(module)
        module(np.tile(data(5, (1, module.dim)), (N, 1)))  # one code per codebook: different stats
        after = snapshot(module)
        assert after.pop("stats") != before.pop("stats")
        assert_same(before, after)


# ================================================================== hypothesis: every entry point

HOSTILE = ("valid", "none", "list", "extra-axis", "transposed", "empty", "nan", "inf", "huge64", "near-max",
           "int-array", "other-library", "scalar")  # fmt: skip


@st.composite
def hostile(draw, module, shape: tuple):
    kind = draw(st.sampled_from(HOSTILE))
    gen = np.random.default_rng(draw(st.integers(0, 2**16)))
    good = gen.standard_normal(shape) * 2.0
    note(f"hostile {kind} for {shape}")
    if kind == "valid":
        return lib_array(module, good)
    if kind == "none":
        return None
    if kind == "list":
        return good.tolist()
    if kind == "extra-axis":
        return lib_array(module, good[None])
    if kind == "transposed":
        return lib_array(module, good.T)
    if kind == "empty":
        return lib_array(module, np.zeros((0,) + shape[1:]))
    if kind in ("nan", "inf"):
        good.reshape(-1)[gen.integers(good.size)] = np.nan if kind == "nan" else np.inf
        return lib_array(module, good)
    if kind == "huge64":
        return lib_array(module, good * 1e39, "float64")
    if kind == "near-max":
        return lib_array(module, np.sign(good) * 3e38)
    if kind == "int-array":
        return lib_array(module, good.astype(np.int64), None)
    if kind == "scalar":
        return 1.5
    other = "array_api_strict" if B.is_numpy(module.xp) else "numpy"
    return B.from_numpy(good, B.namespace_from_module(other))


ENTRY_POINTS = ("forward", "backward", "load_state_dict", "params", "decode", "files")


def _call(draw, module, entry: str, tmp: str):
    dim = module.dim
    if entry == "forward":
        x = draw(hostile(module, (N, dim)))
        return (lambda: module(x)), ("x",)
    if entry == "backward":
        shape = module.state.cache[1] if module.state.cache is not None else (N, dim)
        dq = draw(hostile(module, shape))
        return (lambda: module.backward(dq)), ("dquantized", "backward", "gradient")
    if entry == "load_state_dict":
        state = module.state_dict()
        if not state:
            return (lambda: module.load_state_dict({"evil": np.ones(2)})), ("unexpected",)
        key = draw(st.sampled_from(sorted(state)))
        state[key] = draw(hostile(module, tuple(state[key].shape)))
        return (lambda: module.load_state_dict(state)), (key,)
    if entry == "params":
        name = draw(st.sampled_from(list(module.params) + ["evil"]))
        shape = tuple(module.params[name].shape) if name in module.params else (3,)
        value = draw(hostile(module, shape))
        return (lambda: module.params.__setitem__(name, value)), (name, "parameter")
    if entry == "files":
        path = draw(st.sampled_from([42, None, os.path.join(tmp, "missing.npz"), tmp]))
        return (lambda: type(module).from_file(path)), ("path", "readable")
    K = module.codebook_size
    decode = module.indices_to_codes if isinstance(module, FSQ) else module.get_output_from_indices
    if isinstance(module, ResidualFSQ):
        shape = (4, module.num_quantizers)
    else:
        shape = (4, module.num_codebooks) if module.keep_num_codebooks_dim else (4,)
    good = np.random.default_rng(0).integers(0, K, shape)
    idx = draw(st.sampled_from([good, good + K, -good - 2, good.astype(float), good[..., :1]]))
    arg = lib_array(module, idx, "int64" if idx.dtype.kind == "i" else None)
    return (lambda: decode(arg)), ("indices",)


@given(data=st.data())
@fuzz_settings(ci=150, nightly=3000)
def test_every_entry_point_either_refuses_cleanly_or_succeeds(data, tmp_path_factory):
    tmp = str(tmp_path_factory.getbasetemp())
    entry = data.draw(st.sampled_from(ENTRY_POINTS), label="entry")
    kind = data.draw(st.sampled_from(sorted(KINDS)), label="kind")
    module = pending(kind, data.draw(st.sampled_from(LIBS)), data.draw(st.sampled_from(["float32", "float64"])))
    call, names = _call(data.draw, module, entry, tmp)
    before = snapshot(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            call()
        except ALLOWED as e:
            event(f"{entry}: refused ({type(e).__name__})")
            assert str(e) and (any(n.lower() in str(e).lower() for n in names) or isinstance(e, RuntimeError)), str(e)
            assert_same(before, snapshot(module))
            return
    event(f"{entry}: accepted")
    for name, v in module.state_dict().items():
        assert np.all(np.isfinite(host(v))), name


# ================================================================== hypothesis: numbers under hostile inputs

SCALES = (0.0, 1e-30, 1e-8, 1.0, 1e4, 1e15)


@st.composite
def configurations(draw):
    residual = draw(st.booleans())
    symmetric = residual or draw(st.booleans())
    low = 2 if symmetric else 3
    levels = draw(st.lists(st.integers(low, 9), min_size=1, max_size=4))
    kw = dict(dtype=draw(st.sampled_from(["float32", "float64"])), xp=draw(st.sampled_from(LIBS)),
              seed=draw(st.integers(0, 5)))  # fmt: skip
    d = len(levels)
    if draw(st.booleans()):
        kw["dim"] = draw(st.integers(1, 9))
    if residual:
        kw.update(num_quantizers=draw(st.integers(1, 4)), quantize_dropout=draw(st.booleans()),
                  bound_hard_clamp=draw(st.booleans()), noise_dropout=draw(st.sampled_from([0.0, 0.5])))  # fmt: skip
        if not kw["bound_hard_clamp"] and draw(st.booleans()):
            kw["soft_clamp_input_value"] = draw(st.sampled_from([0.5, 1.0, 3.0]))
        return ResidualFSQ(levels=levels, **kw)
    C = draw(st.integers(1, 3))
    kw.update(num_codebooks=C, preserve_symmetry=symmetric, bound_hard_clamp=draw(st.booleans()),
              orthogonal_rotation=draw(st.booleans()),
              noise_dropout=draw(st.sampled_from([0.0, 0.5])) if symmetric else 0.0)  # fmt: skip
    if "dim" not in kw and draw(st.booleans()):
        kw["dim"] = d * C
    return FSQ(levels, **kw)


@st.composite
def batches(draw, dim: int):
    n = draw(st.integers(1, 12))
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pattern = draw(st.sampled_from(["normal", "zeros", "duplicates", "mixed", "one-huge"]))
    x = gen.standard_normal((n, dim))
    if pattern == "zeros":
        x = np.zeros((n, dim))
    elif pattern == "duplicates":
        x = np.tile(x[:1], (n, 1))
    elif pattern == "one-huge":
        x = x * 1e-30
        x[gen.integers(n)] *= 1e45
    if pattern == "mixed":
        x = x * np.asarray(draw(st.lists(st.sampled_from(SCALES), min_size=n, max_size=n)))[:, None]
    else:
        x = x * draw(st.sampled_from(SCALES[1:]))
    note(f"input {pattern}, n={n}")
    return x


@given(module=configurations(), data=st.data())
@fuzz_settings(ci=120, nightly=2500)
def test_hostile_inputs_give_finite_outputs_on_the_grid(module, data):
    note(repr(module) + f" {module.config()}")
    x_host = data.draw(batches(module.dim))
    in_dtype = data.draw(st.sampled_from(["float32", "float64"]))
    x = lib_array(module, x_host, in_dtype)
    for step in range(2):
        q, idx = module.train()(x)
        g = np.random.default_rng(step).standard_normal(x_host.shape)  # a random upstream gradient
        dx = module.backward(lib_array(module, g, in_dtype))
        for name, a in [("q", q), ("dx", dx), *module.grads.items()]:
            assert np.all(np.isfinite(host(a))), name
        assert q.dtype == x.dtype and dx.dtype == x.dtype
        i = host(idx)
        K = module.codebook_size
        assert np.all(i < K) and np.all(i >= (-1 if isinstance(module, ResidualFSQ) else 0))
    q, idx = module.eval()(x)
    if isinstance(module, FSQ):
        grid_only = not (module.has_projections or module.orthogonal_rotation)
        decoded = host(module.indices_to_codes(idx))
        if grid_only:  # every output is a grid point, and decoding its index gives it back
            np.testing.assert_array_equal(decoded.astype(in_dtype), host(q))
        else:
            np.testing.assert_allclose(decoded, host(q), rtol=1e-4, atol=1e-4 * (1 + np.abs(host(q)).max()))
    else:
        out = host(module.get_output_from_indices(idx))
        np.testing.assert_allclose(out, host(q), rtol=1e-4, atol=1e-4 * (1 + np.abs(host(q)).max()))
    assert all(np.all(np.isfinite(v)) for v in np.atleast_1d(module.stats["perplexity"]))


# ================================================================== constructors

FSQ_OPTIONS = ("levels", "dim", "num_codebooks", "keep_num_codebooks_dim", "channel_first", "projection_has_bias",
               "return_indices", "preserve_symmetry", "noise_dropout", "bound_hard_clamp", "orthogonal_rotation",
               "seed", "dtype", "xp")  # fmt: skip
RFSQ_OPTIONS = ("levels", "num_quantizers", "dim", "is_channel_first", "quantize_dropout",
                "quantize_dropout_cutoff_index", "quantize_dropout_multiple_of", "soft_clamp_input_value",
                "bound_hard_clamp", "noise_dropout", "seed", "dtype", "xp")  # fmt: skip


@given(
    residual=st.booleans(),
    data=st.data(),
    value=st.one_of(
        st.none(), st.booleans(), st.integers(-3, 40), st.just(10**13), st.floats(allow_nan=True), st.text(max_size=4),
        st.sampled_from([np.int64(3), np.float32(0.5), np.bool_(True), [5, 4], [2, 2], (9,), [1.5], object()]),
    ),
)  # fmt: skip
@fuzz_settings(ci=200, nightly=3000)
def test_every_constructor_option_is_checked_by_name(residual, data, value):
    option = data.draw(st.sampled_from(RFSQ_OPTIONS if residual else FSQ_OPTIONS))
    note(f"{option}={value!r}")
    try:
        if residual:
            module = ResidualFSQ(**{"levels": LEVELS, "num_quantizers": Q, option: value})
        else:
            module = FSQ(**{"levels": LEVELS, option: value})
    except (ValueError, TypeError) as e:
        event(f"{option}: refused")
        # a refused preserve_symmetry=False is about the levels it would have to quantize
        named = {option, "levels"} if option == "preserve_symmetry" else {option}
        assert any(n in str(e) for n in named) or option in ("seed", "xp", "dtype"), str(e)
        return
    event(f"{option}: accepted")
    module(np.ones((2, module.dim), dtype=np.float32))  # an accepted configuration works
    if option not in ("seed", "xp", "dtype", "soft_clamp_input_value"):
        assert module.config()[option] is not None  # resolved to its canonical value


@pytest.mark.parametrize("seed", ["0", 1.5, -1, object(), [1, 2]])
def test_constructors_name_a_bad_seed(seed, tmp_path):
    path = str(tmp_path / "f.npz")
    FSQ(LEVELS).save(path)
    for make in (lambda s: FSQ(LEVELS, seed=s), lambda s: ResidualFSQ(levels=LEVELS, num_quantizers=2, seed=s),
                 lambda s: FSQ.from_file(path, seed=s)):  # fmt: skip
        with pytest.raises((TypeError, ValueError), match="seed must be"):
            make(seed)


def test_numpy_scalars_are_the_numbers_they_hold():
    a = FSQ([np.int64(5), np.int32(4)], dim=np.int64(7), num_codebooks=np.int8(2), preserve_symmetry=np.bool_(True),
            noise_dropout=np.float32(0.25))  # fmt: skip
    b = FSQ([5, 4], dim=7, num_codebooks=2, preserve_symmetry=True, noise_dropout=0.25)
    assert a.config() == b.config() and all(type(a.config()[k]) is type(b.config()[k]) for k in a.config())
