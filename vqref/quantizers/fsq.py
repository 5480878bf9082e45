"""``FSQ``: finite scalar quantization (arXiv 2309.15505) with vector-quantize-pytorch's API.

Symbols: N tokens (all leading axes of the input flattened), C = num_codebooks,
d = len(levels) channels per codebook, dim the input width (``C * d`` unless projected).

``quantized, indices = fsq(x)``, then ``dx = fsq.backward(dquantized)``; the projections'
gradients (when ``dim != C * d``) are in ``fsq.grads``.  The codebook is the implicit grid of
:mod:`vqref.ops.fsq`; the state holds only the projections (learnable), the orthogonal
rotation (a constant, with ``orthogonal_rotation``) and the backward cache.  A forward is:

    1. validate x; channel-first inputs to channel-last     Quantizer.check_input, _rows
    2. [training, noise dropout: draw mask and noise]       host generator (a copy)
    3. project, quantize each codebook, project back        core.fsq.fsq_layer_forward
    4. usage statistics per codebook                        vqref.metrics.code_usage
    5. commit cache, generator and stats (eval: stats)      self._commit(...)

There is no optimizer inside: train the projections by reading ``fsq.grads`` and assigning
``fsq.params[name] = ...`` (checked, then committed), as a learnable codebook of
:class:`vqref.VectorQuantize`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import backend as B
from ..backend import Array
from ..core.fsq import Projection, fsq_layer_backward, fsq_layer_forward
from ..metrics import code_usage
from ..ops import fsq as ops
from ..ops.linear import linear_forward
from ..validation import (
    check_bool,
    check_dtype_name,
    check_fits,
    check_index_array,
    check_int,
    check_real,
    check_seed,
    fits,
)
from .base import Quantizer

__all__ = [
    "FSQ",
    "ScalarQuantizer",
    "check_levels",
    "linear_init",
    "orthogonal_init",
    "usage_stats",
    "channels_last",
    "FIT_FIX",
]

MAX_CODEBOOK_SIZE = 1 << 62  # prod(levels): indices are int64
MAX_NUM_CODEBOOKS = 1 << 12
MAX_DIM = 1 << 16  # the projections hold dim * C * d weights each
FIT_FIX = "scale the upstream gradient or run the forward on float64 input"


def check_levels(levels: Any, *, preserve_symmetry: bool) -> tuple:
    """``levels`` as a tuple of Python ints >= 2 (a list or tuple of ints, at least one).

    On the paper's grid (``preserve_symmetry=False``) a level of 2 is refused, as
    vector-quantize-pytorch refuses it: the bound's shift puts z = 0 at the upper edge of the
    interval, so the two values -1 and 0 split the real line at z = -3.8, and almost every input
    gets 0.  Levels above 1000 are refused there too: the widened bound then passes the last
    grid point, and saturated inputs would round beyond the grid.
    """
    if not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels must be a list or tuple of integers >= 2 (e.g. [8, 5, 5, 5]), got {levels!r}")
    if len(levels) == 0:
        raise ValueError("levels must hold at least one integer >= 2 (e.g. [8, 5, 5, 5]), got an empty sequence")
    out = tuple(check_int(f"levels[{j}]", level, 2) for j, level in enumerate(levels))
    size = ops.codebook_size(out)
    if size > MAX_CODEBOOK_SIZE:
        raise ValueError(f"levels {list(out)} give prod(levels) = {size} codes, more than int64 indices hold")
    if not preserve_symmetry and 2 in out:
        raise ValueError(
            f"levels {list(out)} hold a 2: on the paper's grid a channel of two levels maps almost every input "
            "to 0 (as vector-quantize-pytorch, which refuses it too); use preserve_symmetry=True (values -1 and 1) "
            "or a level >= 3"
        )
    if not preserve_symmetry and max(out) > ops.MAX_PAPER_LEVEL:
        raise ValueError(
            f"levels {list(out)} hold a level above {ops.MAX_PAPER_LEVEL}: the paper's bound would round saturated "
            "inputs beyond the grid; use preserve_symmetry=True or smaller levels"
        )
    return out


def check_fsq_options(**kw: Any) -> dict:
    """The validated, canonical options of :class:`FSQ` (every constructor option but seed, dtype,
    xp and device); ``dim`` and ``keep_num_codebooks_dim`` resolved from their ``None`` defaults."""
    flags = ("channel_first", "projection_has_bias", "return_indices", "preserve_symmetry", "bound_hard_clamp",
             "orthogonal_rotation")  # fmt: skip
    out = {k: check_bool(k, kw[k]) for k in flags}
    levels = check_levels(kw["levels"], preserve_symmetry=out["preserve_symmetry"])
    C = check_int("num_codebooks", kw["num_codebooks"], 1, MAX_NUM_CODEBOOKS)
    dim = len(levels) * C if kw["dim"] is None else check_int("dim", kw["dim"], 1, MAX_DIM)
    keep = kw["keep_num_codebooks_dim"]
    keep = C > 1 if keep is None else check_bool("keep_num_codebooks_dim", keep)
    if C > 1 and not keep:
        raise ValueError(
            f"num_codebooks={C} needs keep_num_codebooks_dim=True (or None): indices carry the codebook axis"
        )
    noise = check_real("noise_dropout", kw["noise_dropout"], 0.0, 1.0)
    if noise > 0 and not out["preserve_symmetry"]:
        raise ValueError(f"noise_dropout={noise} needs preserve_symmetry=True (as in vector-quantize-pytorch)")
    if len(levels) * C > MAX_DIM:
        raise ValueError(f"len(levels) * num_codebooks = {len(levels) * C} exceeds {MAX_DIM} channels")
    out.update(levels=list(levels), dim=dim, num_codebooks=C, keep_num_codebooks_dim=keep, noise_dropout=noise)
    return out


def linear_init(din: int, dout: int, rng: np.random.Generator, *, bias: bool) -> dict:
    """Host float64 ``{"W": (din, dout), "b": (dout,)}`` with torch ``nn.Linear``'s default
    distribution, ``U(-1/sqrt(din), 1/sqrt(din))`` for both (``W`` input-major, as vqref.ops.linear)."""
    a = 1.0 / math.sqrt(din)
    out = {"W": rng.uniform(-a, a, size=(din, dout))}
    if bias:
        out["b"] = rng.uniform(-a, a, size=(dout,))
    return out


def orthogonal_init(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``(d, d)`` orthogonal matrix as torch's ``nn.init.orthogonal_`` draws it: the Q of
    the QR decomposition of a Gaussian matrix, columns signed so that R's diagonal is positive
    (which makes Q uniformly distributed over the orthogonal group)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def usage_stats(indices: Array, codebook_size: int, *, per_column: bool = False) -> dict:
    """:func:`vqref.metrics.code_usage` of each column of ``indices (N, C)``: plain numbers for one
    column, a tuple per key for several (or always, with ``per_column``).  Negative entries
    (depths a quantize dropout skipped) are left out."""
    per = []
    for c in range(indices.shape[1]):
        col = indices[:, c]  # (N,)
        per.append(code_usage(col[col >= 0], codebook_size))  # a boolean mask: the depths that ran
    if len(per) == 1 and not per_column:
        return per[0]
    return {k: tuple(p[k] for p in per) for k in per[0]}


def channels_last(x: Array, channel_first: bool) -> Array:
    """``(B, dim, *spatial)`` to ``(B, *spatial, dim)`` when ``channel_first`` (else ``x``)."""
    return B.get_namespace(x).moveaxis(x, 1, -1) if channel_first and x.ndim >= 2 else x


class ScalarQuantizer(Quantizer):
    """What :class:`FSQ` and :class:`vqref.ResidualFSQ` share: reading channel-first inputs, noise
    draws, and the backward's checks and commit (the core backward is the subclass's)."""

    def _channel_first(self, ndim: int) -> bool:
        raise NotImplementedError

    def _check_device(self) -> None:
        # with no state arrays, _place never meets the device: try one tiny array now
        try:
            self._like()
        except (TypeError, ValueError, RuntimeError, AttributeError) as e:
            lib = getattr(self.xp, "__name__", repr(self.xp))
            raise ValueError(f"device={self.device!r} cannot hold arrays in {lib}: {e}") from None

    def _rows(self, name: str, a: Array) -> Array:
        """Check ``a`` (the input or the upstream gradient) and return it channel-last."""
        self.check_input(name, a)
        first = self._channel_first(a.ndim)
        axis = 1 if first else -1
        if a.ndim < (2 if first else 1) or a.shape[axis] != self.dim or B.numel(tuple(a.shape)) == 0:
            layout = "(B, dim, ...)" if first else "(..., dim)"
            raise ValueError(f"{name} must have shape {layout} with dim={self.dim} and at least one vector, "
                             f"got {tuple(a.shape)}")  # fmt: skip
        return channels_last(a, first)

    def _draw_noise(self, rng: np.random.Generator, shape: tuple, dtype: Any) -> tuple:
        """Noise dropout's ``(mask, noise)`` drawn on the host, moved to the state's library."""
        mask = rng.random(shape) < self.noise_dropout  # (M, d) bool
        noise = rng.random(shape) - 0.5  # (M, d) uniform on [-1/2, 1/2)
        xp, dev = self.xp, self.device
        return B.from_numpy(mask, xp, device=dev), B.from_numpy(noise, xp, device=dev, dtype=dtype)

    def _backward(self, dquantized: Array, core_backward: Any) -> Array:
        """The backward of the last training forward with ``core_backward(drows, cache) -> (dx, grads)``:
        checks the upstream gradient, then commits the consumed cache and the gradients."""
        with self._exclusive():
            if self._state.cache is None:
                raise RuntimeError(
                    "backward() needs a training-mode forward first (and each forward allows one backward)"
                )
            cache, shape, dtype = self._state.cache
            xp = self.xp
            self.check_input("dquantized", dquantized, shape=shape)
            check_fits("dquantized", dquantized, "float32" if dtype == xp.float32 else "float64",
                       "the forward's input", FIT_FIX)  # fmt: skip
            first = self._channel_first(len(shape))
            rows = channels_last(dquantized, first)
            lead = tuple(rows.shape[:-1])
            drows = xp.astype(xp.reshape(rows, (-1, self.dim)), dtype, copy=False)  # (N, dim) no copy: read only
            dx, grads = core_backward(drows, cache)
            for name, g in [("dx", dx), *grads.items()]:
                if not (B.all_finite(g) and (name == "dx" or fits(g, self._dtype_name))):
                    raise ValueError(f"the gradient {name} overflows; {FIT_FIX}")
            self._commit(self._updated(cache=None))
            self.grads.clear()  # in place: views of this dict stay valid
            self.grads.update({k: xp.astype(g, self.dtype) for k, g in grads.items()})
            dx = xp.reshape(dx, lead + (self.dim,))
            return xp.moveaxis(dx, -1, 1) if first else dx


class FSQ(ScalarQuantizer):
    """Finite scalar quantization (Mentzer et al., arXiv 2309.15505) with manual gradients.

    ``quantized, indices = fsq(x)``; then ``dx = fsq.backward(dquantized)`` (a surrogate
    gradient: straight through the rounding); the projections' gradients in ``fsq.grads``.

    Parameters
    ----------
    levels : the number of levels of each channel, ints >= 2 (e.g. [8, 5, 5, 5]); a 2 needs
        ``preserve_symmetry``
    dim : size of the channel axis (default ``len(levels) * num_codebooks``).  Any other value
        adds the affine projections ``project_in`` (dim -> C d) and ``project_out`` (C d -> dim)
    num_codebooks : C, groups of ``len(levels)`` channels quantized independently
    keep_num_codebooks_dim : indices keep the codebook axis ``(..., C)`` (default: when C > 1;
        True with C = 1 gives ``(..., 1)``)
    channel_first : inputs are ``(B, dim, ...)``.  As in vector-quantize-pytorch, inputs with four
        or more axes (images, videos) are always read channel-first
    projection_has_bias : the projections are affine (default) or linear
    return_indices : False returns ``(quantized, None)``
    preserve_symmetry : the symmetric grid of arXiv 2411.19842 (L evenly spaced points on [-1, 1])
    noise_dropout : in training, the probability that an entry of the codes gets uniform noise
        on [-1/2, 1/2) (needs ``preserve_symmetry``)
    bound_hard_clamp : clamp to [-1, 1] instead of tanh in the bound
    orthogonal_rotation : rotate each codebook's channels by a fixed random orthogonal matrix
        before quantizing and back after (the outputs are then rotated grid points)
    seed : seed or numpy Generator: the projections' and the rotation's initial values, the noise
    dtype : the state's dtype ("float32" default); outputs keep the input's dtype
    xp, device : the array library (numpy default; cupy; array_api_strict) and device

    Attributes
    ----------
    codebook_size : prod(levels), the size of the implicit codebook
    has_projections : dim != C * len(levels)
    """

    CONFIG_KEYS = ("levels", "dim", "num_codebooks", "keep_num_codebooks_dim", "channel_first", "projection_has_bias",
                   "return_indices", "preserve_symmetry", "noise_dropout", "bound_hard_clamp", "orthogonal_rotation",
                   "dtype")  # fmt: skip

    def __init__(
        self,
        levels: Any,
        dim: int | None = None,
        num_codebooks: int = 1,
        *,
        keep_num_codebooks_dim: bool | None = None,
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        seed: Any = None,
        dtype: Any = "float32",
        xp: Any = None,
        device: Any = None,
    ):
        options = check_fsq_options(
            levels=levels, dim=dim, num_codebooks=num_codebooks, keep_num_codebooks_dim=keep_num_codebooks_dim,
            channel_first=channel_first, projection_has_bias=projection_has_bias, return_indices=return_indices,
            preserve_symmetry=preserve_symmetry, noise_dropout=noise_dropout, bound_hard_clamp=bound_hard_clamp,
            orthogonal_rotation=orthogonal_rotation,
        )  # fmt: skip
        for key, value in options.items():
            setattr(self, key, value)
        self.levels = tuple(self.levels)
        self.codebook_dim = len(self.levels)
        self.codebook_size = ops.codebook_size(self.levels)
        self._dtype_name = check_dtype_name("dtype", dtype)
        rng = check_seed("seed", seed)
        namespace = B.namespace_from_module(xp)
        arrays = {}
        effective = self.codebook_dim * self.num_codebooks
        if self.has_projections:
            bias = self.projection_has_bias
            for name, (din, dout) in (("project_in", (self.dim, effective)), ("project_out", (effective, self.dim))):
                arrays.update({f"{name}.{k}": v for k, v in linear_init(din, dout, rng, bias=bias).items()})
        if self.orthogonal_rotation:
            arrays["orthogonal_rot"] = orthogonal_init(self.codebook_dim, rng)
        self.training = True
        self._init_state(arrays, {}, (rng,), xp=namespace, device=device)
        self._check_device()

    # ---------------------------------------------------------------- configuration

    @property
    def has_projections(self) -> bool:
        return self.dim != self.codebook_dim * self.num_codebooks

    def config(self) -> dict:
        cfg = {k: getattr(self, k) for k in self.CONFIG_KEYS if k != "dtype"}
        cfg["levels"] = list(self.levels)
        cfg["dtype"] = self._dtype_name
        return cfg

    @classmethod
    def check_config(cls, config: dict) -> dict:
        options = check_fsq_options(**{k: config[k] for k in cls.CONFIG_KEYS if k != "dtype"})
        options["dtype"] = check_dtype_name("dtype", config["dtype"])
        return options

    @classmethod
    def spec_from_config(cls, config: dict) -> dict:
        options = check_fsq_options(**{k: config[k] for k in cls.CONFIG_KEYS if k != "dtype"})
        d, C, dim = len(options["levels"]), options["num_codebooks"], options["dim"]
        spec = {}
        bias = options["projection_has_bias"]
        for name, (din, dout) in (("project_in", (dim, d * C)), ("project_out", (d * C, dim))):
            if dim != d * C:
                spec.update({f"{name}.W": (din, dout), **({f"{name}.b": (dout,)} if bias else {})})
        if options["orthogonal_rotation"]:
            spec["orthogonal_rot"] = (d, d)
        return spec

    def learnable_names(self) -> tuple:
        return tuple(k for k in self.state_spec() if k.startswith("project_"))

    def __repr__(self) -> str:
        extra = "".join(f", {k}=True" for k in ("preserve_symmetry", "bound_hard_clamp", "orthogonal_rotation")
                        if getattr(self, k))  # fmt: skip
        return f"FSQ(levels={list(self.levels)}, dim={self.dim}, num_codebooks={self.num_codebooks}{extra})"

    # ---------------------------------------------------------------- forward / backward

    def _channel_first(self, ndim: int) -> bool:
        return self.channel_first or ndim >= 4

    def _layer_arrays(self, dtype: Any) -> dict:
        """The projections and the rotation of the state, in the computation's dtype."""
        s, xp = self._state.arrays, self.xp
        out = {}
        for name in ("project_in", "project_out"):
            if name + ".W" in s:
                b = s.get(name + ".b")
                out[name] = Projection(xp.astype(s[name + ".W"], dtype), None if b is None else xp.astype(b, dtype))
        if "orthogonal_rot" in s:
            out["rotation"] = xp.astype(s["orthogonal_rot"], dtype)
        return out

    def forward(self, x: Array):
        """Quantize ``x``.

        Parameters
        ----------
        x : (..., dim), or (B, dim, ...) channel-first; float32 or float64 of the module's library

        Returns
        -------
        quantized : x's shape and dtype; grid points in [-1, 1] unless projected, rotated or noisy
        indices : (...) int64 (channel-first: (B, ...)), with a last axis C when
            ``keep_num_codebooks_dim``; in [0, codebook_size).  None with ``return_indices=False``
        """
        rows = self._rows("x", x)  # (..., dim) channel-last
        training = self.training  # read once
        with self._exclusive():
            xp = self.xp
            lead = tuple(rows.shape[:-1])
            z = xp.reshape(rows, (-1, self.dim))  # (N, dim)
            rngs = self._rngs()
            noise = None
            if training and self.noise_dropout > 0:
                M = z.shape[0] * self.num_codebooks
                noise = self._draw_noise(rngs[0], (M, self.codebook_dim), x.dtype)
            out, cache = fsq_layer_forward(
                z, self.levels, num_codebooks=self.num_codebooks, preserve_symmetry=self.preserve_symmetry,
                hard_clamp=self.bound_hard_clamp, noise=noise, **self._layer_arrays(x.dtype),
            )  # fmt: skip
            if not (B.all_finite(out.projected) and B.all_finite(out.quantized)):
                raise ValueError(
                    "x is too large for the projections in this dtype: the projected values overflow; scale the "
                    "data or run the forward on float64 input"
                )
            stats = usage_stats(out.indices, self.codebook_size)
            if training:
                pending = (cache, tuple(x.shape), x.dtype)
                self._commit(self._updated(cache=pending, rngs=tuple(rngs), stats=stats))
            else:
                self._commit(self._updated(stats=stats))
            quantized = xp.reshape(out.quantized, lead + (self.dim,))
            if self._channel_first(x.ndim):
                quantized = xp.moveaxis(quantized, -1, 1)
            if not self.return_indices:
                return quantized, None
            indices = out.indices if self.keep_num_codebooks_dim else out.indices[:, 0]
            return quantized, xp.reshape(indices, lead + tuple(indices.shape[1:]))

    def backward(self, dquantized: Array) -> Array:
        """Gradient for the input of the last training forward (straight through the rounding).

        Parameters
        ----------
        dquantized : the shape of the forward's output, the upstream gradient of ``quantized``

        Returns
        -------
        dx : the input's shape and dtype.  The projections' gradients go to ``self.grads``.  The
            cache is consumed: a second backward raises.
        """
        return self._backward(dquantized, fsq_layer_backward)

    # ---------------------------------------------------------------- the implicit codebook

    def indices_to_codes(self, indices: Array) -> Array:
        """The output for ``indices``: codes ``(..., dim)`` (the module's dtype), projected out and
        rotated as in the forward (without noise); channel-first ``(B, dim, ...)`` when the forward
        would be (``channel_first``, or indices of images/videos).

        Parameters
        ----------
        indices : ``(...)``, or ``(..., C)`` with ``keep_num_codebooks_dim``; integers in [0, codebook_size)
        """
        C, keep = self.num_codebooks, self.keep_num_codebooks_dim
        if keep and (not B.is_array(indices) or indices.ndim < 1 or indices.shape[-1] != C):
            got = tuple(indices.shape) if B.is_array(indices) else type(indices).__name__
            raise ValueError(f"indices must be an integer array of shape (..., {C}), got {got}")
        check_index_array("indices", indices, self._like(), self.codebook_size)
        xp = self.xp
        lead = tuple(indices.shape[:-1]) if keep else tuple(indices.shape)
        codes = ops.indices_to_codes(indices, self.levels, dtype=self.dtype,
                                     preserve_symmetry=self.preserve_symmetry)  # (..., [C,] d)  # fmt: skip
        layer = self._layer_arrays(self.dtype)
        if "rotation" in layer:
            codes = codes @ layer["rotation"].mT  # back to the input's frame, as the forward
        codes = xp.reshape(codes, (-1, C * self.codebook_dim))  # (n, C d)
        if "project_out" in layer:
            codes = linear_forward(codes, *layer["project_out"])[0]  # (n, dim)
        codes = xp.reshape(codes, lead + (self.dim,))
        # as vector-quantize-pytorch: channel-first for channel_first, and for the indices of
        # images and videos (three or more axes, besides the codebook axis)
        if (self.channel_first or indices.ndim >= 3 + int(keep)) and codes.ndim >= 2:
            codes = xp.moveaxis(codes, -1, 1)
        return codes

    def codes_to_indices(self, codes: Array) -> Array:
        """Indices ``(...)`` of grid-point codes ``(..., d)``, d = len(levels) (one codebook's
        channels, before any rotation or projection; vector-quantize-pytorch's convention)."""
        self.check_input("codes", codes, last_dim=self.codebook_dim)
        return ops.codes_to_indices(codes, self.levels, preserve_symmetry=self.preserve_symmetry)

    @property
    def implicit_codebook(self) -> Array:
        """``(codebook_size, d)`` every grid point in index order (the module's dtype)."""
        if self.codebook_size > 1 << 24:
            raise ValueError(f"the implicit codebook has {self.codebook_size} codes; decode indices instead")
        idx = self.xp.arange(self.codebook_size, dtype=self.xp.int64, device=self.device)
        return ops.indices_to_codes(idx, self.levels, dtype=self.dtype, preserve_symmetry=self.preserve_symmetry)
