"""The stateful layers of the tiny encoder and decoder: :class:`Linear` and :class:`MLP`.

Symbols: N rows (a batch of vectors), Din input features, Dout output features, L layers.

The forward/backward pairs they are built from (affine map, ReLU, tanh, the MSE loss) are in
:mod:`vqref.nn.functional` and importable from here too.  :class:`Linear` and :class:`MLP` hold
the parameters and the last forward's caches, so a training loop reads
``out = net.forward(x)``, ``dx = net.backward(dout)``, ``opt.step(net.grads)``.  Their ``params``
are live: writing ``net.params["0.W"] = new`` (which is what the optimizers in
:mod:`vqref.nn.optim` do) replaces the array inside the layer that owns it, after checking it.

Like the quantizer modules, they change in one step: every call validates its arguments,
computes everything, and only then remembers the result, so a refused or failing call changes
nothing.  ``apply`` and ``gradients`` are the two halves that change nothing at all (a model that
composes layers, such as :class:`vqref.nn.VQVAE`, calls them and commits once at the end);
``forward`` and ``backward`` are those plus remembering the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from ..params import NamedArrays, ParamView
from ..validation import check_dtype_name, check_fits
from .functional import (
    ACTIVATIONS,
    LinearCache,
    linear_backward,
    linear_forward,
)

__all__ = ["Linear", "MLPCache", "MLP", "check_batch"]


def _resolve(xp: Any, dtype: Any) -> tuple[Any, Any]:
    ns = B.namespace_from_module(xp)
    dt = getattr(ns, dtype) if isinstance(dtype, str) else dtype
    if not ns.isdtype(dt, "real floating"):
        raise ValueError(f"parameters must have a real floating dtype, got {dtype!r}")
    return ns, dt


def check_batch(name: str, a: Array, xp: Any, width: int, *, finite: bool = True) -> None:
    """Refuse anything but a floating ``(N, width)`` array of the library of namespace ``xp`` (and,
    with ``finite``, one without NaN or infinities).  ``TypeError`` for the kind, ``ValueError``
    for the shape or the values; the message names the argument."""
    if not B.is_array(a):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if B.get_namespace(a) is not xp:
        lib = B.library_name(xp.asarray(0.0))
        raise TypeError(f"{name} is a {B.library_name(a)} array but the parameters are {lib} arrays")
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name} must have shape (N, {width}), got {tuple(a.shape)}")
    if finite and not B.all_finite(a):
        raise ValueError(f"{name} contains NaN or infinite values")


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
    network (up to rounding) in every dtype and on every backend.  :meth:`forward` is
    :meth:`apply` (the affine map with the current parameters, nothing remembered) plus
    remembering its cache; a model that composes layers (:class:`MLP`) calls :meth:`apply` and
    keeps the caches itself.
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

    def _set_param(self, name: str, value: Array) -> None:
        new = _checked_param(name, value, self._params[name], self.xp, self.dtype)
        # a new dict: the layer's parameters change in one assignment, and never in place
        self._params = {**self._params, name: new}

    @property
    def grads(self) -> dict:
        return self._grads

    def apply(self, x: Array) -> tuple[Array, LinearCache]:
        """``(y, cache)`` for ``x (N, Din)`` with the current parameters; remembers nothing.

        Checks the kind and shape of ``x``, not its values (:meth:`forward` and the models that
        compose layers check those once, at their door).
        """
        check_batch(f"the input of {self!r}", x, self.xp, self.din, finite=False)
        return linear_forward(x, self._params["W"], self._params["b"])

    def forward(self, x: Array) -> Array:
        """``(N, Din) -> (N, Dout)``; refuses a non-finite input, remembers what the backward needs."""
        check_batch(f"the input of {self!r}", x, self.xp, self.din)
        y, cache = linear_forward(x, self._params["W"], self._params["b"])
        self._cache = cache  # the one change of state, after everything else succeeded
        return y

    __call__ = forward

    def backward(self, dy: Array) -> Array:
        """Store ``grads["W"]``, ``grads["b"]`` for the last forward and return ``dx (N, Din)``."""
        if self._cache is None:
            raise RuntimeError("Linear.backward was called before forward: there is no input to differentiate at")
        check_batch("dy", dy, self.xp, self.dout, finite=False)
        if dy.shape[0] != self._cache.x.shape[0]:
            raise ValueError(f"dy has {dy.shape[0]} rows but the last forward had {self._cache.x.shape[0]}")
        dx, dW, db = linear_backward(dy, self._cache)
        self._grads.update(W=dW, b=db)  # in place: views of this dict stay valid
        return dx

    def state_dict(self) -> dict:
        """Host (numpy) copies of the parameters."""
        return {k: np.array(B.to_numpy(v), copy=True) for k, v in self._params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the parameters by host arrays of the same shapes (cast to this layer's dtype).

        All or nothing: every entry is checked before any parameter is replaced.
        """
        new = _checked_state(self.params, state, self.xp, self.dtype)
        self._params = {**self._params, **new}

    def __repr__(self) -> str:
        return f"Linear({self.din}, {self.dout}, dtype={self.dtype})"


def _checked_param(name: str, value: Array, old: Any, xp: Any, dtype: Any) -> Array:
    """``value`` as the new parameter ``name`` (a copy in ``dtype``), or an error naming it."""
    if not B.is_array(value) or B.library_name(value) != B.library_name(old):
        raise TypeError(f"{name} must be a {B.library_name(old)} array, got {type(value).__name__}")
    if tuple(value.shape) != tuple(old.shape):
        raise ValueError(
            f"{name}: cannot replace an array of shape {tuple(old.shape)} by one of shape {tuple(value.shape)}"
        )
    if not xp.isdtype(value.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {value.dtype}")
    if not B.all_finite(value):
        raise ValueError(f"{name} contains NaN or infinite values")
    check_fits(name, value, check_dtype_name("dtype", dtype), "the layer's parameter")  # float64 -> float32
    return xp.astype(value, dtype, copy=True)


def _checked_state(params: Mapping, state: Mapping[str, Any], xp: Any, dtype: Any) -> dict:
    """Every entry of ``state`` checked and converted for ``params`` (host arrays of any real
    dtype; the names must match exactly).  Raises before returning anything, so a caller that
    commits the result only afterwards is all-or-nothing."""
    if not isinstance(state, Mapping):
        raise TypeError(f"load_state_dict: the state must be a mapping name -> array, got {type(state).__name__}")
    missing = set(params) - set(state)
    extra = set(state) - set(params)
    if missing or extra:
        raise KeyError(f"load_state_dict: missing {sorted(missing)}, unexpected {sorted(extra)}")
    converted = {}
    for k in params:
        old = params[k]
        new = np.asarray(B.to_numpy(state[k]) if B.is_array(state[k]) else state[k])
        if new.shape != tuple(old.shape):
            raise ValueError(f"load_state_dict: {k} has shape {new.shape}, expected {tuple(old.shape)}")
        if new.dtype == np.bool_ or not (np.issubdtype(new.dtype, np.floating) or np.issubdtype(new.dtype, np.integer)):
            raise TypeError(f"load_state_dict: {k} must hold real numbers, got dtype {new.dtype}")
        if not np.all(np.isfinite(new)):
            raise ValueError(f"load_state_dict: {k} contains NaN or infinite values")
        if np.issubdtype(new.dtype, np.floating):
            check_fits(f"load_state_dict: {k}", new, check_dtype_name("dtype", dtype), "the layer's parameter")
        converted[k] = B.from_numpy(new, xp, device=B.get_device(old), dtype=dtype)
        if not B.all_finite(converted[k]):  # any other cast that overflowed (float128, ...)
            raise ValueError(f"load_state_dict: {k} does not fit the layer's dtype {dtype}")
    return converted


class MLPCache(NamedTuple):
    linear: tuple  # L LinearCache, one per layer
    activation: tuple  # L - 1 activation caches, one between each two layers


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
    layers : list of :class:`Linear`, which hold the parameters
    params : NamedArrays, ``"0.W", "0.b", "1.W", ...`` (live: assigning replaces the layer's array)
    grads : NamedArrays with the same names, after :meth:`backward`

    Notes
    -----
    The network keeps the caches and gradients of all its layers itself (as one
    :class:`MLPCache` and one set of gradients), computed with :meth:`apply` and
    :meth:`gradients`: a forward or backward that fails in any layer changes nothing, and a
    layer's own ``grads`` belong to its standalone :meth:`Linear.backward`.
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
        self._layer_grads: list[dict] = [{} for _ in self.layers]
        self._grads = NamedArrays({str(i): g for i, g in enumerate(self._layer_grads)})
        self._cache: MLPCache | None = None

    @property
    def params(self) -> NamedArrays:
        return self._params

    @property
    def grads(self) -> NamedArrays:
        return self._grads

    def apply(self, x: Array) -> tuple[Array, MLPCache]:
        """``(out (N, sizes[-1]), cache)`` for ``x (N, sizes[0])``; remembers nothing.

        Like :meth:`Linear.apply`, checks the kind and shape of ``x`` but not its values.
        """
        act_forward, _ = ACTIVATIONS[self.activation]
        linear, activation = [], []
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, cache = layer.apply(h)  # (N, sizes[i + 1])
            linear.append(cache)
            if i < last:
                h, cache = act_forward(h)
                activation.append(cache)
        return h, MLPCache(tuple(linear), tuple(activation))

    def forward(self, x: Array) -> Array:
        """``(N, sizes[0]) -> (N, sizes[-1])``; refuses a non-finite input."""
        check_batch("the MLP input", x, self.xp, self.sizes[0])
        out, cache = self.apply(x)
        self._cache = cache  # the one change of state, after every layer succeeded
        return out

    __call__ = forward

    def gradients(self, dout: Array, cache: MLPCache) -> tuple[Array, dict]:
        """``(dx (N, sizes[0]), grads)`` for the forward that made ``cache``; changes nothing.

        The chain rule, read from the output back: each layer's backward turns the gradient of
        its output into that of its input, and the activation between two layers masks (relu) or
        scales (tanh) it.  ``grads`` maps ``"i.W"``, ``"i.b"`` to the gradients.
        """
        check_batch("dout", dout, self.xp, self.sizes[-1], finite=False)
        if dout.shape[0] != cache.linear[0].x.shape[0]:
            raise ValueError(f"dout has {dout.shape[0]} rows but the forward had {cache.linear[0].x.shape[0]}")
        _, act_backward = ACTIVATIONS[self.activation]
        grads = {}
        dh = dout  # (N, sizes[-1])
        for i in reversed(range(len(self.layers))):
            if i < len(self.layers) - 1:
                dh = act_backward(dh, cache.activation[i])
            dh, grads[f"{i}.W"], grads[f"{i}.b"] = linear_backward(dh, cache.linear[i])  # dh: (N, sizes[i])
        return dh, grads

    def backward(self, dout: Array) -> Array:
        """Fill :attr:`grads` for the last forward and return ``dx (N, sizes[0])``."""
        if self._cache is None:
            raise RuntimeError("MLP.backward was called before forward: there is no input to differentiate at")
        dx, grads = self.gradients(dout, self._cache)
        self.store_grads(grads)
        return dx

    def store_grads(self, grads: Mapping[str, Any]) -> None:
        """Make ``grads`` (as returned by :meth:`gradients`) the network's :attr:`grads`."""
        new = [{"W": grads[f"{i}.W"], "b": grads[f"{i}.b"]} for i in range(len(self.layers))]  # all, or KeyError
        for layer_grads, g in zip(self._layer_grads, new):  # in place: views of grads stay valid
            layer_grads.clear()
            layer_grads.update(g)

    def state_dict(self) -> dict:
        """Host (numpy) copies of all parameters, under the names of :attr:`params`."""
        return {k: np.array(B.to_numpy(v), copy=True) for k, v in self._params.items()}

    def check_state_dict(self, state: Mapping[str, Any]) -> dict:
        """The parameters :meth:`load_state_dict` would set (checked and converted), or an error;
        changes nothing."""
        return _checked_state(self._params, state, self.xp, self.dtype)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all parameters by host arrays with the names and shapes of :attr:`params`.

        All or nothing: every entry is checked and converted first; only then is any layer's
        parameter replaced (by values that have passed the layer's own checks).
        """
        for k, v in self.check_state_dict(state).items():
            self._params[k] = v

    def __repr__(self) -> str:
        return f"MLP({self.sizes}, activation={self.activation!r}, dtype={self.dtype})"
