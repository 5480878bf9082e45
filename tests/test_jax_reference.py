"""Every backward in vqref against JAX autograd, the second oracle next to torch.

For each public backward (ops, core compositions, vqref.nn, the quantizer modules) the test runs
vqref's hand-written gradient and ``jax.vjp`` of the forward written from the math in
:mod:`vqref.testing.jax_reference` (``jax.lax.stop_gradient`` where the math has sg[.]), in
float64, with a random upstream gradient, distinct sizes and codes held fixed, through the
learners' one call :func:`vqref.testing.check_against_jax` (tolerance 1e-10); the core and
module tests run vqref on numpy and on array_api_strict.  Then:

* negative controls: a deliberately wrong backward fails the same check;
* two independent oracles: the JAX references agree with the torch references (and with torch
  written inline where no torch reference exists) on the same inputs -- for FSQ and LFQ inside
  their core tests, against :mod:`vqref.testing.torch_reference.fsq` and ``.lfq``;
* the table in the package docstring lists every public backward of vqref and a test here;
* JAX stays out of ``import vqref`` and its 64-bit switch does not leak out of a call.

Compiling costs JAX far more than running these small problems, so each reference is compiled
once per test: :func:`_ref` hands out one function object per (reference, options), which the
numpy and array_api_strict runs share, and :func:`_agree_all` checks the ops of a family as one
program.

JAX is imported unconditionally: it is in the ``test`` extra, and these checks must run in CI.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import array_api_strict
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqref import FSQ, LFQ, GroupedResidualVQ, ResidualFSQ, ResidualLFQ, ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.core.fsq import Projection, fsq_backward, fsq_forward, fsq_layer_backward, fsq_layer_forward
from vqref.core.layer import Projection as LayerProjection
from vqref.core.layer import frame, layer_in_backward, layer_in_forward, layer_out_backward, layer_out_forward
from vqref.core.lfq import (
    LFQOptions,
    LFQParams,
    lfq_backward,
    lfq_forward,
    residual_lfq_backward,
    residual_lfq_forward,
)
from vqref.core.quantize import (
    estimator_backward,
    estimator_forward,
    grouped_diversity_backward,
    grouped_diversity_forward,
    quantize_backward,
    quantize_forward,
)
from vqref.core.residual import (
    codebook_gradients,
    residual_add_orthogonal,
    residual_backward,
    residual_forward,
    residual_stack_backward,
    residual_stack_forward,
)
from vqref.core.residual_fsq import residual_fsq_backward, residual_fsq_forward
from vqref.nn import MLP, Linear
from vqref.nn import conv as conv_ops
from vqref.nn.conv_layers import Conv2d, ConvNet, ConvTranspose2d
from vqref.nn.conv_vqvae import ConvVQVAE
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
from vqref.ops import entropy as entropy_ops
from vqref.ops import fsq as fsq_ops
from vqref.ops import gumbel as gumbel_ops
from vqref.ops import lfq as lfq_ops
from vqref.ops.distance import squared_distance_backward, squared_distance_forward
from vqref.ops.l2norm import l2norm_backward, l2norm_backward_fast, l2norm_forward
from vqref.ops.lookup import lookup_backward, lookup_forward
from vqref.ops.losses import (
    codebook_loss_backward,
    codebook_loss_backward_codes,
    codebook_loss_forward,
    commitment_loss_backward,
    commitment_loss_backward_added,
    commitment_loss_forward,
    mse_backward,
    mse_forward,
)
from vqref.ops.orthogonal import orthogonal_loss_backward, orthogonal_loss_forward
from vqref.ops.rotation import rotate, rotation_trick_backward, rotation_trick_backward_fused, rotation_trick_forward
from vqref.ops.straight_through import straight_through_backward, straight_through_forward
from vqref.testing import check_against_jax, check_against_torch, rel_error
from vqref.testing import jax_reference as jr
from vqref.testing.torch_reference.fsq import fsq_layer_grads, fsq_rows_torch, residual_fsq_grads
from vqref.testing.torch_reference.lfq import lfq_grads, residual_lfq_grads

ROOT = Path(__file__).resolve().parents[1]
N, K, D = 11, 7, 5  # distinct sizes: a transposition is a shape error, not a wrong number
LEVELS = (8, 5, 4, 3)  # FSQ: even and odd levels
SYM_LEVELS = (2, 5, 4, 3)  # FSQ's symmetric grid allows a level of 2
TOL = 1e-10


def _host(a):
    return np.asarray(B.to_numpy(a), dtype=np.float64)


def _agree(fn, inputs, dout, grads, tol=TOL):
    """vqref's gradients against JAX's; returns the result (raises on disagreement)."""
    return check_against_jax(fn, inputs, dout, grads, rtol=tol)


_REFERENCES: dict = {}


def _freeze(value):
    """A hashable stand-in for an option value: arrays by shape, dtype and bytes."""
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.dtype.str, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _ref(fn, **options):
    """``functools.partial(fn, **options)``, one object per distinct ``(fn, options)``.

    JAX compiles a reference once per function object (``vjp`` jits it with the function as a
    static argument); a test that runs on two backends then compiles its references once.
    """
    key = (fn, tuple(sorted((k, _freeze(v)) for k, v in options.items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = functools.partial(fn, **options)
    return _REFERENCES[key]


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
        for v, r in zip(values, res.out if isinstance(res.out, tuple) else (res.out,)):
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
    # the quantizer's compositions: added to a zero gradient, and collected per code through q = C[idx]
    zero = B.get_namespace(a).zeros_like(a)
    added = commitment_loss_backward_added(zero, dloss, commitment_loss_forward(a, b)[1], fast=fast)
    _agree(jr.vq.commitment_loss, [a, b], dloss, [added, None])
    idx = np.array([3, 0, 3, 3, 5, 0, 1, 3, 5, 5, 0])  # (N,) repeats; codes 2, 4, 6 unused
    C = bk64.asarray(rng.standard_normal((K, D)))
    q = B.get_namespace(C).take(C, bk64.asarray(idx), axis=0)
    _, cache = codebook_loss_forward(a, q)
    dC = codebook_loss_backward_codes(dloss, cache, bk64.asarray(idx), C, fast=fast)
    _agree(lambda x, c: jr.vq.codebook_loss(x, jr.vq.lookup(c, idx)), [a, C], dloss, [None, dC])


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
    _agree(jr.cosine.l2norm, [bk64.asarray(x)], dy, [l2norm_backward(bk64.asarray(dy), cache, fast=False)])
    _agree(jr.cosine.l2norm, [bk64.asarray(x)], dy, [l2norm_backward_fast(bk64.asarray(dy), cache)])
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


def _agree_all(checks, tol=TOL):
    """Several checks ``(reference, inputs, dout, grads)`` as one compiled JAX program.

    JAX compiles once per program, and compiling costs far more than running these small ops;
    the combined forward returns every reference's output computed from its own inputs, so an
    input's gradient is the vector-Jacobian product of its own reference alone.  Returns each
    check's ``(out, reference gradients)``; fails naming the check and the input that disagree.
    """
    fns, sizes = tuple(c[0] for c in checks), tuple(len(c[1]) for c in checks)
    key = ("all", fns, sizes)
    if key not in _REFERENCES:

        def combined(*args):
            outs, start = [], 0
            for fn, n in zip(fns, sizes):
                outs.append(fn(*args[start : start + n]))
                start += n
            return tuple(outs)

        _REFERENCES[key] = combined
    inputs = [a for c in checks for a in c[1]]
    douts = [d for c in checks for d in (c[2] if isinstance(c[2], tuple) else (c[2],))]
    grads = [g for c in checks for g in c[3]]
    res = check_against_jax(_REFERENCES[key], inputs, douts, grads, rtol=tol, raise_on_failure=False)
    results, start = [], 0
    for i, (c, n) in enumerate(zip(checks, sizes)):
        errors = res.errors[start : start + n]
        assert max(errors) <= tol, f"check {i} ({getattr(c[0], 'func', c[0]).__name__}): relative errors {errors}"
        results.append((res.out[i], res.reference[start : start + n]))
        start += n
    return results


def test_fsq_symmetric_grid_op_backwards(bk64, rng):
    z = 1.5 * rng.standard_normal((N, len(SYM_LEVELS)))
    z[0, :2] = [-1.0, 1.0]  # the clamp's two kinks: slope 1 at both, as torch's clamp
    z[1, :2] = [-1.0 - 1e-9, 1.0 + 1e-9]  # just beyond them: slope 0
    g = rng.standard_normal(z.shape)
    G, Z = bk64.asarray(g), bk64.asarray(z)
    checks, values = [], []
    for hard in (False, True):
        v, cache = fsq_ops.symmetric_bound_forward(Z, SYM_LEVELS, hard_clamp=hard)
        ref = _ref(jr.fsq.symmetric_bound, levels=SYM_LEVELS, hard_clamp=hard)
        checks.append((ref, [z], g, [fsq_ops.symmetric_bound_backward(G, cache)]))
        zb, cache = fsq_ops.bound_forward(Z, LEVELS, hard_clamp=hard)
        checks.append((_ref(jr.fsq.bound, levels=LEVELS, hard_clamp=hard), [z], g, [fsq_ops.bound_backward(G, cache)]))
        values += [v, zb]
    k, cache = fsq_ops.floor_ste_forward(v)
    checks.append((jr.fsq.floor_ste, [v], g, [fsq_ops.floor_ste_backward(G, cache)]))
    codes, cache = fsq_ops.symmetric_scale_forward(k, SYM_LEVELS)
    checks.append(
        (_ref(jr.fsq.symmetric_scale, levels=SYM_LEVELS), [k], g, [fsq_ops.symmetric_scale_backward(G, cache)])
    )
    results = _agree_all(checks)
    for (out, _), value in zip(results, [*values, k, codes]):
        assert rel_error(out, _host(value)) < 1e-14
    hard_grad = results[2][1][0]  # the symmetric bound with the clamp
    assert np.all(hard_grad[0, :2] != 0) and np.all(hard_grad[1, :2] == 0)
    np.testing.assert_array_equal(results[4][0], _host(k))


def test_fsq_noise_dropout_and_soft_clamp_backwards(bk64, rng):
    d = len(SYM_LEVELS)
    codes = np.clip(np.round(rng.standard_normal((N, d))), -1, 1)  # grid points of [-1, 1]
    mask, noise = rng.random((N, d)) < 0.6, rng.random((N, d)) - 0.5
    noise[0, 0], mask[0, 0], codes[0, 0] = 0.25, True, 0.75  # lands on the end of the range: still inside
    g = rng.standard_normal((N, d))
    G = bk64.asarray(g)
    y, cache = fsq_ops.noise_dropout_forward(bk64.asarray(codes), bk64.asarray(mask, dtype=bk64.xp.bool),
                                             bk64.asarray(noise))  # fmt: skip
    x, c = 3 * rng.standard_normal((N, d)), np.array([1.2, 0.5, 2.0, 1.0])
    y2, cache2 = fsq_ops.soft_clamp_forward(bk64.asarray(x), bk64.asarray(c))
    (out, (dcodes,)), (out2, _) = _agree_all([
        (_ref(jr.fsq.noise_dropout, mask=mask, noise=noise), [codes], g, [fsq_ops.noise_dropout_backward(G, cache)]),
        (_ref(jr.fsq.soft_clamp, c=c), [x], g, [fsq_ops.soft_clamp_backward(G, cache2)]),
    ])  # fmt: skip
    cut = np.abs(np.where(mask, codes + noise, codes)) > 1
    assert cut.any() and np.all(dcodes[cut] == 0) and dcodes[0, 0] == g[0, 0]
    assert rel_error(out, _host(y)) < 1e-15 and rel_error(out2, _host(y2)) < 1e-14


def test_lfq_op_backwards(bk64, rng):
    d = 3
    z, g = rng.standard_normal((N, d)), rng.standard_normal((N, d))
    z[0, 1] = 0.0  # a tie: the code -s, the gradient straight through all the same
    G, Z = bk64.asarray(g), bk64.asarray(z)
    _, clamp_cache = lfq_ops.soft_clamp_forward(Z, value=1.3)
    q, sign_cache = lfq_ops.sign_ste_forward(Z, scale=0.5)
    dscores = rng.standard_normal((N, 2**d))
    dS = bk64.asarray(dscores)
    scores = {fast: lfq_ops.code_scores_forward(Z, value=0.7, fast=fast) for fast in (True, False)}
    _, fact_cache = lfq_ops.code_scores_forward_factorised(Z, value=0.7)
    x, W, dy = rng.standard_normal((N, 6)), rng.standard_normal((6, 4)), rng.standard_normal((N, 4))
    y, cos_cache = lfq_ops.cosine_linear_forward(bk64.asarray(x), bk64.asarray(W), scale=1.3)
    score_ref = _ref(jr.lfq.code_scores, value=0.7)
    results = _agree_all([
        (_ref(jr.lfq.soft_clamp, value=1.3), [z], g, [lfq_ops.soft_clamp_backward(G, clamp_cache)]),
        (_ref(jr.lfq.sign_ste, scale=0.5), [z], g, [lfq_ops.sign_ste_backward(G, sign_cache)]),
        # the factorised table (the fast path) and the product with the explicit codebook (the definition)
        (score_ref, [z], dscores, [lfq_ops.code_scores_backward(dS, scores[True][1])]),
        (score_ref, [z], dscores, [lfq_ops.code_scores_backward(dS, scores[False][1])]),
        (score_ref, [z], dscores, [lfq_ops.code_scores_backward_factorised(dS, fact_cache)]),
        (_ref(jr.lfq.cosine_linear, scale=1.3), [x, W], dy,
         list(lfq_ops.cosine_linear_backward(bk64.asarray(dy), cos_cache))),
    ])  # fmt: skip
    np.testing.assert_array_equal(results[1][0], _host(q))
    assert results[1][0][0, 1] == -0.5
    for fast in (True, False):
        assert rel_error(results[2][0], _host(scores[fast][0])) < 1e-13
    assert rel_error(results[5][0], _host(y)) < 1e-14


def _distributions(rng, shape):
    """Rows of probabilities with entries below, at and above the entropy's clamp eps = 1e-5."""
    p = rng.random(shape)
    p[..., :3] = [0.0, 3e-6, 1e-5]
    p[..., 3:] /= p[..., 3:].sum(-1, keepdims=True) / (1 - 1.3e-5)
    return p


def test_entropy_op_backwards(bk64, rng):
    n, C, K_ = 4, 2, 8
    scores, dp = rng.standard_normal((n, C, K_)), rng.standard_normal((n, C, K_))
    S = bk64.asarray(scores)
    p, sm_cache = entropy_ops.softmax_forward(S, inv_temperature=2.5)
    probs, dh = _distributions(rng, (n, C, K_)), rng.standard_normal((n, C))
    h, ent_cache = entropy_ops.entropy_forward(bk64.asarray(probs))
    pen, pen_cache = entropy_ops.entropy_penalty_forward(S, inv_temperature=2.5, diversity_gamma=0.7)
    t, dy = np.array([-30.0, -1.0, 0.0, 2.0, 40.0]), rng.standard_normal(5)
    y, sp_cache = entropy_ops.softplus_forward(bk64.asarray(t))
    results = _agree_all([
        (_ref(jr.entropy.softmax, inv_temperature=2.5), [scores], dp,
         [entropy_ops.softmax_backward(bk64.asarray(dp), sm_cache)]),
        (jr.entropy.entropy, [probs], dh, [entropy_ops.entropy_backward(bk64.asarray(dh), ent_cache)]),
        (_ref(jr.entropy.entropy_penalty, inv_temperature=2.5, diversity_gamma=0.7), [scores], (1.3, 0.0, 0.0),
         [entropy_ops.entropy_penalty_backward(1.3, pen_cache)]),
        (jr.entropy.softplus, [t], dy, [entropy_ops.softplus_backward(bk64.asarray(dy), sp_cache)]),
    ])  # fmt: skip
    for (out, _), value in zip(results, (p, h, None, y)):
        assert value is None or rel_error(out, _host(value)) < 1e-14
    assert rel_error(np.array(results[2][0]), np.array([float(_host(v)) for v in pen])) < 1e-14
    dprobs = results[1][1][0]
    np.testing.assert_allclose(dprobs[..., 1], -dh * np.log(1e-5), rtol=1e-14)  # below eps: -log eps
    np.testing.assert_allclose(dprobs[..., 2], -dh * (np.log(1e-5) + 1), rtol=1e-14)  # at eps: the gradient passes


def test_gumbel_op_backwards(bk64, rng):
    x, C = rng.standard_normal((N, D)), 1.5 * rng.standard_normal((K, D))
    x[0] = C[2]  # distance 0, under the clamp: no gradient through that pair
    dl, dq = rng.standard_normal((N, K)), rng.standard_normal((N, D))
    X, Cb, dL, dQ = bk64.asarray(x), bk64.asarray(C), bk64.asarray(dl), bk64.asarray(dq)
    checks, values = [], []
    for metric in ("euclidean", "dot"):
        logits, cache = gumbel_ops.code_logits_forward(X, Cb, metric=metric)
        checks.append((_ref(jr.gumbel.code_logits, metric=metric), [x, C], dl,
                       list(gumbel_ops.code_logits_backward(dL, cache))))  # fmt: skip
        values.append(logits)
    lg = _host(logits)
    noise = jr.gumbel.gumbel_noise_host((N, K), np.random.default_rng(5))
    _, sm_cache = gumbel_ops.softmax_forward(bk64.asarray(lg))
    y, gs_cache = gumbel_ops.gumbel_softmax_forward(bk64.asarray(lg), temperature=0.7, noise=bk64.asarray(noise))
    yh = _host(y)
    _, soft_cache = gumbel_ops.soft_assignment_forward(bk64.asarray(yh), Cb)
    idx = np.array([3, 0, 3, 3, 5, 0, 1, 3, 5, 5, 0])  # repeats; codes 2, 4, 6 unused
    hard, st_cache = gumbel_ops.straight_through_gumbel_forward(Cb, bk64.asarray(idx))
    probs, dh = _distributions(rng, (N, K)), rng.standard_normal(N)
    _, ent_cache = gumbel_ops.clamped_entropy_forward(bk64.asarray(probs))
    checks += [
        (jr.gumbel.softmax, [lg], dl, [gumbel_ops.softmax_backward(dL, sm_cache)]),
        (_ref(jr.gumbel.gumbel_softmax, temperature=0.7, noise=noise), [lg], dl,
         [gumbel_ops.gumbel_softmax_backward(dL, gs_cache)]),
        (jr.gumbel.soft_assignment, [yh, C], dq, list(gumbel_ops.soft_assignment_backward(dQ, soft_cache))),
        (jr.gumbel.straight_through_gumbel, [np.eye(K)[idx], C], dq,
         list(gumbel_ops.straight_through_gumbel_backward(dQ, st_cache))),
        (jr.gumbel.clamped_entropy, [probs], dh, [gumbel_ops.clamped_entropy_backward(bk64.asarray(dh), ent_cache)]),
    ]  # fmt: skip
    L12 = rng.standard_normal((12, K))
    for P in (1, 3):  # rows grouped by position i mod P
        loss, cache = gumbel_ops.diversity_loss_forward(bk64.asarray(L12), inverse_temperature=2.0, positions=P)
        checks.append((_ref(jr.gumbel.diversity_loss, inverse_temperature=2.0, positions=P), [L12], 0.9,
                       [gumbel_ops.diversity_loss_backward(0.9, cache)]))  # fmt: skip
        values.append(loss)
    groups = np.array([0, 2, 2, 0, 2, 2, 0, 0, 2, 2, 0, 2])  # positions 1 and 3 of P = 4 have no rows
    loss, cache = grouped_diversity_forward(bk64.asarray(L12), bk64.asarray(groups), 4, inverse_temperature=2.0)
    checks.append((_ref(jr.gumbel.grouped_diversity_loss, groups=groups, num_groups=4, inverse_temperature=2.0),
                   [L12], 0.9, [grouped_diversity_backward(0.9, cache)]))  # fmt: skip
    values.append(loss)
    results = _agree_all(checks)
    for (out, _), value in zip([*results[:2], *results[-3:]], values):
        assert rel_error(out, _host(value)) < 1e-13
    assert rel_error(results[3][0], yh) < 1e-14
    np.testing.assert_array_equal(results[5][0], _host(hard))
    assert np.all(results[5][1][1][[2, 4, 6]] == 0)  # unused codes get nothing


def test_conv_backwards(bk64, rng):
    x = rng.standard_normal((2, 7, 6, 3))
    W, b = rng.standard_normal((3, 2, 3, 4)), rng.standard_normal(4)  # a 3 x 2 kernel, C = 3 -> F = 4
    y, cache = conv_ops.conv2d_forward(bk64.asarray(x), bk64.asarray(W), bk64.asarray(b), stride=2, padding=1)
    dy = rng.standard_normal(tuple(y.shape))
    Wt, bt = rng.standard_normal((3, 3, 4, 2)), rng.standard_normal(2)  # Cin = 3 -> Cout = 2, a 3 x 4 kernel
    # stride 3 with output_padding 2 here; stride 2, padding 1, output_padding 1 in the ConvNet below
    yt, cache_t = conv_ops.conv_transpose2d_forward(bk64.asarray(x), bk64.asarray(Wt), bk64.asarray(bt), stride=3,
                                                    padding=0, output_padding=2)  # fmt: skip
    dyt = rng.standard_normal(tuple(yt.shape))
    results = _agree_all([
        (_ref(jr.conv.conv2d, stride=2, padding=1), [x, W, b], dy,
         list(conv_ops.conv2d_backward(bk64.asarray(dy), cache))),
        (_ref(jr.conv.conv_transpose2d, stride=3, padding=0, output_padding=2), [x, Wt, bt], dyt,
         list(conv_ops.conv_transpose2d_backward(bk64.asarray(dyt), cache_t))),
    ])  # fmt: skip
    assert rel_error(results[0][0], _host(y)) < 1e-14 and rel_error(results[1][0], _host(yt)) < 1e-14


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
    # the soft paths (docs/math.md section 9); "noise": Gumbel noise perturbs the straight-through y
    "gumbel-noise": dict(straight_through=True, sample_codebook_temp=0.8, noise=True, learnable_codebook=True,
                         commitment_weight=0.5),
    "gumbel-cosine-diversity": dict(straight_through=True, use_cosine_sim=True, codebook_diversity_loss_weight=0.2,
                                    codebook_diversity_temperature=3.0, commitment_weight=0.5),
    "soft-split-diversity": dict(soft_assignment=True, sample_codebook_temp=0.6, learnable_codebook=True,
                                 codebook_weight=1.0, commitment_weight=0.25, codebook_diversity_loss_weight=0.3,
                                 codebook_diversity_temperature=2.0),
}  # fmt: skip


@pytest.mark.parametrize("name", list(QUANTIZE_CONFIGS))
def test_quantize_backward(rng, name):
    opts = dict(QUANTIZE_CONFIGS[name])
    x, C = rng.standard_normal((N, D)), rng.standard_normal((K, D))
    idx = rng.integers(0, K, size=N)  # held fixed: any assignment will do
    g, dloss = rng.standard_normal((N, D)), 0.4 + rng.random()
    noise = jr.gumbel.gumbel_noise_host((N, K), np.random.default_rng(3)) if opts.pop("noise", False) else None

    def run(xp):
        out, cache = quantize_forward(_on(xp, x), _on(xp, C), indices=_on(xp, idx),
                                      noise=None if noise is None else _on(xp, noise), **opts)  # fmt: skip
        return quantize_backward(_on(xp, g), dloss, cache), (out.quantized, out.loss)

    _agree_backends(_ref(jr.vq.vq_layer, indices=idx, noise=noise, **opts), [x, C], (g, dloss), run)


RESIDUAL_CASES = {
    "per-depth": dict(routing="per_depth"),
    "sum": dict(routing="sum"),
    "per-depth-rotation": dict(routing="per_depth", rotation_trick=True),
    "sum-rotation": dict(routing="sum", rotation_trick=True),
    "shared": dict(routing="per_depth", shared=True),
    "sum-shared-cosine": dict(routing="sum", shared=True, use_cosine_sim=True),
    "orthogonal-subsets": dict(routing="per_depth", orthogonal=True),
    # every depth samples with Gumbel noise from its own generator; the straight-through y per depth
    "gumbel-sampling": dict(routing="per_depth", straight_through=True, sample_codebook_temp=0.7, sampling=True),
    "soft-diversity": dict(routing="per_depth", soft_assignment=True, sample_codebook_temp=0.6,
                           codebook_diversity_loss_weight=0.3, codebook_diversity_temperature=2.0),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RESIDUAL_CASES))
def test_residual_backward(rng, name):
    case = dict(RESIDUAL_CASES[name])
    routing, shared, orth = case.pop("routing"), case.pop("shared", False), case.pop("orthogonal", False)
    sampling = case.pop("sampling", False)
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
        rngs = [np.random.default_rng(10 + level) for level in range(Q)] if sampling else None  # fresh each run
        out, cache = residual_forward(_on(xp, x), arrays, routing=routing, indices=_on(xp, idx), rngs=rngs, **opts)
        if orth:
            ids = [_on(xp, c) for c in code_ids]
            out, cache = residual_add_orthogonal(out, cache, arrays, weight=0.7, code_ids=ids)
        dx, dcbs = residual_backward(_on(xp, g), _on(xp, dlosses), cache)
        return [dx, *codebook_gradients(dcbs, shared=shared)], (out.quantized, out.losses)

    ref_opts = dict(opts, orthogonal_reg_weight=0.7 if orth else 0.0)
    noises = [jr.gumbel.gumbel_noise_host((N, K), np.random.default_rng(10 + level)) for level in range(Q)]
    fn = lambda x, *c: jr.residual.residual_vq(  # noqa: E731
        x, c, idx, routing=routing, code_ids=code_ids, noises=noises if sampling else None, **ref_opts
    )
    _agree_backends(fn, [x] + cbs[: 1 if shared else Q], (g, dlosses), run)


FSQ_LAYER_CASES = {
    "paper-projected": dict(levels=LEVELS, bias=True),
    "symmetric-rotated-noisy-clamp": dict(levels=SYM_LEVELS, preserve_symmetry=True, hard_clamp=True, rotation=True,
                                          noise=True, bias=False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FSQ_LAYER_CASES))
def test_fsq_layer_backward(rng, name):
    case = dict(FSQ_LAYER_CASES[name])
    levels, bias, rotated, noisy = (
        case.pop("levels"),
        case.pop("bias"),
        case.pop("rotation", False),
        case.pop("noise", False),
    )
    C, d, dim = 2, len(levels), 7
    x, g = 1.5 * rng.standard_normal((N, dim)), rng.standard_normal((N, dim))
    params = [rng.standard_normal((dim, C * d)), rng.standard_normal(C * d), rng.standard_normal((C * d, dim)),
              rng.standard_normal(dim)][:: 1 if bias else 2]  # fmt: skip
    R = np.linalg.qr(rng.standard_normal((d, d)))[0] if rotated else None
    noise = (rng.random((N * C, d)) < 0.4, rng.random((N * C, d)) - 0.5) if noisy else None

    def run(xp):
        p = [_on(xp, a) for a in params]
        pin, pout = (
            (Projection(p[0], p[1]), Projection(p[2], p[3]))
            if bias
            else (Projection(p[0], None), Projection(p[1], None))
        )
        layer_noise = None if noise is None else (_on(xp, noise[0]), _on(xp, noise[1]))
        out, cache = fsq_layer_forward(_on(xp, x), levels, num_codebooks=C, project_in=pin, project_out=pout,
                                       rotation=None if R is None else _on(xp, R), noise=layer_noise, **case)  # fmt: skip
        dx, grads = fsq_layer_backward(_on(xp, g), cache)
        names = ["project_in.W", "project_in.b", "project_out.W", "project_out.b"][:: 1 if bias else 2]
        assert sorted(grads) == sorted(names)
        return [dx, *[grads[k] for k in names]], (out.quantized,)

    def fn(x, *p):
        pin, pout = (p[:2], p[2:]) if bias else (p[:1], p[1:])
        return jr.fsq.fsq_layer(x, levels, num_codebooks=C, project_in=pin, project_out=pout, rotation=R, noise=noise,
                                **case)  # fmt: skip

    res = _agree_backends(fn, [x, *params], g, run)
    names = ["W_in", "b_in", "W_out", "b_out"][:: 1 if bias else 2]
    tq, tdx, tgrads = fsq_layer_grads(x, levels, g, C=C, R=R, symmetric=case.get("preserve_symmetry", False),
                                      hard=case.get("hard_clamp", False), noise=noise, **dict(zip(names, params)))  # fmt: skip
    _close([res.out, *res.reference], [tq, tdx, *tgrads.values()])  # the second oracle: torch


@pytest.mark.parametrize("hard, soft, active, noisy", [(True, None, None, False), (False, (1.5, 0.8, 2.0), 3, True)],
                         ids=["hard-clamp", "tanh-soft-dropout-noisy"])  # fmt: skip
def test_residual_fsq_core_backward(rng, hard, soft, active, noisy):
    levels, Q, dim = (8, 5, 2), 4, 7
    d = len(levels)
    L = np.asarray(levels, dtype=np.float64)
    scales = np.stack([L**-level for level in range(Q)])  # (Q, d): depth l's grid shrunk by L^-l
    c = 1 + 1 / (L - 1) if hard else np.asarray(soft)  # the hard clamp's input clamp: the first grid's reach
    x, g = 1.5 * rng.standard_normal((N, dim)), rng.standard_normal((N, dim))
    params = [
        rng.standard_normal((dim, d)),
        rng.standard_normal(d),
        rng.standard_normal((d, dim)),
        rng.standard_normal(dim),
    ]
    noise = [(rng.random((N, d)) < 0.3, rng.random((N, d)) - 0.5) for _ in range(active or Q)] if noisy else None

    def run(xp):
        p = [_on(xp, a) for a in params]
        depth_noise = None if noise is None else [(_on(xp, m), _on(xp, n)) for m, n in noise]
        out, cache = residual_fsq_forward(_on(xp, x), levels, _on(xp, scales), num_active=active,
                                          project_in=Projection(p[0], p[1]), project_out=Projection(p[2], p[3]),
                                          soft_clamp=_on(xp, c), hard_clamp=hard, noise=depth_noise)  # fmt: skip
        dx, grads = residual_fsq_backward(_on(xp, g), cache)
        return [dx, *[grads[k] for k in ("project_in.W", "project_in.b", "project_out.W", "project_out.b")]], (
            out.quantized,
        )

    def fn(x, *p):
        return jr.fsq.residual_fsq(x, levels, num_quantizers=Q, num_active=active, project_in=p[:2], project_out=p[2:],
                                   soft_clamp_value=c, hard_clamp=hard, noise=noise)  # fmt: skip

    res = _agree_backends(fn, [x, *params], g, run)
    state = dict(zip(("project_in.W", "project_in.b", "project_out.W", "project_out.b"), params))
    tq, tdx, tgrads = residual_fsq_grads(x, g, levels, Q, state=state, soft=c, hard=hard, active=active, noise=noise)
    _close([res.out, *res.reference], [tq, tdx, *tgrads.values()])  # the second oracle: torch


LFQ_NAMES = {"W_in": "project_in_W", "b_in": "project_in_b", "W_out": "project_out_W", "b_out": "project_out_b"}
LFQ_CASES = {
    # options of vqref.core.lfq.LFQOptions; "params": the projections (and "R", a rotation) the case has
    "spherical-commitment-masked": dict(spherical=True, codebook_scale=0.5, commitment_loss_weight=0.3, params=(),
                                        loss_rows=True),
    "projected-clamp-softplus": dict(soft_clamp=1.5, softplus_offset=5.0, params=("W_in", "b_in", "W_out", "b_out")),
    "cosine-rotated-no-entropy-rows": dict(cosine_scale=1.2, commitment_loss_weight=0.2, diversity_gamma=0.6,
                                           params=("W_in", "W_out", "b_out", "R"), entropy_rows=()),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LFQ_CASES))
def test_lfq_core_backward(rng, name):
    case = dict(LFQ_CASES[name])
    names = case.pop("params")
    C, d, dim = 2, 3, 5
    projected = "W_in" in names
    x = rng.standard_normal((N, dim if projected else C * d))
    g = rng.standard_normal((N, dim if projected else C * d))
    shapes = {"W_in": (dim, C * d), "b_in": (C * d,), "W_out": (C * d, dim), "b_out": (dim,)}
    params = {k: 0.6 * rng.standard_normal(shapes[k]) for k in names if k != "R"}
    R = np.linalg.qr(rng.standard_normal((d, d)))[0] if "R" in names else None
    entropy_rows = np.array(case.pop("entropy_rows", [0, 2, 3, 7, 10]), dtype=np.int64)  # (n,) tokens of the penalty
    loss_rows = np.array([1, 2, 5, 9]) if case.pop("loss_rows", False) else None  # a mask's tokens
    options = LFQOptions(num_codebooks=C, codebook_dim=d, inv_temperature=2.0, **case)
    daux = 1.7

    def run(xp):
        core = LFQParams(
            rotation=None if R is None else _on(xp, R), **{LFQ_NAMES[k]: _on(xp, v) for k, v in params.items()}
        )
        out, cache = lfq_forward(_on(xp, x), core, options, entropy_rows=_on(xp, entropy_rows),
                                 loss_rows=None if loss_rows is None else _on(xp, loss_rows))  # fmt: skip
        dx, grads = lfq_backward(_on(xp, g), daux, cache)
        assert sorted(grads) == sorted(LFQ_NAMES[k] for k in params)
        return [dx, *[grads[LFQ_NAMES[k]] for k in params]], (out.quantized, out.aux_loss)

    opts = {k: v for k, v in options._asdict().items() if k != "fast"}
    opts["soft_clamp_value"] = opts.pop("soft_clamp")
    fn = lambda x, *p: jr.lfq.lfq(x, **dict(zip(params, p)), rotation=R, entropy_rows=entropy_rows,  # noqa: E731
                                  loss_rows=loss_rows, **opts)  # fmt: skip
    res = _agree_backends(fn, [x, *params.values()], (g, daux), run)
    if entropy_rows.size:  # the second oracle (its penalty needs a row): torch, written with .detach()
        o = options
        ref = lfq_grads(x, C=C, d=d, g=g, daux=daux, s=o.codebook_scale, spherical=o.spherical, clamp=o.soft_clamp,
                        w_commit=o.commitment_loss_weight, gamma=o.diversity_gamma, tau=2.0, softplus=o.softplus_offset,
                        cosine=o.cosine_scale, R=R, rows=entropy_rows, mask_rows=loss_rows, **params)  # fmt: skip
        _close([*res.out, *res.reference], [ref["quantized"], ref["aux"], ref["dx"], *[ref["d" + k] for k in params]])


def test_residual_lfq_core_backward(rng):
    Q, d, dim = 2, 3, 5
    x, g, dlosses = rng.standard_normal((N, dim)), rng.standard_normal((N, dim)), np.array([1.3, -0.7])
    params = [
        rng.standard_normal((dim, d)),
        rng.standard_normal(d),
        rng.standard_normal((d, dim)),
        rng.standard_normal(dim),
    ]
    rotations = [np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(Q)]
    entropy_rows = [np.array([0, 3, 4, 8]), None]  # each depth its own tokens (None: all)
    shared = dict(
        commitment_loss_weight=0.3, softplus_offset=5.0, inv_temperature=3.0
    )  # (spherical: the module's test)
    options = [LFQOptions(num_codebooks=1, codebook_dim=d, codebook_scale=2.0**-level, soft_clamp=1.5 * 2.0**-level,
                          **shared) for level in range(Q)]  # fmt: skip

    def run(xp):
        rows = [None if r is None else _on(xp, r) for r in entropy_rows]
        out, cache = residual_lfq_forward(_on(xp, x), LFQParams(*[_on(xp, a) for a in params]),
                                          [LFQParams(rotation=_on(xp, r)) for r in rotations], options,
                                          entropy_rows=rows)  # fmt: skip
        dx, grads = residual_lfq_backward(_on(xp, g), _on(xp, dlosses), cache)
        return [dx, *[grads[k] for k in ("project_in_W", "project_in_b", "project_out_W", "project_out_b")]], (
            out.quantized,
            out.losses,
        )

    fn = lambda x, *p: jr.lfq.residual_lfq(x, *p, num_quantizers=Q, codebook_dim=d, soft_clamp_value=1.5,  # noqa: E731
                                           rotations=rotations, entropy_rows=entropy_rows, **shared)  # fmt: skip
    res = _agree_backends(fn, [x, *params], (g, dlosses), run)
    names = ("project_in.W", "project_in.b", "project_out.W", "project_out.b")
    ref = residual_lfq_grads(x, g, dlosses, params=dict(zip(names, params)), Q=Q, d=d, clamp=1.5,
                             w_commit=0.3, softplus=5.0, rotations=rotations, tau=3.0,
                             rows=[np.arange(N) if r is None else r for r in entropy_rows])  # the second oracle  # fmt: skip
    _close([*res.out, *res.reference], [ref["quantized"], ref["losses"], ref["dx"], *[ref[k] for k in names]])


def test_residual_stack_backward(rng):
    # the recursion with any quantizer per depth: LFQ depths of scale 2^-l with a commitment loss each
    Q, d = 3, 4
    x, g, dlosses = rng.standard_normal((N, d)), rng.standard_normal((N, d)), 0.5 + rng.random(Q)
    opts = [dict(num_codebooks=1, codebook_dim=d, codebook_scale=0.5**level, commitment_loss_weight=0.2 * (level + 1),
                 entropy_loss_weight=0.0) for level in range(Q)]  # fmt: skip

    def run(xp):
        depths = [functools.partial(lfq_forward, params=LFQParams(), options=LFQOptions(**o)) for o in opts]
        out, caches = residual_stack_forward(_on(xp, x), depths)
        dls = [_on(xp, dlosses)[level] for level in range(Q)]  # 0-d arrays
        dx, extras = residual_stack_backward(_on(xp, g), dls, caches, lfq_backward)
        assert len(extras) == Q and all(e == {} for e in extras)  # no parameters at any depth
        np.testing.assert_allclose(_host(out.quantized + out.residuals[-1]), x, rtol=1e-14)  # sum + r_Q = x
        return [dx], (out.quantized, xp.stack([o.aux_loss for o in out.depths]))

    depths = [_ref(jr.lfq.lfq, **o) for o in opts]
    _agree_backends(_ref(jr.residual.residual_stack, depths=depths), [x], (g, dlosses), run)


LAYER_CASES = {
    # heads, a codebook per head, projections, absent rows returning x
    "separate-projected-passthrough": dict(heads=2, separate=True, projected=True, passthrough=True),
    # one codebook for every piece, listed in vector-quantize-pytorch's order (b, h, t)
    "shared-ordered-masked": dict(heads=3, separate=False, projected=False, passthrough=False),
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_backwards(rng, name):
    case = LAYER_CASES[name]
    H, lead, d = case["heads"], (2, 5), 2
    N_, E = 10, H * d
    dim = 7 if case["projected"] else E
    x = rng.standard_normal((N_, dim))
    mask = rng.random(lead) < 0.7
    params = [rng.standard_normal((dim, E)), rng.standard_normal(E), rng.standard_normal((E, dim)),
              rng.standard_normal(dim)] if case["projected"] else []  # fmt: skip
    host = frame(lead, mask, heads=H, separate=case["separate"], passthrough=case["passthrough"], like=x)
    n = host.rows.shape[0]
    G = H if case["separate"] else 1
    rows_per_stream = n if case["separate"] else n * H
    dstreams = [rng.standard_normal((rows_per_stream, d)) for _ in range(G)]
    outputs = [rng.standard_normal((rows_per_stream, d)) for _ in range(G)]
    dout = rng.standard_normal((N_, dim))
    assert (host.order is None) == case["separate"] and (host.passthrough is not None) == case["passthrough"]

    def run(xp):
        fr = frame(lead, _on(xp, mask), heads=H, separate=case["separate"], passthrough=case["passthrough"],
                   like=_on(xp, x))  # fmt: skip
        p = [_on(xp, a) for a in params]
        streams, in_cache = layer_in_forward(_on(xp, x), LayerProjection(p[0], p[1]) if p else None, fr)
        dx, dW, db = layer_in_backward([_on(xp, a) for a in dstreams], in_cache)
        out, out_cache = layer_out_forward([_on(xp, a) for a in outputs], _on(xp, x),
                                           LayerProjection(p[2], p[3]) if p else None, fr)  # fmt: skip
        douts, dWo, dbo, dpass = layer_out_backward(_on(xp, dout), out_cache)
        assert (dpass is not None) == case["passthrough"]
        grads = [dx, *([dW, db] if p else []), *douts, *([dWo, dbo] if p else []), *([] if dpass is None else [dpass])]
        return grads, (*streams, out)

    layout = dict(rows=host.rows, heads=H, separate=case["separate"], order=host.order)

    def fn(x, *a):
        # x reaches layer_out only in the absent rows that return it: a second input, its own gradient
        pin, a = (a[:2], a[2:]) if params else ((None, None), a)
        outs, a = a[:G], a[G:]
        pout, a = (a[:2], a[2:]) if params else ((None, None), a)
        x_out = a[0] if a else x
        streams = jr.layer.layer_in(x, *pin, **layout)
        return (*streams, jr.layer.layer_out(outs, x_out, *pout, passthrough=case["passthrough"], **layout))

    inputs = [x, *params[:2], *outputs, *params[2:], *([x] if case["passthrough"] else [])]
    _agree_backends(fn, inputs, (*dstreams, dout), run)


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
    # the soft paths: Gumbel-max sampling with the module's generator, the straight-through
    # Gumbel-softmax, the soft code, the diversity loss averaged per position (P = 6 of (2, 6, D))
    "gumbel-sampled-diversity": dict(
        ema_update=False, learnable_codebook=True, stochastic_sample_codes=True, straight_through=True,
        sample_codebook_temp=0.7, codebook_diversity_loss_weight=0.3, codebook_diversity_temperature=2.0,
        commitment_weight=0.4,
    ),
    "soft-cosine-ema": dict(decay=0.8, use_cosine_sim=True, soft_assignment=True, sample_codebook_temp=0.5),
    "gumbel-nearest-diversity-ema": dict(
        decay=0.8, straight_through=True, sample_codebook_temp=0.9, codebook_diversity_loss_weight=0.5,
        codebook_diversity_temperature=3.0,
    ),
    # the maps around the quantizer (vqref.core.layer): projections to codebook_dim, heads, a mask
    "heads-separate-projected-masked": dict(
        ema_update=False, learnable_codebook=True, heads=2, codebook_dim=3, separate_codebook_per_head=True,
        commitment_weight=0.5, mask=True, return_zeros_for_masked_padding=False,
    ),
    "heads-shared-projected-masked-diversity-ema": dict(
        decay=0.8, heads=2, codebook_dim=2, straight_through=True, codebook_diversity_loss_weight=0.4,
        codebook_diversity_temperature=2.0, mask=True,
    ),
}  # fmt: skip


def _layer_options(kw):
    keys = ("commitment_weight", "codebook_weight", "learnable_codebook", "use_cosine_sim", "rotation_trick",
            "straight_through", "soft_assignment", "sample_codebook_temp", "codebook_diversity_loss_weight",
            "codebook_diversity_temperature")  # fmt: skip
    return {k: kw[k] for k in keys if k in kw}


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
def test_vector_quantize_module_backward(rng, name):
    kw = dict(MODULE_CONFIGS[name])
    masked = kw.pop("mask", False)
    vq = VectorQuantize(D, K, seed=0, dtype="float64", **kw)
    state = {k: _host(v) for k, v in vq.state_dict().items()}  # what this forward quantizes with (EMA moves it)
    x, g, dloss = rng.standard_normal((2, 6, D)), rng.standard_normal((2, 6, D)), 0.5 + rng.random()
    mask = rng.random((2, 6)) < 0.7 if masked else None
    rows = None if mask is None else np.flatnonzero(mask)  # the kept rows
    opts = _layer_options(kw)
    if kw.get("codebook_diversity_loss_weight"):
        opts["diversity_positions"] = x.shape[-2]  # row r of (2, 6, D) is at position r mod 6
    if kw.get("stochastic_sample_codes"):  # the noise the forward draws: replayed from a copy of its generator
        opts["noise"] = jr.gumbel.gumbel_noise_host((x.size // D, K), vq.state.rngs[0])
    q, idx, _ = vq(x) if mask is None else vq(x, mask=mask)
    dx = vq.backward(g, dloss=dloss)
    k = _host(idx).astype(np.int64).reshape(-1, vq.heads)  # (N, H)
    k = k if rows is None else k[rows]  # (n, H); the absent rows have -1
    assert np.all(k >= 0)
    if kw.get("orthogonal_reg_weight"):
        opts.update(orthogonal_reg_weight=kw["orthogonal_reg_weight"], orthogonal_code_ids=np.unique(k))
    if "noise" in opts:  # the codes are the Gumbel-max samples of that noise
        logits = -np.linalg.norm(x.reshape(-1, 1, D) - state["codebook"][None], axis=-1)
        np.testing.assert_array_equal(k[:, 0], np.argmax(logits / kw["sample_codebook_temp"] + opts["noise"], axis=1))
    # an EMA codebook is no parameter: the module keeps no gradient of it (the soft paths have one)
    names = list(vq.learnable_names())
    assert sorted(vq.grads) == sorted(names) and ("codebook" in names) == bool(kw.get("learnable_codebook"))
    layout = dict(rows=rows, heads=vq.heads, separate=vq.separate_codebook_per_head,
                  passthrough=not vq.return_zeros_for_masked_padding)  # fmt: skip

    def fn(x, *p):
        a = {**state, **dict(zip(names, p))}
        return jr.layer.quantizer_layer(x, a["codebook"], k, project_in=_projection(a, "project_in"),
                                        project_out=_projection(a, "project_out"), **layout, **opts)  # fmt: skip

    res = _agree(fn, [x.reshape(-1, D), *[state[n] for n in names]], (g.reshape(-1, D), dloss),
                 [dx.reshape(-1, D), *[vq.grads[n] for n in names]])  # fmt: skip
    assert rel_error(_host(q).reshape(-1, D), res.out[0]) < 1e-13


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


@pytest.mark.parametrize("shared", [False, True])
def test_grouped_residual_vq_module_backward(rng, shared):
    """Each group is a residual stack on its slice of the features: the reference is
    :func:`residual.residual_vq` per group, side by side."""
    G, Q = 2, 3
    grvq = GroupedResidualVQ(
        dim=G * D, groups=G, num_quantizers=Q, codebook_size=K, seed=1, dtype="float64", ema_update=False,
        learnable_codebook=True, commitment_weight=0.3, shared_codebook=shared,
    )  # fmt: skip
    cbs = [[_host(layer.codebook) for layer in group][: 1 if shared else Q] for group in grvq.layers]
    x, g, dl = rng.standard_normal((2, 6, G * D)), rng.standard_normal((2, 6, G * D)), 0.5 + rng.random((G, Q))
    _, idx, _ = grvq(x)
    dx = grvq.backward(g, dl)
    k = [_host(idx[i, ...]).astype(np.int64).reshape(-1, Q) for i in range(G)]
    n = len(cbs[0])

    def fn(x, *c):
        outs = [
            jr.residual.residual_vq(
                x[:, i * D : (i + 1) * D], c[i * n : (i + 1) * n], k[i], learnable_codebook=True, commitment_weight=0.3
            )  # fmt: skip
            for i in range(G)
        ]
        return jnp.concatenate([o[0] for o in outs], axis=1), jnp.stack([o[1] for o in outs])

    grads = [grvq.grads[name] for name in grvq.learnable_names()]
    assert len(grads) == G * n
    _agree(fn, [x.reshape(-1, G * D), *[c for group in cbs for c in group]], (g.reshape(-1, G * D), dl),
           [dx.reshape(-1, G * D), *grads])  # fmt: skip


FSQ_MODULE_CONFIGS = {
    "two-codebooks": dict(num_codebooks=2),
    "projected-rotated": dict(dim=7, num_codebooks=2, orthogonal_rotation=True),
    "symmetric-clamp-noisy-nobias": dict(levels=SYM_LEVELS, preserve_symmetry=True, bound_hard_clamp=True,
                                         noise_dropout=0.3, dim=7, projection_has_bias=False),
}  # fmt: skip


def _projection(state: dict, name: str):
    """``(W, b)`` or ``(W,)`` of a module's projection from its state dict, or None."""
    if name + ".W" not in state:
        return None
    return tuple(state[name + k] for k in (".W", ".b") if name + k in state)


@pytest.mark.parametrize("name", list(FSQ_MODULE_CONFIGS))
def test_fsq_module_backward(rng, name):
    kw = dict(FSQ_MODULE_CONFIGS[name])
    levels = kw.pop("levels", LEVELS)
    fsq = FSQ(levels, dtype="float64", seed=3, **kw)
    x, g = 2 * rng.standard_normal((3, 4, fsq.dim)), rng.standard_normal((3, 4, fsq.dim))
    state = {k: _host(v) for k, v in fsq.state_dict().items()}
    noise = None
    if fsq.noise_dropout:  # the draws of the next forward, from a copy of the module's generator
        gen, shape = fsq.state.rngs[0], (12 * fsq.num_codebooks, len(levels))
        noise = (gen.random(shape) < fsq.noise_dropout, gen.random(shape) - 0.5)
    q, _ = fsq(x)
    dx = fsq.backward(g)
    pin, pout = _projection(state, "project_in"), _projection(state, "project_out")
    names = list(fsq.learnable_names())
    assert sorted(names) == sorted(fsq.grads)

    def fn(x, *p):
        n_in = 0 if pin is None else len(pin)
        return jr.fsq.fsq_layer(x, levels, num_codebooks=fsq.num_codebooks, project_in=p[:n_in] or None,
                                project_out=p[n_in:] or None, rotation=state.get("orthogonal_rot"),
                                preserve_symmetry=fsq.preserve_symmetry, hard_clamp=fsq.bound_hard_clamp, noise=noise)  # fmt: skip

    inputs = [x.reshape(12, -1), *(pin or ()), *(pout or ())]
    res = _agree(fn, inputs, g.reshape(12, -1), [dx.reshape(12, -1), *[fsq.grads[k] for k in names]])
    assert rel_error(q.reshape(12, -1), res.out) < 1e-13


RESIDUAL_FSQ_CONFIGS = {
    "projected-noisy": dict(dim=7, num_quantizers=3, noise_dropout=0.3),
    "tanh-soft-dropout": dict(num_quantizers=4, bound_hard_clamp=False, soft_clamp_input_value=[1.5, 0.8, 2.0],
                              quantize_dropout=True, quantize_dropout_cutoff_index=1, seed=1),  # seed 1: 3 of 4 run
}  # fmt: skip


@pytest.mark.parametrize("name", list(RESIDUAL_FSQ_CONFIGS))
def test_residual_fsq_module_backward(rng, name):
    levels = (8, 5, 2)
    rq = ResidualFSQ(levels=levels, dtype="float64", **{"seed": 2, **RESIDUAL_FSQ_CONFIGS[name]})
    Q, d = rq.num_quantizers, len(levels)
    x, g = 1.5 * rng.standard_normal((N, rq.dim)), rng.standard_normal((N, rq.dim))
    noise = None
    if rq.noise_dropout:  # replayed: one (mask, noise) per depth from a copy of the generator
        gen = rq.state.rngs[0]
        noise = [(gen.random((N, d)) < rq.noise_dropout, gen.random((N, d)) - 0.5) for _ in range(Q)]
    state = {k: _host(v) for k, v in rq.state_dict().items()}
    q, idx = rq(x)
    dx = rq.backward(g)
    active = int(np.sum(np.all(_host(idx) >= 0, axis=0)))  # the depths quantize dropout kept
    assert active < Q if rq.quantize_dropout else active == Q
    L = np.asarray(levels, dtype=np.float64)
    c = 1 + 1 / (L - 1) if rq.bound_hard_clamp else np.asarray(rq.soft_clamp_input_value)
    pin, pout = _projection(state, "project_in"), _projection(state, "project_out")

    def fn(x, *p):
        return jr.fsq.residual_fsq(x, levels, num_quantizers=Q, num_active=active, project_in=p[:2] or None,
                                   project_out=p[2:] or None, soft_clamp_value=c, hard_clamp=rq.bound_hard_clamp,
                                   noise=noise)  # fmt: skip

    names = list(rq.learnable_names())
    res = _agree(fn, [x, *(pin or ()), *(pout or ())], g, [dx, *[rq.grads[k] for k in names]])
    assert rel_error(_host(q), res.out) < 1e-13


LFQ_MODULE_CONFIGS = {
    "projected-spherical-subset": dict(spherical=True, commitment_loss_weight=0.4, frac_per_sample_entropy=0.6),
    "cosine-rotated-clamp-softplus-masked": dict(cosine_sim_project_in=True, orthogonal_rotation=True,
                                                 soft_clamp_input_value=1.5, experimental_softplus_entropy_loss=True,
                                                 commitment_loss_weight=0.2, diversity_gamma=0.6, mask=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LFQ_MODULE_CONFIGS))
def test_lfq_module_backward(rng, name):
    kw = dict(LFQ_MODULE_CONFIGS[name])
    masked = kw.pop("mask", False)
    C, d, dim = 2, 3, 5
    lfq = LFQ(dim=dim, codebook_size=2**d, num_codebooks=C, dtype="float64", seed=3, **kw)
    x, g = rng.standard_normal((3, 4, dim)), rng.standard_normal((3, 4, dim))
    mask = rng.random((3, 4)) < 0.7 if masked else None
    tokens = np.arange(12) if mask is None else np.flatnonzero(mask)  # the tokens the losses count
    entropy_rows = tokens
    if lfq.frac_per_sample_entropy < 1:  # the forward's random subset, from a copy of its generator
        pick = lfq.state.rngs[0].choice(tokens.size, size=int(tokens.size * lfq.frac_per_sample_entropy), replace=False)
        entropy_rows = tokens[np.sort(pick)]
    state = {k: _host(v) for k, v in lfq.state_dict().items()}
    q, _, aux = lfq(x, inv_temperature=3.0, mask=mask)
    dx = lfq.backward(g, 0.9)
    names = {"project_in.W": "W_in", "project_in.b": "b_in", "project_out.W": "W_out", "project_out.b": "b_out"}
    keys = [k for k in names if k in state]
    assert sorted(lfq.grads) == sorted(keys)

    def fn(x, *p):
        return jr.lfq.lfq(x, **{names[k]: a for k, a in zip(keys, p)}, num_codebooks=C, codebook_dim=d,
                          codebook_scale=lfq.codebook_scale, spherical=lfq.spherical,
                          soft_clamp_value=lfq.soft_clamp_input_value, entropy_loss_weight=lfq.entropy_loss_weight,
                          commitment_loss_weight=lfq.commitment_loss_weight, diversity_gamma=lfq.diversity_gamma,
                          inv_temperature=3.0,
                          softplus_offset=lfq.entropy_loss_offset if lfq.experimental_softplus_entropy_loss else None,
                          cosine_scale=lfq.cosine_sim_project_in_scale, rotation=state.get("orthogonal_rot"),
                          entropy_rows=entropy_rows, loss_rows=None if mask is None else tokens)  # fmt: skip

    res = _agree(fn, [x.reshape(12, dim), *[state[k] for k in keys]], (g.reshape(12, dim), 0.9),
                 [dx.reshape(12, dim), *[lfq.grads[k] for k in keys]])  # fmt: skip
    assert rel_error(q.reshape(12, dim), res.out[0]) < 1e-13 and abs(float(aux) - float(res.out[1])) < 1e-13


def test_residual_lfq_module_backward(rng):
    Q, d, dim = 2, 3, 5
    rq = ResidualLFQ(dim=dim, num_quantizers=Q, codebook_size=2**d, spherical=True, soft_clamp_input_value=1.5,
                     orthogonal_rotation=True, experimental_softplus_entropy_loss=True, commitment_loss_weight=0.3,
                     frac_per_sample_entropy=0.5, dtype="float64", seed=2)  # fmt: skip
    x, g, dl = rng.standard_normal((N, dim)), rng.standard_normal((N, dim)), np.array([1.3, -0.7])
    gen = rq.state.rngs[0]  # every depth's entropy subset, drawn depth after depth: replayed
    rows = [np.sort(gen.choice(N, size=int(N * 0.5), replace=False)) for _ in range(Q)]
    state = {k: _host(v) for k, v in rq.state_dict().items()}
    q, _, losses = rq(x)
    dx = rq.backward(g, dl)
    keys = ("project_in.W", "project_in.b", "project_out.W", "project_out.b")
    fn = lambda x, *p: jr.lfq.residual_lfq(  # noqa: E731
        x, *p, num_quantizers=Q, codebook_dim=d, soft_clamp_value=1.5, spherical=True, commitment_loss_weight=0.3,
        softplus_offset=rq.entropy_loss_offset, rotations=[state[f"layers.{level}.orthogonal_rot"] for level in range(Q)],
        entropy_rows=rows,
    )  # fmt: skip
    res = _agree(fn, [x, *[state[k] for k in keys]], (g, dl), [dx, *[rq.grads[k] for k in keys]])
    assert rel_error(q, res.out[0]) < 1e-13 and rel_error(_host(losses), res.out[1]) < 1e-13


def test_conv_net_module_backward(rng):
    net = ConvNet(
        [
            Conv2d(3, 4, 3, stride=2, padding=1, rng=0, dtype="float64"),
            ConvTranspose2d(4, 2, 4, stride=2, padding=1, output_padding=1, rng=1, dtype="float64"),
        ]
    )
    x = rng.standard_normal((2, 7, 6, 3))
    out = net.forward(x)
    dout = rng.standard_normal(out.shape)  # (2, 9, 7, 2)
    dx = net.backward(dout)
    names = ["0.W", "0.b", "1.W", "1.b"]
    layers = (("conv", 2, 1), ("transpose", 2, 1, 1))
    fn = lambda x, *p: jr.conv.convnet(x, p, layers)  # noqa: E731
    res = _agree(fn, [x, *[net.params[k] for k in names]], dout, [dx, *[net.grads[k] for k in names]])
    assert rel_error(out, res.out) < 1e-13


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


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_vqvae_with_fsq_and_lfq_backward(rng, kind):
    # FSQ and LFQ behind the VQ interface (vqref.nn.vqvae.QuantizerAdapter): FSQ adds no loss, LFQ
    # its auxiliary loss (entropy penalty and commitment), whose upstream gradient is dloss
    T, d, P, H = 3, 4, 10, 9
    if kind == "fsq":
        quantizer = FSQ(LEVELS, dtype="float64")
        quantize = lambda t: (jr.fsq.fsq(t, LEVELS), 0.0)  # noqa: E731
    else:
        quantizer = LFQ(dim=d, codebook_size=2**d, commitment_loss_weight=0.3, dtype="float64", seed=1)
        quantize = functools.partial(jr.lfq.lfq, num_codebooks=1, codebook_dim=d, commitment_loss_weight=0.3)
    model = VQVAE(quantizer, in_dim=P, hidden=H, num_tokens=T, rng=0, dtype="float64")
    x = rng.random((N, P))
    recon, _, losses = model.forward(x)
    dloss, drecon = 0.5 + rng.random(), rng.standard_normal((N, P))
    dx = model.backward(dloss, drecon)
    enc, dec = model.encoder.state_dict(), model.decoder.state_dict()
    names = [f"{i}.{p}" for i in range(2) for p in ("W", "b")]
    fn = lambda x, *p: jr.nn.autoencoder(x, p[:4], p[4:], quantize, token_dim=d)  # noqa: E731
    inputs = [x, *[enc[n] for n in names], *[dec[n] for n in names]]
    ours = [dx, *[model.grads[f"encoder.{n}"] for n in names], *[model.grads[f"decoder.{n}"] for n in names]]
    ref_recon, ref_total = _agree(fn, inputs, (drecon, dloss), ours).out
    assert rel_error(_host(recon), ref_recon) < 1e-13 and abs(float(_host(losses.total)) - ref_total) < 1e-13


def test_conv_vqvae_backward(rng):
    # residual VQ (its losses summed: dloss reaches every depth) with learnable codebooks (named in grads)
    cls, kw = ResidualVQ, dict(num_quantizers=2, ema_update=False, learnable_codebook=True, commitment_weight=0.5)
    d = 3
    quantizer = cls(dim=d, codebook_size=K, seed=3, dtype="float64", **kw)
    model = ConvVQVAE(quantizer, in_channels=2, hidden=4, rng=0, dtype="float64")
    layers = quantizer.layers if quantizer.is_stack else [quantizer]
    cbs = [_host(layer.codebook) for layer in layers]  # what the forward quantizes with
    x = rng.random((2, 8, 12, 2))  # a 2 x 3 grid of tokens per image
    recon, idx, _ = model.forward(x)
    dloss, drecon = 0.5 + rng.random(), rng.standard_normal(recon.shape)
    dx = model.backward(dloss, drecon)
    learnable = layers[0].codebook_is_learnable
    enc, dec = model.encoder.state_dict(), model.decoder.state_dict()
    names = [f"{i}.{p}" for i in range(3) for p in ("W", "b")]
    opts = {k: v for k, v in kw.items() if k in ("commitment_weight", "learnable_codebook")}

    def fn(x, *p):
        codebooks = p[12:] if learnable else cbs
        return jr.conv.conv_vqvae(x, p[:6], p[6:12], codebooks, _host(idx).astype(np.int64),
                                  residual=quantizer.is_stack, **opts)  # fmt: skip

    inputs = [x, *[enc[n] for n in names], *[dec[n] for n in names], *(cbs if learnable else [])]
    grads = model.grads
    ours = [dx, *[grads[f"encoder.{n}"] for n in names], *[grads[f"decoder.{n}"] for n in names]]
    ours += [grads[f"quantizer.{n}"] for n in quantizer.learnable_names()] if learnable else []
    ref_recon, _ = _agree(fn, inputs, (drecon, dloss), ours).out
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


def _wrong_clamp_kinks(rng):
    z, g = 1.5 * rng.standard_normal((N, len(SYM_LEVELS))), rng.standard_normal((N, len(SYM_LEVELS)))
    z[0, :2] = [-1.0, 1.0]
    _, cache = fsq_ops.symmetric_bound_forward(z, SYM_LEVELS, hard_clamp=True)
    cache = cache._replace(dphi=((z > -1) & (z < 1)).astype(np.float64))  # the open interval: no slope at the kinks
    ref = _ref(jr.fsq.symmetric_bound, levels=SYM_LEVELS, hard_clamp=True)
    return ref, [z], g, [fsq_ops.symmetric_bound_backward(g, cache)]


def _wrong_noise_clamp(rng):
    codes, g = np.clip(np.round(rng.standard_normal((N, 4))), -1, 1), rng.standard_normal((N, 4))
    mask, noise = rng.random((N, 4)) < 0.6, rng.random((N, 4)) - 0.5
    return _ref(jr.fsq.noise_dropout, mask=mask, noise=noise), [codes], g, [g]  # the clamp's zeros forgotten


def _wrong_residual_fsq(rng):
    levels, Q = (8, 5, 2), 3
    L = np.asarray(levels, dtype=np.float64)
    x, g = 0.6 * rng.standard_normal((N, 3)), rng.standard_normal((N, 3))
    out, cache = residual_fsq_forward(x, levels, np.stack([L**-level for level in range(Q)]), hard_clamp=False)
    dx, _ = residual_fsq_backward(g, cache._replace(depths=cache.depths[:1]))  # g reaches x once, not once per depth
    return _ref(jr.fsq.residual_fsq, levels=levels, num_quantizers=Q, hard_clamp=False), [x], g, [dx]


def _wrong_sign_ste(rng):
    z, g = rng.standard_normal((N, 3)), rng.standard_normal((N, 3))
    return _ref(jr.lfq.sign_ste, scale=0.5), [z], g, [np.zeros_like(g)]  # the sign's true derivative, 0


def _wrong_code_scores(rng):
    z, ds = rng.standard_normal((N, 3)), rng.standard_normal((N, 8))
    _, cache = lfq_ops.code_scores_forward_factorised(z, value=0.7)
    grad = lfq_ops.code_scores_backward_factorised(ds, cache._replace(value=0.35))  # the 2 of 2 z . c forgotten
    return _ref(jr.lfq.code_scores, value=0.7), [z], ds, [grad]


def _wrong_entropy_clamp(rng):
    p, dh = _distributions(rng, (N, 8)), rng.standard_normal(N)
    unclamped = -dh[:, None] * (np.log(np.maximum(p, 1e-5)) + 1)  # -(log p + 1) also where the clamp holds p fixed
    return jr.entropy.entropy, [p], dh, [unclamped]


def _wrong_lfq_entropy_share(rng):
    x, g = rng.standard_normal((N, 6)), rng.standard_normal((N, 6))
    options = LFQOptions(num_codebooks=2, codebook_dim=3, inv_temperature=2.0, commitment_loss_weight=0.3)
    _, cache = lfq_forward(x, LFQParams(), options)
    dx, _ = lfq_backward(g, 1.3, cache._replace(entropy=None))  # the entropy penalty's share dropped
    opts = dict(num_codebooks=2, codebook_dim=3, inv_temperature=2.0, commitment_loss_weight=0.3)
    return _ref(jr.lfq.lfq, **opts), [x], (g, 1.3), [dx]


def _wrong_gumbel_codebook(rng):
    x, C, g = rng.standard_normal((N, D)), rng.standard_normal((K, D)), rng.standard_normal((N, D))
    idx = rng.integers(0, K, N)
    opts = dict(sample_codebook_temp=0.8, learnable_codebook=True, commitment_weight=0.5)
    _, soft = quantize_forward(x, C, indices=idx, soft_assignment=True, **opts)
    dx, dC = quantize_backward(g, 0.6, soft)  # y^T g reaches the codebook instead of z^T g
    return _ref(jr.vq.vq_layer, indices=idx, straight_through=True, **opts), [x, C], (g, 0.6), [dx, dC]


def _wrong_diversity(rng):
    logits = rng.standard_normal((12, K))
    _, cache = gumbel_ops.diversity_loss_forward(logits, inverse_temperature=2.0, positions=3)
    grad = gumbel_ops.diversity_loss_backward(0.9 * 3, cache)  # the sum over positions instead of the mean
    return _ref(jr.gumbel.diversity_loss, inverse_temperature=2.0, positions=3), [logits], 0.9, [grad]


def _wrong_conv_kernel(rng):
    x, W, b = rng.standard_normal((2, 7, 6, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)
    y, cache = conv_ops.conv2d_forward(x, W, b, stride=2, padding=1)
    dy = rng.standard_normal(y.shape)
    dx, dW, db = conv_ops.conv2d_backward(dy, cache)
    return _ref(jr.conv.conv2d, stride=2, padding=1), [x, W, b], dy, [dx, dW[::-1, ::-1], db]  # a flipped kernel


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
    "fsq-clamp-kinks-open": _wrong_clamp_kinks,
    "noise-dropout-no-clamp": _wrong_noise_clamp,
    "residual-fsq-once": _wrong_residual_fsq,
    "sign-true-derivative": _wrong_sign_ste,
    "code-scores-half": _wrong_code_scores,
    "entropy-unclamped": _wrong_entropy_clamp,
    "lfq-no-entropy-share": _wrong_lfq_entropy_share,
    "gumbel-soft-codebook-gradient": _wrong_gumbel_codebook,
    "diversity-sum-over-positions": _wrong_diversity,
    "conv-flipped-kernel": _wrong_conv_kernel,
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


@pytest.mark.parametrize(
    "symmetric, hard, noisy", [(False, False, False), (True, True, True)], ids=["paper", "symmetric"]
)
def test_jax_and_torch_agree_on_fsq(rng, symmetric, hard, noisy):
    levels = SYM_LEVELS if symmetric else LEVELS
    z, g = 1.5 * rng.standard_normal((N, len(levels))), rng.standard_normal((N, len(levels)))
    noise = (rng.random(z.shape) < 0.4, rng.random(z.shape) - 0.5) if noisy else None
    opts = dict(hard_clamp=hard, noise=noise)
    out, grads = jr.vjp(_ref(jr.fsq.fsq, levels=levels, preserve_symmetry=symmetric, **opts), [z], g)
    ref = functools.partial(fsq_rows_torch, levels=levels, symmetric=symmetric, hard=hard, noise=noise)
    res = check_against_torch(ref, [z], g, grads, rtol=AGREE)
    np.testing.assert_allclose(res.out, out, rtol=0, atol=1e-15)  # the grid written two ways: within an ulp


def test_jax_and_torch_agree_on_the_straight_through_gumbel_softmax(rng):
    # no torch reference ships for the Gumbel estimators: torch written here from Jang et al. (arXiv 1611.01144)
    import torch

    x, C, g = rng.standard_normal((N, D)), 1.5 * rng.standard_normal((K, D)), rng.standard_normal((N, D))
    idx, noise = rng.integers(0, K, N), jr.gumbel.gumbel_noise_host((N, K), np.random.default_rng(4))
    opts = dict(straight_through=True, sample_codebook_temp=0.8, noise=noise, learnable_codebook=True,
                commitment_weight=0.5, codebook_diversity_loss_weight=0.2, codebook_diversity_temperature=3.0)  # fmt: skip
    (q, loss), grads = jr.vjp(_ref(jr.vq.vq_layer, indices=idx, **opts), [x, C], (g, 0.6))

    def torch_layer(x, c):
        logits = -((x[:, None, :] - c[None, :, :]) ** 2).sum(-1).clamp(min=1e-8).sqrt()  # (N, K)
        z = torch.nn.functional.one_hot(torch.as_tensor(idx), K).to(x.dtype)
        y = torch.softmax(logits / 0.8 + torch.as_tensor(noise), dim=-1)
        out = (z + y - y.detach()) @ c
        p = torch.softmax(3.0 * logits, dim=-1).mean(0)
        return out, 0.5 * ((x - z @ c) ** 2).mean() + 0.2 * (p * p.clamp(min=1e-5).log()).sum()

    res = check_against_torch(torch_layer, [x, C], (g, np.asarray(0.6)), grads, rtol=AGREE)
    _close([q, loss], res.out)


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


# Backwards that have no JAX reference yet, each with the reason (none at present): a backward
# added to vqref needs a reference in vqref/testing/jax_reference, a test here and a row of the
# table, or an entry here until it has them.
NOT_YET_COVERED: set[str] = set()


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
