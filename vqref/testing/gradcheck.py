"""Finite-difference gradient checking, shipped so learners can check their own backward passes.

The check is a vector-Jacobian product (VJP): pick a random upstream gradient ``dout`` of the
output's shape, and compare the analytic ``d/d input <dout, f(input)>`` with central differences

    d/d a_j <dout, f(a)>  ~  (<dout, f(a + h e_j)> - <dout, f(a - h e_j)>) / (2 h).

Why a random ``dout`` and not ones: with ``dout = 1`` some mistakes cancel (a transposed
Jacobian of a symmetric sum, a wrong sign on a term that sums to zero) and the check passes
vacuously.  Why float64: in float32 the difference quotient is never better than ~5e-5
relative, so a float32 check cannot tell a right gradient from a slightly wrong one.

Discrete steps (argmin) are piecewise constant: hold them fixed in ``f`` (pass the indices in
rather than recomputing them), and give ``guard`` to assert that the discrete state would not
have changed at any perturbed point.

Functions here work on any Array API namespace: inputs are copied to the host, perturbed there,
and moved back with :func:`vqref.backend.from_numpy`.  The caller's arrays are never mutated.

Finite differences cannot check a surrogate gradient (the straight-through estimator, the
rotation trick): the forward is piecewise constant and its differences are zero.  For those, and
as a far tighter check of everything else (rounding level instead of ~1e-10), compare with an
autograd framework differentiating the same forward written with a stop-gradient where the math
has sg[.]: :func:`check_against_jax` (``jax.lax.stop_gradient``) and :func:`check_against_torch`
(``.detach()``) take the same arguments, one forward function, the inputs, the upstream gradient
and your gradients.  JAX and torch are imported when those are called, never before.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .. import backend as B
from ..backend import Array

__all__ = [
    "rel_error",
    "numerical_vjp",
    "check_vjp",
    "GradCheckResult",
    "ReferenceCheckResult",
    "check_against_jax",
    "check_against_torch",
    "torch_vjp",
]


def rel_error(a: Array, b: Array, *, floor: float = 1e-30) -> float:
    """Norm-wise relative error ``||a - b|| / max(||a||, ||b||)`` (0 when both are zero).

    Norm-wise rather than element-wise, so that tiny entries of a large gradient do not dominate.
    """
    a = np.asarray(B.to_numpy(a), dtype=np.float64)
    b = np.asarray(B.to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    den = max(np.linalg.norm(a), np.linalg.norm(b))
    if den <= floor:
        return 0.0
    return float(np.linalg.norm(a - b) / den)


def numerical_vjp(
    f: Callable[..., Any],
    inputs: Sequence[Any],
    dout: Array,
    *,
    h: float = 1e-6,
    wrt: Sequence[int] | None = None,
    guard: Callable[..., Any] | None = None,
) -> list:
    """Central-difference VJP of ``f`` at ``inputs`` against upstream gradient ``dout``.

    Parameters
    ----------
    f : callable ``f(*inputs) -> out``, any array namespace
    inputs : arrays (float64 for a meaningful check)
    dout : array of ``out``'s shape
    h : step
    wrt : indices of the inputs to differentiate (default all)
    guard : optional ``guard(*inputs) -> array``; its value (e.g. the argmin indices) must be the
        same at every perturbed point as at ``inputs``, otherwise ``AssertionError``.

    Returns
    -------
    list of host float64 arrays, one per input in ``wrt``, each of that input's shape.
    """
    host = [np.array(B.to_numpy(a), dtype=np.float64, copy=True) for a in inputs]
    xp = B.get_namespace(*[a for a in inputs if B.is_array(a)])
    dtype = inputs[0].dtype
    dev = B.get_device(inputs[0])
    g = np.asarray(B.to_numpy(dout), dtype=np.float64)
    wrt = range(len(inputs)) if wrt is None else wrt

    def call(arrs, fn):
        return fn(*[B.from_numpy(a, xp, device=dev, dtype=dtype) for a in arrs])

    ref_guard = None if guard is None else B.to_numpy(call(host, guard)).copy()
    grads = []
    for idx in wrt:
        base = host[idx]
        grad = np.zeros_like(base)
        flat = base.reshape(-1)
        gflat = grad.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            vals = []
            for step in (h, -h):
                flat[j] = old + step
                if ref_guard is not None:
                    now = B.to_numpy(call(host, guard))
                    if not np.array_equal(now, ref_guard):
                        flat[j] = old
                        raise AssertionError(
                            f"numerical_vjp: the discrete state changed when input {idx} entry {j} "
                            f"moved by {step:+g}; use inputs with a larger assignment margin"
                        )
                out = np.asarray(B.to_numpy(call(host, f)), dtype=np.float64)
                vals.append(float(np.sum(out * g)))
            flat[j] = old
            gflat[j] = (vals[0] - vals[1]) / (2 * h)
        grads.append(grad)
    return grads


class GradCheckResult(NamedTuple):
    errors: tuple  # relative error per checked input
    numerical: tuple  # host arrays
    analytic: tuple  # host arrays
    passed: bool


def check_vjp(
    f: Callable[..., Any],
    vjp: Callable[..., Sequence[Any]],
    inputs: Sequence[Any],
    *,
    seed: int | np.random.Generator = 0,
    dout: Array = None,
    h: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 0.0,
    wrt: Sequence[int] | None = None,
    guard: Callable[..., Any] | None = None,
    raise_on_failure: bool = True,
) -> GradCheckResult:
    """Compare an analytic VJP with finite differences.

    Parameters
    ----------
    f : ``f(*inputs) -> out``
    vjp : ``vjp(dout, *inputs) -> (dinput_0, dinput_1, ...)``, one gradient per input in ``wrt``
        (``None`` stands for a zero gradient).
    inputs : float64 arrays
    seed : seed or generator for the random upstream gradient (standard normal, host side)
    dout : an explicit upstream gradient instead of a random one
    rtol : largest accepted :func:`rel_error` per input
    atol : an input also passes when its largest absolute difference is at most ``atol``; needed
        when the true gradient is exactly zero, where finite differences return rounding noise
        (~1e-10) and the relative error is 1 whatever the analytic gradient's quality
    guard : see :func:`numerical_vjp`

    Returns
    -------
    GradCheckResult; raises ``AssertionError`` naming the worst input if ``raise_on_failure``.
    """
    xp = B.get_namespace(*[a for a in inputs if B.is_array(a)])
    dev = B.get_device(inputs[0])
    out = f(*inputs)
    if dout is None:
        rng = B.as_generator(seed)
        dout = B.from_numpy(rng.standard_normal(tuple(out.shape)), xp, device=dev, dtype=out.dtype)
    wrt = list(range(len(inputs))) if wrt is None else list(wrt)
    num = numerical_vjp(f, inputs, dout, h=h, wrt=wrt, guard=guard)
    ana_all = vjp(dout, *inputs)
    if not isinstance(ana_all, (tuple, list)):
        ana_all = (ana_all,)
    if len(ana_all) != len(wrt):
        raise ValueError(f"check_vjp: vjp returned {len(ana_all)} gradients for {len(wrt)} inputs")
    ana = []
    for a, n in zip(ana_all, num):
        ana.append(np.zeros_like(n) if a is None else np.asarray(B.to_numpy(a), dtype=np.float64))
    errors = tuple(rel_error(a, n) for a, n in zip(ana, num))
    passed = all(e <= rtol or float(np.max(np.abs(a - n), initial=0.0)) <= atol for e, a, n in zip(errors, ana, num))
    if raise_on_failure and not passed:
        worst = int(np.argmax(errors))  # the input with the largest relative error
        raise AssertionError(
            f"check_vjp: gradient of input {wrt[worst]} is off: relative error {errors[worst]:.3e} > {rtol:.1e}"
        )
    return GradCheckResult(errors, tuple(num), tuple(ana), passed)


# --------------------------------------------------------------------------------------------
# Checking against an autograd framework: JAX or torch, one call each
# --------------------------------------------------------------------------------------------


class ReferenceCheckResult(NamedTuple):
    errors: tuple  # relative error per input
    reference: tuple  # host float64 arrays, the framework's gradients
    analytic: tuple  # host float64 arrays, the gradients under test
    passed: bool
    out: Any = None  # the framework's forward value (a host array, or a tuple of them)


def torch_vjp(fn: Callable[..., Any], inputs: Sequence[Any], dout: Any) -> tuple[Any, tuple]:
    """The output of a torch function and its vector-Jacobian product for ``dout``, in float64.

    The torch counterpart of :func:`vqref.testing.jax_reference.vjp`, with the same contract:
    ``fn(*tensors) -> out`` (a tensor or a tuple of tensors), written with ``.detach()`` where the
    math has sg[.]; ``inputs`` floating arrays of any library (copied to float64 CPU tensors);
    ``dout`` one upstream gradient per output.  Returns ``(out, grads)`` as float64 numpy arrays,
    a zero gradient for an input the output does not depend on.  torch is imported here only.
    """
    import torch

    leaves = []
    for j, a in enumerate(inputs):
        host = np.asarray(B.to_numpy(a))
        if not np.issubdtype(host.dtype, np.floating):
            raise TypeError(f"torch_vjp: input {j} has dtype {host.dtype}; fix integer arguments inside fn instead")
        leaves.append(torch.tensor(host, dtype=torch.float64, requires_grad=True))
    out = fn(*leaves)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    douts = list(dout) if isinstance(out, (tuple, list)) else [dout]
    if len(douts) != len(outs):
        raise ValueError(f"torch_vjp: fn returned {len(outs)} outputs but dout has {len(douts)} entries")
    cotangents = []
    for s, (y, g) in enumerate(zip(outs, douts)):
        g = torch.tensor(np.asarray(B.to_numpy(g), dtype=np.float64))
        if tuple(g.shape) != tuple(y.shape):
            raise ValueError(f"torch_vjp: output {s} has shape {tuple(y.shape)} but its dout has {tuple(g.shape)}")
        cotangents.append(g)
    grads = torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
    host_out = tuple(y.detach().numpy().copy() for y in outs)
    grads = tuple(np.zeros(tuple(a.shape)) if d is None else d.numpy().copy() for a, d in zip(leaves, grads))
    return (host_out if isinstance(out, (tuple, list)) else host_out[0]), grads


def _check_against(
    framework: str, fn: Callable, inputs: Sequence[Any], dout: Any, grads: Sequence[Any], rtol: float,
    atol: float, raise_on_failure: bool, **options: Any,
) -> ReferenceCheckResult:  # fmt: skip
    if framework == "jax":
        from .jax_reference import vjp as run
    else:
        run = torch_vjp
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    if len(grads) != len(inputs):
        raise ValueError(f"check_against_{framework}: {len(grads)} gradients for {len(inputs)} inputs")
    out, ref = run(fn, inputs, dout, **options)
    ana = tuple(
        np.zeros_like(r) if g is None else np.asarray(B.to_numpy(g), dtype=np.float64) for g, r in zip(grads, ref)
    )
    for j, (a, r) in enumerate(zip(ana, ref)):
        if a.shape != r.shape:
            raise ValueError(f"check_against_{framework}: gradient {j} has shape {a.shape}, its input {r.shape}")
    errors = tuple(rel_error(a, r) for a, r in zip(ana, ref))
    passed = all(e <= rtol or float(np.max(np.abs(a - r), initial=0.0)) <= atol for e, a, r in zip(errors, ana, ref))
    if raise_on_failure and not passed:
        worst = int(np.argmax(errors))
        raise AssertionError(
            f"check_against_{framework}: gradient of input {worst} is off: relative error "
            f"{errors[worst]:.3e} > {rtol:.1e}"
        )
    return ReferenceCheckResult(errors, ref, ana, passed, out)


def check_against_jax(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    dout: Any,
    grads: Sequence[Any],
    *,
    rtol: float = 1e-10,
    atol: float = 0.0,
    raise_on_failure: bool = True,
    jit: bool = True,
) -> ReferenceCheckResult:
    """Compare your gradients with JAX autograd of the same forward, in float64.

    Parameters
    ----------
    fn : ``fn(*inputs) -> out`` written with ``jax.numpy``, ``jax.lax.stop_gradient`` where the
        math has sg[.]; indices and options fixed inside it.  The functions of
        :mod:`vqref.testing.jax_reference` are such forwards.
    inputs : the floating arrays your backward differentiates (any library; float64 recommended)
    dout : the upstream gradient you gave your backward: one array of ``out``'s shape (a number
        for a 0-d output), or one per output when ``fn`` returns a tuple
    grads : your gradients, one per input, in the order of ``inputs`` (``None`` for zero)
    rtol : largest accepted norm-wise relative error (:func:`rel_error`) per input.  Autograd and
        a correct backward agree to rounding, about 1e-14 on well-conditioned float64 problems;
        1e-10 leaves room for cancellation.  Compare float32 gradients with ~1e-5.
    atol : an input also passes when its largest absolute difference is at most ``atol`` (for
        gradients that are zero up to rounding)
    jit : compile the forward and its VJP with ``jax.jit`` (faster); ``False`` runs them op by
        op, for forwards that branch on array values (see :func:`vqref.testing.jax_reference.vjp`)

    Returns
    -------
    ReferenceCheckResult(errors, reference, analytic, passed, out): per input the relative error,
    JAX's gradient and yours (host float64), whether all passed, and JAX's forward value (to
    compare with yours).  Raises ``AssertionError`` naming the worst input when the check fails
    and ``raise_on_failure``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from vqref.ops.l2norm import l2norm_backward, l2norm_forward
    >>> x, dy = np.random.default_rng(0).standard_normal((2, 5, 3))
    >>> y, cache = l2norm_forward(x)
    >>> res = check_against_jax(lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True), [x], dy,
    ...                         [l2norm_backward(dy, cache)])
    >>> res.passed
    True

    :func:`check_against_torch` is the same call with a torch forward.
    """
    return _check_against("jax", fn, inputs, dout, grads, rtol, atol, raise_on_failure, jit=jit)


def check_against_torch(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    dout: Any,
    grads: Sequence[Any],
    *,
    rtol: float = 1e-10,
    atol: float = 0.0,
    raise_on_failure: bool = True,
) -> ReferenceCheckResult:
    """Compare your gradients with torch autograd of the same forward, in float64.

    :func:`check_against_jax` with ``fn`` written in torch (``.detach()`` where the math has
    sg[.]); parameters and result as there (torch has no ``jit`` option: it runs op by op).  The
    forward runs on float64 CPU tensors made from ``inputs`` (:func:`torch_vjp`).

    Examples
    --------
    >>> from vqref.ops.l2norm import l2norm_backward, l2norm_forward
    >>> x, dy = np.random.default_rng(0).standard_normal((2, 5, 3))
    >>> y, cache = l2norm_forward(x)
    >>> res = check_against_torch(lambda x: x / x.norm(dim=1, keepdim=True), [x], dy, [l2norm_backward(dy, cache)])
    >>> res.passed
    True
    """
    return _check_against("torch", fn, inputs, dout, grads, rtol, atol, raise_on_failure)
