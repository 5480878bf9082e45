"""Integrity of the nn kit (docs/reliability.md, "The nn kit"): calls that change everything or
nothing, NaN that is never turned into a number, and caches no caller can change.

1. Transactions.  ``MLP.load_state_dict``, ``VQVAE.load_state_dict``, ``SGD.step``/``Adam.step``,
   ``Linear``/``MLP``/``VQVAE.forward`` and ``VQVAE.backward`` either succeed completely or leave
   every parameter, gradient, optimizer moment and step count, the quantizer's state and the
   pending backward exactly as they were.  "The pending backward" is checked by what the model
   does next: after a refused call, a model continues bit for bit like a twin that never saw it.
2. NaN.  ``relu(NaN) = NaN`` (and its derivative is NaN), tanh likewise; the forwards refuse
   non-finite inputs before anything runs.
3. Caches.  Changing the input or a returned output in place between forward and backward
   changes no gradient (Linear, ReLU, tanh, MSE, MLP, VQVAE).
4. The numbers are those of before: each backward is compared bit for bit with its formula.

Negative controls.  Every test below failed on the code before this change; each says how in a
``Before:`` line (the report of the change lists the failures, run against the old files).
The hypothesis properties at the end throw hostile arguments at the same entry points.
"""

from __future__ import annotations

import math

import array_api_strict
import numpy as np
import pytest
from conftest import fuzz_settings
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.nn import (
    MLP,
    SGD,
    Adam,
    Linear,
    linear_backward,
    linear_forward,
    mse_loss_backward,
    mse_loss_forward,
    relu_backward,
    relu_forward,
    tanh_backward,
    tanh_forward,
)
from vqref.nn.vqvae import VQVAE
from vqref.ops import losses

# Distinct sizes: N images, P pixels, H hidden, T tokens, d token dim, K codes.
N, P, H, T, D, K = 7, 10, 9, 3, 4, 5
SIZES = [6, 9, 5, 4]
STRICT = B.namespace_from_module(array_api_strict)

QUANTIZERS = {
    "ema": lambda dtype: VectorQuantize(D, K, decay=0.8, commitment_weight=0.25, seed=3, dtype=dtype),
    "learnable": lambda dtype: VectorQuantize(
        D, K, ema_update=False, learnable_codebook=True, codebook_weight=1.0, seed=3, dtype=dtype
    ),
    "residual": lambda dtype: ResidualVQ(dim=D, codebook_size=K, num_quantizers=2, decay=0.8, seed=3, dtype=dtype),
}

# ------------------------------------------------------------------ profiles (as in test_fuzz.py)

_EXAMPLES = {"step": (150, 2000), "load": (120, 1500), "forward": (120, 1500), "mutation": (120, 1500)}


def _settings(kind: str) -> settings:
    return fuzz_settings(*_EXAMPLES[kind])


# ------------------------------------------------------------------ helpers


def _host(a):
    return np.array(B.to_numpy(a), copy=True)


def _bits(a) -> tuple:
    h = _host(a)
    return h.dtype.str, h.shape, h.tobytes()


def _fingerprint(model=None, opt=None) -> dict:
    """Everything a refused call must leave alone, as bytes: parameters, gradients, the
    quantizer's state and generators, the optimizer's moments and step counts."""
    fp: dict = {}
    if model is not None:
        fp.update({("param", k): _bits(v) for k, v in model.params.items()})
        fp.update({("grad", k): _bits(v) for k, v in model.grads.items()})
        q = getattr(model, "quantizer", None)
        if q is not None:
            fp.update({("quantizer", k): _bits(v) for k, v in q.state_dict().items()})
            fp["quantizer rngs"] = repr([g.bit_generator.state for g in q.state.rngs])
    if opt is not None:
        for key, st in opt.state.items():
            for name, v in st.items():
                fp[("opt", key, name)] = _bits(v) if B.is_array(v) else v
    return fp


def _data(seed: int, shape: tuple, dtype: str = "float64", xp=np):
    ns = B.namespace_from_module(xp)
    return B.from_numpy(np.random.default_rng(seed).random(shape), ns, dtype=getattr(ns, dtype))


def _vqvae_setup(kind: str = "ema", dtype: str = "float32", hidden=H):
    """A VQ-VAE and its Adam after one full step, with a second forward pending its backward."""
    model = VQVAE(QUANTIZERS[kind](dtype), in_dim=P, hidden=hidden, num_tokens=T, rng=0, dtype=dtype)
    opt = Adam(model.params, lr=1e-2)
    model.forward(_data(1, (N, P), dtype))
    model.backward()
    opt.step(model.grads)
    model.forward(_data(2, (N, P), dtype))  # pending
    return model, opt


def _vqvae_next(model, opt, dtype: str = "float32") -> list:
    """What the model does next: the pending backward, a step, another forward and backward."""
    out = [_host(model.backward(0.7))] + [_host(g) for g in model.grads.values()]
    opt.step(model.grads)
    recon, indices, losses_ = model.forward(_data(3, (N, P), dtype))
    out += [_host(recon), _host(indices), _host(losses_.total), _host(model.backward())]
    return out + [_host(v) for v in model.params.values()]


def _mlp_setup(dtype: str = "float64", xp=np, activation: str = "relu", opt_cls=Adam):
    net = MLP(SIZES, activation=activation, rng=0, dtype=dtype, xp=xp, init="fan_in")
    opt = opt_cls(net.params, lr=1e-2, **({"momentum": 0.9} if opt_cls is SGD else {}))
    net.forward(_data(1, (N, SIZES[0]), dtype, xp))
    net.backward(_data(2, (N, SIZES[-1]), dtype, xp))
    opt.step(net.grads)
    net.forward(_data(3, (N, SIZES[0]), dtype, xp))  # pending
    return net, opt


def _mlp_next(net, opt, dtype: str = "float64", xp=np) -> list:
    out = [_host(net.backward(_data(4, (N, SIZES[-1]), dtype, xp)))] + [_host(g) for g in net.grads.values()]
    opt.step(net.grads)
    out.append(_host(net.forward(_data(5, (N, SIZES[0]), dtype, xp))))
    out.append(_host(net.backward(_data(6, (N, SIZES[-1]), dtype, xp))))
    return out + [_host(v) for v in net.params.values()]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


def _assert_refused_and_unchanged(call, model, opt, twin, twin_opt, next_fn, exc=(ValueError, TypeError, KeyError)):
    """``call()`` raises; the model is bit-identical to its twin, now and in what it does next."""
    with pytest.raises(exc):
        call()
    assert _fingerprint(model, opt) == _fingerprint(twin, twin_opt)
    assert _same(next_fn(model, opt), next_fn(twin, twin_opt))


# ============================================================================================
# 1. Transactions
# ============================================================================================


@pytest.mark.parametrize("bad", ["overflow-last", "nan-last", "shape-last", "text-last", "missing", "extra"])
def test_mlp_load_state_dict_is_all_or_nothing(bad):
    """Before: a float64 entry beyond float32's range in the last layer became inf in the cast,
    and the layer refused it only after the first layers had been replaced."""
    net, opt = _mlp_setup("float32")
    twin, twin_opt = _mlp_setup("float32")
    state = MLP(SIZES, rng=9, dtype="float64").state_dict()  # other weights in every layer
    last = f"{len(SIZES) - 2}.W"
    if bad == "overflow-last":
        state[last] = state[last] * 1e40
    elif bad == "nan-last":
        state[last][0, 0] = np.nan
    elif bad == "shape-last":
        state[last] = state[last].T
    elif bad == "text-last":
        state[last] = np.full(state[last].shape, "a")
    elif bad == "missing":
        del state[last]
    else:
        state["9.W"] = state[last]
    _assert_refused_and_unchanged(lambda: net.load_state_dict(state), net, opt, twin, twin_opt, _mlp_next)


@pytest.mark.parametrize(
    "bad", ["quantizer-nan", "quantizer-negative-count", "quantizer-missing", "quantizer-flag", "decoder-shape"]
)
def test_vqvae_load_state_dict_is_all_or_nothing(bad):
    """Before: the encoder (and the decoder) were loaded first, then the quantizer refused its
    entry: the model was left half replaced."""
    model, opt = _vqvae_setup()
    twin, twin_opt = _vqvae_setup()
    state = VQVAE(QUANTIZERS["ema"]("float32"), in_dim=P, hidden=H, num_tokens=T, rng=7).state_dict()
    state = {k: np.array(v, copy=True) for k, v in state.items()}
    if bad == "quantizer-nan":
        state["quantizer.codebook"][1, 2] = np.nan
    elif bad == "quantizer-negative-count":
        state["quantizer.cluster_size"][0] = -1.0
    elif bad == "quantizer-missing":
        del state["quantizer.embed_avg"]
    elif bad == "quantizer-flag":
        state["quantizer.initted"] = np.asarray(0.5)
    else:
        state["decoder.1.W"] = state["decoder.1.W"][:, :-1]
    _assert_refused_and_unchanged(lambda: model.load_state_dict(state), model, opt, twin, twin_opt, _vqvae_next)


def test_vqvae_load_state_dict_loads_everything():
    model, _ = _vqvae_setup()
    other = VQVAE(QUANTIZERS["ema"]("float32"), in_dim=P, hidden=H, num_tokens=T, rng=7)
    other.forward(_data(8, (N, P), "float32"))
    model.load_state_dict(other.state_dict())
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
    with pytest.raises(RuntimeError):  # a load drops the pending backward
        model.backward()


POISONS = ["nan", "inf", "shape", "int", "bool", "library", "list"]


def _poisoned(kind: str, g, xp=np):
    """A bad gradient for a parameter like ``g`` (a numpy or array_api_strict array)."""
    h = _host(g)
    if kind == "nan":
        h.flat[h.size // 2] = np.nan
    elif kind == "inf":
        h.flat[-1] = -np.inf
    elif kind == "shape":
        return B.from_numpy(np.append(h.ravel(), 0.0), B.namespace_from_module(xp), dtype=g.dtype)
    elif kind == "int":
        return B.from_numpy(h.astype(np.int64), B.namespace_from_module(xp))
    elif kind == "bool":
        return B.from_numpy(h > 0, B.namespace_from_module(xp))
    elif kind == "library":
        other = array_api_strict if xp is np else np
        return B.from_numpy(h, B.namespace_from_module(other))
    elif kind == "list":
        return h.tolist()
    return B.from_numpy(h, B.namespace_from_module(xp), dtype=g.dtype)


def _dict_setup(opt_cls, xp=np, dtype="float64"):
    gen = np.random.default_rng(0)
    ns = B.namespace_from_module(xp)
    shapes = {"a": (5, 3), "b": (3,), "c": (7, 2)}
    params = {k: B.from_numpy(gen.standard_normal(s), ns, dtype=getattr(ns, dtype)) for k, s in shapes.items()}
    kw = {"momentum": 0.9, "weight_decay": 0.1} if opt_cls is SGD else {"weight_decay": 0.1}
    opt = opt_cls(params, lr=0.05, **kw)
    grads = {k: B.from_numpy(gen.standard_normal(s), ns, dtype=getattr(ns, dtype)) for k, s in shapes.items()}
    opt.step(grads)  # the moments exist
    return params, opt, grads


def _dict_fingerprint(params, opt) -> dict:
    fp = {("param", k): _bits(v) for k, v in params.items()}
    return {**fp, **_fingerprint(None, opt)}


@pytest.mark.parametrize("opt_cls", [SGD, Adam])
@pytest.mark.parametrize("kind", POISONS)
def test_optimizer_step_is_all_or_nothing(opt_cls, kind):
    """Before: ``a`` and ``b`` were updated (and their moments and step counts advanced) before
    the shape of ``c``'s gradient was refused; NaN, inf, integer, boolean and foreign-library
    gradients were not refused at all (NaN went into the parameters and the moments)."""
    params, opt, grads = _dict_setup(opt_cls)
    before = _dict_fingerprint(params, opt)
    bad = {**grads, "c": _poisoned(kind, grads["c"])}
    with pytest.raises((ValueError, TypeError)):
        opt.step(bad)
    assert _dict_fingerprint(params, opt) == before


@pytest.mark.parametrize("opt_cls", [SGD, Adam])
def test_optimizer_step_through_an_mlp_is_all_or_nothing(opt_cls):
    """The same through live parameters (each write checked by its layer).  Before: the first
    layer was updated, then the NaN gradient of the last layer was written into the moments
    and the parameter was refused by its layer half-way through the step."""
    net, opt = _mlp_setup(opt_cls=opt_cls)
    twin, twin_opt = _mlp_setup(opt_cls=opt_cls)
    grads = {k: _host(v) for k, v in net.grads.items()}
    grads["2.b"][0] = np.nan
    _assert_refused_and_unchanged(lambda: opt.step(grads), net, opt, twin, twin_opt, _mlp_next)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("target", ["dict", "mlp"])
def test_optimizer_refuses_a_step_that_overflows(target):
    """A finite gradient and a huge learning rate: the new value would be inf in float32.
    Before: the plain dict received inf silently; the MLP's first layers were updated before
    the last one refused its value."""
    if target == "dict":
        params = {"a": np.ones((5, 3), np.float32), "b": np.ones(3, np.float32)}
        opt = SGD(params, lr=1e37)
        grads = {"a": np.ones((5, 3), np.float32), "b": np.full(3, 100.0, np.float32)}
        before = _dict_fingerprint(params, opt)
        with pytest.raises(ValueError, match="NaN or infinite"):
            opt.step(grads)
        assert _dict_fingerprint(params, opt) == before
    else:
        net = MLP(SIZES, rng=0, dtype="float32")
        net.forward(_data(1, (N, SIZES[0]), "float32"))
        net.backward(_data(2, (N, SIZES[-1]), "float32"))
        opt = SGD(net.params, lr=10.0)
        grads = {k: v for k, v in net.grads.items()}
        grads["2.b"] = np.full(SIZES[-1], 3e38, np.float32)
        before = _fingerprint(net, opt)
        with pytest.raises(ValueError, match="NaN or infinite"):
            opt.step(grads)
        assert _fingerprint(net, opt) == before


def test_optimizer_state_is_replaced_not_changed_in_place():
    """A step replaces the state; the arrays it keeps are its own.  Before: ``state[...]`` was
    updated in place, and SGD's first velocity was the caller's gradient array itself, so
    changing that array later changed the optimizer's momentum."""
    params, opt, grads = _dict_setup(SGD)

    def contents(state):
        return {k: {n: _bits(v) for n, v in s.items()} for k, s in state.items()}

    old_state = opt.state
    old = contents(old_state)
    opt.step(grads)
    assert contents(opt.state) != old  # the step moved the velocities ...
    assert contents(old_state) == old  # ... in a new state: the one read before is as it was

    fresh = {"a": np.zeros((5, 3))}
    sgd = SGD(fresh, lr=0.1, momentum=0.9)
    gradient = np.ones((5, 3))
    sgd.step({"a": gradient})
    gradient[...] = 1e6  # the caller reuses its buffer
    np.testing.assert_array_equal(sgd.state[(0, "a")]["velocity"], np.ones((5, 3)))


def test_gradient_for_an_unknown_name_is_refused():
    """Before: a misspelt gradient name was skipped silently (its parameter never trained)."""
    params, opt, grads = _dict_setup(Adam)
    before = _dict_fingerprint(params, opt)
    with pytest.raises(KeyError, match="cc"):
        opt.step({**grads, "cc": grads["c"]})
    assert _dict_fingerprint(params, opt) == before


@pytest.mark.parametrize(
    "cls,kwargs,exc,name",
    [
        (SGD, dict(lr=math.nan), ValueError, "lr"),
        (SGD, dict(lr=math.inf), ValueError, "lr"),
        (SGD, dict(lr=-0.1), ValueError, "lr"),
        (SGD, dict(lr=True), TypeError, "lr"),
        (SGD, dict(lr="0.1"), TypeError, "lr"),
        (SGD, dict(lr=0.1, momentum=1.0), ValueError, "momentum"),
        (SGD, dict(lr=0.1, momentum=-0.5), ValueError, "momentum"),
        (SGD, dict(lr=0.1, momentum=math.nan), ValueError, "momentum"),
        (SGD, dict(lr=0.1, momentum=True), TypeError, "momentum"),
        (SGD, dict(lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay"),
        (SGD, dict(lr=0.1, weight_decay=math.inf), ValueError, "weight_decay"),
        (Adam, dict(lr=math.nan), ValueError, "lr"),
        (Adam, dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (Adam, dict(betas=(0.9, math.nan)), ValueError, r"betas\[1\]"),
        (Adam, dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (Adam, dict(betas=(0.9,)), TypeError, "betas"),
        (Adam, dict(betas=(False, 0.9)), TypeError, r"betas\[0\]"),
        (Adam, dict(eps=0.0), ValueError, "eps"),
        (Adam, dict(eps=-1e-8), ValueError, "eps"),
        (Adam, dict(eps=math.inf), ValueError, "eps"),
        (Adam, dict(eps=True), TypeError, "eps"),
        (Adam, dict(weight_decay=math.nan), ValueError, "weight_decay"),
    ],
)
def test_optimizer_hyperparameters_are_checked(cls, kwargs, exc, name):
    """Before: NaN passed every ``x < 0`` test, inf and bools were accepted, eps = 0 was allowed
    (0/0 for a parameter whose gradient is still 0), and the messages did not name the argument."""
    with pytest.raises(exc, match=name):
        cls({"W": np.zeros((2, 3))}, **kwargs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: overflow in the encoder
@pytest.mark.parametrize("batch", ["empty", "overflow"])
def test_vqvae_forward_that_fails_in_the_quantizer_keeps_the_pending_backward(batch):
    """The encoder runs, then the quantizer refuses the tokens: an empty batch, or finite images
    on which the encoder overflows float32 (a hidden unit whose weights are all 1e38, so its
    value is +inf and every token is infinite).  Before: the encoder had already replaced its
    cache, so the pending backward then differentiated the encoder at the refused batch (for the
    empty batch: a shape error; for the overflowing one: a step the layers refused half-way)."""
    model, opt = _vqvae_setup()
    twin, twin_opt = _vqvae_setup()
    W0 = _host(model.params["encoder.0.W"])
    x = np.zeros((0, P), np.float32)
    if batch == "overflow":
        huge = W0.copy()
        huge[:, 0] = 1e38
        for m in (model, twin):
            m.params["encoder.0.W"] = huge
        x = np.full((N, P), 3e38, np.float32)

    def restore_then_next(m, o):
        m.params["encoder.0.W"] = W0
        return _vqvae_next(m, o)

    _assert_refused_and_unchanged(lambda: model.forward(x), model, opt, twin, twin_opt, restore_then_next, ValueError)


@pytest.mark.parametrize("bad", ["drecon-shape", "drecon-nan", "dloss-nan", "dloss-vector", "dloss-text"])
def test_vqvae_refused_backward_keeps_the_pending_backward(bad):
    """Before: the pending cache was taken (and dropped) before anything was checked, so after a
    refused ``drecon`` the real backward raised "needs a training-mode forward"."""
    model, opt = _vqvae_setup()
    twin, twin_opt = _vqvae_setup()
    kwargs = {
        "drecon-shape": dict(drecon=np.ones((N, P + 1), np.float32)),
        "drecon-nan": dict(drecon=np.full((N, P), np.nan, np.float32)),
        "dloss-nan": dict(dloss=math.nan),
        "dloss-vector": dict(dloss=np.ones(2, np.float32)),
        "dloss-text": dict(dloss="1"),
    }[bad]
    _assert_refused_and_unchanged(lambda: model.backward(**kwargs), model, opt, twin, twin_opt, _vqvae_next)


def test_decode_indices_between_forward_and_backward_changes_nothing():
    """Before: ``decode_indices`` ran ``decoder.forward``, which replaced the decoder's cache of
    the pending training forward with that of the decoded batch."""
    model, opt = _vqvae_setup()
    twin, twin_opt = _vqvae_setup()
    indices = np.zeros((N + 2, T), dtype=np.int64)
    assert model.decode_indices(indices).shape == (N + 2, P)
    assert _same(_vqvae_next(model, opt), _vqvae_next(twin, twin_opt))


# ============================================================================================
# 2. NaN is never turned into a number
# ============================================================================================


def test_relu_propagates_nan(bk):
    """Before: ``relu_forward`` mapped NaN to 0 (``where(x > 0, x, 0)``) and its gradient to 0."""
    x_h = np.array([[np.nan, 2.0, -3.0, 0.0], [-0.0, np.inf, -np.inf, 0.5]])
    y, cache = relu_forward(bk.asarray(x_h))
    want = np.array([[np.nan, 2.0, 0.0, 0.0], [0.0, np.inf, 0.0, 0.5]])
    np.testing.assert_array_equal(bk.np(y), want)  # NaN where NaN, nowhere else
    dy_h = np.array([[1.5, -2.0, 3.0, 4.0], [5.0, 6.0, 7.0, -8.0]])
    dx = bk.np(relu_backward(bk.asarray(dy_h), cache))
    np.testing.assert_array_equal(dx, [[np.nan, -2.0, 0.0, 0.0], [0.0, 6.0, 0.0, -8.0]])


def test_tanh_propagates_nan(bk):
    """tanh(NaN) = NaN and so is its derivative; tanh(+-inf) = +-1 with derivative 0."""
    x_h = np.array([[np.nan, np.inf, -np.inf, 0.25]])
    y, cache = tanh_forward(bk.asarray(x_h))
    np.testing.assert_allclose(bk.np(y), [[np.nan, 1.0, -1.0, np.tanh(0.25)]], rtol=bk.rtol)  # NaN matches NaN only
    dx = bk.np(tanh_backward(bk.asarray(np.full((1, 4), 2.0)), cache))
    np.testing.assert_allclose(dx, [[np.nan, 0.0, 0.0, 2.0 * (1 - np.tanh(0.25) ** 2)]], rtol=bk.rtol)
    assert np.isnan(dx[0, 0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: overflow and inf - inf in the encoder
def test_a_nan_inside_the_encoder_reaches_the_quantizer_and_nothing_is_committed():
    """An encoder with two hidden layers, on finite images: the first layer overflows to +inf in
    two units, and the second computes inf - inf = NaN, which enters the second ReLU.  Before:
    that ReLU turned the NaN into 0, the quantizer saw finite tokens and committed its EMA step,
    and the model trained on without a word.  Now the NaN reaches the quantizer, which refuses it."""
    model, opt = _vqvae_setup(dtype="float64", hidden=[H, H])
    twin, twin_opt = _vqvae_setup(dtype="float64", hidden=[H, H])
    W0, W1 = _host(model.params["encoder.0.W"]), _host(model.params["encoder.1.W"])
    huge0, huge1 = W0.copy(), W1.copy()
    huge0[:, :2] = 1e308  # hidden units 0 and 1: positive terms only, their sum overflows to +inf
    huge1[0, :], huge1[1, :] = 1.0, -1.0  # every unit of the second layer: inf - inf
    for m in (model, twin):
        m.params["encoder.0.W"], m.params["encoder.1.W"] = huge0, huge1
    x = np.full((N, P), 10.0)
    h0 = x @ huge0 + _host(model.params["encoder.0.b"])
    h1 = np.maximum(h0, 0.0) @ huge1 + _host(model.params["encoder.1.b"])
    assert np.isinf(h0[:, :2]).all() and np.isnan(h1).all()  # what the second ReLU receives

    def restore_then_next(m, o):  # back to ordinary weights, then the pending backward and a step
        m.params["encoder.0.W"], m.params["encoder.1.W"] = W0, W1
        return _vqvae_next(m, o, "float64")

    _assert_refused_and_unchanged(lambda: model.forward(x), model, opt, twin, twin_opt, restore_then_next, ValueError)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("target", ["linear", "mlp", "vqvae"])
def test_forwards_refuse_non_finite_inputs(target, value):
    """Before: Linear and MLP computed on (ReLU hid the NaN); the VQ-VAE ran its encoder, replacing
    its cache, before the quantizer refused the tokens."""
    if target == "vqvae":
        model, opt = _vqvae_setup()
        twin, twin_opt = _vqvae_setup()
        x, nxt = _host(_data(9, (N, P), "float32")), _vqvae_next
    elif target == "mlp":
        model, opt = _mlp_setup()
        twin, twin_opt = _mlp_setup()
        x, nxt = _host(_data(9, (N, SIZES[0]))), _mlp_next
    else:
        model, twin = Linear(SIZES[0], 3, rng=0, dtype="float64"), Linear(SIZES[0], 3, rng=0, dtype="float64")
        opt, twin_opt = SGD(model.params, lr=0.1), SGD(twin.params, lr=0.1)
        for m in (model, twin):
            m.forward(_data(1, (N, SIZES[0])))

        def nxt(m, o):
            dx = m.backward(_data(2, (N, 3)))
            return [_host(dx), *(_host(g) for g in m.grads.values())]

        x = _host(_data(9, (N, SIZES[0])))
    x[2, 1] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.forward(x)
    assert _fingerprint(model, opt) == _fingerprint(twin, twin_opt)
    assert _same(nxt(model, opt), nxt(twin, twin_opt))


def test_forwards_refuse_the_wrong_kind_of_input():
    net = MLP(SIZES, rng=0, dtype="float64")
    model = VQVAE(QUANTIZERS["ema"]("float64"), in_dim=P, hidden=H, num_tokens=T, rng=0, dtype="float64")
    for call, width in ((net.forward, SIZES[0]), (net.layers[0].forward, SIZES[0]), (model.forward, P)):
        with pytest.raises(TypeError, match="array"):
            call(np.zeros((N, width)).tolist())
        with pytest.raises(TypeError, match="array_api_strict"):
            call(STRICT.zeros((N, width)))
        with pytest.raises(TypeError, match="floating"):
            call(np.zeros((N, width), dtype=np.int64))
        with pytest.raises(ValueError, match="shape"):
            call(np.zeros((N, width + 1)))
        with pytest.raises(ValueError, match="shape"):
            call(np.zeros(width))


# ============================================================================================
# 3. Caches no caller can change
# ============================================================================================


def _pair_case(op: str, gen):
    """``(forward, backward, inputs, dout)`` for one pair, with host float64 inputs."""
    x = gen.standard_normal((N, 5))
    if op == "linear":
        return linear_forward, linear_backward, [x, gen.standard_normal((5, 3)), gen.standard_normal(3)], (N, 3)
    if op == "relu":
        return relu_forward, relu_backward, [x], (N, 5)
    if op == "tanh":
        return tanh_forward, tanh_backward, [x], (N, 5)
    return mse_loss_forward, mse_loss_backward, [x, gen.standard_normal((N, 5))], ()


@pytest.mark.parametrize("op", ["linear", "relu", "tanh", "mse"])
def test_pair_caches_hold_their_own_arrays(op, rng):
    """Overwrite every input and the output in place between forward and backward.  Before:
    LinearCache held x and W, TanhCache the returned y, and the MSE cache pred and target,
    all by reference, so the gradients changed (ReLU's mask was already its own)."""
    fwd, bwd, inputs, dshape = _pair_case(op, rng)
    dout = rng.standard_normal(dshape) if dshape else 1.3
    want = bwd(dout, fwd(*[a.copy() for a in inputs])[1])
    out, cache = fwd(*inputs)
    for a in inputs:
        a[...] = 7.0
    if dshape:
        out[...] = -3.0
    got = bwd(dout, cache)
    for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        np.testing.assert_array_equal(g, w)


def test_linear_facade_cache_holds_its_own_input(rng):
    """Before: ``x[...] = 0`` after ``Linear.forward`` changed ``grads["W"]``."""
    a, b = Linear(5, 3, rng=0, dtype="float64"), Linear(5, 3, rng=0, dtype="float64")
    x, dy = rng.standard_normal((N, 5)), rng.standard_normal((N, 3))
    b.forward(x.copy())
    y = a.forward(x)
    x[...] = 0.0
    y[...] = 0.0
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    for k in ("W", "b"):
        np.testing.assert_array_equal(a.grads[k], b.grads[k])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_cache_holds_its_own_arrays(activation, rng):
    """Before: the first layer's cache was the caller's x, so mutating it changed ``0.W``'s gradient."""
    a = MLP(SIZES, activation=activation, rng=0, dtype="float64", init="fan_in")
    b = MLP(SIZES, activation=activation, rng=0, dtype="float64", init="fan_in")
    x, dout = rng.standard_normal((N, SIZES[0])), rng.standard_normal((N, SIZES[-1]))
    b.forward(x.copy())
    out = a.forward(x)
    x[...] = 5.0
    out[...] = -5.0
    np.testing.assert_array_equal(a.backward(dout), b.backward(dout))
    for k in b.grads:
        np.testing.assert_array_equal(a.grads[k], b.grads[k])


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_vqvae_caches_hold_their_own_arrays(kind, rng):
    """Mutate the images and the reconstruction between forward and backward.  Before: the MSE
    cache held both (the reconstruction gradient changed) and the encoder's cache held x."""
    a = VQVAE(QUANTIZERS[kind]("float64"), in_dim=P, hidden=H, num_tokens=T, rng=0, dtype="float64")
    b = VQVAE(QUANTIZERS[kind]("float64"), in_dim=P, hidden=H, num_tokens=T, rng=0, dtype="float64")
    x = rng.random((N, P))
    b.forward(x.copy())
    recon, _, _ = a.forward(x)
    x[...] = 0.5
    recon[...] = 9.0
    np.testing.assert_array_equal(a.backward(0.9), b.backward(0.9))
    assert sorted(a.grads) == sorted(b.grads)
    for k in b.grads:
        np.testing.assert_array_equal(a.grads[k], b.grads[k])


# ============================================================================================
# 4. The numbers are those of before
# ============================================================================================


@pytest.mark.parametrize("block", [None, 7 * 5])
def test_backwards_equal_their_formulas_bit_for_bit(bk, rng, block, monkeypatch):
    """Each backward against the expression the code had before the caches changed."""
    if block is not None:
        monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", block)  # the op's blocked backward: several blocks
    xp = bk.xp
    for n, din, dout in [(1, 3, 2), (23, 5, 4), (40, 64, 17)]:
        x, W, b = bk.asarray(rng.standard_normal((n, din))), bk.asarray(rng.standard_normal((din, dout))), None
        b = bk.asarray(rng.standard_normal(dout))
        dy, t = bk.asarray(rng.standard_normal((n, dout))), bk.asarray(rng.standard_normal((n, din)))
        dx, dW, db = linear_backward(dy, linear_forward(x, W, b)[1])
        for got, want in ((dx, dy @ W.mT), (dW, x.mT @ dy), (db, xp.sum(dy, axis=0))):
            np.testing.assert_array_equal(bk.np(got), bk.np(want))
        dh = bk.asarray(rng.standard_normal((n, din)))
        want = xp.where(x > 0, dh, xp.zeros_like(dh))
        np.testing.assert_array_equal(bk.np(relu_backward(dh, relu_forward(x)[1])), bk.np(want))
        y = xp.tanh(x)
        np.testing.assert_array_equal(bk.np(tanh_backward(dh, tanh_forward(x)[1])), bk.np(dh * (1.0 - y * y)))
        for dloss in (1.0, 0.37, bk.asarray(np.asarray(2.5))):
            got = mse_loss_backward(dloss, mse_loss_forward(x, t)[1])
            want = losses.mse_backward(dloss, losses.mse_forward(x, t)[1])[0]  # the op the quantizers use
            np.testing.assert_array_equal(bk.np(got), bk.np(want))
        np.testing.assert_array_equal(bk.np(mse_loss_forward(x, t)[0]), bk.np(losses.mse_forward(x, t)[0]))


# ============================================================================================
# 5. Hypothesis: hostile arguments at every entry point
# ============================================================================================

GOOD_GRADIENTS = ["ok", "none", "other-float"]


def _gradient(kind: str, g, xp):
    if kind == "none":
        return None
    if kind == "other-float":
        ns = B.namespace_from_module(xp)
        return B.from_numpy(_host(g), ns, dtype=ns.float32 if _host(g).dtype == np.float64 else ns.float64)
    return _poisoned(kind, g, xp) if kind != "ok" else g


@_settings("step")
@given(
    target=st.sampled_from(["dict", "mlp", "vqvae"]),
    opt_cls=st.sampled_from([SGD, Adam]),
    strict=st.booleans(),
    dtype=st.sampled_from(["float32", "float64"]),
    kinds=st.lists(st.sampled_from(GOOD_GRADIENTS), min_size=10, max_size=10),
    poisons=st.lists(st.tuples(st.integers(0, 9), st.sampled_from(POISONS)), max_size=3),
    unknown=st.booleans(),
)
def test_hostile_optimizer_steps(target, opt_cls, strict, dtype, kinds, poisons, unknown):
    """A random subset of gradients poisoned (NaN, inf, wrong shape, integer or boolean dtype,
    another library, a list, an unknown name): the step is refused exactly when something is
    wrong, and then every parameter, moment and step count is bit-identical."""
    xp = array_api_strict if strict and target != "vqvae" else np
    if target == "dict":
        params, opt, grads = _dict_setup(opt_cls, xp, dtype)
        owner = None
    elif target == "mlp":
        owner, opt = _mlp_setup(dtype, xp, opt_cls=opt_cls)
        params, grads = owner.params, dict(owner.grads.items())
    else:
        owner, _ = _vqvae_setup("learnable", dtype)
        opt = opt_cls(owner.params, lr=1e-2)
        opt.step(owner.grads)
        params, grads = owner.params, dict(owner.grads.items())
    names = sorted(grads)
    for i, poison in poisons:  # a random subset of the gradients poisoned, usually a small one
        kinds[i] = poison
    bad = {name: _gradient(kind, grads[name], xp) for name, kind in zip(names, kinds)}
    if unknown:
        bad["no.such"] = grads[names[0]]
    note(f"{dict(zip(names, kinds))} unknown={unknown}")
    refused = unknown or any(kind not in GOOD_GRADIENTS for kind in kinds[: len(names)])
    before = _dict_fingerprint(params, opt) if owner is None else _fingerprint(owner, opt)
    event("refused" if refused else "applied")
    try:
        opt.step(bad)
    except (ValueError, TypeError, KeyError):
        assert refused
        after = _dict_fingerprint(params, opt) if owner is None else _fingerprint(owner, opt)
        assert after == before
        return
    assert not refused
    for name, kind in zip(names, kinds):
        value = _host(params[name])
        assert np.all(np.isfinite(value)) and value.dtype.name == dtype, name
        if kind == "none":  # no gradient: the parameter is skipped
            assert _bits(value) == before["param", name], name


def _bad_entry(kind: str, value: np.ndarray) -> object:
    v = np.array(value, copy=True)
    if kind == "nan":
        v.flat[0] = np.nan
        return v
    if kind == "inf":
        v.flat[-1] = np.inf
        return v
    if kind == "shape":
        return np.append(v.ravel(), 1.0)
    if kind == "text":
        return np.full(v.shape, "x")
    if kind == "huge":
        return v.astype(np.float64) * 0 + 1e39
    if kind == "negative":
        return -np.abs(v.astype(np.float64)) - 1.0
    return v


ENTRY_POISONS = ["nan", "inf", "shape", "text", "huge", "negative"]


@_settings("load")
@given(
    target=st.sampled_from(["mlp", "vqvae-ema", "vqvae-residual"]),
    dtype=st.sampled_from(["float32", "float64"]),
    poisons=st.lists(st.tuples(st.integers(0, 19), st.sampled_from(ENTRY_POISONS)), max_size=3),
    missing=st.booleans(),
    extra=st.booleans(),
)
def test_hostile_state_dicts(target, dtype, poisons, missing, extra):
    """A state from another model with random bad entries: either a clear error and the model
    (parameters, optimizer, quantizer, pending backward) bit-identical to its twin, or the
    whole state loaded."""
    if target == "mlp":
        model, opt = _mlp_setup(dtype)
        twin, twin_opt = _mlp_setup(dtype)
        nxt = lambda m, o: _mlp_next(m, o, dtype)  # noqa: E731
        state = MLP(SIZES, rng=9, dtype=dtype).state_dict()
    else:
        kind = target.split("-")[1]
        model, opt = _vqvae_setup(kind, dtype)
        twin, twin_opt = _vqvae_setup(kind, dtype)
        nxt = lambda m, o: _vqvae_next(m, o, dtype)  # noqa: E731
        other = VQVAE(QUANTIZERS[kind](dtype), in_dim=P, hidden=H, num_tokens=T, rng=7, dtype=dtype)
        other.forward(_data(8, (N, P), dtype))
        state = other.state_dict()
    names = sorted(state)
    kinds = ["ok"] * 20
    for i, poison in poisons:
        kinds[i] = poison
    hostile = {}
    must_fail = missing or extra
    for name, kind in zip(names, kinds):
        value = _host(state[name])
        if value.dtype == np.bool_:  # a flag: the poisons do not apply
            hostile[name] = value
            continue
        poison = kind
        if kind == "negative" and not name.endswith("cluster_size"):
            poison = "ok"  # negative weights and codes are fine; negative EMA counts are not
        if kind == "huge" and dtype == "float64":
            poison = "ok"  # 1e39 is a float64 number
        hostile[name] = _bad_entry(poison, value)
        must_fail = must_fail or poison != "ok"
    if missing:
        del hostile[names[-1]]
    if extra:
        hostile["encoder.7.W" if target != "mlp" else "7.W"] = np.zeros((2, 2))
    note(f"{dict(zip(names, kinds))} missing={missing} extra={extra}")
    event("refused" if must_fail else "loaded")
    try:
        model.load_state_dict(hostile)
    except (ValueError, TypeError, KeyError):
        assert must_fail
        assert _fingerprint(model, opt) == _fingerprint(twin, twin_opt)
        assert _same(nxt(model, opt), nxt(twin, twin_opt))
        return
    assert not must_fail
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(_host(v), np.asarray(hostile[k]).astype(_host(v).dtype))


INPUT_POISONS = ["nan", "inf", "-inf", "width", "1d", "3d", "int", "bool", "library", "list", "huge"]


def _bad_input(kind: str, x: np.ndarray, gen) -> object:
    x = np.array(x, copy=True)
    i, j = gen.integers(x.shape[0]), gen.integers(x.shape[1])
    if kind in ("nan", "inf", "-inf"):
        x[i, j] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
        return x
    return {
        "width": lambda: np.concatenate([x, x[:, :1]], axis=1),
        "1d": lambda: x[0],
        "3d": lambda: x[None],
        "int": lambda: x.astype(np.int64),
        "bool": lambda: x > 0.5,
        "library": lambda: STRICT.asarray(x),
        "list": lambda: x.tolist(),
        "huge": lambda: np.full_like(x, np.finfo(x.dtype).max),
    }[kind]()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: the overflowing inputs overflow in the matmul
@_settings("forward")
@given(
    target=st.sampled_from(["linear", "mlp", "vqvae-ema", "vqvae-learnable", "vqvae-residual"]),
    dtype=st.sampled_from(["float32", "float64"]),
    kind=st.sampled_from(INPUT_POISONS),
    seed=st.integers(0, 2**16),
)
def test_hostile_forwards(target, dtype, kind, seed):
    """A non-finite, misshapen, mistyped or overflowing input: a clear error and nothing changed
    (the pending backward included), or -- only for the finite inputs at the dtype's maximum,
    which are valid arguments -- a result (a Linear or MLP returns the IEEE overflow; a VQ-VAE's
    quantizer refuses the infinite tokens that usually follow)."""
    gen = np.random.default_rng(seed)
    if target.startswith("vqvae"):
        model, opt = _vqvae_setup(target.split("-")[1], dtype)
        twin, twin_opt = _vqvae_setup(target.split("-")[1], dtype)
        nxt, width = (lambda m, o: _vqvae_next(m, o, dtype)), P
    elif target == "mlp":
        model, opt = _mlp_setup(dtype)
        twin, twin_opt = _mlp_setup(dtype)
        nxt, width = (lambda m, o: _mlp_next(m, o, dtype)), SIZES[0]
    else:
        model, twin = Linear(SIZES[0], 3, rng=0, dtype=dtype), Linear(SIZES[0], 3, rng=0, dtype=dtype)
        opt, twin_opt = SGD(model.params, lr=0.1), SGD(twin.params, lr=0.1)
        for m in (model, twin):
            m.forward(_data(1, (N, SIZES[0]), dtype))
        nxt, width = (
            (lambda m, o: [_host(m.backward(_data(2, (N, 3), dtype))), *map(_host, m.grads.values())]),
            SIZES[0],
        )
    x = _bad_input(kind, gen.random((N, width)).astype(dtype), gen)
    try:
        out = model.forward(x)
    except (ValueError, TypeError):
        assert _fingerprint(model, opt) == _fingerprint(twin, twin_opt)
        assert _same(nxt(model, opt), nxt(twin, twin_opt))
        return
    assert kind == "huge", kind  # the only input of the right kind: finite, of the right shape
    assert out.shape[0] == N


@_settings("mutation")
@given(
    target=st.sampled_from(
        ["linear", "mlp-relu", "mlp-tanh", "linear-pair", "relu", "tanh", "mse", "vqvae-ema", "vqvae-learnable"]
    ),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    mutate_input=st.booleans(),
    mutate_output=st.booleans(),
    fill=st.sampled_from([0.0, -1.0, 1e6, np.nan]),
)
def test_mutating_inputs_and_outputs_changes_no_gradient(target, n, seed, mutate_input, mutate_output, fill):
    """Between forward and backward, overwrite the input and/or the returned output in place:
    dx and every parameter gradient are bit-identical to a run on untouched arrays (for the
    pairs: every gradient the backward returns, with ``W`` and ``b`` overwritten as well)."""

    def run(mutate: bool):
        g = np.random.default_rng(seed)
        if target.startswith("vqvae"):
            model = VQVAE(
                QUANTIZERS[target.split("-")[1]]("float64"), in_dim=P, hidden=H, num_tokens=T, rng=0, dtype="float64"
            )
            x = g.random((n, P))
            out, _, _ = model.forward(x)
            backward = lambda: [model.backward(0.6), *model.grads.values()]  # noqa: E731
        elif target in ("linear", "mlp-relu", "mlp-tanh"):
            model = (
                Linear(5, 3, rng=0, dtype="float64")
                if target == "linear"
                else MLP([5, 6, 3], activation=target.split("-")[1], rng=0, dtype="float64", init="fan_in")
            )
            x, dy = g.standard_normal((n, 5)), g.standard_normal((n, 3))
            out = model.forward(x)
            backward = lambda: [model.backward(dy), *model.grads.values()]  # noqa: E731
        else:
            fwd, bwd, inputs, dshape = _pair_case(target.split("-")[0], g)
            inputs = [a[:n] if a.shape[0] == N else a for a in inputs]  # n rows
            dout = g.standard_normal((n, dshape[1])) if dshape else 0.8
            x = inputs[0]
            out, cache = fwd(*inputs)

            def backward():
                res = bwd(dout, cache)
                return list(res) if isinstance(res, tuple) else [res]

            if mutate and mutate_input:
                for a in inputs[1:]:
                    a[...] = fill
        if mutate and mutate_input:
            x[...] = fill
        if mutate and mutate_output and getattr(out, "ndim", 0):
            out[...] = fill
        return [_host(a) for a in backward()]

    assert _same(run(True), run(False))
