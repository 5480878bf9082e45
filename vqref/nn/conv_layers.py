"""Convolution layers that keep their parameters, and a stack of them with ReLUs in between.

Symbols: N images of H x W pixels, C channels in, F channels out, a kernel of k x k taps with
stride s and padding p; L layers in a stack.

The layers wrap the pairs of :mod:`vqref.nn.conv` the way :class:`vqref.nn.Linear` wraps the
affine map: ``params`` is a live :class:`vqref.params.ParamView` (``"W"``, ``"b"``) that an
optimizer writes back through, ``apply``/``gradients`` compute without remembering anything,
``forward``/``backward`` are the same plus remembering the cache or the gradients.  Images are
channels-last, ``(N, H, W, C)``; the kernels are ``(k, k, C, F)`` for :class:`Conv2d` and
``(C, k, k, F)`` for :class:`ConvTranspose2d` (see :mod:`vqref.nn.conv` for torch's layouts).

:class:`ConvNet` composes them like :class:`vqref.nn.MLP` composes linear layers: a ReLU after
every layer but the last, the caches and gradients of all layers kept by the stack, so a
forward or backward that fails in any layer changes nothing.  It also knows how far one input
pixel reaches (:meth:`ConvNet.reach`), which is what makes a token of a convolutional VQ-VAE a
*region* of the image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from ..params import NamedArrays, ParamView
from .conv import (
    conv2d_backward,
    conv2d_forward,
    conv_output_size,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
    conv_transpose_output_size,
)
from .functional import relu_backward, relu_forward
from .layers import _checked_param, _checked_state, _resolve

__all__ = ["check_images", "Conv2d", "ConvTranspose2d", "ConvNetCache", "ConvNet"]


def check_images(name: str, a: Array, xp: Any, channels: int, *, finite: bool = True) -> None:
    """Refuse anything but a floating ``(N, H, W, channels)`` array of the library of ``xp`` (and,
    with ``finite``, one without NaN or infinities).  ``TypeError`` for the kind, ``ValueError``
    for the shape or the values; the message names the argument."""
    if not B.is_array(a):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if B.get_namespace(a) is not xp:
        lib = B.library_name(xp.asarray(0.0))
        raise TypeError(f"{name} is a {B.library_name(a)} array but the parameters are {lib} arrays")
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {a.dtype}")
    if a.ndim != 4 or a.shape[3] != channels:
        raise ValueError(
            f"{name} must be channels-last images of shape (N, H, W, {channels}), got {tuple(a.shape)}"
            + (" (channels-first? move the channel axis last)" if a.ndim == 4 and a.shape[1] == channels else "")
        )
    if finite and not B.all_finite(a):
        raise ValueError(f"{name} contains NaN or infinite values")


class _ConvLayer:
    """What :class:`Conv2d` and :class:`ConvTranspose2d` share; a subclass names its pair of ops,
    its kernel's shape and its output size."""

    transposed = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        rng: Any,
        dtype: Any = "float32",
        xp: Any = np,
        device: Any = None,
    ):
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("kernel_size", kernel_size, 1),
            ("stride", stride, 1),
            ("padding", padding, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.xp, self.dtype = _resolve(xp, dtype)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        # Glorot & Bengio (2010, eq. 16) with the fans of a convolution: each output value sums
        # C k k inputs, each input value feeds F k k outputs.
        k = self.kernel_size
        a = math.sqrt(6.0 / ((self.in_channels + self.out_channels) * k * k))
        W = B.as_generator(rng).uniform(-a, a, size=self.kernel_shape)  # float64 on the host, then cast
        self._params = {
            "W": B.from_numpy(W, self.xp, device=device, dtype=self.dtype),
            "b": B.from_numpy(np.zeros(self.out_channels), self.xp, device=device, dtype=self.dtype),
        }
        self._grads: dict = {}
        self._cache: Any = None

    @property
    def kernel_shape(self) -> tuple:
        raise NotImplementedError

    def output_size(self, size: int) -> int:
        """Output positions along one axis for ``size`` input positions."""
        raise NotImplementedError

    def reach(self, lo: int, hi: int, size: int) -> tuple[int, int, int]:
        """``(lo', hi', size')``: the output positions that the input positions ``lo..hi`` (of
        ``size``) can change, clipped to the output's ``size'`` positions (``lo' > hi'`` if none)."""
        raise NotImplementedError

    def _ops(self) -> tuple:
        raise NotImplementedError

    @property
    def params(self) -> ParamView:
        return ParamView(lambda: ("W", "b"), lambda name: self._params[name], self._set_param)

    def _set_param(self, name: str, value: Array) -> None:
        new = _checked_param(name, value, self._params[name], self.xp, self.dtype)
        self._params = {**self._params, name: new}  # one assignment, never in place

    @property
    def grads(self) -> dict:
        return self._grads

    def apply(self, x: Array) -> tuple[Array, Any]:
        """``(y, cache)`` for ``x (N, H, W, C)``; remembers nothing (checks the kind and shape, not the values)."""
        check_images(f"the input of {self!r}", x, self.xp, self.in_channels, finite=False)
        forward, _ = self._ops()
        return forward(x, self._params["W"], self._params["b"])

    def gradients(self, dy: Array, cache: Any) -> tuple[Array, dict]:
        """``(dx, {"W": dW, "b": db})`` for the forward that made ``cache``; changes nothing."""
        check_images("dy", dy, self.xp, self.out_channels, finite=False)
        _, backward = self._ops()
        dx, dW, db = backward(dy, cache)
        return dx, {"W": dW, "b": db}

    def forward(self, x: Array) -> Array:
        """``(N, H, W, C) -> (N, H', W', F)``; refuses a non-finite input, remembers what the backward needs."""
        check_images(f"the input of {self!r}", x, self.xp, self.in_channels)
        y, cache = self.apply(x)
        self._cache = cache  # the one change of state, after everything else succeeded
        return y

    __call__ = forward

    def backward(self, dy: Array) -> Array:
        """Store ``grads["W"]``, ``grads["b"]`` for the last forward and return ``dx``."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward was called before forward")
        expected = self._output_shape()
        if tuple(dy.shape) != expected:
            raise ValueError(f"dy must have the shape of the last output, {expected}, got {tuple(dy.shape)}")
        dx, grads = self.gradients(dy, self._cache)
        self._grads.update(grads)  # in place: views of this dict stay valid
        return dx

    def _output_shape(self) -> tuple:
        c = self._cache
        if self.transposed:
            return tuple(c.y_shape)
        N, H, W, _ = c.x_shape
        return (N, self.output_size(H), self.output_size(W), self.out_channels)

    def state_dict(self) -> dict:
        """Host (numpy) copies of the parameters."""
        return {k: np.array(B.to_numpy(v), copy=True) for k, v in self._params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the parameters by host arrays of the same shapes; all or nothing."""
        new = _checked_state(self.params, state, self.xp, self.dtype)
        self._params = {**self._params, **new}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding})"
        )


class Conv2d(_ConvLayer):
    """A convolution layer ``y = conv2d(x, W) + b`` on channels-last images.

    Parameters
    ----------
    in_channels, out_channels : C, F
    kernel_size : k (square kernels)
    stride, padding : s >= 1, p >= 0
    rng : numpy Generator or seed (required: no global RNG), for the Glorot-uniform kernel
        (biases start at 0)
    dtype, xp, device : as for :class:`vqref.nn.Linear`

    Attributes
    ----------
    params : ParamView ``{"W": (k, k, C, F), "b": (F,)}``
    grads : dict with the same keys after :meth:`backward`
    """

    @property
    def kernel_shape(self) -> tuple:
        k = self.kernel_size
        return (k, k, self.in_channels, self.out_channels)

    def _ops(self) -> tuple:
        s, p = self.stride, self.padding
        return (
            lambda x, W, b: conv2d_forward(x, W, b, stride=s, padding=p),
            conv2d_backward,
        )

    def output_size(self, size: int) -> int:
        return conv_output_size(size, self.kernel_size, self.stride, self.padding)

    def reach(self, lo: int, hi: int, size: int) -> tuple[int, int, int]:
        # Output u reads the input rows u s - p .. u s - p + k - 1; it sees lo..hi when
        # u s - p <= hi and u s - p + k - 1 >= lo.
        k, s, p = self.kernel_size, self.stride, self.padding
        out = self.output_size(size)
        first = -((-(lo + p - k + 1)) // s)  # ceil((lo + p - k + 1) / s)
        last = (hi + p) // s
        return max(first, 0), min(last, out - 1), out


class ConvTranspose2d(_ConvLayer):
    """A transposed-convolution layer (learnable upsampling) on channels-last images.

    Parameters
    ----------
    in_channels, out_channels : Cin, Cout
    kernel_size, stride, padding : k, s, p of the convolution this one transposes
    output_padding : in ``[0, s)``, see :func:`vqref.nn.conv.conv_transpose2d_forward`
    rng, dtype, xp, device : as for :class:`Conv2d`

    Attributes
    ----------
    params : ParamView ``{"W": (Cin, k, k, Cout), "b": (Cout,)}``
    grads : dict with the same keys after :meth:`backward`

    Notes
    -----
    With ``k = 2s`` and ``p = s / 2`` (the VQ-VAE decoder's 4x4, stride 2, padding 1) every
    output pixel receives exactly ``(k / s)^2 = 4`` contributions and the output is exactly s
    times the input along each axis.
    """

    transposed = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, output_padding: int = 0, **kwargs):
        # checked before the base draws the kernel: a refused layer takes nothing from rng
        stride = kwargs.get("stride", 1)
        ok = isinstance(output_padding, (int, np.integer)) and not isinstance(output_padding, bool)
        if not ok or not 0 <= output_padding < (stride if isinstance(stride, (int, np.integer)) else 1):
            raise ValueError(
                f"output_padding must be an integer in [0, stride) = [0, {stride}), got {output_padding!r}"
            )
        self.output_padding = int(output_padding)
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)

    @property
    def kernel_shape(self) -> tuple:
        k = self.kernel_size
        return (self.in_channels, k, k, self.out_channels)

    def _ops(self) -> tuple:
        s, p, op = self.stride, self.padding, self.output_padding
        return (
            lambda x, W, b: conv_transpose2d_forward(x, W, b, stride=s, padding=p, output_padding=op),
            conv_transpose2d_backward,
        )

    def output_size(self, size: int) -> int:
        return conv_transpose_output_size(size, self.kernel_size, self.stride, self.padding, self.output_padding)

    def reach(self, lo: int, hi: int, size: int) -> tuple[int, int, int]:
        # Input a writes the output rows a s - p .. a s - p + k - 1.
        k, s, p = self.kernel_size, self.stride, self.padding
        out = self.output_size(size)
        return max(lo * s - p, 0), min(hi * s - p + k - 1, out - 1), out


class ConvNetCache(NamedTuple):
    layers: tuple  # L caches of the convolution layers
    activation: tuple  # L - 1 ReLU caches, one between each two layers


class ConvNet:
    """Convolution layers with a ReLU after each but the last: ``conv -> relu -> ... -> conv``.

    Parameters
    ----------
    layers : sequence of :class:`Conv2d` / :class:`ConvTranspose2d` (at least one), each
        taking the previous one's output channels, all of one dtype and array library

    Attributes
    ----------
    params : NamedArrays ``"0.W", "0.b", "1.W", ...`` (live: assigning replaces the layer's array)
    grads : NamedArrays with the same names after :meth:`backward`
    """

    def __init__(self, layers: Sequence[_ConvLayer]):
        self.layers = list(layers)
        if not self.layers or not all(isinstance(layer, _ConvLayer) for layer in self.layers):
            raise TypeError("ConvNet needs a non-empty list of Conv2d / ConvTranspose2d layers")
        for i, (a, b) in enumerate(zip(self.layers[:-1], self.layers[1:])):
            if a.out_channels != b.in_channels:
                raise ValueError(f"layer {i} gives {a.out_channels} channels but layer {i + 1} takes {b.in_channels}")
            if (a.xp, a.dtype) != (b.xp, b.dtype):
                raise ValueError(f"layers {i} and {i + 1} differ in array library or dtype")
        self.xp, self.dtype = self.layers[0].xp, self.layers[0].dtype
        self.in_channels, self.out_channels = self.layers[0].in_channels, self.layers[-1].out_channels
        self._params = NamedArrays({str(i): layer.params for i, layer in enumerate(self.layers)})
        self._layer_grads: list[dict] = [{} for _ in self.layers]
        self._grads = NamedArrays({str(i): g for i, g in enumerate(self._layer_grads)})
        self._cache: ConvNetCache | None = None

    @property
    def params(self) -> NamedArrays:
        return self._params

    @property
    def grads(self) -> NamedArrays:
        return self._grads

    def output_shape(self, shape: tuple) -> tuple:
        """The output's shape for input images of ``shape = (N, H, W, C)``."""
        N, H, W, _ = shape
        for layer in self.layers:
            H, W = layer.output_size(H), layer.output_size(W)
        return (N, H, W, self.out_channels)

    def reach(self, lo: int, hi: int, size: int) -> tuple[int, int]:
        """The output positions (first, last) along one axis that the input positions ``lo..hi``
        can change, for an input of ``size`` positions: the layers' reaches chained.

        A ReLU acts pixel by pixel and changes no reach; a 1x1 convolution neither.
        """
        for layer in self.layers:
            lo, hi, size = layer.reach(lo, hi, size)
        return lo, hi

    def apply(self, x: Array) -> tuple[Array, ConvNetCache]:
        """``(out, cache)`` for ``x (N, H, W, C)``; remembers nothing."""
        convs, acts = [], []
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, cache = layer.apply(h)
            convs.append(cache)
            if i < last:
                h, cache = relu_forward(h)
                acts.append(cache)
        return h, ConvNetCache(tuple(convs), tuple(acts))

    def forward(self, x: Array) -> Array:
        """``(N, H, W, C) -> (N, H', W', F)``; refuses a non-finite input."""
        check_images("the ConvNet input", x, self.xp, self.in_channels)
        out, cache = self.apply(x)
        self._cache = cache  # the one change of state, after every layer succeeded
        return out

    __call__ = forward

    def gradients(self, dout: Array, cache: ConvNetCache) -> tuple[Array, dict]:
        """``(dx, grads)`` for the forward that made ``cache``; changes nothing.

        The chain rule from the output back: each layer's backward, and between two layers the
        ReLU's mask.  ``grads`` maps ``"i.W"``, ``"i.b"`` to the gradients.
        """
        grads = {}
        dh = dout
        for i in reversed(range(len(self.layers))):
            if i < len(self.layers) - 1:
                dh = relu_backward(dh, cache.activation[i])
            dh, g = self.layers[i].gradients(dh, cache.layers[i])
            grads[f"{i}.W"], grads[f"{i}.b"] = g["W"], g["b"]
        return dh, grads

    def backward(self, dout: Array) -> Array:
        """Fill :attr:`grads` for the last forward and return ``dx``."""
        if self._cache is None:
            raise RuntimeError("ConvNet.backward was called before forward")
        dx, grads = self.gradients(dout, self._cache)
        self.store_grads(grads)
        return dx

    def store_grads(self, grads: Mapping[str, Any]) -> None:
        """Make ``grads`` (as returned by :meth:`gradients`) the network's :attr:`grads`."""
        new = [{"W": grads[f"{i}.W"], "b": grads[f"{i}.b"]} for i in range(len(self.layers))]  # all, or KeyError
        for layer_grads, g in zip(self._layer_grads, new):
            layer_grads.clear()
            layer_grads.update(g)

    def state_dict(self) -> dict:
        """Host (numpy) copies of all parameters, under the names of :attr:`params`."""
        return {k: np.array(B.to_numpy(v), copy=True) for k, v in self._params.items()}

    def check_state_dict(self, state: Mapping[str, Any]) -> dict:
        """The parameters :meth:`load_state_dict` would set (checked and converted); changes nothing."""
        return _checked_state(self._params, state, self.xp, self.dtype)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all parameters; all or nothing (every entry is checked before any is set)."""
        for k, v in self.check_state_dict(state).items():
            self._params[k] = v

    def __repr__(self) -> str:
        return "ConvNet([" + ", ".join(map(repr, self.layers)) + "])"
