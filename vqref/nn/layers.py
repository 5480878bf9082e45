"""The layers of the tiny encoder and decoder: forward/backward pairs and two stateful facades.

Symbols: N rows (a batch of vectors), Din input features, Dout output features, L layers.

A VQ-VAE needs an encoder before its quantizer and a decoder after it.  For 8x8 digit images
(64 features) a small multilayer perceptron is enough, and writing it by hand keeps the whole
model free of autograd: every gradient in the demo is one of the formulas below.

The pairs follow the package convention, ``<op>_forward(...) -> (out, cache)`` and
``<op>_backward(dout, cache) -> gradients``:

* affine map          ``y = x W + b``                 (:func:`linear_forward`)
* rectifier           ``y = max(x, 0)``               (:func:`relu_forward`)
* hyperbolic tangent  ``y = tanh(x)``                 (:func:`tanh_forward`)
* mean squared error  ``loss = mean((pred - t)^2)``   (:func:`mse_loss_forward`)

:class:`Linear` and :class:`MLP` hold the parameters and the last forward's caches, so a
training loop reads ``out = net.forward(x)``, ``dx = net.backward(dout)``, ``opt.step(net.grads)``.
Their ``params`` are live: writing ``net.params["0.W"] = new`` (which is what the optimizers in
:mod:`vqref.nn.optim` do) replaces the array inside the layer that owns it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..ops.losses import MSECache, mse_backward, mse_forward
from ..params import NamedArrays, ParamView

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
    "MSECache",
    "mse_loss_forward",
    "mse_loss_backward",
    "NamedArrays",
    "Linear",
    "MLP",
    "ACTIVATIONS",
]


# --------------------------------------------------------------------------------------------
# Forward/backward pairs
# --------------------------------------------------------------------------------------------


class LinearCache(NamedTuple):
    x: Any  # (N, Din) the layer input
    W: Any  # (Din, Dout) the weights used by the forward


def linear_forward(x: Any, W: Any, b: Any) -> tuple[Any, LinearCache]:
    """Affine map ``y = x W + b``, one row per input vector.

    Parameters
    ----------
    x : (N, Din) float
    W : (Din, Dout) float
        Stored input-major (as in cs231n), so the forward is a plain ``x @ W``; torch's
        ``nn.Linear`` stores the transpose ``(Dout, Din)``.
    b : (Dout,) float

    Returns
    -------
    y : (N, Dout)
    cache : LinearCache(x, W)
    """
    y = x @ W + b  # (N, Dout)
    return y, LinearCache(x, W)


def linear_backward(dy: Any, cache: LinearCache) -> tuple[Any, Any, Any]:
    """Gradients of the affine map.

    From ``y_nj = sum_i x_ni W_ij + b_j``:

        dx = dy W^T            (N, Din)
        dW = x^T dy            (Din, Dout)   a sum of one outer product per row
        db = sum_n dy_n        (Dout,)       b is broadcast over rows, so its gradient sums them

    Parameters
    ----------
    dy : (N, Dout) float
    cache : LinearCache from :func:`linear_forward`

    Returns
    -------
    dx : (N, Din), dW : (Din, Dout), db : (Dout,)
    """
    xp = B.get_namespace(dy)
    x, W = cache
    dx = dy @ W.mT  # (N, Din)
    dW = x.mT @ dy  # (Din, Dout)
    db = xp.sum(dy, axis=0)  # (Dout,)
    return dx, dW, db


class ReluCache(NamedTuple):
    positive: Any  # (N, D) bool, where the input was > 0


def relu_forward(x: Any) -> tuple[Any, ReluCache]:
    """Rectified linear unit ``y = max(x, 0)``, elementwise.

    Parameters
    ----------
    x : (N, D) float

    Returns
    -------
    y : (N, D), cache : ReluCache(positive)

    Notes
    -----
    Only the sign pattern is cached: the derivative is 1 where ``x > 0`` and 0 elsewhere.  At
    ``x = 0`` exactly the function has no derivative; the subgradient 0 is used there, as torch does.
    """
    xp = B.get_namespace(x)
    positive = x > 0  # (N, D) bool
    y = xp.where(positive, x, xp.zeros_like(x))  # (N, D)
    return y, ReluCache(positive)


def relu_backward(dy: Any, cache: ReluCache) -> Any:
    """``dx = dy * [x > 0]``: the gradient passes where the unit was active and stops elsewhere.

    Returns
    -------
    dx : (N, D)
    """
    xp = B.get_namespace(dy)
    return xp.where(cache.positive, dy, xp.zeros_like(dy))  # (N, D)


class TanhCache(NamedTuple):
    y: Any  # (N, D) the output tanh(x)


def tanh_forward(x: Any) -> tuple[Any, TanhCache]:
    """Hyperbolic tangent ``y = tanh(x)``, elementwise; a smooth, bounded alternative to ReLU.

    Returns
    -------
    y : (N, D), cache : TanhCache(y)
    """
    xp = B.get_namespace(x)
    y = xp.tanh(x)  # (N, D)
    return y, TanhCache(y)


def tanh_backward(dy: Any, cache: TanhCache) -> Any:
    """``dx = dy * (1 - y^2)``, since ``d tanh(x)/dx = 1 - tanh(x)^2``.

    The output, not the input, is cached: the derivative is a function of ``y`` alone, and
    reusing it avoids a second ``tanh``.

    Returns
    -------
    dx : (N, D)
    """
    y = cache.y
    return dy * (1.0 - y * y)  # (N, D)


def mse_loss_forward(pred: Any, target: Any) -> tuple[Any, MSECache]:
    """Mean squared error over all elements, ``loss = (1/M) sum_ij (pred_ij - target_ij)^2``.

    This is the reconstruction loss of the VQ-VAE (van den Oord et al. 2017, eq. 3, first term)
    with the normaliser ``M = N * D`` of ``torch.nn.functional.mse_loss``.  It is the one MSE of
    vqref, :func:`vqref.ops.losses.mse_forward`; this wrapper only insists on equal shapes
    (that op also accepts arrays that broadcast).

    Parameters
    ----------
    pred : (N, D) float
    target : (N, D) float, a constant: no gradient flows into it

    Returns
    -------
    loss : () float, the 0-d mean
    cache : MSECache(pred, target, M) of :mod:`vqref.ops.losses` (references to the two arrays:
        do not modify them in place before the backward)

    Notes
    -----
    An empty batch gives a loss of 0, not the NaN of a mean over nothing.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"mse_loss_forward: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return mse_forward(pred, target)


def mse_loss_backward(dloss: Any, cache: MSECache) -> Any:
    """``dpred = dloss * (2/M) (pred - target)``: :func:`vqref.ops.losses.mse_backward`'s first gradient.

    Parameters
    ----------
    dloss : () float (a 0-d array or a Python number; 1.0 when this loss is the objective)

    Returns
    -------
    dpred : (N, D)
    """
    dpred, _ = mse_backward(dloss, cache)  # the target is data: its gradient is dropped
    return dpred  # (N, D)


# The activations an MLP may use: name -> (forward, backward).
ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "tanh": (tanh_forward, tanh_backward),
}


# --------------------------------------------------------------------------------------------
# Stateful facades
# --------------------------------------------------------------------------------------------


def _resolve(xp: Any, dtype: Any) -> tuple[Any, Any]:
    ns = B.namespace_from_module(xp)
    dt = getattr(ns, dtype) if isinstance(dtype, str) else dtype
    if not ns.isdtype(dt, "real floating"):
        raise ValueError(f"parameters must have a real floating dtype, got {dtype!r}")
    return ns, dt


class Linear:
    """A fully connected layer ``y = x W + b`` that keeps its parameters, gradients and cache.

    Parameters
    ----------
    din, dout : int
        Input and output features (Din, Dout).
    rng : numpy.random.Generator or seed
        Host randomness for the initial weights (required: there is no global RNG).
    dtype : str or dtype
        Floating dtype of the parameters, in ``xp`` (default ``"float32"``).
    xp : module or namespace
        The array library (default numpy); ``array_api_strict`` and cupy work too.
    device : optional device of ``xp`` for the parameters.
    init : ``"glorot"`` or ``"fan_in"``
        ``"glorot"`` (Glorot & Bengio 2010, eq. 16): ``W ~ U(-a, a)`` with
        ``a = sqrt(6 / (Din + Dout))``, which keeps the variance of activations and of gradients
        about constant across layers; biases start at 0.  ``"fan_in"``:
        ``W, b ~ U(-1/sqrt(Din), 1/sqrt(Din))``, torch's ``nn.Linear`` default.

    Attributes
    ----------
    params : :class:`vqref.params.ParamView` ``{"W": (Din, Dout), "b": (Dout,)}``: reading gives a
        copy; assigning checks the value and replaces the layer's array by a copy of it
    grads : dict with the same keys, filled by :meth:`backward` (overwritten, never accumulated)

    Notes
    -----
    The weights are drawn in float64 on the host and then cast, so the same seed gives the same
    network (up to rounding) in every dtype and on every backend.  The cache of the last forward
    holds references to the input and to ``W``: change ``W`` in place only after the backward
    (the optimizers replace it out of place, which is always safe).
    """

    def __init__(
        self,
        din: int,
        dout: int,
        *,
        rng: Any,
        dtype: Any = "float32",
        xp: Any = np,
        device: Any = None,
        init: str = "glorot",
    ):
        self.xp, self.dtype = _resolve(xp, dtype)
        self.din, self.dout = int(din), int(dout)
        gen = B.as_generator(rng)
        if init == "glorot":
            a = math.sqrt(6.0 / (self.din + self.dout))
            W = gen.uniform(-a, a, size=(self.din, self.dout))
            b = np.zeros(self.dout)
        elif init == "fan_in":
            a = 1.0 / math.sqrt(self.din)
            W = gen.uniform(-a, a, size=(self.din, self.dout))
            b = gen.uniform(-a, a, size=(self.dout,))
        else:
            raise ValueError(f"init must be 'glorot' or 'fan_in', got {init!r}")
        self._params = {
            "W": B.from_numpy(W, self.xp, device=device, dtype=self.dtype),
            "b": B.from_numpy(b, self.xp, device=device, dtype=self.dtype),
        }
        self._grads: dict = {}
        self._cache: LinearCache | None = None

    @property
    def params(self) -> ParamView:
        return ParamView(lambda: ("W", "b"), lambda name: self._params[name], self._set_param)

    def _set_param(self, name: str, value: Any) -> None:
        old = self._params[name]
        if not B.is_array(value) or B.library_name(value) != B.library_name(old):
            raise TypeError(f"{name} must be a {B.library_name(old)} array, got {type(value).__name__}")
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(
                f"{name}: cannot replace an array of shape {tuple(old.shape)} by one of shape {tuple(value.shape)}"
            )
        if not self.xp.isdtype(value.dtype, "real floating"):
            raise TypeError(f"{name} must be a real floating-point array, got dtype {value.dtype}")
        if not B.all_finite(value):
            raise ValueError(f"{name} contains NaN or infinite values")
        # a new dict: the layer's parameters change in one assignment, and never in place
        self._params = {**self._params, name: self.xp.astype(value, self.dtype, copy=True)}

    @property
    def grads(self) -> dict:
        return self._grads

    def forward(self, x: Any) -> Any:
        """``(N, Din) -> (N, Dout)``; remembers what the backward needs."""
        if x.ndim != 2 or x.shape[1] != self.din:
            raise ValueError(f"Linear({self.din}, {self.dout}) expects input (N, {self.din}), got {tuple(x.shape)}")
        y, self._cache = linear_forward(x, self._params["W"], self._params["b"])
        return y

    __call__ = forward

    def backward(self, dy: Any) -> Any:
        """Store ``grads["W"]``, ``grads["b"]`` for the last forward and return ``dx (N, Din)``."""
        if self._cache is None:
            raise RuntimeError("Linear.backward was called before forward: there is no input to differentiate at")
        dx, dW, db = linear_backward(dy, self._cache)
        self._grads["W"] = dW
        self._grads["b"] = db
        return dx

    def state_dict(self) -> dict:
        """Host (numpy) copies of the parameters."""
        return {k: np.array(B.to_numpy(v), copy=True) for k, v in self._params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the parameters by host arrays of the same shapes (cast to this layer's dtype)."""
        _load(self._params, state, self.xp, self.dtype)

    def __repr__(self) -> str:
        return f"Linear({self.din}, {self.dout}, dtype={self.dtype})"


def _load(params: MutableMapping, state: Mapping[str, Any], xp: Any, dtype: Any) -> None:
    missing = set(params) - set(state)
    extra = set(state) - set(params)
    if missing or extra:
        raise KeyError(f"load_state_dict: missing {sorted(missing)}, unexpected {sorted(extra)}")
    # every entry is checked and converted first; only then is anything replaced, so a bad entry
    # late in the dict leaves every parameter as it was
    converted = {}
    for k in list(params):
        old = params[k]
        new = np.asarray(B.to_numpy(state[k]) if B.is_array(state[k]) else state[k])
        if new.shape != tuple(old.shape):
            raise ValueError(f"load_state_dict: {k} has shape {new.shape}, expected {tuple(old.shape)}")
        if not (np.issubdtype(new.dtype, np.floating) or np.issubdtype(new.dtype, np.integer)):
            raise TypeError(f"load_state_dict: {k} must hold real numbers, got dtype {new.dtype}")
        if not np.all(np.isfinite(new)):
            raise ValueError(f"load_state_dict: {k} contains NaN or infinite values")
        converted[k] = B.from_numpy(new, xp, device=B.get_device(old), dtype=dtype)
    for k, v in converted.items():
        params[k] = v


class MLP:
    """A multilayer perceptron, ``Linear -> activation -> ... -> Linear``, with no final activation.

    ``sizes = [64, 32, 8]`` gives ``Linear(64, 32) -> relu -> Linear(32, 8)``: the output is left
    linear so that it can be any real vector (a latent for the quantizer, or pixel values).

    Parameters
    ----------
    sizes : list of int, at least two: the feature counts from input to output
    activation : ``"relu"`` or ``"tanh"``
    rng, dtype, xp, device, init : as for :class:`Linear`; one generator initialises all layers
        in order, so the network is reproducible from one seed.

    Attributes
    ----------
    layers : list of :class:`Linear`
    params : NamedArrays, ``"0.W", "0.b", "1.W", ...`` (live: assigning replaces the layer's array)
    grads : NamedArrays with the same names, after :meth:`backward`
    """

    def __init__(
        self,
        sizes: list[int],
        *,
        activation: str = "relu",
        rng: Any,
        dtype: Any = "float32",
        xp: Any = np,
        device: Any = None,
        init: str = "glorot",
    ):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.sizes = sizes
        self.activation = activation
        self.xp, self.dtype = _resolve(xp, dtype)
        gen = B.as_generator(rng)
        self.layers = [
            Linear(din, dout, rng=gen, dtype=self.dtype, xp=self.xp, device=device, init=init)
            for din, dout in zip(sizes[:-1], sizes[1:])
        ]
        self._params = NamedArrays({str(i): layer.params for i, layer in enumerate(self.layers)})
        self._grads = NamedArrays({str(i): layer.grads for i, layer in enumerate(self.layers)})
        self._act_caches: list | None = None

    @property
    def params(self) -> NamedArrays:
        return self._params

    @property
    def grads(self) -> NamedArrays:
        return self._grads

    def forward(self, x: Any) -> Any:
        """``(N, sizes[0]) -> (N, sizes[-1])``."""
        act_forward, _ = ACTIVATIONS[self.activation]
        caches = []
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer.forward(h)  # (N, sizes[i + 1])
            if i < last:
                h, cache = act_forward(h)
                caches.append(cache)
        self._act_caches = caches
        return h

    __call__ = forward

    def backward(self, dout: Any) -> Any:
        """Fill :attr:`grads` for the last forward and return ``dx (N, sizes[0])``.

        The chain rule, read from the output back: each layer's backward turns the gradient of
        its output into that of its input, and the activation between two layers masks (relu) or
        scales (tanh) it.
        """
        if self._act_caches is None:
            raise RuntimeError("MLP.backward was called before forward: there is no input to differentiate at")
        _, act_backward = ACTIVATIONS[self.activation]
        dh = dout  # (N, sizes[-1])
        for i in reversed(range(len(self.layers))):
            if i < len(self.layers) - 1:
                dh = act_backward(dh, self._act_caches[i])
            dh = self.layers[i].backward(dh)  # (N, sizes[i])
        return dh

    def state_dict(self) -> dict:
        """Host (numpy) copies of all parameters, under the names of :attr:`params`."""
        return {k: np.array(B.to_numpy(v), copy=True) for k, v in self._params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all parameters by host arrays with the names and shapes of :attr:`params`."""
        _load(self._params, state, self.xp, self.dtype)

    def __repr__(self) -> str:
        return f"MLP({self.sizes}, activation={self.activation!r}, dtype={self.dtype})"
