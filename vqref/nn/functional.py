"""The forward/backward pairs of the tiny encoder and decoder (the facades are in :mod:`vqref.nn.layers`).

Symbols: N rows (a batch of vectors), Din input features, Dout output features, D features.

A VQ-VAE needs an encoder before its quantizer and a decoder after it.  For 8x8 digit images
(64 features) a small multilayer perceptron is enough, and writing it by hand keeps the whole
model free of autograd: every gradient in the demo is one of the formulas below.

The pairs follow the package convention, ``<op>_forward(...) -> (out, cache)`` and
``<op>_backward(dout, cache) -> gradients``:

* affine map          ``y = x W + b``                 (:func:`linear_forward`, from :mod:`vqref.ops.linear`)
* rectifier           ``y = max(x, 0)``               (:func:`relu_forward`)
* hyperbolic tangent  ``y = tanh(x)``                 (:func:`tanh_forward`)
* mean squared error  ``loss = mean((pred - t)^2)``   (:func:`mse_loss_forward`)

Every cache holds arrays of its own -- copies, or quantities the forward computed -- never a
reference to an argument or to the returned output: changing an input or an output in place
between the forward and the backward changes no gradient.  Each cache's fields say which.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.losses import mse_forward

__all__ = [
    "LinearCache",
    "linear_forward",
    "linear_backward",
    "ReluCache",
    "relu_forward",
    "relu_backward",
    "TanhCache",
    "tanh_forward",
    "tanh_backward",
    "MSELossCache",
    "mse_loss_forward",
    "mse_loss_backward",
    "ACTIVATIONS",
]


# --------------------------------------------------------------------------------------------
# Forward/backward pairs
# --------------------------------------------------------------------------------------------


class ReluCache(NamedTuple):
    positive: Any  # (N, D) bool, where the input was > 0 (computed by the forward: no reference to x)
    nan: Any  # (N, D) bool, where the input was NaN


def relu_forward(x: Array) -> tuple[Array, ReluCache]:
    """Rectified linear unit ``y = max(x, 0)``, elementwise; ``max(NaN, 0)`` is NaN.

    Parameters
    ----------
    x : (N, D) float

    Returns
    -------
    y : (N, D), cache : ReluCache(positive, nan)

    Notes
    -----
    Only two masks are cached: the derivative is 1 where ``x > 0``, 0 where ``x < 0``, and
    undefined (NaN) where x is NaN.  At ``x = 0`` exactly the function has no derivative; the
    subgradient 0 is used there, as torch does.  A NaN input gives a NaN output, as in torch:
    mapping it to 0 would hide it from every later check.
    """
    xp = B.get_namespace(x)
    positive = x > 0  # (N, D) bool
    nan = xp.isnan(x)  # (N, D) bool: NaN is neither > 0 nor <= 0
    y = xp.where(positive | nan, x, xp.zeros_like(x))  # (N, D)
    return y, ReluCache(positive, nan)


def relu_backward(dy: Array, cache: ReluCache) -> Array:
    """``dx = dy * [x > 0]``: the gradient passes where the unit was active and stops elsewhere.

    Where the input was NaN the derivative is undefined, and ``dx`` is NaN there.

    Returns
    -------
    dx : (N, D)
    """
    xp = B.get_namespace(dy)
    dx = xp.where(cache.positive, dy, xp.zeros_like(dy))  # (N, D)
    return xp.where(cache.nan, xp.full_like(dy, math.nan), dx)  # (N, D)


class TanhCache(NamedTuple):
    dydx: Any  # (N, D) the local derivative 1 - tanh(x)^2, computed by the forward


def tanh_forward(x: Array) -> tuple[Array, TanhCache]:
    """Hyperbolic tangent ``y = tanh(x)``, elementwise; a smooth, bounded alternative to ReLU.

    Returns
    -------
    y : (N, D), cache : TanhCache(dydx)

    Notes
    -----
    The derivative ``d tanh(x)/dx = 1 - tanh(x)^2`` is a function of the output alone, so the
    forward computes it from ``y`` and caches it: a new array (changing ``x`` or ``y`` in place
    later changes nothing) of the size a copy of ``y`` would have, with no second ``tanh``.
    NaN stays NaN, in the output and in the derivative.
    """
    xp = B.get_namespace(x)
    y = xp.tanh(x)  # (N, D)
    return y, TanhCache(1.0 - y * y)


def tanh_backward(dy: Array, cache: TanhCache) -> Array:
    """``dx = dy * (1 - y^2)``, the cached local derivative times the upstream gradient.

    Returns
    -------
    dx : (N, D)
    """
    return dy * cache.dydx  # (N, D)


class MSELossCache(NamedTuple):
    diff: Any  # (N, D) pred - target, computed by the forward (no reference to either argument)
    count: int  # M = N * D, the number of elements averaged over


def mse_loss_forward(pred: Array, target: Array) -> tuple[Array, MSELossCache]:
    """Mean squared error over all elements, ``loss = (1/M) sum_ij (pred_ij - target_ij)^2``.

    This is the reconstruction loss of the VQ-VAE (van den Oord et al. 2017, eq. 3, first term)
    with the normaliser ``M = N * D`` of ``torch.nn.functional.mse_loss``.  Its value is the one
    MSE of vqref, :func:`vqref.ops.losses.mse_forward`; this wrapper insists on equal shapes
    (that op also accepts arrays that broadcast) and caches the difference itself.

    Parameters
    ----------
    pred : (N, D) float
    target : (N, D) float, a constant: no gradient flows into it

    Returns
    -------
    loss : () float, the 0-d mean
    cache : MSELossCache(diff, M): the difference ``pred - target``, the one array the backward
        needs, so that changing ``pred`` or ``target`` in place afterwards changes nothing

    Notes
    -----
    An empty batch gives a loss of 0, not the NaN of a mean over nothing.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"mse_loss_forward: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    loss, _ = mse_forward(pred, target)  # () its cache refers to the two arguments: not kept
    diff = pred - target  # (N, D)
    return loss, MSELossCache(diff, B.numel(tuple(diff.shape)))


def mse_loss_backward(dloss: Array, cache: MSELossCache) -> Array:
    """``dpred = dloss * (2/M) (pred - target)``, the first gradient of :func:`vqref.ops.losses.mse_backward`.

    The same two operations per element as that op (bit for bit); the target is data, and its
    gradient is not formed.

    Parameters
    ----------
    dloss : () float (a 0-d array or a Python number; 1.0 when this loss is the objective)

    Returns
    -------
    dpred : (N, D)
    """
    factor = (2.0 / max(cache.count, 1)) * dloss  # () 2 dloss / M
    return factor * cache.diff  # (N, D)


# The activations an MLP may use: name -> (forward, backward).
ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "tanh": (tanh_forward, tanh_backward),
}
