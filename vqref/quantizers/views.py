"""Read-only views of one codebook of a quantizer (``rq.layers[level]``).

Symbols: K codes, D = dim.

A residual stack keeps all its codebooks in one state (so that a training step commits them
together); ``layers`` presents each depth the way vector-quantize-pytorch's ``rvq.layers[l]``
does -- its codebook, EMA statistics and options -- without a second copy of the state.  A
view reads the module's committed state at the moment it is used, and cannot change it (its
arrays are read-only views on numpy, copies on other libraries): to change a codebook, use the
module (``load_state_dict``, ``params``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Array
from ..ops.l2norm import l2norm_forward

__all__ = ["CodebookView"]

# the module's per-depth options a view shows as its own
_OPTIONS = (
    "dim", "codebook_size", "decay", "eps", "commitment_weight", "codebook_weight", "ema_update",
    "learnable_codebook", "kmeans_init", "kmeans_iters", "use_cosine_sim", "orthogonal_reg_weight",
    "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes", "threshold_ema_dead_code",
    "rotation_trick", "chunk_size", "codebook_is_learnable", "xp", "dtype", "device", "training",
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
