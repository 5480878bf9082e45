"""The integrity guarantees of the quantizer modules, each tested at its source (docs/reliability.md).

A module's state is its arrays, flags, random generators, the pending backward's cache, the array
library and device (``Quantizer.state``).  This file proves, class by class:

2. a refused call changes nothing (parameter assignment, ``to``, ``init_codebook``);
3. values that fit float64 but not a float32 state are refused wherever data enters the state;
4. the backward cache cannot be changed by the caller (input copied, outputs shielded);
5. options are strict (flags are booleans, names are never imported, numpy scalars are numbers);
9. a concurrent call raises instead of losing an update; pickling and copying keep the state.

and, over all of them, a hypothesis property: every public entry point fed hostile arguments
either raises a ValueError/TypeError/KeyError/RuntimeError that names the problem and leaves the
complete state bit-identical, or returns a valid result.  (Class 1, files, is
``tests/test_files.py``.)

Negative controls switch each guarantee off (monkeypatching the shield, the lock, the state
check) and show the corruption the guarantee prevents, so no test here passes vacuously.

Symbols: N = 11 tokens, D = 5 features, K = 7 codes, Q = 3 depths (distinct on purpose).
"""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import re
import sys
import threading
import warnings

import numpy as np
import pytest
from conftest import fuzz_settings
from hypothesis import event, given, note
from hypothesis import strategies as st

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.quantizers import Quantizer
from vqref.quantizers import vq_step as vq_module  # the module whose core calls a forward makes

N, D, K, Q = 11, 5, 7, 3
LIBS = ("numpy", "array_api_strict")
F32_MAX = float(np.finfo(np.float32).max)
ALLOWED = (ValueError, TypeError, KeyError, RuntimeError)

# the module kinds: every estimator, metric and codebook training mode, plain and residual
KINDS = {
    "vq-ste": (VectorQuantize, {}),
    "vq-rotation": (VectorQuantize, dict(rotation_trick=True)),
    "vq-cosine": (VectorQuantize, dict(use_cosine_sim=True)),
    "vq-learnable": (
        VectorQuantize,
        dict(learnable_codebook=True, ema_update=False, orthogonal_reg_weight=0.5, orthogonal_reg_max_codes=3),
    ),
    "vq-kmeans-dead": (VectorQuantize, dict(kmeans_init=True, threshold_ema_dead_code=1.5)),
    "vq-q3": (VectorQuantize, dict(num_quantizers=Q, threshold_ema_dead_code=1.5)),
    "rvq-per-depth": (ResidualVQ, dict(rotation_trick=True, threshold_ema_dead_code=1.5)),
    "rvq-sum": (ResidualVQ, dict(gradient_routing="sum", learnable_codebook=True, ema_update=False)),
    "rvq-shared": (ResidualVQ, dict(shared_codebook=True, kmeans_init=True, orthogonal_reg_weight=0.5)),
    "vq-gumbel": (
        VectorQuantize,
        dict(
            stochastic_sample_codes=True,
            straight_through=True,
            codebook_diversity_loss_weight=0.2,
            orthogonal_reg_weight=0.5,
            threshold_ema_dead_code=1.5,
        ),
    ),
    "rvq-soft": (
        ResidualVQ,
        dict(
            soft_assignment=True,
            sample_codebook_temp=0.5,
            learnable_codebook=True,
            ema_update=False,
            codebook_diversity_loss_weight=0.1,
        ),
    ),
}
CACHE_KINDS = ("vq-ste", "vq-rotation", "vq-cosine", "vq-learnable", "vq-q3", "rvq-per-depth", "rvq-sum", "rvq-shared",
               "vq-gumbel", "rvq-soft")  # fmt: skip


def build(kind: str, lib: str = "numpy", dtype: str = "float64", seed: int = 0, **extra):
    cls, kw = KINDS[kind]
    kw = {**kw, **extra}
    if cls is ResidualVQ:
        return ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=seed, xp=lib, dtype=dtype, **kw)
    return VectorQuantize(D, K, seed=seed, xp=lib, dtype=dtype, **kw)


def lib_array(module, host, dtype: str | None = None):
    """Host data as an array of the module's library (float: the module's dtype unless given)."""
    host = np.asarray(host)
    if dtype is None and np.issubdtype(host.dtype, np.floating):
        dtype = module.config()["dtype"]
    return B.from_numpy(host, module.xp, dtype=None if dtype is None else getattr(module.xp, dtype))


def data(seed: int, shape=(N, D)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * 2.0


def host(a) -> np.ndarray:
    return np.array(B.to_numpy(a), copy=True)


def backward(module, dq, dloss=1.0):
    return module.backward(dq, dloss)  # positional: dloss for VectorQuantize, dlosses for ResidualVQ


# ------------------------------------------------------------------ the complete state


def snapshot(module) -> dict:
    """Everything a refused call must leave bit-identical: state_dict arrays (values and dtypes),
    flags, every generator's state, mode, library and device, the gradients, and the pending
    cache -- by its presence and by the gradient a copy of the module computes from it."""
    s = module.state
    snap = {
        "arrays": {k: host(v) for k, v in module.state_dict().items()},
        "dtypes": {k: str(v.dtype) for k, v in module.state_dict().items()},
        "rngs": [g.bit_generator.state for g in s.rngs],
        "training": module.training,
        "library": B.library_name(next(iter(s.arrays.values()))),
        "device": repr(s.device),
        "grads": {k: host(v) for k, v in module.grads.items()},
        "cache": s.cache is not None,
    }
    if s.cache is not None:
        twin = copy.deepcopy(module)
        _, shape, dtype = s.cache
        dq = B.from_numpy(np.random.default_rng(99).standard_normal(shape), twin.xp, dtype=dtype)
        snap["pending-dx"] = host(backward(twin, dq, 0.75))
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
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key], err_msg="the pending cache's gradient changed")
        else:
            assert a[key] == b[key], key


def train_steps(module, steps: int, seed: int = 1, backward_last: bool = True) -> list:
    """``steps`` forward/backward pairs on a fixed data stream; every output as host arrays."""
    gen = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        x = lib_array(module, gen.standard_normal((N, D)) * 2.0)
        q, idx, loss = module(x)
        out += [host(q), host(idx), host(loss)]
        if backward_last or step < steps - 1:
            dx = backward(module, lib_array(module, gen.standard_normal((N, D))))
            out += [host(dx)] + [host(g) for g in module.grads.values()]
    return out


def assert_runs_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)


def learnable_name(module) -> str:
    return next(iter(module.params))


# ================================================================== 2. a refused call changes nothing


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["vq-learnable", "rvq-sum"])
def test_nan_update_through_params_is_refused(kind, lib):
    module = build(kind, lib)
    train_steps(module, 1)
    module(lib_array(module, data(5)))  # a pending backward too
    name = learnable_name(module)
    before = snapshot(module)
    with pytest.raises(ValueError, match=rf"{name} contains NaN or infinite"):
        module.params[name] -= float("nan") * module.grads[name]
    with pytest.raises(ValueError, match=rf"{name} contains NaN or infinite"):
        module.params[name] = module.params[name] + float("inf")
    assert_same(before, snapshot(module))
    # the same update with a finite step is accepted (so the refusal above is about the NaN)
    module.params[name] -= 0.1 * module.grads[name]
    assert not np.array_equal(host(module.params[name]), before["arrays"][name])


@pytest.mark.parametrize("lib", LIBS)
def test_no_array_handed_out_aliases_the_state(lib):
    """Writing in place into anything the module handed out, or into an array it was given,
    never changes the module: numpy arrays are read-only views, other libraries' are copies."""
    module = build("vq-learnable", lib)
    new = data(3, (K, D))
    given = lib_array(module, new.copy())
    module.params["codebook"] = given
    before = snapshot(module)
    handed_out = [
        given,  # assigned: the module keeps a copy
        module.params["codebook"],
        module.codebook,
        module.embed_avg,
        module.cluster_size,
        module.layers[0].codebook,
        module.state.arrays["codebook"],
        module.state_dict()["codebook"],
    ]
    for a in handed_out:
        try:
            a[...] = 123.0
        except ValueError as e:  # numpy: read-only
            assert "read-only" in str(e)
    assert_same(before, snapshot(module))
    np.testing.assert_array_equal(host(module.codebook), new)


def test_a_generator_passed_as_seed_stays_the_callers():
    gen = np.random.default_rng(4)
    module = VectorQuantize(D, K, seed=gen, kmeans_init=True)
    before = snapshot(module)
    gen.random(100)  # the caller keeps drawing from its generator
    assert_same(before, snapshot(module))


def _blocked_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # "import cupy" now raises ImportError everywhere


BAD_MOVES = [
    ("cupy-missing", lambda m: m.to("cupy"), ValueError, r"xp='cupy' is not available"),
    ("numpy-gpu", lambda m: m.to("numpy", device="gpu"), ValueError, r"device='gpu'"),
    ("strict-str-device", lambda m: m.to("array_api_strict", device="cpu"), ValueError, r"device='cpu'"),
    ("device-object", lambda m: m.to(np, device=object()), ValueError, r"device=<object"),
    ("xp-int", lambda m: m.to(42), TypeError, r"xp must be an array library"),
    ("xp-os", lambda m: m.to("os"), ValueError, r"xp must be one of the array libraries"),
    ("xp-module-not-array", lambda m: m.to(os), ValueError, r"xp='os' is not an array library"),
]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("case", BAD_MOVES, ids=[c[0] for c in BAD_MOVES])
def test_a_failed_move_leaves_the_module_usable(case, lib, monkeypatch):
    _, move, err, msg = case
    _blocked_cupy(monkeypatch)
    module, twin = build("vq-learnable", lib), build("vq-learnable", lib)
    train_steps(module, 1)
    train_steps(twin, 1)
    module(lib_array(module, data(5)))
    twin(lib_array(twin, data(5)))
    before = snapshot(module)
    with pytest.raises(err, match=msg):
        move(module)
    assert_same(before, snapshot(module))
    # and it goes on exactly as a module that never tried to move
    assert_runs_equal(train_steps(module, 2, seed=7), train_steps(twin, 2, seed=7))


# (id, codebook, cluster_size, error, message); host arrays, moved to the module's library
BAD_INIT = [
    ("nan", np.full((K, D), np.nan), None, ValueError, r"codebook'\] contains NaN"),
    ("inf-counts", data(1, (K, D)), np.full(K, np.inf), ValueError, r"cluster_size'\] contains NaN"),
    ("shape", data(1, (D, K)), None, ValueError, r"codebook'\] must have shape \(7, 5\)"),
    ("int", np.ones((K, D), dtype=np.int64), None, TypeError, r"codebook'\] must be floating"),
    ("float16", np.ones((K, D), dtype=np.float16), None, TypeError, r"codebook'\] must be floating"),
    ("list", data(1, (K, D)).tolist(), None, TypeError, r"codebook must be an array"),
    ("list-counts", data(1, (K, D)), [1.0] * K, TypeError, r"cluster_size must be an array"),
    ("negative-counts", data(1, (K, D)), -np.ones(K), ValueError, r"EMA counts"),
    ("product-overflow", np.full((K, D), 1e38), np.full(K, 10.0), ValueError, r"codebook \* cluster_size"),
    ("beyond-float32", np.full((K, D), 1e39), None, ValueError, r"beyond the float32 range"),
]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("case", BAD_INIT, ids=[c[0] for c in BAD_INIT])
def test_init_codebook_refuses_bad_values(case, lib):
    _, codebook, counts, err, msg = case
    module = build("vq-ste", lib, dtype="float32")
    module(lib_array(module, data(2)))
    before = snapshot(module)

    def move(a):  # to the module's library where it has the dtype (init_codebook takes any library)
        return (
            lib_array(module, a, a.dtype.name) if isinstance(a, np.ndarray) and hasattr(module.xp, a.dtype.name) else a
        )

    with pytest.raises(err, match=msg):
        module.init_codebook(move(codebook), move(counts))
    assert_same(before, snapshot(module))
    # an array of another library is data too: accepted, and the module counts as initialised
    module.init_codebook(data(1, (K, D)).astype(np.float32))
    assert module.initted and module.state.cache is None


def test_init_codebook_on_a_stack_is_a_type_error():
    module = build("rvq-per-depth")
    before = snapshot(module)
    with pytest.raises(TypeError, match=r"init_codebook sets one codebook.*use load_state_dict"):
        module.init_codebook(data(1, (K, D)))
    assert_same(before, snapshot(module))


# ================================================================== 3. values beyond the state dtype


def _quiet():
    """numpy's overflow warnings are expected on the way to the refusal."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)
    return ctx


# (id, kind, x host data, an optional codebook to load first, message)
# (id, kind, extra options, x host data, depth-0 codebook to load (or None: a pending backward), message)
HUGE_TRAINING = [
    ("x-beyond-float32", "vq-ste", {}, np.full((N, D), 1e39), None, r"x holds values beyond the float32 range"),
    ("ema-sums-overflow", "vq-ste", {}, np.full((N, D), 3e38), None, r"x would make codebook non-finite in the EMA"),
    # four equal rows form one k-means cluster whose sum (mean * count) leaves float32's range
    ("kmeans-overflow", "vq-kmeans-dead", {}, np.r_[np.full((4, D), 3e38), data(1, (N - 4, D))], "fresh",
     r"x would make codebook non-finite in the k-means initialisation"),
    # dead codes restarted from rows near the limit, times the threshold 1.5
    ("restart-overflow", "vq-ste", dict(threshold_ema_dead_code=1.5, ema_update=False), np.full((N, D), 3e38), None,
     r"x would make (codebook|embed_avg) non-finite in the EMA update and dead-code restarts"),
    # one row, depth-0 codes at -1.5e38: depth 0's update stays in range, the residual 4.5e38 does not
    ("residual-overflow", "rvq-per-depth", dict(threshold_ema_dead_code=0.0), np.full((1, D), 3e38), -1.5e38,
     r"x would make 1\.\w+ non-finite"),
    ("stack-ema", "vq-q3", {}, np.full((N, D), 3e38), None, r"x would make 0\.\w+ non-finite"),
]  # fmt: skip


@pytest.mark.parametrize("input_dtype", ["float32", "float64"])
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("case", HUGE_TRAINING, ids=[c[0] for c in HUGE_TRAINING])
def test_training_data_that_would_overflow_the_state_is_refused(case, lib, input_dtype):
    _, kind, extra, x_host, codebook, msg = case
    if input_dtype == "float32" and np.max(np.abs(x_host)) > F32_MAX:
        pytest.skip("not representable as float32 input")
    module = build(kind, lib, dtype="float32", **extra)
    if codebook is None:
        module(lib_array(module, data(2)))  # a pending backward, which the refusal must keep
    elif codebook != "fresh":
        state = {k: host(v) for k, v in module.state_dict().items()}
        state["0.codebook"] = np.full((K, D), codebook)
        state["0.embed_avg"] = np.zeros((K, D))  # EMA sums that stay in range at depth 0
        module.load_state_dict(state)
    before = snapshot(module)
    ctx = _quiet()
    try:
        with pytest.raises(ValueError, match=msg):
            module(lib_array(module, x_host, input_dtype))
    finally:
        ctx.__exit__(None, None, None)
    assert_same(before, snapshot(module))


@pytest.mark.parametrize("lib", LIBS)
def test_cosine_training_on_huge_values_is_fine(lib):
    """A cosine codebook learns from the normalised input: values near float32's limit are data."""
    module = build("vq-cosine", lib, dtype="float32")
    module(lib_array(module, np.sign(data(1)) * 3e38, "float64"))
    assert all(np.all(np.isfinite(host(v))) for v in module.state_dict().values())


def test_state_check_negative_control(monkeypatch):
    """Without the check of the new state, a batch within float32's range corrupts the codebook."""
    monkeypatch.setattr(VectorQuantize, "check_finite", lambda self, *a: None)
    module = build("vq-ste", dtype="float32")
    ctx = _quiet()
    try:
        module(np.full((N, D), 3e38))
    finally:
        ctx.__exit__(None, None, None)
    assert not np.all(np.isfinite(host(module.state_dict()["codebook"])))


@pytest.mark.parametrize("lib", LIBS)
def test_other_entries_into_a_float32_state_refuse_float64_values_beyond_its_range(lib):
    module = build("vq-learnable", lib, dtype="float32")
    module(lib_array(module, data(2)))
    before = snapshot(module)
    huge = np.full((K, D), 1e39)
    state = {k: host(v) for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"state_dict\['codebook'\] holds values beyond the float32 range"):
        module.load_state_dict({**state, "codebook": lib_array(module, huge, "float64")})
    with pytest.raises(ValueError, match=r"beyond the float32 range"):
        module.init_codebook(lib_array(module, huge, "float64"))
    with pytest.raises(ValueError, match=r"codebook holds values beyond the float32 range"):
        module.params["codebook"] = lib_array(module, huge, "float64")
    assert_same(before, snapshot(module))


@pytest.mark.parametrize("lib", LIBS)
def test_upstream_gradients_that_would_overflow_are_refused(lib):
    module = build("vq-learnable", lib, dtype="float32")
    # float32 input: a float64 upstream gradient beyond float32 would become inf in the cast
    module(lib_array(module, data(2), "float32"))
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"dquantized holds values beyond the float32 range"):
        module.backward(lib_array(module, np.full((N, D), 1e39), "float64"))
    with pytest.raises(ValueError, match=r"dloss holds values beyond the float32 range"):
        module.backward(lib_array(module, data(3), "float32"), dloss=1e39)
    with pytest.raises(ValueError, match=r"dloss holds values beyond the float32 range"):
        module.backward(lib_array(module, data(3), "float32"), dloss=lib_array(module, np.asarray(1e39), "float64"))
    assert_same(before, snapshot(module))
    # float64 input: the gradient is computed in float64; cast to the float32 state it would be inf
    module(lib_array(module, data(2), "float64"))
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"the gradient of codebook overflows the module's float32 state"):
        module.backward(lib_array(module, data(3), "float64"), dloss=1e300)
    assert_same(before, snapshot(module))
    assert all(np.all(np.isfinite(v)) for v in before["pending-grads"].values())


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["vq-ste", "rvq-per-depth"])
def test_eval_on_values_beyond_float32_computes_in_float64(kind, lib):
    """Eval does not touch the state, so float64 input beyond float32's range is accepted: the
    float32 codebook is cast to the input's float64, and the result is exact."""
    module = build(kind, lib, dtype="float32").eval()
    before = snapshot(module)
    x = lib_array(module, data(3) * 1e39, "float64")
    q, idx, loss = module(x)
    assert q.dtype == module.xp.float64 and loss.dtype == module.xp.float64
    assert np.all(np.isfinite(host(q))) and np.all(np.isfinite(host(loss)))
    # decoding works in the float32 state dtype: equal to its rounding (exact for a single depth)
    np.testing.assert_allclose(host(q), host(module.get_output_from_indices(idx)), rtol=0, atol=1e-6 * Q)
    assert_same(before, snapshot(module))
    with pytest.raises(ValueError, match=r"x holds values beyond the float32 range"):
        module.train()(x)


# ================================================================== 4. caches the caller cannot corrupt


def _mutate_all(x, outputs: tuple, module) -> None:
    """Write zeros into the input, the outputs and the residuals, where the library lets us."""
    for a in (x, *outputs, *module.last_residuals):
        try:
            a[...] = 0
        except ValueError as e:
            assert "read-only" in str(e)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_changing_inputs_or_outputs_in_place_cannot_change_a_gradient(kind, lib):
    module = build(kind, lib)
    train_steps(module, 1)
    x = lib_array(module, data(4))
    q, idx, loss = module(x)
    expected = snapshot(module)  # the gradient the pending cache gives, from a copy
    _mutate_all(x, (q, idx), module)
    assert_same(expected, snapshot(module))


@pytest.mark.parametrize("kind", ["vq-rotation", "rvq-sum"])
def test_shield_negative_control(kind, monkeypatch):
    """Without the shield (outputs handed out writeable, sharing the cache's memory), writing
    into the returned outputs does change the gradient: the shield is what prevents it."""
    monkeypatch.setattr(Quantizer, "shield", lambda self, a: a)
    module = build(kind)
    train_steps(module, 1)
    q, idx, loss = module(lib_array(module, data(4)))
    expected = snapshot(module)
    _mutate_all(lib_array(module, data(0)), (q, idx), module)
    with pytest.raises(AssertionError):
        assert_same(expected, snapshot(module))


# ================================================================== 5. strict options

FLAGS = (
    "ema_update",
    "learnable_codebook",
    "kmeans_init",
    "use_cosine_sim",
    "orthogonal_reg_active_codes_only",
    "rotation_trick",
    "shared_codebook",
    "stochastic_sample_codes",
    "straight_through",
    "soft_assignment",
)


@pytest.mark.parametrize("value", ["False", "True", 0, 1, None, np.float64(0.0)])
@pytest.mark.parametrize("flag", FLAGS)
def test_flags_must_be_booleans(flag, value):
    for make in (
        lambda: VectorQuantize(D, K, **{flag: value}),
        lambda: ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, **{flag: value}),
    ):
        with pytest.raises(TypeError, match=rf"{flag} must be True or False, got {re.escape(repr(value))}"):
            make()


def evil_module_on_path(tmp_path, monkeypatch):
    """A module on sys.path (and in the working directory) whose import creates a marker file;
    yields the marker's path, and checks afterwards that it would have caught an import."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_module_xyz.py").write_text(f"open({str(marker)!r}, 'w').close()\nasarray = lambda *a, **k: 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    importlib.invalidate_caches()
    yield marker
    assert "evil_module_xyz" not in sys.modules
    # positive control: importing it is what would create the marker
    importlib.import_module("evil_module_xyz")
    assert marker.exists()
    del sys.modules["evil_module_xyz"]


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    yield from evil_module_on_path(tmp_path, monkeypatch)


BAD_NAMES = [
    (dict(xp="evil_module_xyz"), ValueError, r"xp must be one of the array libraries"),
    (dict(xp="antigravity"), ValueError, r"xp must be one of the array libraries"),
    (dict(xp="os"), ValueError, r"xp must be one of the array libraries"),
    (dict(xp=42), TypeError, r"xp must be an array library module"),
    (dict(dtype="evil_module_xyz"), ValueError, r"dtype must be float32 or float64"),
    (dict(dtype="evil_module_xyz.float32"), ValueError, r"dtype must be float32 or float64"),
    (dict(dtype=None), ValueError, r"dtype must be float32 or float64 .*got None"),
    (dict(dtype=np.float16), ValueError, r"dtype must be float32 or float64"),
    (dict(gradient_routing="evil_module_xyz"), ValueError, r"gradient_routing must be one of"),
    (dict(gradient_routing=1), TypeError, r"gradient_routing must be one of"),
]


@pytest.mark.parametrize("residual", [False, True], ids=["vq", "rvq"])
@pytest.mark.parametrize("case", BAD_NAMES, ids=[str(c[0]) for c in BAD_NAMES])
def test_names_are_never_imported(case, residual, evil_module):
    kw, err, msg = case
    had_antigravity = "antigravity" in sys.modules
    with pytest.raises(err, match=msg):
        if residual:
            ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, **kw)
        else:
            VectorQuantize(D, K, **kw)
    module = VectorQuantize(D, K)
    if "xp" in kw:
        with pytest.raises(err, match=msg):
            module.to(kw["xp"])
    assert not evil_module.exists()
    assert ("antigravity" in sys.modules) == had_antigravity


def test_positional_arguments_are_never_dropped():
    with pytest.raises(TypeError, match=r"positional argument"):
        VectorQuantize(4, 8, 0.9, num_quantizers=2)
    with pytest.raises(TypeError, match=r"positional argument"):
        ResidualVQ(4, 2, 8)
    module = VectorQuantize(D, K, learnable_codebook=True, ema_update=False)
    module(data(1))
    with pytest.raises(TypeError, match=r"positional argument"):
        module.backward(data(2), 1.0, 2.0)


BAD_SEEDS = [(-1, ValueError), (1.5, TypeError), ("0", TypeError), (True, TypeError),
             (np.random.RandomState(0), TypeError), ([1, 2], TypeError), (np.float64(3.0), TypeError)]  # fmt: skip
CONSTRUCTORS = {
    "VectorQuantize": lambda seed: VectorQuantize(D, K, seed=seed),
    "VectorQuantize-stack": lambda seed: VectorQuantize(D, K, num_quantizers=Q, seed=seed),
    "ResidualVQ": lambda seed: ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=seed),
    "from_file": None,  # filled in the test (needs a file)
}


@pytest.mark.parametrize(
    "seed, err", BAD_SEEDS, ids=[type(s[0]).__name__ + ":" + str(i) for i, s in enumerate(BAD_SEEDS)]
)
@pytest.mark.parametrize("ctor", sorted(CONSTRUCTORS))
def test_every_constructor_names_a_bad_seed(ctor, seed, err, tmp_path):
    if ctor == "from_file":
        path = tmp_path / "m.npz"
        VectorQuantize(D, K, seed=0).save(str(path))
        make = lambda s: VectorQuantize.from_file(str(path), seed=s)  # noqa: E731
    else:
        make = CONSTRUCTORS[ctor]
    with pytest.raises(err, match=r"seed must be"):
        make(seed)


NUMPY_SCALARS = dict(
    dim=np.int32(D),
    codebook_size=np.int64(K),
    num_quantizers=np.int64(Q),
    decay=np.float32(0.9),
    eps=np.float64(1e-3),
    commitment_weight=np.int64(2),
    kmeans_iters=np.uint8(3),
    threshold_ema_dead_code=np.float32(0.5),
    kmeans_init=np.bool_(True),
)


@pytest.mark.parametrize("lib", LIBS)
def test_numpy_scalars_are_the_numbers_they_hold(lib):
    python = {k: v.item() for k, v in NUMPY_SCALARS.items()}
    a = ResidualVQ(**NUMPY_SCALARS, seed=0, xp=lib)
    b = ResidualVQ(**python, seed=0, xp=lib)
    assert a.config() == b.config()
    assert all(type(a.config()[k]) is type(b.config()[k]) for k in a.config())
    assert_same(snapshot(a), snapshot(b))
    single = VectorQuantize(D, K, seed=0, xp=lib, learnable_codebook=True, ema_update=False)
    for scalar in (np.int64(1), np.float32(0.5), np.float64(2.0), np.int8(3)):
        a(lib_array(a, data(1)))
        b(lib_array(b, data(1)))
        dq = lib_array(a, data(2))
        np.testing.assert_array_equal(host(a.backward(dq, dlosses=scalar)), host(b.backward(dq, dlosses=scalar.item())))
        single(lib_array(single, data(1)))
        twin = copy.deepcopy(single)
        dq = lib_array(single, data(2))
        np.testing.assert_array_equal(host(single.backward(dq, dloss=scalar)), host(twin.backward(dq, scalar.item())))
        np.testing.assert_array_equal(host(single.grads["codebook"]), host(twin.grads["codebook"]))
    single(lib_array(single, data(1)))
    with pytest.raises(TypeError, match=r"dloss must be a real number, got True"):
        single.backward(lib_array(single, data(2)), dloss=np.bool_(True))


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        (dict(dim=True), TypeError, r"dim must be an integer"),
        (dict(decay=True), TypeError, r"decay must be a real number"),
        (dict(dim=5.0), TypeError, r"dim must be an integer"),
        (dict(codebook_size="7"), TypeError, r"codebook_size must be an integer"),
        (dict(n_embed=np.array([K])), TypeError, r"n_embed must be an integer"),
        (dict(commitment=np.array([1.0])), TypeError, r"commitment must be a real number"),
        (dict(codebook_size=10**12), ValueError, r"exceeds 4294967296 elements"),
        (dict(num_quantizers=10**9), ValueError, r"num_quantizers must be <= 4096"),
        (dict(kmeans_iters=10**9), ValueError, r"kmeans_iters must be <= 10000"),
        (dict(decay=float("nan")), ValueError, r"decay must be finite"),
    ],
)
def test_numbers_are_numbers_within_their_ranges(kw, err, msg):
    args = dict(dim=D, codebook_size=K, num_quantizers=2)
    args.update(kw)
    with pytest.raises(err, match=msg):
        ResidualVQ(**args)


# ================================================================== 9. concurrency, pickling, copying


class _Gate:
    """Makes a wrapped core function wait inside a call until released (a deterministic overlap)."""

    def __init__(self, fn):
        self.fn, self.entered, self.release = fn, threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(10), "the test never released the gate"
        return self.fn(*args, **kwargs)


def _in_thread(fn) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_catch(fn)))
    thread.start()
    return thread, result


def _catch(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - reported to the main thread
        return e


def _every_commit(module, x, dq) -> list:
    name = learnable_name(module)
    state = module.state_dict()
    return [
        ("forward", lambda: module(x)),
        ("backward", lambda: module.backward(dq)),
        ("load_state_dict", lambda: module.load_state_dict(state)),
        ("params", lambda: module.params.__setitem__(name, module.params[name])),
        ("to", lambda: module.to(module.xp)),
    ]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("blocked", ["residual_forward", "residual_backward"])
def test_an_overlapping_call_raises_instead_of_losing_an_update(blocked, lib, monkeypatch):
    module, twin = build("vq-learnable", lib), build("vq-learnable", lib)
    x, dq = lib_array(module, data(1)), lib_array(module, data(2))
    if blocked == "residual_backward":
        module(x)
        twin(x)
    gate = _Gate(getattr(vq_module, blocked))
    monkeypatch.setattr(vq_module, blocked, gate)
    first = (lambda: module(x)) if blocked == "residual_forward" else (lambda: module.backward(dq))
    thread, result = _in_thread(first)
    assert gate.entered.wait(10)
    try:
        for name, call in _every_commit(module, x, dq):
            with pytest.raises(RuntimeError, match=r"already changing its state in another thread"):
                call()
    finally:
        gate.release.set()
        thread.join(10)
    assert not isinstance(result[0], BaseException), result[0]
    # the first call completed as if alone: the same state as a module that ran it alone
    monkeypatch.setattr(vq_module, blocked, gate.fn)
    twin(x) if blocked == "residual_forward" else twin.backward(dq)
    assert_same(snapshot(twin), snapshot(module))


def test_a_backward_holds_the_lock_from_the_moment_it_reads_its_cache(monkeypatch):
    """A backward paused while validating (after reading the cache) must keep a forward out:
    otherwise that forward commits a new cache, and the backward then consumes the old one
    and wipes the new one."""
    module = build("vq-learnable")
    module(data(1))  # the cache the backward reads
    gate = _Gate(Quantizer.check_input)
    monkeypatch.setattr(
        Quantizer,
        "check_input",
        lambda self, name, *a, **k: (gate if name == "dquantized" else gate.fn)(self, name, *a, **k),
    )
    thread, result = _in_thread(lambda: module.backward(data(2)))
    assert gate.entered.wait(10)
    try:
        with pytest.raises(RuntimeError, match=r"already changing its state in another thread"):
            module(data(3))
    finally:
        gate.release.set()
        thread.join(10)
    assert not isinstance(result[0], BaseException), result[0]
    assert module.state.cache is None  # consumed by the backward, and no forward slipped in


def test_without_the_lock_an_overlapping_forward_loses_an_update(monkeypatch):
    """Negative control: with the lock switched off, the second forward's update is lost."""
    import contextlib

    monkeypatch.setattr(Quantizer, "_exclusive", lambda self: contextlib.nullcontext())
    module, twin = build("vq-ste"), build("vq-ste")
    x1, x2 = data(1), data(2)
    gate = _Gate(vq_module.residual_forward)
    monkeypatch.setattr(vq_module, "residual_forward", gate)
    thread, result = _in_thread(lambda: module(x1))
    assert gate.entered.wait(10)
    monkeypatch.setattr(vq_module, "residual_forward", gate.fn)
    module(x2)  # no error: it commits, then the first forward overwrites it
    gate.release.set()
    thread.join(10)
    twin(x2)
    twin(x1)  # two sequential steps
    with pytest.raises(AssertionError):
        assert_same(snapshot(twin), snapshot(module))


def test_eval_from_another_thread_cannot_split_a_training_step(monkeypatch):
    module, twin = build("vq-kmeans-dead"), build("vq-kmeans-dead")
    x = data(1)
    gate = _Gate(vq_module.residual_forward)
    monkeypatch.setattr(vq_module, "residual_forward", gate)
    thread, result = _in_thread(lambda: module(x))
    assert gate.entered.wait(10)
    module.eval()  # mid-step: the step started in training mode and finishes in it
    gate.release.set()
    thread.join(10)
    monkeypatch.setattr(vq_module, "residual_forward", gate.fn)
    twin(x)
    twin.eval()
    assert_same(snapshot(twin), snapshot(module))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_pickle_round_trips_the_state_and_trains_on_identically(kind, lib):
    module = build(kind, lib, dtype="float32")
    train_steps(module, 2)
    restored = pickle.loads(pickle.dumps(module))
    assert type(restored) is type(module)
    assert restored.config() == module.config()
    a, b = snapshot(module), snapshot(restored)
    assert b["grads"] == {}  # gradients and a pending backward are not pickled (documented)
    a["grads"] = {}
    assert_same(a, b)
    assert_runs_equal(train_steps(module, 3, seed=5), train_steps(restored, 3, seed=5))
    assert_same(snapshot(module), snapshot(restored))
    # a pending backward is not kept by pickle: backward says so
    module(lib_array(module, data(1)))
    with pytest.raises(RuntimeError, match=r"needs a training-mode forward first"):
        pickle.loads(pickle.dumps(module)).backward(lib_array(module, data(2)))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["vq-learnable", "rvq-sum", "rvq-shared"])
def test_deepcopy_keeps_a_pending_backward_and_is_independent(kind, lib):
    module = build(kind, lib)
    train_steps(module, 1)
    module(lib_array(module, data(3)))
    twin = copy.deepcopy(module)
    assert_same(snapshot(module), snapshot(twin))
    dq = lib_array(module, data(4))
    np.testing.assert_array_equal(host(backward(module, dq)), host(backward(twin, dq)))
    # the copy trains on its own
    before = snapshot(module)
    train_steps(twin, 2, seed=9)
    assert_same(before, snapshot(module))


# ================================================================== the property, over every entry point


_settings = fuzz_settings


HOSTILE_KINDS = (
    "valid", "valid", "valid", "valid", "none", "int", "float", "bool", "str", "list", "object", "numpy-scalar",
    "extra-axis", "transposed", "empty", "zero-d", "nan", "inf", "huge64", "near-max", "float16",
    "int-array", "bool-array", "complex", "other-library",
)  # fmt: skip


@st.composite
def hostile(draw, module, shape: tuple, dtype: str | None = None):
    """A hostile stand-in for an array of ``shape`` (or, one time in ten, a valid one)."""
    kind = draw(st.sampled_from(HOSTILE_KINDS))
    gen = np.random.default_rng(draw(st.integers(0, 2**16)))
    good = gen.standard_normal(shape) * 2.0
    note(f"hostile {kind} for shape {shape}")
    lib = lambda a, dt=dtype: lib_array(module, a, dt)  # noqa: E731
    if kind == "valid":
        return lib(good)
    if kind in ("none", "int", "float", "bool", "str", "object"):
        return {"none": None, "int": 1, "float": 1.5, "bool": True, "str": "1.0", "object": object()}[kind]
    if kind == "list":
        return good.tolist()
    if kind == "numpy-scalar":
        return draw(st.sampled_from([np.float64(1.0), np.float32(2.0), np.int64(1), np.bool_(True)]))
    if kind == "extra-axis":
        return lib(good[None])
    if kind == "transposed":
        return lib(good.T if good.ndim == 2 else good.reshape(-1)[::-1].copy()[None])
    if kind == "empty":
        return lib(np.zeros((0,) + tuple(shape[1:])))
    if kind == "zero-d":
        return lib(np.asarray(1.0))
    if kind in ("nan", "inf"):
        bad = good.copy()
        bad.reshape(-1)[gen.integers(bad.size)] = np.nan if kind == "nan" else -np.inf
        return lib(bad)
    if kind == "huge64":
        return lib(good * 1e39, "float64")
    if kind == "near-max":
        return lib(np.sign(good) * 3e38)
    if kind in ("float16", "int-array", "bool-array"):
        bad = good.astype({"float16": np.float16, "int-array": np.int64, "bool-array": bool}[kind])
        return bad if kind == "float16" and not B.is_numpy(module.xp) else lib(bad, None)  # strict has no float16
    if kind == "complex":
        return good.astype(np.complex128)  # numpy only (array_api_strict has it too, numpy is enough)
    # an array of the other library
    other = "numpy" if B.library_name(next(iter(module.state.arrays.values()))) != "numpy" else "array_api_strict"
    return B.from_numpy(good, B.namespace_from_module(other))


ENTRY_POINTS = (
    "forward", "backward", "load_state_dict", "init_codebook", "params", "to", "files", "decode", "train",
)  # fmt: skip


@st.composite
def modules(draw, entry: str):
    kind = draw(st.sampled_from(sorted(KINDS)))
    lib = draw(st.sampled_from(LIBS))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    module = build(kind, lib, dtype=dtype, seed=draw(st.integers(0, 3)))
    setups = ["fresh", "trained", "pending", "eval"] + ["pending"] * (6 if entry == "backward" else 0)
    setup = draw(st.sampled_from(setups))
    note(f"module {kind} on {lib} {dtype}, {setup}")
    if setup != "fresh":
        train_steps(module, 1, seed=draw(st.integers(0, 3)))
    if setup == "pending":
        module(lib_array(module, data(7)))
    if setup == "eval":
        module.eval()
    return module


def _call(draw, module, entry: str, tmp: str):
    """Draw hostile arguments for ``entry``; return (call, the argument names a message may cite)."""
    if entry == "forward":
        lead = draw(st.sampled_from([(N,), (2, 3), (1,)]))
        x = draw(hostile(module, lead + (D,)))
        tau = draw(st.sampled_from([None, None, None, 0.5, 0.0, -1.0, float("nan"), "1", True, np.float32(2.0)]))
        return (lambda: module(x, sample_codebook_temp=tau)), ("x", "sample_codebook_temp")
    if entry == "backward":
        shape = module.state.cache[1] if module.state.cache is not None else (N, D)
        dq = draw(hostile(module, shape))
        dloss = draw(st.one_of(st.just(1.0), hostile(module, (Q,) if module.is_stack else ())))
        return (lambda: backward(module, dq, dloss)), ("dquantized", "dloss", "backward")
    if entry == "load_state_dict":
        state = {k: v for k, v in module.state_dict().items()}
        how = draw(st.sampled_from(["replace", "drop", "extra", "not-a-mapping", "flag"]))
        key = draw(st.sampled_from(sorted(state)))
        if how == "replace":
            shape = tuple(state[key].shape) if not key.endswith("initted") else ()
            state[key] = draw(hostile(module, shape))
        elif how == "drop":
            del state[key]
        elif how == "extra":
            state["evil"] = state[key]
        elif how == "flag":
            state[key] = draw(st.sampled_from([1, 0, "False", None, np.int64(2), 1.0]))
        else:
            state = draw(st.sampled_from([None, [1, 2], "state", 3]))
        return (lambda: module.load_state_dict(state)), (key, "evil", "state", "keys")
    if entry == "init_codebook":
        codebook = draw(hostile(module, (K, D)))
        counts = draw(st.one_of(st.none(), hostile(module, (K,))))
        return (lambda: module.init_codebook(codebook, counts)), ("codebook", "cluster_size", "embed_avg", "stack")
    if entry == "params":
        names = list(module.params) or ["codebook"]
        name = draw(st.sampled_from(names + ["evil"]))
        value = draw(hostile(module, (K, D)))
        return (lambda: module.params.__setitem__(name, value)), (name, "parameter")
    if entry == "to":
        xp = draw(st.sampled_from([None, "numpy", "array_api_strict", np, "cupy", "os", 42, "evil_module_xyz", os]))
        device = draw(st.sampled_from([None, None, "cpu", "gpu", 0, object()]))
        return (lambda: module.to(xp, device)), ("xp", "device")
    if entry == "files":
        # a file saved by some module (maybe this one's configuration, maybe another's), or no file
        saved = os.path.join(tmp, "saved.npz")
        build(draw(st.sampled_from(sorted(KINDS))), dtype=draw(st.sampled_from(["float32", "float64"]))).save(saved)
        path = draw(st.sampled_from([42, None, b"x", tmp, os.path.join(tmp, "missing.npz"), saved]))
        if draw(st.booleans()):
            return (lambda: module.load(path)), ("path", "readable", "configuration", "does not hold")
        return (lambda: type(module).from_file(path)), ("path", "readable", "configuration", "does not hold")
    if entry == "decode":
        shape = (4, Q) if module.is_stack else (4,)
        kind = draw(st.sampled_from(["valid", "negative", "large", "float", "list", "other", "empty", "shape"]))
        good = np.random.default_rng(0).integers(0, K, shape)
        idx = {
            "valid": lambda: lib_array(module, good, "int64"),
            "negative": lambda: lib_array(module, -good - 1, "int64"),
            "large": lambda: lib_array(module, good + K, "int64"),
            "float": lambda: lib_array(module, good.astype(float)),
            "list": lambda: good.tolist(),
            "other": lambda: draw(hostile(module, shape)),
            "empty": lambda: lib_array(module, np.zeros((0,) + shape[1:], dtype=np.int64), "int64"),
            "shape": lambda: lib_array(module, good[..., :1] if module.is_stack else good[:, None], "int64"),
        }[kind]()
        method = draw(st.sampled_from([module.get_codes_from_indices, module.get_output_from_indices]))
        return (lambda: method(idx)), ("indices",)
    mode = draw(st.sampled_from([True, False, 1, "False", None, np.bool_(False)]))
    return (lambda: module.train(mode)), ("mode", "train")


def _valid_state(module) -> None:
    for name, v in module.state_dict().items():
        assert np.all(np.isfinite(host(v))), f"state_dict[{name}] is not finite after a successful call"


@given(data=st.data())
@_settings(ci=450, nightly=6000)
def test_every_entry_point_either_refuses_cleanly_or_succeeds(data, tmp_path_factory):
    tmp = str(tmp_path_factory.getbasetemp())
    entry = data.draw(st.sampled_from(ENTRY_POINTS), label="entry")
    module = data.draw(modules(entry), label="module")
    call, names = _call(data.draw, module, entry, tmp)
    before = snapshot(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow on the way to a refusal
        warnings.filterwarnings("ignore", "You are comparing a array_api_strict dtype")
        try:
            result = call()
        except ALLOWED as e:
            message = str(e)
            note(f"refused: {type(e).__name__}: {message}")
            event(f"{entry}: refused ({type(e).__name__})")
            assert message, "an error without a message"
            assert any(n.lower() in message.lower() for n in names) or isinstance(e, RuntimeError), message
            assert_same(before, snapshot(module))
            return
    note(f"accepted, returned {type(result).__name__}")
    event(f"{entry}: accepted")
    _valid_state(module)
    if entry == "forward" and module.training:
        assert module.state.cache is not None


def test_constructor_property_smoke():
    """The constructors under hostile options (the property above covers built modules)."""

    @given(
        option=st.sampled_from(
            [
                "dim",
                "codebook_size",
                "decay",
                "eps",
                "commitment_weight",
                "kmeans_iters",
                "threshold_ema_dead_code",
                "orthogonal_reg_weight",
                "chunk_size",
                "seed",
                "dtype",
                "xp",
                "use_cosine_sim",
                "gradient_routing",
                "num_quantizers",
                "sample_codebook_temp",
                "straight_through",
                "codebook_diversity_loss_weight",
                "codebook_diversity_temperature",
            ]
        ),  # fmt: skip
        value=st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-3, 40),
            st.just(10**13),
            st.floats(allow_nan=True),
            st.text(max_size=5),
            st.sampled_from([np.int64(3), np.float32(0.5), np.bool_(True), [1], object()]),
        ),
        residual=st.booleans(),
    )
    @_settings(ci=200, nightly=3000)
    def check(option, value, residual):
        kw = {option: value}
        try:
            if residual:
                ResidualVQ(**{"dim": D, "codebook_size": K, "num_quantizers": 2, **kw})
            else:
                VectorQuantize(**{"dim": D, "codebook_size": K, **kw})
        except (ValueError, TypeError) as e:
            assert option in str(e) or "seed" in str(e) or "dtype" in str(e), str(e)

    check()
