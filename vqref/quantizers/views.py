"""Read-only views of a vector quantizer's codebooks (``vq.codebook``, ``rq.layers[level]``) and
decoding indices to codes.

Symbols: K codes, D = dim, Q depths.

A residual stack keeps all its codebooks in one state (so that a training step commits them
together); ``layers`` presents each depth the way vector-quantize-pytorch's ``rvq.layers[l]``
does -- its codebook, EMA statistics and options -- without a second copy of the state.  A
view reads the module's committed state at the moment it is used, and cannot change it (its
arrays are read-only views on numpy, copies on other libraries): to change a codebook, use the
module (``load_state_dict``, ``params``).

:class:`CodebookViews` gives :class:`vqref.VectorQuantize` these read-only properties and the
decoding methods; :class:`CodebookView` is one depth's view.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from ..backend import Array
from ..ops.l2norm import l2norm_forward
from ..validation import check_index_array

__all__ = ["CodebookView", "CodebookViews"]

# the module's per-depth options a view shows as its own
_OPTIONS = (
    "dim", "codebook_size", "decay", "eps", "commitment_weight", "codebook_weight", "ema_update",
    "learnable_codebook", "kmeans_init", "kmeans_iters", "use_cosine_sim", "orthogonal_reg_weight",
    "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes", "threshold_ema_dead_code",
    "rotation_trick", "chunk_size", "codebook_is_learnable", "xp", "dtype", "device", "training",
    "stochastic_sample_codes", "sample_codebook_temp", "straight_through", "soft_assignment",
    "codebook_diversity_loss_weight", "codebook_diversity_temperature",
)  # fmt: skip


class CodebookView:
    """Depth ``level``'s codebook of ``module`` (state entries ``prefix + "codebook"``, ...)."""

    def __init__(self, module: Any, prefix: str, level: int):
        self._module = module
        self._prefix = prefix
        self.level = level

    def __getattr__(self, name: str) -> Array:
        if name in _OPTIONS:
            return getattr(self._module, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Array) -> None:
        if name in ("_module", "_prefix", "level") and name not in self.__dict__:
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"a codebook view is read-only (tried to set {name!r}); change the module instead")

    def _entry(self, key: str) -> Array:
        # read-only views (numpy) or copies (other libraries): a view never exposes the live state
        module, name = self._module, self._prefix + key
        return module.state_flag(name) if key == "initted" else module.state_array(name)

    @property
    def codebook(self) -> Array:
        """(K, D) this depth's codebook (read-only)."""
        return self._entry("codebook")

    @property
    def cluster_size(self) -> Array:
        """(K,) its EMA counts N_k."""
        return self._entry("cluster_size")

    @property
    def embed_avg(self) -> Array:
        """(K, D) its EMA sums m_k."""
        return self._entry("embed_avg")

    @property
    def initted(self) -> bool:
        return self._entry("initted")

    @property
    def generator(self) -> np.random.Generator:
        """A copy of the random generator this codebook draws from."""
        rngs = self._module.state.rngs  # copies
        return rngs[0 if len(rngs) == 1 else self.level]

    def config(self) -> dict:
        """The options of a single ``VectorQuantize`` configured like this depth."""
        cfg = {k: v for k, v in self._module.config().items() if k not in ("shared_codebook", "gradient_routing")}
        cfg["num_quantizers"] = 1
        return cfg

    def get_codes(self, indices: Array) -> Array:
        """Codes ``(..., dim)`` for integer ``indices (...)`` (unit codes for cosine codebooks)."""
        module = self._module
        module.check_indices("indices", indices)
        xp = module.xp
        codebook = self.codebook
        if module.use_cosine_sim:
            codebook, _ = l2norm_forward(codebook)
        flat = xp.reshape(indices, (-1,))
        return xp.reshape(xp.take(codebook, flat, axis=0), tuple(indices.shape) + (module.dim,))

    def __repr__(self) -> str:
        return f"CodebookView(level={self.level}, codebook={tuple(self.codebook.shape)}, initted={self.initted})"


class CodebookViews:
    """The read-only state and the decoding of :class:`vqref.VectorQuantize` (a mixin).

    A single codebook is ``vq.codebook`` (and ``cluster_size``, ``embed_avg``, ``initted``); a
    stack's are ``vq.layers[level].codebook``.  ``get_codes_from_indices`` and
    ``get_output_from_indices`` decode indices.  The class using it provides ``_prefixes()``,
    ``num_codebooks``, ``num_quantizers``, ``is_stack`` and the :class:`vqref.quantizers.Quantizer`
    accessors.
    """

    def _single(self, key: str) -> Array:
        if self._prefixes() != [""]:
            raise AttributeError(
                f"a stack of {self.num_codebooks} codebooks has no single {key}; use .layers[level].{key}"
            )
        return self.state_flag(key) if key == "initted" else self.state_array(key)

    codebook = property(lambda self: self._single("codebook"), doc="(K, D) the codebook (read-only)")
    cluster_size = property(lambda self: self._single("cluster_size"), doc="(K,) EMA counts N_k (read-only)")
    embed_avg = property(lambda self: self._single("embed_avg"), doc="(K, D) EMA sums m_k (read-only)")
    initted = property(lambda self: self._single("initted"), doc="False until k-means has initialised it")

    @property
    def layers(self) -> tuple:
        """One read-only :class:`CodebookView` per depth (the same one at every depth if shared)."""
        prefixes = self._prefixes()
        return tuple(
            CodebookView(self, prefixes[0 if len(prefixes) == 1 else level], level)
            for level in range(self.num_quantizers)
        )

    @property
    def generator(self) -> np.random.Generator:
        """A copy of the module's random generator (the first depth's, for a stack)."""
        return B.clone_generator(self._state.rngs[0])

    def get_codes_from_indices(self, indices: Array) -> Array:
        """Codes for ``indices``: ``(..., dim)`` for ``(...)``, or ``(Q, ..., dim)`` for a stack's
        ``(..., Q)`` (unit codes for cosine codebooks)."""
        if not self.is_stack:
            return self.layers[0].get_codes(indices)
        if not B.is_array(indices) or indices.ndim < 1 or indices.shape[-1] != self.num_quantizers:
            got = tuple(indices.shape) if B.is_array(indices) else type(indices).__name__
            raise ValueError(f"indices must be an integer array of shape (..., {self.num_quantizers}), got {got}")
        return self.xp.stack([layer.get_codes(indices[..., layer.level]) for layer in self.layers], axis=0)

    def get_output_from_indices(self, indices: Array) -> Array:
        """The quantized output for ``indices`` (the sum over depths, for a stack), shape ``(..., dim)``.

        For indices that an eval-mode forward returned, this equals that forward's output."""
        if not self.is_stack:
            return self.get_codes_from_indices(indices)
        codes = self.get_codes_from_indices(indices)
        out = codes[0, ...]
        for level in range(1, self.num_quantizers):
            out = out + codes[level, ...]
        return out

    def check_indices(self, name: str, indices: Array) -> Array:
        """Refuse anything but integer indices of the module's library in [0, K)."""
        return check_index_array(name, indices, self._like(), self.codebook_size)
