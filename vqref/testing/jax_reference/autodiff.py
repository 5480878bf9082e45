"""Run a JAX function's vector-Jacobian product in float64 on host arrays: the one entry point.

Symbols: any shapes; ``f(a_1, ..., a_m) -> y`` (an array, or a tuple of arrays).

What it computes.  For an upstream gradient ``g`` of the output's shape, the VJP is

    a_j_bar = J_{f, a_j}^T g = d/d a_j <g, f(a)>                 (one array per input)

and with several outputs ``(y_1, ..., y_r)`` and one upstream gradient each, the gradient of
``sum_s <g_s, y_s>``.  JAX builds it with :func:`jax.vjp`; where the math has a stop-gradient
``sg[u]`` the reference writes ``jax.lax.stop_gradient(u)``, so a surrogate gradient (the
straight-through estimator, the rotation trick) comes out as the exact derivative of the
surrogate expression.

Why float64, and why a context.  JAX computes in float32 unless 64-bit types are switched on,
and float32 autograd is no better an oracle than float32 finite differences (~1e-7 relative).
:func:`vjp` switches them on with the ``jax.enable_x64`` context manager for the duration of
the call only, so importing this package changes no global setting (other JAX code in the same
process keeps its defaults).  Call the reference functions of the family modules through
:func:`vjp`, or inside ``with x64():`` when you evaluate them yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ... import backend as B
from ...backend import Array

__all__ = ["vjp", "x64", "as_host"]


def x64():
    """A context manager in which JAX creates float64 arrays by default (``jax.enable_x64``)."""
    return jax.enable_x64(True)


def as_host(a: Any) -> np.ndarray:
    """A float64 numpy copy of an array of any library vqref knows, or of a JAX array or number."""
    if isinstance(a, jax.Array):
        return np.array(a, dtype=np.float64)
    return np.array(B.to_numpy(a), dtype=np.float64)


def _input(a: Array, position: int) -> jax.Array:
    host = np.asarray(B.to_numpy(a))
    if not np.issubdtype(host.dtype, np.floating):
        raise TypeError(
            f"vjp: input {position} has dtype {host.dtype}; only floating inputs are differentiated. "
            "Fix integer arguments such as code indices inside fn instead (a lambda or functools.partial)"
        )
    return jnp.asarray(host, dtype=jnp.float64)


def _pullback(fn: Callable[..., Any], args: tuple, cotangent: Any) -> tuple[Any, tuple]:
    """``fn(*args)`` and its VJP for ``cotangent``: the two halves of :func:`jax.vjp` in one call."""
    out, pullback = jax.vjp(fn, *args)
    return out, pullback(cotangent)


# The same, compiled as one XLA program.  Run op by op, JAX compiles every primitive for every
# new shape (about 30 ms each on a CPU); compiling the whole forward and backward at once is
# several times faster for the small problems of tests and notebooks.  ``fn`` is a static
# argument: a new function (a new lambda) is traced and compiled again.
_pullback_jit = jax.jit(_pullback, static_argnums=0)


def vjp(fn: Callable[..., Any], inputs: Sequence[Array], dout: Any, *, jit: bool = True) -> tuple[Any, tuple]:
    """The output of ``fn`` and its vector-Jacobian product for ``dout``, by JAX in float64.

    Parameters
    ----------
    fn : ``fn(*inputs) -> out`` written with ``jax.numpy`` (and ``jax.lax.stop_gradient`` for
        sg[.]); ``out`` is one array or a tuple/list of arrays.  Everything that is not
        differentiated (indices, options) is fixed inside ``fn``.
    inputs : m floating arrays of any library (numpy, cupy, array_api_strict, JAX, ...),
        converted to float64 on the host
    dout : the upstream gradient: an array (or a number for a 0-d output) of ``out``'s shape,
        or a sequence with one such entry per output when ``out`` is a tuple
    jit : compile ``fn`` and its VJP as one program (faster; the default).  ``False`` runs them
        op by op, for a forward that ``jax.jit`` cannot trace (Python branches on array values,
        conversions to Python numbers).

    Returns
    -------
    out : float64 numpy array, or a tuple of them (the structure of ``fn``'s output)
    grads : tuple of m float64 numpy arrays, ``grads[j]`` the shape of ``inputs[j]``; zeros for an
        input the output does not depend on

    Raises
    ------
    TypeError for a non-floating input; ValueError when ``dout`` does not match the output.
    """
    with x64():
        args = tuple(_input(a, j) for j, a in enumerate(inputs))
        shapes = jax.eval_shape(fn, *args)  # the output's structure, shapes and dtypes (traced, not run)
        leaves, tree = jax.tree_util.tree_flatten(shapes)
        douts = [dout] if len(leaves) == 1 and not isinstance(shapes, (tuple, list)) else list(dout)
        if len(douts) != len(leaves):
            raise ValueError(f"vjp: fn returned {len(leaves)} outputs but dout has {len(douts)} entries")
        cotangents = []
        for s, (y, g) in enumerate(zip(leaves, douts)):
            g = jnp.asarray(as_host(g), dtype=y.dtype)  # the output's dtype: float64
            if g.shape != y.shape:
                raise ValueError(f"vjp: output {s} has shape {tuple(y.shape)} but its dout has {tuple(g.shape)}")
            cotangents.append(g)
        run = _pullback_jit if jit else _pullback
        out, grads = run(fn, args, jax.tree_util.tree_unflatten(tree, cotangents))
        host_out = jax.tree_util.tree_map(as_host, out)
        return host_out, tuple(as_host(d) for d in grads)
