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

from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from ..ops.l2norm import l2norm_forward
from ..ops.linear import linear_forward

__all__ = ["CodebookView", "CodebookViews", "PendingResidual", "check_codes"]

# the module's per-depth options a view shows as its own
_OPTIONS = (
    "dim", "codebook_size", "decay", "eps", "commitment_weight", "codebook_weight", "ema_update",
    "learnable_codebook", "kmeans_init", "kmeans_iters", "use_cosine_sim", "orthogonal_reg_weight",
    "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes", "threshold_ema_dead_code",
    "rotation_trick", "chunk_size", "codebook_is_learnable", "xp", "dtype", "device", "training",
    "stochastic_sample_codes", "sample_codebook_temp", "straight_through", "soft_assignment",
    "codebook_diversity_loss_weight", "codebook_diversity_temperature",
)  # fmt: skip


class PendingResidual(NamedTuple):
    """The last residual ``r_Q = r_{Q-1} - c_{Q-1}`` of a step, formed only if it is read.

    It is a diagnostic (``last_residuals``) that no computation needs: forming it at every call
    would cost an (N, d) array and a pass over it.  ``before`` and ``code`` are the arrays of
    the step (in eval mode, with one depth and no projection, the caller's x and the returned
    output themselves).
    """

    before: Any  # (n, d) r_{Q-1}
    code: Any  # (n, d) c_{Q-1}, 0 for the rows that stopped before depth Q - 1

    def value(self) -> Array:
        return self.before - self.code  # (n, d)


class CodebookView:
    """Depth ``level``'s codebook of ``module`` (state entries ``prefix + "codebook"``, ...)."""

    def __init__(self, module: Any, prefix: str, level: int, generator_index: int | None = None):
        self._module = module
        self._prefix = prefix
        self.level = level
        self._generator_index = generator_index

    def __getattr__(self, name: str) -> Array:
        if name == "codebook_size":  # this depth's K_l
            return self._module.codebook_sizes[self.level]
        if name == "dim":  # the codes' width (the module's dim without projections)
            return self._module.codebook_dim
        if name in _OPTIONS:
            return getattr(self._module, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Array) -> None:
        if name in ("_module", "_prefix", "level", "_generator_index") and name not in self.__dict__:
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
        if self._generator_index is not None:
            return rngs[self._generator_index]
        return rngs[0 if self._module.num_codebooks == 1 else self.level]

    def config(self) -> dict:
        """The options of a single ``VectorQuantize`` configured like this depth (its codebook
        size, its codes' width, one head, no projection; the stack's own options left out)."""
        stack_only = ("shared_codebook", "gradient_routing", "quantize_dropout", "quantize_dropout_cutoff_index",
                      "quantize_dropout_multiple_of", "quantize_dropout_per_sample", "beam_size", "eval_beam_size",
                      "beam_score_quantizer_weights", "beam_score")  # fmt: skip
        cfg = {k: v for k, v in self._module.config().items() if k not in stack_only}
        cfg.update(num_quantizers=1, codebook_size=self.codebook_size, dim=self.dim, codebook_dim=self.dim, heads=1,
                   separate_codebook_per_head=False)  # fmt: skip
        return cfg

    def get_codes(self, indices: Array) -> Array:
        """Codes ``(..., d)`` for integer ``indices (...)`` (unit codes for cosine codebooks); an
        index -1 (an absent token, a skipped depth) gives the zero vector."""
        module = self._module
        module.check_indices("indices", indices, self.codebook_size)
        xp = module.xp
        codebook = self.codebook
        if module.use_cosine_sim:
            codebook, _ = l2norm_forward(codebook)
        flat = xp.reshape(indices, (-1,))
        codes = xp.take(codebook, xp.where(flat < 0, xp.zeros_like(flat), flat), axis=0)  # (M, d)
        codes = xp.where((flat < 0)[:, None], xp.zeros_like(codes), codes)
        return xp.reshape(codes, tuple(indices.shape) + (codebook.shape[-1],))

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

    _last_residuals: tuple = ()  # the residuals of the last call; the last one may be pending

    @property
    def last_residuals(self) -> tuple:
        """The Q + 1 residuals of the last call, ``r_0`` (the input, projected) to ``r_Q = r_0 - quantized``.

        Rows of the codebooks' width ``codebook_dim``, only the present tokens (with a mask), one
        stream only (not with a codebook per head); () before the first call.  ``r_Q`` is formed
        when first read (nothing else needs it, and forming it at every call cost an (N, d)
        array).  In training every residual comes from the module's own copies (read-only on
        numpy); in eval mode the module copies nothing, so ``r_0`` is the caller's x itself and,
        with one depth and no projection, ``r_Q`` is formed from x and the returned output: read
        it before writing into either.
        """
        res = self._last_residuals
        if res and isinstance(res[-1], PendingResidual):
            res = res[:-1] + (res[-1].value(),)
            self._last_residuals = res
        return res

    @property
    def generator(self) -> np.random.Generator:
        """A copy of the module's random generator (the first depth's, for a stack)."""
        return B.clone_generator(self._state.rngs[0])

    def get_codes_from_indices(self, indices: Array) -> Array:
        """Codes for ``indices``, in the codes' space (before ``project_out``).

        * plain VQ: ``(...)`` -> ``(..., d)``;
        * heads: ``(..., H)`` -> ``(..., H d)``, the heads' codes side by side;
        * a stack: ``(..., Q')`` with ``Q' <= Q`` (the first Q' depths, as a quantize dropout
          leaves them) -> ``(Q, ..., d)``, zero codes for the depths not given.

        An index -1 (an absent token, a depth a dropout skipped) gives a zero code.  Codes of a
        cosine codebook are its unit rows.
        """
        xp = self.xp
        if self.is_stack:
            Q = self.num_quantizers
            if not B.is_array(indices) or indices.ndim < 1 or not 1 <= indices.shape[-1] <= Q:
                got = tuple(indices.shape) if B.is_array(indices) else type(indices).__name__
                raise ValueError(
                    f"indices must be an integer array of shape (..., {Q}), or (..., Q') with 1 <= Q' < {Q} for "
                    f"the first Q' depths, got {got}"
                )
            given = indices.shape[-1]
            codes = [layer.get_codes(indices[..., layer.level]) for layer in self.layers[:given]]
            zeros = xp.zeros(tuple(indices.shape[:-1]) + (self.codebook_dim,), dtype=self.dtype, device=self.device)
            return xp.stack(codes + [zeros] * (Q - given), axis=0)
        if self.heads > 1:
            H = self.heads
            if not B.is_array(indices) or indices.ndim < 1 or indices.shape[-1] != H:
                got = tuple(indices.shape) if B.is_array(indices) else type(indices).__name__
                raise ValueError(f"indices must be an integer array of shape (..., {H}) (one per head), got {got}")
            return xp.concat([self._head_codes(indices[..., h], h) for h in range(H)], axis=-1)
        return self.layers[0].get_codes(indices)

    def _head_codes(self, indices: Array, head: int) -> Array:
        """Head ``head``'s codes ``(..., d)`` (its own codebook, or the shared one)."""
        if not self.separate_codebook_per_head:
            return self.layers[0].get_codes(indices)
        self.check_indices("indices", indices, self.codebook_sizes[0])
        xp = self.xp
        codebook = self.state_array("codebook")[head, ...]  # (K, d)
        if self.use_cosine_sim:
            codebook, _ = l2norm_forward(codebook)
        flat = xp.reshape(indices, (-1,))
        codes = xp.take(codebook, xp.where(flat < 0, xp.zeros_like(flat), flat), axis=0)  # (M, d)
        codes = xp.where((flat < 0)[:, None], xp.zeros_like(codes), codes)
        return xp.reshape(codes, tuple(indices.shape) + (self.codebook_dim,))

    def get_output_from_indices(self, indices: Array) -> Array:
        """The quantized output for ``indices``, shape ``(..., dim)``: the codes (summed over the
        depths given, for a stack) mapped by ``project_out``.  A token whose indices are all -1 (a
        token a mask left out) gives 0.

        For indices that an eval-mode forward returned, this equals that forward's output; a
        prefix of a stack's depths gives the coarser reconstruction of those depths."""
        xp = self.xp
        codes = self.get_codes_from_indices(indices)
        if self.is_stack:
            total = codes[0, ...]
            for level in range(1, self.num_quantizers):
                total = total + codes[level, ...]
            absent = xp.all(indices < 0, axis=-1)  # (...)
        else:
            total = codes
            absent = xp.all(indices < 0, axis=-1) if self.heads > 1 else indices < 0
        if self.has_projections:
            W, b = self.state_array("project_out.W"), self.state_array("project_out.b")
            flat = xp.reshape(total, (-1, total.shape[-1]))
            total = xp.reshape(linear_forward(flat, W, b)[0], tuple(total.shape[:-1]) + (self.dim,))
            total = xp.where(absent[..., None], xp.zeros_like(total), total)
        return total

    def check_indices(self, name: str, indices: Array, num_codes: int | None = None) -> Array:
        """Refuse anything but integer indices of the module's library in [0, K) or -1 (no code)."""
        return check_codes(name, indices, self._like(), self.codebook_sizes[0] if num_codes is None else num_codes)


def check_codes(name: str, indices: Array, like: Array, num_codes: int) -> Array:
    """Refuse anything but an integer array of ``like``'s library with values in [0, K) or -1
    (no code: an absent token, a depth a dropout skipped)."""
    if B.is_array(indices) and B.library_name(indices) != B.library_name(like):
        raise TypeError(
            f"{name} is a {B.library_name(indices)} array but this module holds {B.library_name(like)} arrays; "
            "move one of them"
        )
    xp = B.get_namespace(like)
    if not B.is_array(indices) or not xp.isdtype(indices.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array")
    flat = xp.reshape(indices, (-1,))
    if flat.shape[0] and (int(xp.min(flat)) < -1 or int(xp.max(flat)) >= num_codes):
        raise ValueError(f"{name} must lie in [0, {num_codes}), or be -1 (no code)")
    return indices
