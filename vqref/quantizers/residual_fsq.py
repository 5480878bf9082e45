"""``ResidualFSQ``: residual finite scalar quantization with vector-quantize-pytorch's API.

Symbols: N tokens (all leading axes flattened), d = len(levels), dim the input width (d unless
projected), Q = num_quantizers depths, K = prod(levels) codes per depth.

``quantized, indices = rfsq(x)`` with ``indices (..., Q)``, then ``dx = rfsq.backward(dquantized)``;
the projections' gradients (when ``dim != d``) in ``rfsq.grads``.  The algorithm is
:mod:`vqref.core.residual_fsq` (Q symmetric-grid FSQ depths, depth l's grid shrunk by
``L^-l``).  A forward is:

    1. validate x; channel-first inputs to channel-last        FSQ's helpers
    2. [training: draw the quantize-dropout depth and noise]   host generator (a copy)
    3. project, soft clamp, Q depths, project back             core.residual_fsq.residual_fsq_forward
    4. usage statistics per depth                              vqref.metrics.code_usage
    5. commit cache, generator and stats (eval: stats)         self._commit(...)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from ..backend import Array
from ..core.fsq import Projection
from ..core.residual_fsq import residual_fsq_backward, residual_fsq_forward
from ..ops import fsq as ops
from ..ops.linear import linear_forward
from ..validation import check_bool, check_dtype_name, check_int, check_real, check_seed
from .fsq import MAX_DIM, ScalarQuantizer, check_levels, linear_init, usage_stats

__all__ = ["ResidualFSQ"]

MAX_NUM_QUANTIZERS = 1 << 12
MIN_SCALE = 1e-30  # the smallest depth scale L^-l: residual / scale stays far inside float32's range


def _check_soft_clamp(value: Any, d: int) -> list | None:
    """``soft_clamp_input_value`` as None or a list of d positive floats (a number for every channel)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != d:
            raise ValueError(f"soft_clamp_input_value must hold len(levels) = {d} numbers, got {len(value)}")
        return [check_real(f"soft_clamp_input_value[{j}]", v, 1e-30) for j, v in enumerate(value)]
    return [check_real("soft_clamp_input_value", value, 1e-30)] * d


def check_residual_fsq_options(**kw: Any) -> dict:
    """The validated, canonical options of :class:`ResidualFSQ` (all but seed, dtype, xp, device)."""
    levels = check_levels(kw["levels"], preserve_symmetry=True)  # every depth is on the symmetric grid
    d = len(levels)
    out = {k: check_bool(k, kw[k]) for k in ("is_channel_first", "quantize_dropout", "bound_hard_clamp")}
    Q = check_int("num_quantizers", kw["num_quantizers"], 1, MAX_NUM_QUANTIZERS)
    dim = d if kw["dim"] is None else check_int("dim", kw["dim"], 1, MAX_DIM)
    smallest = float(max(levels)) ** -(Q - 1)  # the deepest grid's scale
    if smallest < MIN_SCALE:
        raise ValueError(
            f"num_quantizers={Q} with a level of {max(levels)}: the deepest depth's grid would be scaled by "
            f"{max(levels)}^-{Q - 1} = {smallest:.3g}, below {MIN_SCALE:g}, where float32 cannot divide by it; "
            "use fewer depths"
        )
    cutoff = check_int("quantize_dropout_cutoff_index", kw["quantize_dropout_cutoff_index"], 0)
    multiple = check_int("quantize_dropout_multiple_of", kw["quantize_dropout_multiple_of"], 1)
    if out["quantize_dropout"] and Q > 1 and cutoff >= Q:
        raise ValueError(
            f"quantize_dropout_cutoff_index={cutoff} must be < num_quantizers={Q}: the last depth kept is drawn "
            "from [cutoff, num_quantizers)"
        )
    soft = _check_soft_clamp(kw["soft_clamp_input_value"], d)
    if out["bound_hard_clamp"] and soft is not None:
        raise ValueError(
            "soft_clamp_input_value must be None with bound_hard_clamp=True (the clamp value is then "
            "1 + 1/(L - 1), as in vector-quantize-pytorch); pass bound_hard_clamp=False to choose it"
        )
    noise = check_real("noise_dropout", kw["noise_dropout"], 0.0, 1.0)
    out.update(levels=list(levels), num_quantizers=Q, dim=dim, quantize_dropout_cutoff_index=cutoff,
               quantize_dropout_multiple_of=multiple, soft_clamp_input_value=soft, noise_dropout=noise)  # fmt: skip
    return out


class ResidualFSQ(ScalarQuantizer):
    """Residual FSQ (SoundStream's residual recursion, arXiv 2107.03312, on FSQ layers) with manual gradients.

    ``quantized, indices = rfsq(x)`` for ``x (..., dim)`` (or ``(B, dim, ...)`` with
    ``is_channel_first``); ``indices (..., Q)``, -1 at depths that quantize dropout skipped.
    Then ``dx = rfsq.backward(dquantized)``; projections' gradients in ``rfsq.grads``.

    Parameters
    ----------
    levels : ints >= 2, the levels of each channel at every depth
    num_quantizers : Q
    dim : the input width (default len(levels)); another value adds the projections in and out
    is_channel_first : inputs are (B, dim, ...); indices then come as (B, Q, ...)
    quantize_dropout : in training, keep only the depths up to one drawn from
        ``[quantize_dropout_cutoff_index, Q)`` (rounded up to ``quantize_dropout_multiple_of``)
    soft_clamp_input_value : c of the soft clamp ``tanh(x / c) c`` before the depths (a number or
        len(levels) numbers; only with ``bound_hard_clamp=False``, which otherwise uses 1 + 1/(L - 1))
    bound_hard_clamp : the depths' bound clamps to [-1, 1] instead of tanh (default True)
    noise_dropout : every depth's noise dropout probability in training (see :class:`vqref.FSQ`)
    seed, dtype, xp, device : as :class:`vqref.FSQ`

    Attributes
    ----------
    codebook_size : prod(levels) per depth
    scales : (Q, d) the per-depth scales L^-l
    """

    CONFIG_KEYS = ("levels", "num_quantizers", "dim", "is_channel_first", "quantize_dropout",
                   "quantize_dropout_cutoff_index", "quantize_dropout_multiple_of", "soft_clamp_input_value",
                   "bound_hard_clamp", "noise_dropout", "dtype")  # fmt: skip

    def __init__(
        self,
        *,
        levels: Any,
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: Any = None,
        bound_hard_clamp: bool = True,
        noise_dropout: float = 0.0,
        seed: Any = None,
        dtype: Any = "float32",
        xp: Any = None,
        device: Any = None,
    ):
        options = check_residual_fsq_options(
            levels=levels, num_quantizers=num_quantizers, dim=dim, is_channel_first=is_channel_first,
            quantize_dropout=quantize_dropout, quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of, soft_clamp_input_value=soft_clamp_input_value,
            bound_hard_clamp=bound_hard_clamp, noise_dropout=noise_dropout,
        )  # fmt: skip
        for key, value in options.items():
            setattr(self, key, value)
        self.levels = tuple(self.levels)
        self.codebook_dim = len(self.levels)
        self.codebook_size = ops.codebook_size(self.levels)
        self._dtype_name = check_dtype_name("dtype", dtype)
        rng = check_seed("seed", seed)
        arrays = {}
        if self.has_projections:
            for name, (din, dout) in (("project_in", (self.dim, self.codebook_dim)),
                                      ("project_out", (self.codebook_dim, self.dim))):  # fmt: skip
                arrays.update({f"{name}.{k}": v for k, v in linear_init(din, dout, rng, bias=True).items()})
        self.training = True
        self._init_state(arrays, {}, (rng,), xp=B.namespace_from_module(xp), device=device)
        self._check_device()

    # ---------------------------------------------------------------- configuration

    @property
    def has_projections(self) -> bool:
        return self.dim != self.codebook_dim

    @property
    def drops_depths(self) -> bool:
        """Quantize dropout is on (vector-quantize-pytorch: ``quantize_dropout and num_quantizers > 1``)."""
        return self.quantize_dropout and self.num_quantizers > 1

    def config(self) -> dict:
        cfg = {k: getattr(self, k) for k in self.CONFIG_KEYS if k != "dtype"}
        cfg["levels"] = list(self.levels)
        cfg["dtype"] = self._dtype_name
        return cfg

    @classmethod
    def check_config(cls, config: dict) -> dict:
        options = check_residual_fsq_options(**{k: config[k] for k in cls.CONFIG_KEYS if k != "dtype"})
        options["dtype"] = check_dtype_name("dtype", config["dtype"])
        return options

    @classmethod
    def spec_from_config(cls, config: dict) -> dict:
        options = check_residual_fsq_options(**{k: config[k] for k in cls.CONFIG_KEYS if k != "dtype"})
        d, dim = len(options["levels"]), options["dim"]
        if dim == d:
            return {}
        return {"project_in.W": (dim, d), "project_in.b": (d,), "project_out.W": (d, dim), "project_out.b": (dim,)}

    def learnable_names(self) -> tuple:
        return tuple(self.state_spec())

    def __repr__(self) -> str:
        return f"ResidualFSQ(levels={list(self.levels)}, num_quantizers={self.num_quantizers}, dim={self.dim})"

    def _host_scales(self) -> np.ndarray:
        L = np.asarray(self.levels, dtype=np.float64)  # (d,)
        return L[None, :] ** -np.arange(self.num_quantizers, dtype=np.float64)[:, None]  # (Q, d)

    @property
    def scales(self) -> Array:
        """(Q, d) depth l's grid is shrunk by ``L^-l`` (the module's dtype)."""
        return B.from_numpy(self._host_scales(), self.xp, device=self.device, dtype=self.dtype)

    def _constants(self, dtype: Any) -> dict:
        """The scales, the soft clamp's c and the projections, in the computation's dtype."""
        xp, dev, s = self.xp, self.device, self._state.arrays
        soft = self.soft_clamp_input_value
        if self.bound_hard_clamp:
            soft = 1 + 1 / (np.asarray(self.levels, dtype=np.float64) - 1)  # (d,) the first grid's reach + 1/2 step
        out = {"scales": B.from_numpy(self._host_scales(), xp, device=dev, dtype=dtype)}
        out["soft_clamp"] = None if soft is None else B.from_numpy(np.asarray(soft), xp, device=dev, dtype=dtype)
        for name in ("project_in", "project_out"):
            if name + ".W" in s:
                out[name] = Projection(xp.astype(s[name + ".W"], dtype), xp.astype(s[name + ".b"], dtype))
        return out

    # ---------------------------------------------------------------- forward / backward

    def _channel_first(self, ndim: int) -> bool:
        return self.is_channel_first

    def forward(self, x: Array):
        """Quantize ``x``.

        Returns
        -------
        quantized : x's shape and dtype
        indices : (..., Q) int64 ((B, Q, ...) with ``is_channel_first``); -1 at skipped depths
        """
        rows = self._rows("x", x)
        training = self.training
        with self._exclusive():
            xp, Q = self.xp, self.num_quantizers
            lead = tuple(rows.shape[:-1])
            z = xp.reshape(rows, (-1, self.dim))  # (N, dim)
            rngs = self._rngs()
            active = Q
            if training and self.drops_depths:
                last = int(rngs[0].integers(self.quantize_dropout_cutoff_index, Q))
                m = self.quantize_dropout_multiple_of
                last = -(-(last + 1) // m) * m - 1  # rounded up to a multiple of m, minus one
                active = min(last + 1, Q)
            noise = None
            if training and self.noise_dropout > 0:
                shape = (z.shape[0], self.codebook_dim)
                noise = [self._draw_noise(rngs[0], shape, x.dtype) for _ in range(active)]
            out, cache = residual_fsq_forward(
                z, self.levels, num_active=active, hard_clamp=self.bound_hard_clamp, noise=noise,
                **self._constants(x.dtype),
            )  # fmt: skip
            if not (B.all_finite(out.projected) and B.all_finite(out.quantized)):
                raise ValueError(
                    "x is too large for the projections in this dtype; scale the data or use float64 input"
                )
            stats = usage_stats(out.indices, self.codebook_size, per_column=True)
            if training:
                self._commit(self._updated(cache=(cache, tuple(x.shape), x.dtype), rngs=tuple(rngs), stats=stats))
            else:
                self._commit(self._updated(stats=stats))
            quantized = xp.reshape(out.quantized, lead + (self.dim,))
            indices = xp.reshape(out.indices, lead + (Q,))
            if self.is_channel_first:
                return xp.moveaxis(quantized, -1, 1), xp.moveaxis(indices, -1, 1)
            return quantized, indices

    def backward(self, dquantized: Array) -> Array:
        """Gradient for the input of the last training forward; projections' gradients in ``grads``.

        Parameters
        ----------
        dquantized : the shape of the forward's output

        Returns
        -------
        dx : the input's shape and dtype.  The cache is consumed: a second backward raises.
        """
        return self._backward(dquantized, residual_fsq_backward)

    # ---------------------------------------------------------------- decoding

    @property
    def codebooks(self) -> Array:
        """(Q, K, d) every depth's implicit codebook, unscaled (the same grid at every depth)."""
        if self.codebook_size > 1 << 24:
            raise ValueError(f"the implicit codebook has {self.codebook_size} codes; decode indices instead")
        idx = self.xp.arange(self.codebook_size, dtype=self.xp.int64, device=self.device)
        grid = ops.indices_to_codes(idx, self.levels, dtype=self.dtype, preserve_symmetry=True)  # (K, d)
        return self.xp.stack([grid] * self.num_quantizers, axis=0)

    def get_codes_from_indices(self, indices: Array) -> Array:
        """``(Q, ..., d)`` every depth's scaled code for ``indices (..., Q')``; -1 (a skipped depth)
        gives zeros.  Q' < Q (coarse indices, the depths after Q' skipped) needs quantize dropout."""
        xp, Q = self.xp, self.num_quantizers
        if not B.is_array(indices):
            raise TypeError(f"indices must be an integer array of shape (..., {Q}), got {type(indices).__name__}")
        if indices.ndim < 1:
            raise ValueError(f"indices must be an integer array of shape (..., {Q}), got a 0-d array")
        q = indices.shape[-1]
        if q > Q or (q < Q and not self.drops_depths):
            raise ValueError(
                f"indices must have shape (..., {Q})"
                + ("" if q > Q else " (fewer depths only with quantize_dropout, as in vector-quantize-pytorch)")
                + f", got {tuple(indices.shape)}"
            )
        if B.library_name(indices) != B.library_name(self._like()):
            raise TypeError(f"indices is a {B.library_name(indices)} array but this module holds "
                            f"{B.library_name(self._like())} arrays; move one of them")  # fmt: skip
        if not xp.isdtype(indices.dtype, "integral"):
            raise TypeError("indices must be an integer array")
        flat = xp.reshape(indices, (-1,))
        if flat.shape[0] and (int(xp.min(flat)) < -1 or int(xp.max(flat)) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}) (or be -1 for a skipped depth)")
        scales = self.scales  # (Q, d)
        codes = []
        for level in range(Q):
            if level >= q:
                codes.append(xp.zeros(tuple(indices.shape[:-1]) + (self.codebook_dim,), dtype=self.dtype,
                                      device=self.device))  # fmt: skip
                continue
            idx = indices[..., level]
            skipped = (idx < 0)[..., None]  # (..., 1)
            c = ops.indices_to_codes(xp.where(idx < 0, 0, idx), self.levels, dtype=self.dtype, preserve_symmetry=True)
            codes.append(xp.where(skipped, xp.zeros_like(c), c) * scales[level, ...])  # (..., d)
        return xp.stack(codes, axis=0)

    def get_output_from_indices(self, indices: Array) -> Array:
        """The quantized output ``(..., dim)`` for ``indices (..., Q')``: the sum over depths,
        projected out (for the indices of an eval forward, that forward's output)."""
        xp = self.xp
        codes = self.get_codes_from_indices(indices)  # (Q, ..., d)
        total = codes[0, ...]
        for level in range(1, self.num_quantizers):
            total = total + codes[level, ...]
        if "project_out.W" not in self._state.arrays:
            return total
        c = self._constants(self.dtype)["project_out"]
        lead = tuple(total.shape[:-1])
        out = linear_forward(xp.reshape(total, (-1, self.codebook_dim)), c.W, c.b)[0]
        return xp.reshape(out, lead + (self.dim,))
