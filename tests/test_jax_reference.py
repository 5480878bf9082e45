"""Every backward in vqref against JAX autograd, the second oracle next to torch.

For each public backward (ops, core compositions, vqref.nn, the quantizer modules) the test runs
vqref's hand-written gradient and ``jax.vjp`` of the forward written from the math in
:mod:`vqref.testing.jax_reference` (``jax.lax.stop_gradient`` where the math has sg[.]), in
float64, with a random upstream gradient, distinct sizes and codes held fixed, through the
learners' one call :func:`vqref.testing.check_against_jax` (tolerance 1e-10).  Then:

* negative controls: a deliberately wrong backward fails the same check;
* two independent oracles: the JAX references agree with the torch references (and with torch
  written inline where no torch reference exists) on the same inputs;
* the table in the package docstring lists every public backward of vqref and a test here;
* JAX stays out of ``import vqref`` and its 64-bit switch does not leak out of a call.

JAX is imported unconditionally: it is in the ``test`` extra, and these checks must run in CI.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import array_api_strict
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqref import FSQ, ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.core.fsq import fsq_backward, fsq_forward
from vqref.core.quantize import estimator_backward, estimator_forward, quantize_backward, quantize_forward
from vqref.core.residual import codebook_gradients, residual_add_orthogonal, residual_backward, residual_forward
from vqref.nn import MLP, Linear
from vqref.nn.functional import (
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
from vqref.ops import fsq as fsq_ops
from vqref.ops.distance import squared_distance_backward, squared_distance_forward
from vqref.ops.l2norm import l2norm_backward, l2norm_forward
from vqref.ops.lookup import lookup_backward, lookup_forward
from vqref.ops.losses import (
    codebook_loss_backward,
    codebook_loss_forward,
    commitment_loss_backward,
    commitment_loss_forward,
    mse_backward,
    mse_forward,
)
from vqref.ops.orthogonal import orthogonal_loss_backward, orthogonal_loss_forward
from vqref.ops.rotation import rotate, rotation_trick_backward, rotation_trick_backward_fused, rotation_trick_forward
from vqref.ops.straight_through import straight_through_backward, straight_through_forward
from vqref.testing import check_against_jax, check_against_torch, rel_error
from vqref.testing import jax_reference as jr

ROOT = Path(__file__).resolve().parents[1]
N, K, D = 11, 7, 5  # distinct sizes: a transposition is a shape error, not a wrong number
LEVELS = (8, 5, 4, 3)  # FSQ: even and odd levels
TOL = 1e-10


def _host(a):
    return np.asarray(B.to_numpy(a), dtype=np.float64)


def _agree(fn, inputs, dout, grads, tol=TOL):
    """vqref's gradients against JAX's; returns the result (raises on disagreement)."""
    return check_against_jax(fn, inputs, dout, grads, rtol=tol)


NUMPY, STRICT = B.namespace_from_module(np), B.namespace_from_module(array_api_strict)


def _on(xp, a):
    """Host data ``a`` in namespace ``xp``: floats as float64, integers as they are."""
    a = np.asarray(a)
    return B.from_numpy(a, xp, dtype=xp.float64 if np.issubdtype(a.dtype, np.floating) else None)


def _agree_backends(fn, inputs, dout, run, tol=TOL):
    """One JAX reference; vqref on numpy and on array_api_strict (float64) against it.

    ``run(xp) -> (grads, values)``: vqref's gradients and forward values computed in ``xp``;
    the values are compared with JAX's forward output (same structure).
    """
    res = None
    for xp in (NUMPY, STRICT):
        grads, values = run(xp)
        if res is None:
            res = _agree(fn, inputs, dout, grads, tol)
        else:
            for g, r in zip(grads, res.reference):
                assert rel_error(np.zeros_like(r) if g is None else _host(g), r) <= tol
        for v, r in zip(values, res.out):
            assert rel_error(_host(v), r) < 1e-13
    return res


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------


def test_squared_distance_backward(bk64, rng):
    x, C, ddist = (
        bk64.asarray(rng.standard_normal((N, D))),
        bk64.asarray(rng.standard_normal((K, D))),
        rng.standard_normal((N, K)),
    )
    dist, cache = squared_distance_forward(x, C)
    res = _agree(jr.vq.squared_distance, [x, C], ddist, squared_distance_backward(bk64.asarray(ddist), cache))
    assert rel_error(dist, res.out) < 1e-13


def test_lookup_backward_repeated_and_unused_codes(bk64, rng):
    idx = np.array([3, 0, 3, 3, 5, 0, 1, 3, 5, 5, 0])  # repeats; codes 2, 4, 6 unused
    C, dq = bk64.asarray(rng.standard_normal((K, D))), rng.standard_normal((N, D))
    q, cache = lookup_forward(C, bk64.asarray(idx))
    res = _agree(lambda c: jr.vq.lookup(c, idx), [C], dq, [lookup_backward(bk64.asarray(dq), cache)])
    assert np.all(res.reference[0][[2, 4, 6]] == 0) and np.array_equal(_host(q), _host(C)[idx])


@pytest.mark.parametrize("fast", [True, False])
def test_losses_backward(bk64, rng, fast):
    a, b = bk64.asarray(rng.standard_normal((N, D))), bk64.asarray(rng.standard_normal((N, D)))
    dloss = 0.3 + rng.random()
    _, cache = mse_forward(a, b, fast=fast)
    _agree(jr.vq.mse, [a, b], dloss, mse_backward(dloss, cache, fast=fast))
    _, cache = commitment_loss_forward(a, b)
    res = _agree(jr.vq.commitment_loss, [a, b], dloss, [commitment_loss_backward(dloss, cache, fast=fast), None])
    assert np.all(res.reference[1] == 0)  # sg[q]
    _, cache = codebook_loss_forward(a, b)
    res = _agree(jr.vq.codebook_loss, [a, b], dloss, [None, codebook_loss_backward(dloss, cache, fast=fast)])
    assert np.all(res.reference[0] == 0)  # sg[x]


def test_straight_through_backward(bk64, rng):
    z, q, g = (
        bk64.asarray(rng.standard_normal((N, D))),
        bk64.asarray(rng.standard_normal((N, D))),
        rng.standard_normal((N, D)),
    )
    out, cache = straight_through_forward(z, q)
    res = _agree(jr.vq.straight_through, [z, q], g, [straight_through_backward(bk64.asarray(g), cache), None])
    assert np.all(res.reference[1] == 0) and rel_error(_host(out), res.out) < 1e-15


def _l2norm_rows(rng, eps=1e-6):
    x = rng.standard_normal((N, D))
    x[2] = 0.0  # a zero row: y = 0, dx = dy / eps
    x[5] = 1e-7 * rng.standard_normal(D)  # shorter than eps: the linear branch
    x[7] = np.eye(D)[1] * eps  # exactly eps long: the projection branch, as torch's clamp
    assert np.linalg.norm(x[7]) == eps
    return x


def test_l2norm_backward_all_branches(bk64, rng):
    x = _l2norm_rows(rng)
    dy = rng.standard_normal((N, D))
    y, cache = l2norm_forward(bk64.asarray(x))
    assert bool(B.to_numpy(cache.above)[7, 0]) and not bool(B.to_numpy(cache.above)[5, 0])
    _agree(jr.cosine.l2norm, [bk64.asarray(x)], dy, [l2norm_backward(bk64.asarray(dy), cache)])
    # leading axes are more rows
    x3, dy3 = rng.standard_normal((3, 4, D)), rng.standard_normal((3, 4, D))
    _, cache = l2norm_forward(bk64.asarray(x3))
    _agree(jr.cosine.l2norm, [bk64.asarray(x3)], dy3, [l2norm_backward(bk64.asarray(dy3), cache)])


@pytest.mark.parametrize(
    "heads, code_ids",
    [(None, None), (3, None), (None, np.array([1, 4, 4, 6])), (2, np.array([0, 2, 5]))],
    ids=["all", "heads", "subset-repeats", "heads-subset"],
)
def test_orthogonal_loss_backward(bk64, rng, heads, code_ids):
    shape = (K, D) if heads is None else (heads, K, D)
    C = bk64.asarray(rng.standard_normal(shape))
    dloss = 0.5 + rng.random()
    _, cache = orthogonal_loss_forward(C, code_ids=code_ids)
    res = _agree(
        lambda c: jr.orthogonal.orthogonal_loss(c, code_ids=code_ids),
        [C],
        dloss,
        [orthogonal_loss_backward(dloss, cache)],
    )
    if code_ids is not None:
        unused = np.setdiff1d(np.arange(K), code_ids)
        assert np.all(res.reference[0][..., unused, :] == 0)


def _rotation_rows(rng):
    """Generic rows, wide angles (120-170 degrees: the fused path hands them to the definition),
    and straight-through rows (q = 0, e = 0, q negligible next to e)."""
    e, q = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    for i, deg in ((1, 130.0), (4, 165.0)):
        u = e[i] / np.linalg.norm(e[i])
        w = q[i] - (q[i] @ u) * u
        w /= np.linalg.norm(w)
        q[i] = 1.7 * (np.cos(np.radians(deg)) * u + np.sin(np.radians(deg)) * w)
    q[6], e[8], q[9] = 0.0, 0.0, 1e-17 * e[9]
    return e, q


@pytest.mark.parametrize("variant", ["fast", "definition", "fused"])
def test_rotation_trick_backward(bk64, rng, variant):
    e, q = _rotation_rows(rng)
    g = rng.standard_normal((N, D))
    out, cache = rotation_trick_forward(bk64.asarray(e), bk64.asarray(q))
    G = bk64.asarray(g)
    de = {
        "fast": lambda: rotation_trick_backward(G, cache),
        "definition": lambda: rotation_trick_backward(G, cache, fast=False),
        "fused": lambda: rotation_trick_backward_fused(G, cache),
    }[variant]()
    res = _agree(jr.rotation.rotation_trick, [bk64.asarray(e), bk64.asarray(q)], g, [de, None])
    assert np.all(res.reference[1] == 0)  # the code gets nothing
    np.testing.assert_array_equal(_host(de)[[6, 8, 9]], g[[6, 8, 9]])  # straight-through rows
    live = np.setdiff1d(np.arange(N), [6, 8, 9])
    assert rel_error(res.out[live], _host(out)[live]) < 1e-13  # sg[lambda R] e = q


def test_fsq_op_backwards(bk64, rng):
    z = bk64.asarray(1.5 * rng.standard_normal((N, len(LEVELS))))
    g = rng.standard_normal((N, len(LEVELS)))
    G = bk64.asarray(g)
    zb, cache = fsq_ops.bound_forward(z, LEVELS)
    res = _agree(lambda z: jr.fsq.bound(z, LEVELS), [z], g, [fsq_ops.bound_backward(G, cache)])
    assert rel_error(res.out, _host(zb)) < 1e-14
    zr, cache = fsq_ops.round_ste_forward(zb)
    _agree(jr.fsq.round_ste, [zb], g, [fsq_ops.round_ste_backward(G, cache)])
    _, cache = fsq_ops.scale_forward(zr, LEVELS)
    _agree(lambda z: jr.fsq.scale(z, LEVELS), [zr], g, [fsq_ops.scale_backward(G, cache)])


def test_fsq_core_backward(bk64, rng):
    z = bk64.asarray(1.5 * rng.standard_normal((N, len(LEVELS))))
    g = rng.standard_normal((N, len(LEVELS)))
    out, cache = fsq_forward(z, LEVELS)
    res = _agree(lambda z: jr.fsq.fsq(z, LEVELS), [z], g, [fsq_backward(bk64.asarray(g), cache)])
    np.testing.assert_array_equal(res.out, _host(out.quantized))


# --------------------------------------------------------------------------------------------
# core compositions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotation", [False, True], ids=["ste", "rotation"])
def test_estimator_backward(bk64, rng, rotation):
    x, q, g = rng.standard_normal((N, D)), rng.standard_normal((N, D)), rng.standard_normal((N, D))
    _, cache = estimator_forward(bk64.asarray(x), bk64.asarray(q), kind="rotation" if rotation else "ste")
    dx = estimator_backward(bk64.asarray(g), cache).dx
    _agree(lambda x, q: jr.vq.estimator(x, q, rotation=rotation), [x, q], g, [dx, None])


QUANTIZE_CONFIGS = {
    "frozen": dict(),
    "beta": dict(commitment_weight=0.3),
    "learnable-one-term": dict(learnable_codebook=True, commitment_weight=0.6),
    "learnable-split": dict(learnable_codebook=True, commitment_weight=0.25, codebook_weight=1.3),
    "cosine": dict(use_cosine_sim=True, learnable_codebook=True, commitment_weight=0.4, codebook_weight=0.9),
    "rotation": dict(rotation_trick=True, learnable_codebook=True, commitment_weight=0.5),
    "cosine-rotation": dict(use_cosine_sim=True, rotation_trick=True, commitment_weight=0.7),
    "orthogonal": dict(learnable_codebook=True, commitment_weight=0.25, orthogonal_reg_weight=0.8),
    "orthogonal-subset": dict(orthogonal_reg_weight=0.6, orthogonal_code_ids=np.array([0, 2, 2, 5])),
}


@pytest.mark.parametrize("name", list(QUANTIZE_CONFIGS))
def test_quantize_backward(rng, name):
    opts = QUANTIZE_CONFIGS[name]
    x, C = rng.standard_normal((N, D)), rng.standard_normal((K, D))
    idx = rng.integers(0, K, size=N)  # held fixed: any assignment will do
    g, dloss = rng.standard_normal((N, D)), 0.4 + rng.random()

    def run(xp):
        out, cache = quantize_forward(_on(xp, x), _on(xp, C), indices=_on(xp, idx), **opts)
        return quantize_backward(_on(xp, g), dloss, cache), (out.quantized, out.loss)

    _agree_backends(lambda x, C: jr.vq.vq_layer(x, C, idx, **opts), [x, C], (g, dloss), run)


RESIDUAL_CASES = {
    "per-depth": dict(routing="per_depth"),
    "sum": dict(routing="sum"),
    "per-depth-rotation": dict(routing="per_depth", rotation_trick=True),
    "sum-rotation": dict(routing="sum", rotation_trick=True),
    "shared": dict(routing="per_depth", shared=True),
    "sum-shared-cosine": dict(routing="sum", shared=True, use_cosine_sim=True),
    "orthogonal-subsets": dict(routing="per_depth", orthogonal=True),
}


@pytest.mark.parametrize("name", list(RESIDUAL_CASES))
def test_residual_backward(rng, name):
    case = dict(RESIDUAL_CASES[name])
    routing, shared, orth = case.pop("routing"), case.pop("shared", False), case.pop("orthogonal", False)
    opts = dict(learnable_codebook=True, commitment_weight=0.3, **case)
    Q = 3
    x = rng.standard_normal((N, D))
    cbs = [rng.standard_normal((K, D)) * 0.5**level for level in range(Q)]
    cbs = [cbs[0]] * Q if shared else cbs
    idx = rng.integers(0, K, size=(N, Q))
    g, dlosses = rng.standard_normal((N, D)), 0.5 + rng.random(Q)
    code_ids = [np.array([0, 3]), np.array([1, 2, 6]), np.array([4, 4, 5])] if orth else None

    def run(xp):
        arrays = [_on(xp, c) for c in cbs]
        arrays = [arrays[0]] * Q if shared else arrays  # one array: residual_forward sees it is shared
        out, cache = residual_forward(_on(xp, x), arrays, routing=routing, indices=_on(xp, idx), **opts)
        if orth:
            ids = [_on(xp, c) for c in code_ids]
            out, cache = residual_add_orthogonal(out, cache, arrays, weight=0.7, code_ids=ids)
        dx, dcbs = residual_backward(_on(xp, g), _on(xp, dlosses), cache)
        return [dx, *codebook_gradients(dcbs, shared=shared)], (out.quantized, out.losses)

    ref_opts = dict(opts, orthogonal_reg_weight=0.7 if orth else 0.0)
    fn = lambda x, *c: jr.residual.residual_vq(x, c, idx, routing=routing, code_ids=code_ids, **ref_opts)  # noqa: E731
    _agree_backends(fn, [x] + cbs[: 1 if shared else Q], (g, dlosses), run)


# --------------------------------------------------------------------------------------------
# vqref.nn
# --------------------------------------------------------------------------------------------


def test_nn_functional_backwards(bk64, rng):
    Din, Dout = 6, 4
    x, W, b = rng.standard_normal((N, Din)), rng.standard_normal((Din, Dout)), rng.standard_normal(Dout)
    dy = rng.standard_normal((N, Dout))
    _, cache = linear_forward(bk64.asarray(x), bk64.asarray(W), bk64.asarray(b))
    _agree(jr.nn.linear, [x, W, b], dy, linear_backward(bk64.asarray(dy), cache))
    h = rng.standard_normal((N, Din))
    h[0, :3] = 0.0  # the kink: subgradient 0
    dh = rng.standard_normal((N, Din))
    _, cache = relu_forward(bk64.asarray(h))
    res = _agree(jr.nn.relu, [h], dh, [relu_backward(bk64.asarray(dh), cache)])
    assert np.all(res.reference[0][0, :3] == 0)
    _, cache = tanh_forward(bk64.asarray(h))
    _agree(jr.nn.tanh, [h], dh, [tanh_backward(bk64.asarray(dh), cache)])
    target, dloss = rng.standard_normal((N, Din)), 0.3 + rng.random()
    _, cache = mse_loss_forward(bk64.asarray(h), bk64.asarray(target))
    res = _agree(jr.nn.mse_loss, [h, target], dloss, [mse_loss_backward(dloss, cache), None])
    assert np.all(res.reference[1] == 0)  # the target is data


def _mlp_inputs(net):
    return [net.params[f"{i}.{p}"] for i in range(len(net.layers)) for p in ("W", "b")]


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_linear_and_mlp_module_backward(rng, activation):
    layer = Linear(6, 4, rng=1, dtype="float64", init="fan_in")
    x, dy = rng.standard_normal((N, 6)), rng.standard_normal((N, 4))
    layer.forward(x)
    dx = layer.backward(dy)
    _agree(jr.nn.linear, [x, layer.params["W"], layer.params["b"]], dy, [dx, layer.grads["W"], layer.grads["b"]])

    net = MLP([6, 9, 8, 3], activation=activation, rng=2, dtype="float64", init="fan_in")
    dout = rng.standard_normal((N, 3))
    net.forward(x)
    dx = net.backward(dout)
    names = [f"{i}.{p}" for i in range(3) for p in ("W", "b")]
    fn = lambda x, *p: jr.nn.mlp(x, p, activation=activation)  # noqa: E731
    _agree(fn, [x, *_mlp_inputs(net)], dout, [dx, *[net.grads[k] for k in names]])


# --------------------------------------------------------------------------------------------
# The quantizer modules and the VQ-VAE
# --------------------------------------------------------------------------------------------

MODULE_CONFIGS = {
    "learnable-split": dict(ema_update=False, learnable_codebook=True, commitment_weight=0.25, codebook_weight=1.0),
    "cosine-ema": dict(decay=0.8, use_cosine_sim=True, commitment_weight=0.5),
    "rotation-ema": dict(decay=0.8, rotation_trick=True, commitment_weight=0.3),
    "orthogonal-active": dict(
        ema_update=False, learnable_codebook=True, orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True
    ),
}


def _layer_options(kw):
    keys = ("commitment_weight", "codebook_weight", "learnable_codebook", "use_cosine_sim", "rotation_trick")
    return {k: kw[k] for k in keys if k in kw}


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
def test_vector_quantize_module_backward(rng, name):
    kw = MODULE_CONFIGS[name]
    vq = VectorQuantize(D, K, seed=0, dtype="float64", **kw)
    C = _host(vq.codebook)  # the codebook this forward quantizes with (EMA updates it afterwards)
    x, g, dloss = rng.standard_normal((2, 6, D)), rng.standard_normal((2, 6, D)), 0.5 + rng.random()
    _, idx, _ = vq(x)
    dx = vq.backward(g, dloss=dloss)
    k = _host(idx).astype(np.int64).reshape(-1)
    opts = _layer_options(kw)
    if kw.get("orthogonal_reg_weight"):
        opts.update(orthogonal_reg_weight=kw["orthogonal_reg_weight"], orthogonal_code_ids=np.unique(k))
    fn = lambda x, C: jr.vq.vq_layer(x, C, k, **opts)  # noqa: E731
    dC = vq.grads.get("codebook")
    assert (dC is not None) == bool(kw.get("learnable_codebook"))
    _agree(fn, [x.reshape(-1, D), C], (g.reshape(-1, D), dloss), [dx.reshape(-1, D), dC])


@pytest.mark.parametrize("routing", ["per_depth", "sum"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
def test_residual_vq_module_backward(rng, routing, shared):
    Q = 3
    rvq = ResidualVQ(
        dim=D, codebook_size=K, num_quantizers=Q, seed=0, dtype="float64", ema_update=False, learnable_codebook=True,
        rotation_trick=True, commitment_weight=0.4, gradient_routing=routing, shared_codebook=shared,
    )  # fmt: skip
    cbs = [_host(layer.codebook) for layer in rvq.layers][: 1 if shared else Q]
    x, g, dl = rng.standard_normal((2, 6, D)), rng.standard_normal((2, 6, D)), 0.5 + rng.random(Q)
    _, idx, _ = rvq(x)
    dx = rvq.backward(g, dl)
    k = _host(idx).astype(np.int64).reshape(-1, Q)
    fn = lambda x, *c: jr.residual.residual_vq(  # noqa: E731
        x, c, k, routing=routing, learnable_codebook=True, rotation_trick=True, commitment_weight=0.4
    )
    grads = [rvq.grads[name] for name in rvq.learnable_names()]
    _agree(fn, [x.reshape(-1, D), *cbs], (g.reshape(-1, D), dl), [dx.reshape(-1, D), *grads])


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_fsq_module_backward(rng, num_codebooks):
    dim = len(LEVELS) * num_codebooks
    fsq = FSQ(LEVELS, num_codebooks=num_codebooks, dtype="float64")
    x, g = 2 * rng.standard_normal((3, 4, dim)), rng.standard_normal((3, 4, dim))
    fsq(x)
    dx = fsq.backward(g)
    d = len(LEVELS)
    _agree(lambda z: jr.fsq.fsq(z, LEVELS), [x.reshape(-1, d)], g.reshape(-1, d), [dx.reshape(-1, d)])


VQVAE_CONFIGS = {
    "learnable-split": (
        VectorQuantize,
        dict(ema_update=False, learnable_codebook=True, codebook_weight=1.0, commitment_weight=0.25),
    ),
    "cosine-ema": (VectorQuantize, dict(decay=0.8, use_cosine_sim=True, commitment_weight=0.25)),
    "orthogonal-ema": (VectorQuantize, dict(decay=0.8, orthogonal_reg_weight=0.8)),
    "residual-shared-ema": (
        ResidualVQ,
        dict(num_quantizers=3, decay=0.8, commitment_weight=0.25, shared_codebook=True),
    ),
    "residual-learnable-rotation": (
        ResidualVQ,
        dict(num_quantizers=2, ema_update=False, learnable_codebook=True, rotation_trick=True, commitment_weight=0.5),
    ),
}


@pytest.mark.parametrize("name", list(VQVAE_CONFIGS))
def test_vqvae_backward(rng, name):
    cls, kw = VQVAE_CONFIGS[name]
    T, d, P, H = 3, 4, 10, 9
    quantizer = cls(dim=d, codebook_size=K, seed=3, dtype="float64", **kw)
    model = VQVAE(quantizer, in_dim=P, hidden=H, num_tokens=T, rng=0, dtype="float64")
    x = rng.random((N, P))
    model.forward(x)  # a warm-up step: the codebooks move toward the data
    model.backward()
    layers = quantizer.layers if quantizer.is_stack else [quantizer]
    shared = kw.get("shared_codebook", False)
    cbs = [_host(layer.codebook) for layer in layers][: 1 if shared else None]  # what the forward quantizes with
    recon, idx, _ = model.forward(x)
    dloss, drecon = 0.5 + rng.random(), rng.standard_normal((N, P))
    dx = model.backward(dloss, drecon)
    learnable = layers[0].codebook_is_learnable
    # the regulariser of an EMA codebook is evaluated after this step's update
    held = [_host(layer.codebook) for layer in layers]
    enc, dec = model.encoder.state_dict(), model.decoder.state_dict()
    opts = dict(_layer_options(kw), orthogonal_reg_weight=kw.get("orthogonal_reg_weight", 0.0))
    k = _host(idx).astype(np.int64)

    def fn(x, *p):
        e, r = p[: len(enc)], p[len(enc) : len(enc) + len(dec)]
        c = p[len(enc) + len(dec) :] if learnable else cbs
        return jr.nn.vqvae(x, e, r, c, k, token_dim=d, residual=cls is ResidualVQ, orthogonal_codebooks=held, **opts)

    names = [f"{i}.{p}" for i in range(2) for p in ("W", "b")]
    inputs = [x, *[enc[n] for n in names], *[dec[n] for n in names], *(cbs if learnable else [])]
    grads = model.grads
    ours = [dx, *[grads[f"encoder.{n}"] for n in names], *[grads[f"decoder.{n}"] for n in names]]
    ours += [grads[f"quantizer.{n}"] for n in quantizer.learnable_names()] if learnable else []
    ref_recon, _ = _agree(fn, inputs, (drecon, dloss), ours, tol=1e-9).out
    assert rel_error(_host(recon), ref_recon) < 1e-13


# --------------------------------------------------------------------------------------------
# Negative controls: a wrong backward fails the JAX check
# --------------------------------------------------------------------------------------------


def _wrong_lookup(rng):
    idx = np.array([3, 0, 3, 3, 5, 0, 1, 3, 5, 5, 0])
    C, dq = rng.standard_normal((K, D)), rng.standard_normal((N, D))
    wrong = np.zeros((K, D))
    wrong[idx] += dq  # numpy's indexed += keeps one of the repeated rows
    return (lambda c: jr.vq.lookup(c, idx)), [C], dq, [wrong]


def _wrong_straight_through(rng):
    z, q, g = rng.standard_normal((N, D)), rng.standard_normal((N, D)), rng.standard_normal((N, D))
    return jr.vq.straight_through, [z, q], g, [np.zeros_like(g), None]  # "fixed" to the true derivative, 0


def _wrong_rotation(rng):
    e, q, g = rng.standard_normal((N, D)), rng.standard_normal((N, D)), rng.standard_normal((N, D))
    _, cache = rotation_trick_forward(e, q)
    return jr.rotation.rotation_trick, [e, q], g, [cache.scale * rotate(g, cache.basis), None]  # R g, not R^T g


def _wrong_l2norm_boundary(rng):
    x, dy = _l2norm_rows(rng), rng.standard_normal((N, D))
    _, cache = l2norm_forward(x)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    cache = cache._replace(above=norm > 1e-6)  # strict inequality: the row of length eps takes dy / eps
    return jr.cosine.l2norm, [x], dy, [l2norm_backward(dy, cache)]


def _wrong_orthogonal(rng):
    C = rng.standard_normal((K, D))
    _, cache = orthogonal_loss_forward(C)
    H, n = 1, K
    dChat = (4.0 / (H * n * n)) * (cache.gram @ cache.norm_cache.y)[0]
    return jr.orthogonal.orthogonal_loss, [C], 0.7, [0.7 * dChat / cache.norm_cache.scale[0]]  # no projection


def _wrong_quantize(rng):
    x, C, idx, g = (
        rng.standard_normal((N, D)),
        rng.standard_normal((K, D)),
        rng.integers(0, K, N),
        rng.standard_normal((N, D)),
    )
    opts = dict(learnable_codebook=True, commitment_weight=0.25, codebook_weight=1.0)
    _, cache = quantize_forward(x, C, indices=idx, **opts)
    grads = quantize_backward(g, 0.9, cache._replace(commitment_weight=0.5))  # beta counted twice
    return (lambda x, C: jr.vq.vq_layer(x, C, idx, **opts)), [x, C], (g, 0.9), list(grads)


def _wrong_residual_routing(rng):
    x, cbs, idx, g = (
        rng.standard_normal((N, D)),
        [rng.standard_normal((K, D)) for _ in range(3)],
        rng.integers(0, K, (N, 3)),
        rng.standard_normal((N, D)),
    )
    out, cache = residual_forward(x, cbs, routing="sum", indices=idx, commitment_weight=0.3)
    dx, _ = residual_backward(g, np.ones(3), cache)  # "sum": g reaches x once; the reference says per depth
    fn = lambda x: jr.residual.residual_vq(x, cbs, idx, routing="per_depth", commitment_weight=0.3)  # noqa: E731
    return fn, [x], (g, np.ones(3)), [dx]


def _wrong_fsq(rng):
    z, g = 1.5 * rng.standard_normal((N, len(LEVELS))), rng.standard_normal((N, len(LEVELS)))
    _, cache = fsq_forward(z, LEVELS)
    return (lambda z: jr.fsq.fsq(z, LEVELS)), [z], g, [fsq_ops.scale_backward(g, cache.scale)]  # the bound forgotten


def _wrong_relu_kink(rng):
    h, dh = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    h[0, :3] = 0.0
    return jr.nn.relu, [h], dh, [np.where(h >= 0, dh, 0.0)]  # derivative 1 at the kink


def _wrong_mse_loss(rng):
    p, t = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    _, cache = mse_loss_forward(p, t)
    return jr.nn.mse_loss, [p, t], 1.0, [mse_loss_backward(0.5, cache), None]  # 1/M instead of 2/M


def _wrong_linear_bias(rng):
    x, W, b, dy = (
        rng.standard_normal((N, 6)),
        rng.standard_normal((6, 4)),
        rng.standard_normal(4),
        rng.standard_normal((N, 4)),
    )
    _, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(dy, cache)
    return jr.nn.linear, [x, W, b], dy, [dx, dW, db / N]  # the mean over rows instead of the sum


def _slightly_wrong_distance(rng):
    x, C, ddist = rng.standard_normal((N, D)), rng.standard_normal((K, D)), rng.standard_normal((N, K))
    _, cache = squared_distance_forward(x, C)
    dx, dC = squared_distance_backward(ddist, cache)
    return jr.vq.squared_distance, [x, C], ddist, [dx * (1 + 1e-8), dC]  # off by 1e-8: finite differences miss it


WRONG = {
    "lookup-indexed-add": _wrong_lookup,
    "ste-true-derivative": _wrong_straight_through,
    "rotation-R-not-RT": _wrong_rotation,
    "l2norm-boundary": _wrong_l2norm_boundary,
    "orthogonal-no-projection": _wrong_orthogonal,
    "quantize-commitment-twice": _wrong_quantize,
    "residual-routing": _wrong_residual_routing,
    "fsq-no-bound": _wrong_fsq,
    "relu-kink": _wrong_relu_kink,
    "mse-loss-half": _wrong_mse_loss,
    "linear-bias-mean": _wrong_linear_bias,
    "distance-1e-8": _slightly_wrong_distance,
}


@pytest.mark.parametrize("name", list(WRONG))
def test_negative_control_a_wrong_backward_fails(rng, name):
    fn, inputs, dout, grads = WRONG[name](rng)
    res = check_against_jax(fn, inputs, dout, grads, rtol=TOL, raise_on_failure=False)
    assert not res.passed, res.errors
    with pytest.raises(AssertionError, match="check_against_jax: gradient of input"):
        check_against_jax(fn, inputs, dout, grads, rtol=TOL)


# --------------------------------------------------------------------------------------------
# Two oracles: the JAX references agree with the torch references
# --------------------------------------------------------------------------------------------

from vqref.testing.torch_reference import vq as tref  # noqa: E402
from vqref.testing.torch_reference.cosine import l2norm_reference  # noqa: E402
from vqref.testing.torch_reference.nn import mlp_vjp  # noqa: E402
from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference  # noqa: E402
from vqref.testing.torch_reference.residual import residual_vq_grads  # noqa: E402
from vqref.testing.torch_reference.rotation import rotation_trick_reference  # noqa: E402

AGREE = 1e-12


def _close(jax_values, torch_values, tol=AGREE):
    for a, b in zip(jax_values, torch_values):
        assert rel_error(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) < tol


def test_jax_and_torch_agree_on_the_ops(rng):
    x, C = rng.standard_normal((N, D)), rng.standard_normal((K, D))
    ddist, dq, g = rng.standard_normal((N, K)), rng.standard_normal((N, D)), rng.standard_normal((N, D))
    idx = np.array([3, 0, 3, 3, 5, 0, 1, 3, 5, 5, 0])
    out, grads = jr.vjp(jr.vq.squared_distance, [x, C], ddist)
    _close([out, *grads], tref.squared_distance_grads(x, C, ddist))
    out, grads = jr.vjp(lambda c: jr.vq.lookup(c, idx), [C], dq)
    _close([out, *grads], tref.lookup_grads(C, idx, dq))
    for fn, flags in (
        (jr.vq.mse, {}),
        (jr.vq.commitment_loss, dict(detach_b=True)),
        (jr.vq.codebook_loss, dict(detach_a=True)),
    ):
        out, grads = jr.vjp(fn, [x, dq], 0.7)
        _close([out, *grads], tref.mse_grads(x, dq, 0.7, **flags))
    xs = _l2norm_rows(rng)
    out, grads = jr.vjp(jr.cosine.l2norm, [xs], dq)
    _close([out, *grads], l2norm_reference(xs, dq))
    out, grads = jr.vjp(jr.rotation.rotation_trick, [x, dq], g)  # generic rows: the torch reference has no guards
    _close([out, *grads], rotation_trick_reference(x, dq, g))


@pytest.mark.parametrize("heads, code_ids", [(None, None), (3, np.array([1, 4, 4, 6]))], ids=["all", "heads-subset"])
def test_jax_and_torch_agree_on_the_orthogonal_loss(rng, heads, code_ids):
    C = rng.standard_normal((K, D) if heads is None else (heads, K, D))
    out, grads = jr.vjp(lambda c: jr.orthogonal.orthogonal_loss(c, code_ids=code_ids), [C], 0.8)
    _close([out, *grads], orthogonal_loss_reference(C, 0.8, code_ids=code_ids))


@pytest.mark.parametrize("name", ["learnable-one-term", "learnable-split", "cosine-rotation", "orthogonal"])
def test_jax_and_torch_agree_on_the_vq_layer(rng, name):
    opts = QUANTIZE_CONFIGS[name]
    x, C, idx = rng.standard_normal((N, D)), rng.standard_normal((K, D)), rng.integers(0, K, N)
    g, dloss = rng.standard_normal((N, D)), 0.6
    (q, loss), grads = jr.vjp(lambda x, C: jr.vq.vq_layer(x, C, idx, **opts), [x, C], (g, dloss))
    _close([q, loss, *grads], tref.vector_quantize_grads(x, C, idx, g, dloss, **opts))


@pytest.mark.parametrize("routing", ["per_depth", "sum"])
@pytest.mark.parametrize("shared, rotation", [(False, False), (True, True)], ids=["plain", "shared-rotation"])
def test_jax_and_torch_agree_on_residual_vq(rng, routing, shared, rotation):
    Q = 3
    x, idx, g, dl = (
        rng.standard_normal((N, D)),
        rng.integers(0, K, (N, Q)),
        rng.standard_normal((N, D)),
        0.5 + rng.random(Q),
    )
    cbs = [rng.standard_normal((K, D)) for _ in range(1 if shared else Q)]
    opts = dict(learnable_codebook=True, commitment_weight=0.3, rotation_trick=rotation)
    fn = lambda x, *c: jr.residual.residual_vq(x, c, idx, routing=routing, **opts)  # noqa: E731
    (q, losses), grads = jr.vjp(fn, [x, *cbs], (g, dl))
    tq, tlosses, tdx, tdcbs = residual_vq_grads(
        x, cbs * (Q if shared else 1), idx, g, dl, routing=routing, shared=shared, **opts
    )
    _close([q, losses, grads[0], *grads[1:]], [tq, tlosses, tdx, *tdcbs])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_jax_and_torch_agree_on_the_mlp(rng, activation):
    sizes = [6, 9, 3]
    params = {
        f"{i}.{p}": rng.standard_normal((a, b) if p == "W" else (b,))
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        for p in "Wb"
    }
    x, dout = rng.standard_normal((N, 6)), rng.standard_normal((N, 3))
    names = ["0.W", "0.b", "1.W", "1.b"]
    fn = lambda x, *p: jr.nn.mlp(x, p, activation=activation)  # noqa: E731
    out, grads = jr.vjp(fn, [x, *[params[k] for k in names]], dout)
    tout, tdx, tgrads = mlp_vjp(x, params, dout, activation=activation)
    _close([out, grads[0], *grads[1:]], [tout, tdx, *[tgrads[k] for k in names]])


def test_jax_and_torch_agree_on_fsq(rng):
    # no torch reference ships for FSQ: the learners' torch call checks JAX's gradients instead
    import torch

    def fsq_torch(z):
        L = torch.tensor(LEVELS, dtype=torch.float64)
        h = (L - 1) * (1 + 1e-3) / 2
        o = torch.tensor([0.5 if level % 2 == 0 else 0.0 for level in LEVELS], dtype=torch.float64)
        zb = torch.tanh(z + torch.atanh(o / h)) * h - o
        zr = zb + (torch.round(zb) - zb).detach()
        return zr / torch.tensor([level // 2 for level in LEVELS], dtype=torch.float64)

    z, g = 1.5 * rng.standard_normal((N, len(LEVELS))), rng.standard_normal((N, len(LEVELS)))
    out, grads = jr.vjp(lambda z: jr.fsq.fsq(z, LEVELS), [z], g)
    res = check_against_torch(fsq_torch, [z], g, grads, rtol=AGREE)
    np.testing.assert_array_equal(res.out, out)


# --------------------------------------------------------------------------------------------
# The learners' calls, and JAX kept in its place
# --------------------------------------------------------------------------------------------


def test_check_against_jax_and_torch_are_one_call_each(rng):
    x, dy = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    y, cache = l2norm_forward(x)
    dx = l2norm_backward(dy, cache)
    res_j = check_against_jax(lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True), [x], dy, [dx])
    res_t = check_against_torch(lambda x: x / x.norm(dim=1, keepdim=True), [x], dy, [dx])
    assert res_j.passed and res_t.passed and max(res_j.errors + res_t.errors) < 1e-14
    assert rel_error(res_j.out, y) < 1e-15 and rel_error(res_t.out, y) < 1e-15
    bad = [2 * dx]
    assert not check_against_jax(jr.cosine.l2norm, [x], dy, bad, raise_on_failure=False).passed
    assert not check_against_torch(
        lambda x: x / x.norm(dim=1, keepdim=True), [x], dy, bad, raise_on_failure=False
    ).passed
    with pytest.raises(AssertionError, match="check_against_torch: gradient of input 0"):
        check_against_torch(lambda x: x / x.norm(dim=1, keepdim=True), [x], dy, bad)
    # a float32 backward is compared with the float64 reference at a float32 tolerance
    y32, cache32 = l2norm_forward(x.astype(np.float32))
    dx32 = l2norm_backward(dy.astype(np.float32), cache32)
    assert check_against_jax(jr.cosine.l2norm, [x], dy, [dx32], rtol=1e-5).passed
    assert not check_against_jax(jr.cosine.l2norm, [x], dy, [dx32], raise_on_failure=False).passed


def test_zero_reference_gradients_need_atol_and_unused_inputs_get_zeros(rng):
    z, q, g = rng.standard_normal((N, D)), rng.standard_normal((N, D)), rng.standard_normal((N, D))
    noise = np.full((N, D), 1e-14)  # rounding-level noise where the true gradient is exactly 0
    for check, fn in (
        (check_against_jax, jr.vq.straight_through),
        (check_against_torch, lambda z, q: z + (q - z).detach()),  # q: no gradient (autograd's None)
    ):
        res = check(fn, [z, q], g, [g, noise], raise_on_failure=False)
        assert not res.passed and res.errors[1] == 1.0 and np.all(res.reference[1] == 0)
        assert check(fn, [z, q], g, [g, noise], atol=1e-12).passed
        assert not check(fn, [z, q], g, [g, 1e-9 + noise], atol=1e-12, raise_on_failure=False).passed


def test_jit_and_op_by_op_agree(rng):
    # the compiled path is the fast path of the op-by-op definition
    e, q = _rotation_rows(rng)
    g = rng.standard_normal((N, D))
    out_j, grads_j = jr.vjp(jr.rotation.rotation_trick, [e, q], g)
    out_e, grads_e = jr.vjp(jr.rotation.rotation_trick, [e, q], g, jit=False)
    _close([out_j, *grads_j], [out_e, *grads_e], tol=1e-14)


def test_vjp_refuses_what_it_cannot_differentiate(rng):
    x = rng.standard_normal((N, D))
    with pytest.raises(TypeError, match="input 1 has dtype int64.*inside fn"):
        jr.vjp(lambda x, k: x[k], [x, np.arange(3)], np.ones((3, D)))
    with pytest.raises(ValueError, match="output 0 has shape \\(11, 5\\) but its dout has \\(5, 11\\)"):
        jr.vjp(jr.nn.tanh, [x], np.ones((D, N)))
    with pytest.raises(ValueError, match="fn returned 2 outputs but dout has 1"):
        jr.vjp(lambda x: (x, jnp.sum(x)), [x], [np.ones((N, D))])
    with pytest.raises(ValueError, match="2 gradients for 1 inputs"):
        check_against_jax(jr.nn.tanh, [x], np.ones((N, D)), [x, x])


def test_sixty_four_bit_mode_does_not_leak(rng):
    jr.vjp(jr.nn.tanh, [rng.standard_normal((3, 2))], np.ones((3, 2)))
    assert not jax.config.jax_enable_x64 and jnp.ones(2).dtype == jnp.float32
    with jr.x64():
        assert jnp.ones(2).dtype == jnp.float64
    assert jnp.ones(2).dtype == jnp.float32


def test_import_vqref_and_vqref_testing_need_neither_jax_nor_torch():
    code = "import sys, vqref, vqref.testing; print(sorted(m for m in ('jax', 'torch') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# The table: every public backward in vqref has a JAX reference and a test here
# --------------------------------------------------------------------------------------------


# Backwards written while the JAX references were (by other changes of the same issue): each needs
# a reference in vqref/testing/jax_reference, a test here and a row of the table, then leaves this list.
NOT_YET_COVERED = {
    "vqref.core.fsq.fsq_layer_backward",
    "vqref.core.lfq.lfq_backward",
    "vqref.core.lfq.residual_lfq_backward",
    "vqref.core.residual.residual_stack_backward",
    "vqref.core.residual_fsq.residual_fsq_backward",
    "vqref.ops.entropy.softmax_backward",
    "vqref.ops.entropy.entropy_backward",
    "vqref.ops.entropy.entropy_penalty_backward",
    "vqref.ops.entropy.softplus_backward",
    "vqref.ops.fsq.symmetric_bound_backward",
    "vqref.ops.fsq.floor_ste_backward",
    "vqref.ops.fsq.symmetric_scale_backward",
    "vqref.ops.fsq.noise_dropout_backward",
    "vqref.ops.fsq.soft_clamp_backward",
    "vqref.ops.gumbel.code_logits_backward",
    "vqref.ops.gumbel.softmax_backward",
    "vqref.ops.gumbel.gumbel_softmax_backward",
    "vqref.ops.gumbel.soft_assignment_backward",
    "vqref.ops.gumbel.straight_through_gumbel_backward",
    "vqref.ops.gumbel.clamped_entropy_backward",
    "vqref.ops.gumbel.diversity_loss_backward",
    "vqref.ops.lfq.soft_clamp_backward",
    "vqref.ops.lfq.sign_ste_backward",
    "vqref.ops.lfq.code_scores_backward",
    "vqref.ops.lfq.code_scores_backward_factorised",
    "vqref.ops.lfq.cosine_linear_backward",
    "vqref.quantizers.lfq.LFQ.backward",
    "vqref.quantizers.residual_fsq.ResidualFSQ.backward",
    "vqref.quantizers.residual_lfq.ResidualLFQ.backward",
}


def _public_backwards() -> set[str]:
    """Qualified names of the public backward functions and methods of the library (not vqref.testing)."""
    found = set()
    for path in sorted((ROOT / "vqref").rglob("*.py")):
        rel = path.relative_to(ROOT / "vqref").as_posix()
        if rel.startswith("testing/"):
            continue
        module = "vqref." + rel[:-3].replace("/", ".").removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and "backward" in node.name and not node.name.startswith("_"):
                found.add(f"{module}.{node.name}")
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                found.update(
                    f"{module}.{node.name}.{m.name}"
                    for m in node.body
                    if isinstance(m, ast.FunctionDef) and "backward" in m.name and not m.name.startswith("_")
                )
    return found


def _table() -> dict[str, tuple[str, str]]:
    """backward -> (JAX reference, test) from the rows of the package docstring's table."""
    rows = re.findall(r"^\s*``([\w.]+)``\s+``([\w.()]+)``\s+(test_\w+)\s*$", jr.__doc__, flags=re.M)
    return {name: (ref, test) for name, ref, test in rows}


def test_every_backward_is_in_the_table_with_a_reference_and_a_test():
    table = _table()
    library = _public_backwards()
    assert len(library) > 30
    missing = sorted(library - set(table) - set(NOT_YET_COVERED))
    assert not missing, (
        "add a JAX reference, a test and a row of the table in vqref/testing/jax_reference for: " + ", ".join(missing)
    )
    stale = sorted(set(table) - library)
    assert not stale, f"the table lists backwards vqref no longer has: {stale}"
    covered_now = sorted(set(NOT_YET_COVERED) & set(table))
    assert not covered_now, f"take these off NOT_YET_COVERED: {covered_now}"
    gone = sorted(set(NOT_YET_COVERED) - library)
    assert not gone, f"NOT_YET_COVERED lists backwards vqref no longer has: {gone}"
    tests = {name for name, value in globals().items() if name.startswith("test_") and callable(value)}
    for name, (ref, test) in table.items():
        assert test in tests, f"{name}: the table names {test}, which is not a test in this file"
        head = ref.split("(")[0]
        obj = jr
        for part in head.split("."):
            obj = getattr(obj, part)  # the reference exists
        assert callable(obj), ref
