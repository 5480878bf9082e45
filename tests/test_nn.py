"""Tests of vqref.nn: the layer pairs, the Linear/MLP facades and the SGD/Adam optimizers.

Gradients: finite differences (float64) for every pair, torch autograd for the composed MLP,
float32 against the float64 analytic result.  Optimizers: step by step against torch.optim.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqref import backend as B
from vqref.nn import (
    MLP,
    SGD,
    Adam,
    Linear,
    NamedArrays,
    linear_backward,
    linear_forward,
    mse_loss_backward,
    mse_loss_forward,
    relu_backward,
    relu_forward,
    tanh_backward,
    tanh_forward,
)
from vqref.testing import check_vjp, rel_error
from vqref.testing.torch_reference import nn as tref

N, DIN, DOUT = 6, 5, 3  # distinct, so a transposition is a shape error


def _away_from_zero(rng, shape, margin=0.05):
    """Standard normal entries pushed at least ``margin`` away from 0 (relu's kink)."""
    z = rng.standard_normal(shape)
    return np.sign(z) * (margin + np.abs(z))


# --------------------------------------------------------------------------------------------
# The pairs, by finite differences (float64)
# --------------------------------------------------------------------------------------------


def test_linear_backward_finite_differences(bk64, rng):
    x = bk64.asarray(rng.standard_normal((N, DIN)))
    W = bk64.asarray(rng.standard_normal((DIN, DOUT)))
    b = bk64.asarray(rng.standard_normal(DOUT))

    def f(x, W, b):
        return linear_forward(x, W, b)[0]

    def vjp(dy, x, W, b):
        return linear_backward(dy, linear_forward(x, W, b)[1])

    res = check_vjp(f, vjp, [x, W, b], seed=1)
    assert max(res.errors) < 1e-8

    def vjp_wrong(dy, x, W, b):  # the bias gradient averaged over rows instead of summed
        dx, dW, db = vjp(dy, x, W, b)
        return dx, dW, db / N

    assert check_vjp(f, vjp_wrong, [x, W, b], seed=1, raise_on_failure=False).passed is False


def test_linear_forward_value(bk, rng):
    x, W, b = rng.standard_normal((N, DIN)), rng.standard_normal((DIN, DOUT)), rng.standard_normal(DOUT)
    y, _ = linear_forward(bk.asarray(x), bk.asarray(W), bk.asarray(b))
    assert y.dtype == bk.dtype and tuple(y.shape) == (N, DOUT)
    assert rel_error(bk.np(y), np.einsum("ni,ij->nj", x, W) + b) < bk.rtol


def test_relu_backward_finite_differences(bk64, rng):
    x = bk64.asarray(_away_from_zero(rng, (N, DIN)))

    def f(x):
        return relu_forward(x)[0]

    def vjp(dy, x):
        return relu_backward(dy, relu_forward(x)[1])

    check_vjp(f, vjp, [x], seed=2)

    def vjp_wrong(dy, x):  # forgets the mask: the identity's gradient
        return dy

    assert check_vjp(f, vjp_wrong, [x], seed=2, raise_on_failure=False).passed is False


def test_relu_at_zero_uses_torch_subgradient(bk):
    import torch

    x = np.array([[-1.0, 0.0, 2.0], [0.0, 3.0, -0.5]])
    dy = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y, cache = relu_forward(bk.asarray(x))
    dx = relu_backward(bk.asarray(dy), cache)
    xt = torch.tensor(x, requires_grad=True)
    torch.relu(xt).backward(torch.tensor(dy))
    np.testing.assert_array_equal(bk.np(y), np.maximum(x, 0.0))
    np.testing.assert_array_equal(bk.np(dx), xt.grad.numpy())
    assert np.all(np.isfinite(bk.np(dx)))


def test_tanh_backward_finite_differences(bk64, rng):
    x = bk64.asarray(1.5 * rng.standard_normal((N, DIN)))

    def f(x):
        return tanh_forward(x)[0]

    def vjp(dy, x):
        return tanh_backward(dy, tanh_forward(x)[1])

    check_vjp(f, vjp, [x], seed=3)

    def vjp_wrong(dy, x):  # 1 - x^2 instead of 1 - tanh(x)^2
        return dy * (1.0 - x * x)

    assert check_vjp(f, vjp_wrong, [x], seed=3, raise_on_failure=False).passed is False


def test_mse_loss_value_and_finite_differences(bk64, rng):
    pred_h, target_h = rng.standard_normal((N, DIN)), rng.standard_normal((N, DIN))
    pred, target = bk64.asarray(pred_h), bk64.asarray(target_h)
    loss, _ = mse_loss_forward(pred, target)
    assert loss.shape == () and loss.dtype == bk64.dtype
    assert abs(float(bk64.np(loss)) - ((pred_h - target_h) ** 2).sum() / (N * DIN)) < 1e-12

    def f(pred):
        return mse_loss_forward(pred, target)[0]

    def vjp(dloss, pred):
        return mse_loss_backward(dloss, mse_loss_forward(pred, target)[1])

    check_vjp(f, vjp, [pred], seed=4)  # a random 0-d upstream gradient, not 1

    def vjp_wrong(dloss, pred):  # drops the 2 of d(u^2)/du
        return 0.5 * vjp(dloss, pred)

    assert check_vjp(f, vjp_wrong, [pred], seed=4, raise_on_failure=False).passed is False


def test_mse_loss_empty_batch_is_zero_not_nan(bk):
    empty = bk.asarray(np.zeros((0, DIN)))
    loss, cache = mse_loss_forward(empty, empty)
    assert float(bk.np(loss)) == 0.0
    assert tuple(mse_loss_backward(1.0, cache).shape) == (0, DIN)
    with pytest.raises(ValueError):
        mse_loss_forward(bk.asarray(np.zeros((2, 3))), bk.asarray(np.zeros((3, 2))))


# --------------------------------------------------------------------------------------------
# The MLP against torch autograd, and float32 against float64
# --------------------------------------------------------------------------------------------

SIZES = [7, 9, 5, 4]


def _fwd_bwd(net, x, target):
    out = net.forward(x)
    loss, cache = mse_loss_forward(out, target)
    dx = net.backward(mse_loss_backward(1.0, cache))
    return out, loss, dx


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_gradients_match_torch(bk64, rng, activation):
    net = MLP(SIZES, activation=activation, rng=11, dtype="float64", xp=bk64.module, init="fan_in")
    x_h, t_h = rng.standard_normal((N, SIZES[0])), rng.standard_normal((N, SIZES[-1]))
    out, loss, dx = _fwd_bwd(net, bk64.asarray(x_h), bk64.asarray(t_h))
    ref_loss, ref_dx, ref_grads = tref.mlp_mse_grads(x_h, t_h, net.state_dict(), activation=activation)
    assert abs(float(bk64.np(loss)) - ref_loss) <= 1e-12 * abs(ref_loss)
    assert rel_error(bk64.np(dx), ref_dx) < 1e-10
    assert sorted(net.grads) == sorted(ref_grads) == ["0.W", "0.b", "1.W", "1.b", "2.W", "2.b"]
    for k, g in ref_grads.items():
        assert rel_error(bk64.np(net.grads[k]), g) < 1e-10, k


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    n=st.integers(1, 5),
    activation=st.sampled_from(["relu", "tanh"]),
    seed=st.integers(0, 2**16),
)
def test_mlp_vjp_matches_torch_any_shape(bk64, sizes, n, activation, seed):
    gen = np.random.default_rng(seed)
    net = MLP(sizes, activation=activation, rng=gen, dtype="float64", xp=bk64.module, init="fan_in")
    x_h, dout_h = gen.standard_normal((n, sizes[0])), gen.standard_normal((n, sizes[-1]))
    out = net.forward(bk64.asarray(x_h))
    dx = net.backward(bk64.asarray(dout_h))
    ref_out, ref_dx, ref_grads = tref.mlp_vjp(x_h, net.state_dict(), dout_h, activation=activation)
    assert tuple(out.shape) == (n, sizes[-1]) and tuple(dx.shape) == (n, sizes[0])
    assert rel_error(bk64.np(out), ref_out) < 1e-12
    assert rel_error(bk64.np(dx), ref_dx) < 1e-10
    for k, g in ref_grads.items():
        assert rel_error(bk64.np(net.grads[k]), g) < 1e-10, k


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_dtype_and_float64_agreement(bk, rng, activation):
    x_h, t_h = rng.standard_normal((N, SIZES[0])), rng.standard_normal((N, SIZES[-1]))
    ref = MLP(SIZES, activation=activation, rng=5, dtype="float64", xp=np, init="fan_in")
    ref_out, ref_loss, ref_dx = _fwd_bwd(ref, x_h, t_h)
    net = MLP(SIZES, activation=activation, rng=5, dtype=bk.dtype_name, xp=bk.module, init="fan_in")
    out, loss, dx = _fwd_bwd(net, bk.asarray(x_h), bk.asarray(t_h))
    for a in (out, loss, dx, *net.params.values(), *net.grads.values()):
        assert a.dtype == bk.dtype and B.library_name(a) == bk.name
    assert rel_error(bk.np(out), ref_out) < bk.rtol
    assert rel_error(bk.np(dx), ref_dx) < bk.rtol
    assert abs(float(bk.np(loss)) - float(ref_loss)) <= bk.rtol * float(ref_loss)
    for k in ref.grads:
        assert rel_error(bk.np(net.grads[k]), ref.grads[k]) < bk.rtol, k


# --------------------------------------------------------------------------------------------
# Initialisation, the live params mapping, state dicts, errors
# --------------------------------------------------------------------------------------------


def test_init_bounds_and_reproducibility(bk):
    din, dout = 64, 24
    a_glorot = np.sqrt(6.0 / (din + dout))
    lin = Linear(din, dout, rng=3, dtype=bk.dtype_name, xp=bk.module)
    W, b = bk.np(lin.params["W"]), bk.np(lin.params["b"])
    assert W.shape == (din, dout) and b.shape == (dout,)
    assert np.abs(W).max() <= a_glorot and np.abs(W).max() > 0.95 * a_glorot  # fills the interval
    assert abs(W.std() - a_glorot / np.sqrt(3.0)) < 0.05 * a_glorot  # the std of U(-a, a)
    np.testing.assert_array_equal(b, 0.0)

    lin2 = Linear(din, dout, rng=np.random.default_rng(3), dtype="float64", xp=np, init="glorot")
    np.testing.assert_array_equal(W, lin2.params["W"].astype(W.dtype))  # same seed, same net
    other = Linear(din, dout, rng=4, dtype=bk.dtype_name, xp=bk.module)
    assert not np.array_equal(W, bk.np(other.params["W"]))

    a_fan_in = 1.0 / np.sqrt(din)
    lin3 = Linear(din, dout, rng=3, dtype=bk.dtype_name, xp=bk.module, init="fan_in")
    W3, b3 = bk.np(lin3.params["W"]), bk.np(lin3.params["b"])
    assert np.abs(W3).max() <= a_fan_in and np.abs(W3).max() > 0.95 * a_fan_in
    assert np.abs(b3).max() <= a_fan_in and np.abs(b3).max() > 0.5 * a_fan_in
    with pytest.raises(ValueError):
        Linear(din, dout, rng=3, init="he")


def test_params_mapping_writes_back(bk, rng):
    net = MLP([DIN, 4, DOUT], rng=0, dtype=bk.dtype_name, xp=bk.module)
    assert list(net.params) == ["0.W", "0.b", "1.W", "1.b"] and len(net.params) == 4
    x = bk.asarray(rng.standard_normal((N, DIN)))
    before = bk.np(net.forward(x)).copy()

    w0 = bk.np(net.params["0.W"]).copy()
    net.params["0.W"] -= 1.0  # reads a copy, subtracts, assigns it back through the check
    np.testing.assert_array_equal(bk.np(net.layers[0].params["W"]), w0 - 1.0)
    assert net.layers[0].params["W"] is not net.params["0.W"]  # copies: no caller holds the layer's array
    view = net.params  # a view built once sees every later update (it must not read a stale array)
    view["0.W"] -= 1.0
    view["0.W"] -= 1.0
    np.testing.assert_allclose(bk.np(view["0.W"]), w0 - 3.0, rtol=1e-6, atol=1e-6)
    after = bk.np(net.forward(x))
    assert not np.allclose(after, before)

    new_b = bk.asarray(rng.standard_normal(DOUT))
    net.params["1.b"] = new_b
    np.testing.assert_array_equal(bk.np(net.layers[1].params["b"]), bk.np(new_b))
    shift = bk.np(net.forward(x)) - after  # only the output bias changed
    np.testing.assert_allclose(shift, np.broadcast_to(bk.np(new_b), (N, DOUT)), atol=1e-5)
    if bk.module is np:  # the layer stored a copy: changing the caller's array later changes nothing
        new_b[...] = 7.0
        assert not np.any(bk.np(net.layers[1].params["b"]) == 7.0)

    with pytest.raises(ValueError):
        net.params["0.W"] = bk.asarray(np.zeros((4, DIN)))  # transposed
    with pytest.raises(KeyError):
        net.params["2.W"] = new_b
    with pytest.raises(KeyError):
        net.params["W"]
    with pytest.raises(TypeError):
        del net.params["0.b"]


def test_named_arrays_nest():
    enc = MLP([DIN, 4, 2], rng=0, dtype="float64")
    dec = MLP([2, 4, DIN], rng=1, dtype="float64")
    both = NamedArrays({"enc": enc.params, "dec": dec.params})
    assert len(both) == 8 and "dec.1.W" in both and "enc.1.W" in both
    both["dec.1.W"] = both["dec.1.W"] * 2.0
    np.testing.assert_array_equal(dec.layers[1].params["W"], both["dec.1.W"])
    with pytest.raises(ValueError):
        NamedArrays({"a.b": enc.params})


def test_state_dict_round_trip(bk, rng):
    a = MLP(SIZES, rng=1, dtype=bk.dtype_name, xp=bk.module)
    b = MLP(SIZES, rng=2, dtype=bk.dtype_name, xp=bk.module)
    x = bk.asarray(rng.standard_normal((N, SIZES[0])))
    assert not np.array_equal(bk.np(a.forward(x)), bk.np(b.forward(x)))
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b.load_state_dict(state)
    np.testing.assert_array_equal(bk.np(a.forward(x)), bk.np(b.forward(x)))
    assert all(v.dtype == bk.dtype for v in b.params.values())
    with pytest.raises(KeyError):
        b.load_state_dict({"0.W": state["0.W"]})


def test_backward_before_forward_raises(bk):
    dy = bk.asarray(np.ones((N, DOUT)))
    with pytest.raises(RuntimeError, match="before forward"):
        Linear(DIN, DOUT, rng=0, dtype=bk.dtype_name, xp=bk.module).backward(dy)
    with pytest.raises(RuntimeError, match="before forward"):
        MLP([DIN, 4, DOUT], rng=0, dtype=bk.dtype_name, xp=bk.module).backward(dy)


def test_bad_arguments_raise(bk):
    with pytest.raises(ValueError):
        MLP([DIN], rng=0)
    with pytest.raises(ValueError):
        MLP([DIN, DOUT], rng=0, activation="gelu")
    with pytest.raises(ValueError):
        Linear(DIN, DOUT, rng=0, dtype="int64")
    lin = Linear(DIN, DOUT, rng=0, dtype=bk.dtype_name, xp=bk.module)
    with pytest.raises(ValueError):
        lin.forward(bk.asarray(np.ones((N, DOUT))))


# --------------------------------------------------------------------------------------------
# Optimizers against torch.optim
# --------------------------------------------------------------------------------------------

SHAPES = {"W": (DIN, DOUT), "b": (DOUT,), "codebook": (7, 2)}


def _opt_problem(rng, steps):
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads_seq = [{k: rng.standard_normal(s) * (1.0 + t) for k, s in SHAPES.items()} for t in range(steps)]
    del grads_seq[2]["b"]  # a parameter without a gradient this step is left alone
    return params, grads_seq


def _run_ours(bk, opt_cls, params_h, grads_seq, **kw):
    params = {k: bk.asarray(v) for k, v in params_h.items()}
    opt = opt_cls(params, **kw)
    history = []
    for grads in grads_seq:
        opt.step({k: bk.asarray(v) for k, v in grads.items()})
        for v in params.values():
            assert v.dtype == bk.dtype and B.library_name(v) == bk.name
        history.append({k: bk.np(v) for k, v in params.items()})
    return opt, history


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_matches_torch(bk, rng, weight_decay):
    params_h, grads_seq = _opt_problem(rng, steps=6)
    kw = dict(lr=0.03, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    opt, ours = _run_ours(bk, Adam, params_h, grads_seq, **kw)
    ref = tref.adam_steps(params_h, grads_seq, **kw)
    for t, (a, r) in enumerate(zip(ours, ref)):
        for k in SHAPES:
            assert rel_error(a[k] - params_h[k], r[k] - params_h[k]) < bk.rtol, (t, k)
    assert opt.state[(0, "b")]["t"] == 5 and opt.state[(0, "W")]["t"] == 6
    assert all(s["m"].dtype == bk.dtype and s["v"].dtype == bk.dtype for s in opt.state.values())


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.7, 0.1)])
def test_sgd_matches_torch(bk, rng, momentum, weight_decay):
    params_h, grads_seq = _opt_problem(rng, steps=5)
    kw = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    _, ours = _run_ours(bk, SGD, params_h, grads_seq, **kw)
    ref = tref.sgd_steps(params_h, grads_seq, **kw)
    for t, (a, r) in enumerate(zip(ours, ref)):
        for k in SHAPES:
            # compare the displacements: they carry the whole update, not just its rounding
            assert rel_error(a[k] - params_h[k], r[k] - params_h[k]) < bk.rtol, (t, k)


def test_adam_first_step_is_lr_sign(bk64, rng):
    """With bias correction the first Adam step is lr * g / (|g| + eps), about lr per entry."""
    g_h = _away_from_zero(rng, (DIN, DOUT), margin=0.1)
    params = {"W": bk64.asarray(np.zeros((DIN, DOUT)))}
    # eps must be > 0; 1e-300 is absorbed by |g| >= 0.1 (it is below half an ulp), so the step is exact
    Adam(params, lr=0.01, eps=1e-300).step({"W": bk64.asarray(g_h)})
    np.testing.assert_allclose(bk64.np(params["W"]), -0.01 * np.sign(g_h), rtol=1e-12)


def test_optimizer_over_several_mappings(rng):
    def pair(seed):
        enc = MLP([DIN, 4, 2], rng=seed, dtype="float64")
        return enc, MLP([2, 4, DIN], rng=seed + 1, dtype="float64")

    x, t = rng.standard_normal((N, DIN)), rng.standard_normal((N, DIN))

    def fwd_bwd(enc, dec):
        loss, cache = mse_loss_forward(dec.forward(enc.forward(x)), t)
        enc.backward(dec.backward(mse_loss_backward(1.0, cache)))

    enc1, dec1 = pair(0)
    enc2, dec2 = pair(0)
    opt_list = Adam([enc1.params, dec1.params], lr=0.01)
    opt_view = Adam(NamedArrays({"enc": enc2.params, "dec": dec2.params}), lr=0.01)
    with pytest.raises(ValueError, match="more than one mapping"):
        fwd_bwd(enc1, dec1)
        opt_list.step(enc1.grads)  # "0.W" is in both mappings: ambiguous
    for _ in range(3):
        fwd_bwd(enc1, dec1)
        opt_list.step([enc1.grads, dec1.grads])
        fwd_bwd(enc2, dec2)
        opt_view.step(NamedArrays({"enc": enc2.grads, "dec": dec2.grads}))
    for k in enc1.params:
        np.testing.assert_array_equal(enc1.params[k], enc2.params[k])
        np.testing.assert_array_equal(dec1.params[k], dec2.params[k])
    assert not np.array_equal(enc1.params["0.W"], pair(0)[0].params["0.W"])  # they did move


def test_optimizer_rejects_mismatched_gradients(bk):
    params = {"W": bk.asarray(np.zeros((DIN, DOUT)))}
    with pytest.raises(ValueError):
        SGD(params, lr=0.1).step({"W": bk.asarray(np.zeros((DOUT, DIN)))})
    with pytest.raises(ValueError):
        Adam(params, betas=(0.9, 1.0))
    with pytest.raises(TypeError):
        SGD([], lr=0.1)


def test_zero_state_restarts_adam(rng):
    g = {"W": rng.standard_normal((DIN, DOUT))}
    p1, p2 = {"W": np.zeros((DIN, DOUT))}, {"W": np.zeros((DIN, DOUT))}
    opt = Adam(p1, lr=0.01)
    opt.step(g)
    opt.step({"W": 3.0 * g["W"]})
    opt.zero_state()
    assert opt.state == {}
    opt.step(g)  # a fresh first step moves by lr * sign(g) again
    Adam(p2, lr=0.01).step(g)
    np.testing.assert_allclose(p1["W"] - p2["W"], _two_adam_steps(g["W"]), rtol=1e-9, atol=1e-15)


def _two_adam_steps(g):
    """The displacement of two Adam steps (defaults, lr 0.01) with gradients g then 3 g, by hand."""
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    m1, v1 = (1 - b1) * g, (1 - b2) * g * g
    p = -lr * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + eps)
    m2, v2 = b1 * m1 + (1 - b1) * 3 * g, b2 * v1 + (1 - b2) * 9 * g * g
    return p - lr * (m2 / (1 - b1**2)) / (np.sqrt(v2 / (1 - b2**2)) + eps)


# --------------------------------------------------------------------------------------------
# End to end: a tiny regression fit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_with_adam_fits_a_smooth_function(bk, activation):
    gen = np.random.default_rng(7)
    x_h = gen.uniform(-1.5, 1.5, size=(96, 2))
    y_h = np.sin(2.0 * x_h[:, :1]) * np.cos(x_h[:, 1:]) + 0.3 * x_h[:, 1:]  # (96, 1)
    x, y = bk.asarray(x_h), bk.asarray(y_h)
    net = MLP([2, 24, 24, 1], activation=activation, rng=gen, dtype=bk.dtype_name, xp=bk.module)
    opt = Adam(net.params, lr=0.01)
    losses = []
    for _ in range(300):
        loss, cache = mse_loss_forward(net.forward(x), y)
        net.backward(mse_loss_backward(1.0, cache))
        opt.step(net.grads)
        losses.append(float(bk.np(loss)))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] / 10.0, (losses[0], losses[-1])


# --------------------------------------------------------------------------------------------
# apply / gradients: the halves of forward / backward that change nothing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_apply_and_gradients_are_forward_and_backward_without_state(bk, rng, activation):
    net = MLP(SIZES, activation=activation, rng=3, dtype=bk.dtype_name, xp=bk.module, init="fan_in")
    x, dout = bk.asarray(rng.standard_normal((N, SIZES[0]))), bk.asarray(rng.standard_normal((N, SIZES[-1])))
    out, cache = net.apply(x)
    assert len(net.grads) == 0  # nothing remembered, nothing stored
    with pytest.raises(RuntimeError, match="before forward"):
        net.backward(dout)
    dx, grads = net.gradients(dout, cache)
    assert len(net.grads) == 0
    np.testing.assert_array_equal(bk.np(net.forward(x)), bk.np(out))
    np.testing.assert_array_equal(bk.np(net.backward(dout)), bk.np(dx))
    assert sorted(net.grads) == sorted(grads)
    for k, g in grads.items():
        np.testing.assert_array_equal(bk.np(net.grads[k]), bk.np(g))
    layer = net.layers[0]
    y, lcache = layer.apply(x)
    dxl, dW, db = linear_backward(bk.asarray(rng.standard_normal((N, SIZES[1]))), lcache)
    assert layer.grads == {} and tuple(dW.shape) == (SIZES[0], SIZES[1])
    with pytest.raises(ValueError, match="rows"):  # a dout for another batch
        net.gradients(dout[:2, ...], cache)
