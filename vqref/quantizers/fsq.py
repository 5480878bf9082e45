"""``FSQ``: finite scalar quantization (arXiv 2309.15505) with vector-quantize-pytorch's API.

Symbols: N tokens (all leading axes of the input flattened), C = num_codebooks,
d = len(levels) channels per codebook, dim = C * d.

``quantized, indices = fsq(x)``, then ``dx = fsq.backward(dquantized)``.  FSQ learns nothing: its
codebook is the implicit grid of :mod:`vqref.ops.fsq`, so its state holds no arrays, only the
backward cache of the last training forward.  A training forward is:

    1. validate x                             Quantizer.check_input
    2. quantize each codebook's d channels    core.fsq.fsq_forward  (rows of (N * C, d))
    3. commit the cache                       self._commit(...)

This first slice has no input/output projections: ``dim`` must equal ``C * len(levels)``.
"""

from __future__ import annotations

from typing import Any

from .. import backend as B
from ..backend import Array
from ..core.fsq import fsq_backward, fsq_forward
from ..ops import fsq as ops
from ..validation import check_dtype_name, check_fits, check_index_array, check_int, check_seed
from .base import Quantizer

__all__ = ["FSQ"]

MAX_CODEBOOK_SIZE = 1 << 62  # prod(levels): indices are int64
MAX_NUM_CODEBOOKS = 1 << 12
_FIT_FIX = "scale the upstream gradient or run the forward on float64 input"


def check_levels(levels: Any) -> tuple:
    """``levels`` as a tuple of Python ints >= 2 (a list or tuple of ints, at least one)."""
    if not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels must be a list or tuple of integers >= 2 (e.g. [8, 5, 5, 5]), got {levels!r}")
    if len(levels) == 0:
        raise ValueError("levels must hold at least one integer >= 2 (e.g. [8, 5, 5, 5]), got an empty sequence")
    out = tuple(check_int(f"levels[{j}]", level, 2) for j, level in enumerate(levels))
    size = ops.codebook_size(out)
    if size > MAX_CODEBOOK_SIZE:
        raise ValueError(f"levels {list(out)} give prod(levels) = {size} codes, more than int64 indices hold")
    return out


def check_fsq_options(levels: Any, dim: Any, num_codebooks: Any) -> dict:
    """Validated ``levels`` (a list), ``dim`` (resolved to an int) and ``num_codebooks``."""
    lv = check_levels(levels)
    C = check_int("num_codebooks", num_codebooks, 1, MAX_NUM_CODEBOOKS)
    effective = len(lv) * C
    dim = effective if dim is None else check_int("dim", dim, 1)
    if dim != effective:
        raise ValueError(
            f"dim={dim} differs from len(levels) * num_codebooks = {effective}: the projections in and out "
            f"that vector-quantize-pytorch adds in that case are not implemented yet in vqref; use dim=None "
            f"or dim={effective}"
        )
    return {"levels": list(lv), "dim": dim, "num_codebooks": C}


class FSQ(Quantizer):
    """Finite scalar quantization (Mentzer et al., arXiv 2309.15505) with manual gradients.

    ``quantized, indices = fsq(x)`` for ``x`` of shape ``(..., dim)``; then
    ``dx = fsq.backward(dquantized)`` (a surrogate gradient: straight through the rounding).

    Parameters
    ----------
    levels : the number of levels of each channel, ints >= 2 (e.g. [8, 5, 5, 5])
    dim : size of the last axis; ``None`` or ``len(levels) * num_codebooks`` (projections are not
        implemented yet)
    num_codebooks : C, groups of ``len(levels)`` channels quantized independently
    seed : accepted for a uniform constructor; FSQ draws nothing
    dtype : the module's dtype ("float32" default); outputs keep the input's dtype
    xp, device : the array library (numpy default; cupy; array_api_strict) and device

    Attributes
    ----------
    codebook_size : prod(levels), the size of the implicit codebook
    """

    CONFIG_KEYS = ("levels", "dim", "num_codebooks", "dtype")

    def __init__(
        self,
        levels: Any,
        dim: int | None = None,
        num_codebooks: int = 1,
        *,
        seed: Any = None,
        dtype: Any = "float32",
        xp: Any = None,
        device: Any = None,
    ):
        options = check_fsq_options(levels, dim, num_codebooks)
        self.levels = tuple(options["levels"])
        self.dim = options["dim"]
        self.num_codebooks = options["num_codebooks"]
        self.codebook_dim = len(self.levels)
        self.codebook_size = ops.codebook_size(self.levels)
        self._dtype_name = check_dtype_name("dtype", dtype)
        rng = check_seed("seed", seed)
        namespace = B.namespace_from_module(xp)
        self.training = True
        self._init_state({}, {}, (rng,), xp=namespace, device=device)
        self._check_device()

    def _check_device(self) -> None:
        # with no state arrays, _place never meets the device: try one tiny array now
        try:
            self._like()
        except (TypeError, ValueError, RuntimeError, AttributeError) as e:
            lib = getattr(self.xp, "__name__", repr(self.xp))
            raise ValueError(f"device={self.device!r} cannot hold arrays in {lib}: {e}") from None

    # ---------------------------------------------------------------- configuration

    def config(self) -> dict:
        return {"levels": list(self.levels), "dim": self.dim, "num_codebooks": self.num_codebooks,
                "dtype": self._dtype_name}  # fmt: skip

    @classmethod
    def check_config(cls, config: dict) -> dict:
        options = check_fsq_options(config["levels"], config["dim"], config["num_codebooks"])
        options["dtype"] = check_dtype_name("dtype", config["dtype"])
        return options

    @classmethod
    def spec_from_config(cls, config: dict) -> dict:
        return {}  # nothing learnable, nothing stored: the codebook is implicit

    def __repr__(self) -> str:
        return f"FSQ(levels={list(self.levels)}, dim={self.dim}, num_codebooks={self.num_codebooks})"

    # ---------------------------------------------------------------- validation

    # ---------------------------------------------------------------- forward / backward

    def forward(self, x: Array):
        """Quantize ``x``.

        Parameters
        ----------
        x : (..., dim) float32 or float64 array of the module's library

        Returns
        -------
        quantized : (..., dim), x's dtype; every entry on its channel's grid in [-1, 1]
        indices : (...) int64 for one codebook, (..., C) for several; in [0, codebook_size)
        """
        self.check_input("x", x, last_dim=self.dim)
        training = self.training  # read once
        with self._exclusive():
            xp, C, d = self.xp, self.num_codebooks, self.codebook_dim
            z = xp.reshape(x, (-1, d))  # (N * C, d): each codebook's channels are one row
            out, cache = fsq_forward(z, self.levels)
            if training:
                self._commit(self._updated(cache=(cache, tuple(x.shape), x.dtype)))
            lead = tuple(x.shape[:-1])
            quantized = xp.reshape(out.quantized, tuple(x.shape))
            indices = xp.reshape(out.indices, lead + ((C,) if C > 1 else ()))
            return quantized, indices

    def backward(self, dquantized: Array) -> Array:
        """Gradient for the input of the last training forward (straight through the rounding).

        Parameters
        ----------
        dquantized : (..., dim), the upstream gradient of ``quantized``

        Returns
        -------
        dx : (..., dim), the input's dtype.  The cache is consumed: a second backward raises.
        """
        with self._exclusive():
            if self._state.cache is None:
                raise RuntimeError(
                    "backward() needs a training-mode forward first (and each forward allows one backward)"
                )
            cache, shape, dtype = self._state.cache
            xp = self.xp
            self.check_input("dquantized", dquantized, shape=shape)
            check_fits("dquantized", dquantized, "float32" if dtype == xp.float32 else "float64",
                       "the forward's input", _FIT_FIX)  # fmt: skip
            dq = xp.astype(xp.reshape(dquantized, (-1, self.codebook_dim)), dtype)
            dx = fsq_backward(dq, cache)
            self._commit(self._updated(cache=None))
            return xp.reshape(dx, shape)

    # ---------------------------------------------------------------- the implicit codebook

    def indices_to_codes(self, indices: Array) -> Array:
        """Codes ``(..., dim)`` (the module's dtype) for ``indices`` ``(...)``, or ``(..., C)``."""
        C = self.num_codebooks
        if C > 1 and (not B.is_array(indices) or indices.ndim < 1 or indices.shape[-1] != C):
            got = tuple(indices.shape) if B.is_array(indices) else type(indices).__name__
            raise ValueError(f"indices must be an integer array of shape (..., {C}), got {got}")
        check_index_array("indices", indices, self._like(), self.codebook_size)
        codes = ops.indices_to_codes(indices, self.levels, dtype=self.dtype)  # (..., [C,] d)
        lead = tuple(indices.shape[:-1]) if C > 1 else tuple(indices.shape)
        return self.xp.reshape(codes, lead + (self.dim,))

    def codes_to_indices(self, codes: Array) -> Array:
        """Indices ``(...)``, or ``(..., C)``, of grid-point codes ``(..., dim)``."""
        self.check_input("codes", codes, last_dim=self.dim)
        C, d = self.num_codebooks, self.codebook_dim
        lead = tuple(codes.shape[:-1])
        idx = ops.codes_to_indices(self.xp.reshape(codes, lead + (C, d)), self.levels)  # (..., C)
        return idx if C > 1 else self.xp.reshape(idx, lead)
