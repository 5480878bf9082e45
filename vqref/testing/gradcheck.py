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
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .. import backend as B
from ..backend import Array

__all__ = ["rel_error", "numerical_vjp", "check_vjp", "GradCheckResult"]


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
