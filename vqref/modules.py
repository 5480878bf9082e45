"""Stateful facades with the API of vector-quantize-pytorch: ``quantized, indices, loss = vq(x)``.

Symbols: N tokens (all leading axes of the input flattened), D = dim, K = codebook_size.

A module holds the codebook and its EMA statistics, validates every input before touching any
state, calls the pure functions of :mod:`vqref.core` and keeps the cache of the last training
forward so that ``vq.backward(dquantized)`` can return the input's gradient.  All the math lives
in the pure functions; this file only orchestrates, visibly:

    training forward:  [k-means init on the first batch] -> quantize (old codebook)
                       -> EMA update -> [dead-code restarts]
                       -> [orthogonal regulariser on the updated codebook] -> commit the new state
    eval forward:      quantize [+ orthogonal regulariser]; the state (codebook, EMA statistics,
                       k-means flag, RNG) and the backward cache do not change

The orthogonal regulariser is a loss on the codebook *parameter*, not on the quantization, so it
is evaluated at the value the module holds after the forward: in training, after this step's EMA
update and restarts (vector-quantize-pytorch's order).  ``grads["codebook"]`` is then the
gradient at ``params["codebook"]`` as the optimizer finds it.

``last_losses`` (VectorQuantize) and ``last_residuals`` (ResidualVQ) are diagnostics of the
last call in either mode, not state.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from collections.abc import MutableMapping
from typing import Any

import numpy as np

from . import backend as B
from .core.ema import EMAState, expire_dead_codes
from .core.quantize import quantize_backward, quantize_forward
from .core.state import kmeans_init_state, training_update
from .ops.l2norm import l2norm_forward
from .ops.orthogonal import orthogonal_loss_forward, select_codes

__all__ = ["VectorQuantize", "ResidualVQ", "ParamView"]

_STATE_KEYS = ("codebook", "cluster_size", "embed_avg", "initted")


class ParamView(MutableMapping):
    """A live dict view of a module's learnable arrays.

    ``view[k]`` is the module's current array and ``view[k] = new`` (also ``view[k] -= step``)
    writes back into the module after checking the shape, so optimizers can work on plain
    mappings without knowing which module owns each array.
    """

    def __init__(self, getters: dict, setters: dict):
        self._get = getters
        self._set = setters

    def __getitem__(self, key):
        return self._get[key]()

    def __setitem__(self, key, value):
        if key not in self._set:
            raise KeyError(f"unknown parameter {key!r}; parameters are {sorted(self._set)}")
        self._set[key](value)

    def __delitem__(self, key):
        raise TypeError("parameters cannot be deleted")

    def __iter__(self):
        return iter(self._get)

    def __len__(self):
        return len(self._get)

    def __repr__(self):
        return "ParamView(" + ", ".join(f"{k}: {tuple(self[k].shape)}" for k in self) + ")"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def _orthogonal_term(codebook: Any, code_ids: Any, weight: float, cache: Any):
    """The orthogonal regulariser on ``codebook (K, D)``, attached to one depth's quantize cache.

    ``cache`` comes from :func:`vqref.core.quantize.quantize_forward` called with
    ``orthogonal_reg_weight=0``; the returned cache is the one it would have returned had it
    evaluated the regulariser on ``codebook``, so ``quantize_backward`` adds the gradient of
    ``weight * orth`` at ``codebook`` (its step 4).  The caller adds ``weight * orth`` to the loss.

    Returns
    -------
    orth : 0-d, the unweighted value
    cache : the QuantizeCache with the regulariser's cache and weight
    """
    orth, orth_cache = orthogonal_loss_forward(codebook, code_ids=code_ids)  # ()
    return orth, cache._replace(orthogonal=orth_cache, orthogonal_weight=float(weight))


def _alias(name: str, value: Any, alias: str, alias_value: Any, default: Any) -> Any:
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"{name}={value!r} and its alias {alias}={alias_value!r} disagree; give one")
    if value is not None:
        return value
    if alias_value is not None:
        return alias_value
    return default


class _Quantizer:
    """What both quantizer modules share: train/eval modes and saving to ``.npz``."""

    training: bool = True

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x: Any):
        return self.forward(x)

    def __deepcopy__(self, memo: dict):
        # The array namespace is a Python module, which cannot be copied: share it.
        import copy
        import types

        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, value if isinstance(value, types.ModuleType) else copy.deepcopy(value, memo))
        return new

    def save(self, path: str) -> None:
        """Save configuration and state to an ``.npz`` file (plain arrays, no pickle)."""
        arrays = {k: np.asarray(B.to_numpy(v)) for k, v in self.state_dict().items()}
        arrays["config"] = np.asarray(json.dumps({"class": type(self).__name__, **self.config()}))
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    def load(self, path: str) -> None:
        """Load a state saved by :meth:`save`; the file's configuration must match this module's."""
        config, state = _read_npz(path)
        mine = {"class": type(self).__name__, **self.config()}
        diff = {k: (config.get(k), v) for k, v in mine.items() if k not in ("dtype", "chunk_size") and config.get(k) != v}
        if diff:
            raise ValueError(
                "the file was saved from a different configuration: "
                + ", ".join(f"{k}: file {a!r} vs module {b!r}" for k, (a, b) in diff.items())
            )
        self.load_state_dict(state)

    @classmethod
    def from_file(cls, path: str, **kwargs):
        """Build a module from a file written by :meth:`save` (``kwargs``: seed, xp, device)."""
        config, state = _read_npz(path)
        if config.pop("class", cls.__name__) != cls.__name__:
            raise ValueError(f"{path} does not hold a {cls.__name__}")
        module = cls(**config, **kwargs)
        module.load_state_dict(state)
        return module


class VectorQuantize(_Quantizer):
    """Vector quantization layer (VQ-VAE, arXiv 1711.00937) with manual gradients.

    ``quantized, indices, loss = vq(x)`` for ``x`` of shape ``(..., dim)``; then
    ``dx = vq.backward(dquantized, dloss=1.0)``; parameter gradients in ``vq.grads``.

    Parameters
    ----------
    dim : D, the size of the last axis
    codebook_size : K (alias ``n_embed``)
    decay : EMA decay gamma in [0, 1] (vector-quantize-pytorch's default 0.8)
    eps : Laplace smoothing of the EMA counts (1e-5)
    commitment_weight : beta (alias ``commitment``), default 1.0
    codebook_weight : with ``learnable_codebook``: weight of a separate codebook term
        ``mse(sg[x], q)`` (the VQ-VAE paper's split, e.g. 1.0 with commitment 0.25); ``None``
        (default) is vector-quantize-pytorch's single term ``commitment_weight * mse(x, q)``
    ema_update : update the codebook by EMA in training (default True)
    learnable_codebook : the losses send a gradient to the codebook (needs ``ema_update=False``)
    kmeans_init, kmeans_iters : initialise the codebook by k-means on the first training batch
    use_cosine_sim : l2-normalised inputs and codes, assignment by cosine similarity
    orthogonal_reg_weight : weight of the orthogonal regulariser (> 0 makes the codebook learnable,
        so its gradient appears in ``grads``).  In training it is evaluated on the codebook after
        this step's EMA update and restarts (vector-quantize-pytorch's order), so its value and
        gradient belong to the codebook in ``params`` after the forward.  With ``ema_update=True``
        (as in vector-quantize-pytorch) the next training forward's EMA recompute overwrites any
        gradient step on the codebook; use ``ema_update=False`` for the regulariser to act
        persistently
    orthogonal_reg_active_codes_only, orthogonal_reg_max_codes : restrict the regulariser's codes
    threshold_ema_dead_code : restart codes whose EMA count falls below this (0 = off)
    rotation_trick : the rotation trick (arXiv 2410.06424) instead of the straight-through
        estimator (default False: vqref's default estimator is the STE)
    num_quantizers : > 1 quantizes residually in that many depths (see ``ResidualVQ``)
    seed : seed or numpy Generator for every random choice (init, k-means, restarts)
    dtype : dtype of the stored state (default "float32"); inputs may be float32 or float64, and
        outputs keep the input's dtype
    xp : array library of the state (numpy by default; cupy; array_api_strict); see :meth:`to`
    chunk_size : rows per chunk of the nearest-code search (default: automatic)
    """

    def __new__(cls, *args: Any, num_quantizers: int = 1, **kwargs: Any):
        # VectorQuantize(num_quantizers=Q) with Q > 1 *is* residual quantization in Q depths, as
        # the seed document uses it: build (and return) the equivalent ResidualVQ.
        if (
            cls is VectorQuantize
            and not isinstance(num_quantizers, bool)
            and isinstance(num_quantizers, (int, np.integer))
            and num_quantizers > 1
        ):
            names = ("dim", "codebook_size")
            for name, value in zip(names, args):
                kwargs[name] = value
            return ResidualVQ(num_quantizers=num_quantizers, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        dim: int,
        codebook_size: int | None = None,
        *,
        n_embed: int | None = None,
        decay: float = 0.8,
        eps: float = 1e-5,
        commitment_weight: float | None = None,
        commitment: float | None = None,
        codebook_weight: float | None = None,
        ema_update: bool = True,
        learnable_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        threshold_ema_dead_code: float = 0,
        rotation_trick: bool = False,
        num_quantizers: int = 1,
        seed: Any = None,
        dtype: Any = "float32",
        xp: Any = None,
        device: Any = None,
        chunk_size: int | None = None,
    ):
        codebook_size = _alias("codebook_size", codebook_size, "n_embed", n_embed, None)
        if codebook_size is None:
            raise TypeError("VectorQuantize needs codebook_size (or its alias n_embed)")
        commitment_weight = _alias("commitment_weight", commitment_weight, "commitment", commitment, 1.0)
        self.dim = _check_int("dim", dim, 1)
        self.codebook_size = _check_int("codebook_size", codebook_size, 1)
        self.decay = _check_real("decay", decay, 0.0, 1.0)
        self.eps = _check_real("eps", eps, 0.0)
        self.commitment_weight = _check_real("commitment_weight", commitment_weight, 0.0)
        self.codebook_weight = None if codebook_weight is None else _check_real("codebook_weight", codebook_weight, 0.0)
        self.ema_update = bool(ema_update)
        self.learnable_codebook = bool(learnable_codebook)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = _check_int("kmeans_iters", kmeans_iters, 1)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.orthogonal_reg_weight = _check_real("orthogonal_reg_weight", orthogonal_reg_weight, 0.0)
        self.orthogonal_reg_active_codes_only = bool(orthogonal_reg_active_codes_only)
        self.orthogonal_reg_max_codes = (
            None if orthogonal_reg_max_codes is None else _check_int("orthogonal_reg_max_codes", orthogonal_reg_max_codes, 1)
        )
        self.threshold_ema_dead_code = _check_real("threshold_ema_dead_code", threshold_ema_dead_code, 0.0)
        self.rotation_trick = bool(rotation_trick)
        self.num_quantizers = _check_int("num_quantizers", num_quantizers, 1)
        if self.num_quantizers > 1:
            raise ValueError("num_quantizers > 1 builds a ResidualVQ; construct ResidualVQ directly")
        self.chunk_size = None if chunk_size is None else _check_int("chunk_size", chunk_size, 1)
        if self.ema_update and self.learnable_codebook:
            raise ValueError(
                "learnable_codebook=True needs ema_update=False: the EMA would overwrite every gradient step"
            )
        if self.use_cosine_sim and self.learnable_codebook:
            raise ValueError("use_cosine_sim cannot be combined with learnable_codebook (as in vector-quantize-pytorch)")
        if self.codebook_weight is not None and not self.learnable_codebook:
            raise ValueError("codebook_weight only applies with learnable_codebook=True and ema_update=False")
        if self.rotation_trick and self.dim == 1:
            raise ValueError("rotation_trick needs dim > 1: in one dimension the only rotation is the identity")

        try:
            self._rng = B.as_generator(seed)
        except (TypeError, ValueError) as e:
            raise TypeError(f"seed must be None, an int or a numpy Generator, got {seed!r} ({e})") from None
        self._xp = B.namespace_from_module(xp)
        self._device = device
        # a name, a numpy dtype, or the dtype object of another Array API library
        # (array_api_strict.float32 prints as "array_api_strict.float32")
        try:
            self._dtype_name = np.dtype(dtype).name
        except TypeError:
            self._dtype_name = str(dtype).rsplit(".", 1)[-1]
        if self._dtype_name not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.training = True
        self._cache = None
        self._cache_shape = None
        self.grads: dict = {}

        # Initial codebook: uniform in +-sqrt(6 / (K D)), as torch's kaiming_uniform_ on a
        # (1, K, D) tensor gives in vector-quantize-pytorch.  Cosine codebooks start unit-norm.
        K, D = self.codebook_size, self.dim
        if self.kmeans_init:
            # replaced by the k-means centroids of the first training batch; no random numbers
            # are drawn here, so the seed's first draws are k-means' initial means
            init = np.zeros((K, D))
        else:
            bound = math.sqrt(6.0 / (K * D))
            init = self._rng.uniform(-bound, bound, size=(K, D))
            if self.use_cosine_sim:
                init = init / np.maximum(np.linalg.norm(init, axis=1, keepdims=True), 1e-6)
        self.codebook = self._from_host(init)
        self.cluster_size = self._from_host(np.ones(K))
        self.embed_avg = self._from_host(init)
        self.initted = not self.kmeans_init

    # ------------------------------------------------------------------ configuration helpers

    @property
    def dtype(self):
        return getattr(self._xp, self._dtype_name)

    @property
    def xp(self):
        return self._xp

    def _from_host(self, a: Any) -> Any:
        # A fresh buffer every time: the state arrays must never alias each other (codebook and
        # embed_avg start from the same values) nor the caller's arrays, because a gradient step
        # may update params["codebook"] in place.
        return B.from_numpy(np.array(a, dtype=self._dtype_name, copy=True), self._xp, device=self._device)

    def config(self) -> dict:
        """The constructor arguments (without seed, xp and device), JSON-serialisable."""
        return {
            "dim": self.dim,
            "codebook_size": self.codebook_size,
            "decay": self.decay,
            "eps": self.eps,
            "commitment_weight": self.commitment_weight,
            "codebook_weight": self.codebook_weight,
            "ema_update": self.ema_update,
            "learnable_codebook": self.learnable_codebook,
            "kmeans_init": self.kmeans_init,
            "kmeans_iters": self.kmeans_iters,
            "use_cosine_sim": self.use_cosine_sim,
            "orthogonal_reg_weight": self.orthogonal_reg_weight,
            "orthogonal_reg_active_codes_only": self.orthogonal_reg_active_codes_only,
            "orthogonal_reg_max_codes": self.orthogonal_reg_max_codes,
            "threshold_ema_dead_code": self.threshold_ema_dead_code,
            "rotation_trick": self.rotation_trick,
            "num_quantizers": self.num_quantizers,
            "dtype": self._dtype_name,
            "chunk_size": self.chunk_size,
        }

    def __repr__(self) -> str:
        flags = [k for k in ("use_cosine_sim", "kmeans_init", "rotation_trick", "learnable_codebook") if getattr(self, k)]
        return (
            f"VectorQuantize(dim={self.dim}, codebook_size={self.codebook_size}, decay={self.decay}, "
            f"commitment_weight={self.commitment_weight}{''.join(', ' + f + '=True' for f in flags)})"
        )

    # ------------------------------------------------------------------ modes

    @property
    def codebook_is_learnable(self) -> bool:
        """True when the codebook receives a gradient (a learnable codebook or the orthogonal
        regulariser, which makes it learnable as in vector-quantize-pytorch)."""
        return self.learnable_codebook or self.orthogonal_reg_weight > 0

    @property
    def params(self) -> ParamView:
        """The live learnable arrays: ``{"codebook": ...}`` when learnable, else empty."""
        if not self.codebook_is_learnable:
            return ParamView({}, {})
        return ParamView({"codebook": lambda: self.codebook}, {"codebook": self._set_codebook})

    def _set_codebook(self, value: Any) -> None:
        self._check_array("codebook", value, (self.codebook_size, self.dim))
        self.codebook = value if value.dtype == self.dtype else self._xp.astype(value, self.dtype)

    def init_codebook(self, codebook: Any, cluster_size: Any = None) -> None:
        """Set the codebook (e.g. your own initial codes) with a consistent EMA state.

        ``cluster_size`` defaults to ones (one pseudo-count per code, the initial state of
        vector-quantize-pytorch); ``embed_avg`` is set to ``codebook * cluster_size`` so that the
        invariant ``codebook = embed_avg / smoothed(cluster_size)`` holds, and the module counts
        as initialised (no k-means on the next batch).  Any array library; shapes are checked.
        """
        K, D = self.codebook_size, self.dim
        cb = np.asarray(B.to_numpy(codebook), dtype=np.float64)
        cs = np.ones(K) if cluster_size is None else np.asarray(B.to_numpy(cluster_size), dtype=np.float64)
        self.load_state_dict({"codebook": cb, "cluster_size": cs, "embed_avg": cb * cs[:, None], "initted": True})

    def to(self, xp: Any, device: Any = None) -> "VectorQuantize":
        """Move the state to another array library (``numpy``, ``cupy``, ``array_api_strict``)."""
        new_xp = B.namespace_from_module(xp)
        moved = {k: B.to_numpy(getattr(self, k)) for k in ("codebook", "cluster_size", "embed_avg")}
        self._xp, self._device = new_xp, device
        for k, v in moved.items():
            setattr(self, k, self._from_host(v))
        self._cache = None
        self.grads.clear()  # in place: views of this dict stay valid
        return self

    # ------------------------------------------------------------------ validation

    def _check_array(self, name: str, a: Any, shape: tuple | None = None, *, last_dim: int | None = None) -> None:
        if not B._is_array(a):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
        lib = B.library_name(a)
        try:
            xp = B.get_namespace(a, self.codebook)
        except TypeError:
            raise TypeError(
                f"{name} is a {lib} array but this module holds {B.library_name(self.codebook)} arrays; "
                f"move one of them (e.g. module.to({lib}))"
            ) from None
        if not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(f"{name} must be a real floating-point array, got dtype {a.dtype}")
        if a.dtype not in (xp.float32, xp.float64):
            raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype}")
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
        if last_dim is not None:
            if a.ndim < 1 or a.shape[-1] != last_dim:
                raise ValueError(f"{name} must have shape (..., {last_dim}), got {tuple(a.shape)}")
            if B.numel(tuple(a.shape)) == 0:
                raise ValueError(f"{name} is empty (shape {tuple(a.shape)}); at least one vector is needed")
        if not B.all_finite(a):
            raise ValueError(f"{name} contains NaN or infinite values")

    # ------------------------------------------------------------------ forward / backward

    def forward(self, x: Any):
        """Quantize ``x``.

        Parameters
        ----------
        x : (..., dim) float32 or float64 array of the module's library

        Returns
        -------
        quantized : (..., dim), x's dtype; its rows are (normalised) codebook rows
        indices : (...) int64
        loss : 0-d, ``commitment_weight * mse(x, sg[q])`` plus the enabled terms
        """
        self._check_array("x", x, last_dim=self.dim)
        xp = self._xp
        lead = tuple(x.shape[:-1])
        xf = xp.reshape(x, (-1, self.dim))  # (N, D)
        state = EMAState(self.codebook, self.cluster_size, self.embed_avg)
        initted = self.initted
        rng_state = self._rng.bit_generator.state

        try:
            # Everything below computes new values only; they are committed at the very end,
            # so a failure leaves the module as it was.
            if self.training and not initted:
                state = self._kmeans_state(xf)
                initted = True
            codebook = xp.astype(state.codebook, x.dtype)  # compute in the input's dtype
            # The regulariser is added below, once the codebook it belongs to is known.
            out, cache = quantize_forward(
                xf,
                codebook,
                commitment_weight=self.commitment_weight,
                codebook_weight=self.codebook_weight,
                learnable_codebook=self.learnable_codebook,
                use_cosine_sim=self.use_cosine_sim,
                rotation_trick=self.rotation_trick,
                orthogonal_reg_weight=0.0,
                chunk_size=self.chunk_size,
            )
            if self.training:
                state = self._state_update(state, xf, out.indices, cache)
            if self.orthogonal_reg_weight > 0:
                # The orthogonal regulariser is a loss on the codebook parameter, so it is
                # evaluated on the codebook this forward leaves behind: in training, the one after
                # the EMA step and restarts above (as vector-quantize-pytorch does); in eval, the
                # unchanged one.  Its gradient in grads["codebook"] is then taken at the values
                # that params["codebook"] holds when an optimizer steps it.  (Evaluated on the
                # codebook of the assignment instead, the gradient would belong to codes the
                # module no longer has.)  Its subset comes from this batch's assignment.
                w = self.orthogonal_reg_weight
                held = xp.astype(state.codebook, x.dtype)  # (K, D)
                orth, cache = _orthogonal_term(held, self._orthogonal_code_ids(out.indices), w, cache)
                out = out._replace(loss=out.loss + w * orth, orthogonal=orth)
        except BaseException:
            self._rng.bit_generator.state = rng_state
            raise
        if not self.training:
            # eval changes nothing: a random regulariser subset drawn for the eval loss is
            # drawn from the module's stream and then given back
            self._rng.bit_generator.state = rng_state

        if self.training:
            self.codebook, self.cluster_size, self.embed_avg = state
            self.initted = initted
            self._cache = cache
            self._cache_shape = tuple(x.shape)
            self._cache_dtype = x.dtype
        self.last_losses = {"commitment": out.commitment, "orthogonal": out.orthogonal}
        quantized = xp.reshape(out.quantized, tuple(x.shape))
        indices = xp.reshape(out.indices, lead)
        return quantized, indices, out.loss

    def _kmeans_state(self, xf: Any) -> EMAState:
        """k-means on the first training batch (normalised first for cosine codebooks)."""
        data = xf
        if self.use_cosine_sim:
            data, _ = l2norm_forward(xf)
        return kmeans_init_state(
            data,
            self.codebook_size,
            iters=self.kmeans_iters,
            rng=self._rng,
            eps=self.eps,
            use_cosine_sim=self.use_cosine_sim,
            dtype=self.dtype,
        )

    def _orthogonal_code_ids(self, indices: Any):
        """The codes the regulariser sees (None: all K), from the batch's ``indices (N,)``.

        A driver step: the used codes are read on the host, and a random subset
        (``orthogonal_reg_max_codes``) is drawn from the module's generator, after this
        step's restart candidates.
        """
        used = indices if self.orthogonal_reg_active_codes_only else None
        if used is None and self.orthogonal_reg_max_codes is None:
            return None
        ids = select_codes(self.codebook_size, used_indices=used, max_codes=self.orthogonal_reg_max_codes, rng=self._rng)
        return B.from_numpy(ids, self._xp, device=B.get_device(indices))

    def _state_update(self, state: EMAState, xf: Any, indices: Any, cache) -> EMAState:
        """EMA step on this batch (codes move toward their cluster means), then dead-code restarts."""
        data = xf if cache.x_norm is None else cache.x_norm.y  # the vectors that were quantized
        return training_update(
            state,
            self._xp.astype(data, self.dtype),
            indices,
            decay=self.decay,
            eps=self.eps,
            ema=self.ema_update,
            dead_code_threshold=self.threshold_ema_dead_code,
            rng=self._rng,
            normalize=self.use_cosine_sim,
        )

    def backward(self, dquantized: Any, dloss: Any = 1.0) -> Any:
        """Gradient for the input of the last training forward.

        Parameters
        ----------
        dquantized : (..., dim), the upstream gradient of ``quantized``
        dloss : scalar or 0-d array, the upstream gradient of ``loss`` (1.0 when the loss is
            added to the training objective as is)

        Returns
        -------
        dx : (..., dim), the input's dtype.  The codebook's gradient (when learnable) is stored
            in ``self.grads["codebook"]``.  The cache is consumed: a second backward raises.
        """
        if self._cache is None:
            raise RuntimeError(
                "backward() needs a training-mode forward first (and each forward allows one backward)"
            )
        self._check_array("dquantized", dquantized, self._cache_shape)
        xp = self._xp
        if B._is_array(dloss):
            self._check_array("dloss", dloss, ())
            dloss = xp.astype(dloss, self._cache_dtype)
        else:
            dloss = _check_real("dloss", dloss)
        dq = xp.astype(xp.reshape(dquantized, (-1, self.dim)), self._cache_dtype)
        dx, dcodebook = quantize_backward(dq, dloss, self._cache)
        self._cache = None
        self.grads.clear()  # in place: views of this dict stay valid
        if self.codebook_is_learnable:
            if dcodebook is None:
                dcodebook = xp.zeros((self.codebook_size, self.dim), dtype=self.dtype, device=B.get_device(dx))
            self.grads["codebook"] = xp.astype(dcodebook, self.dtype)
        return xp.reshape(dx, self._cache_shape)

    # ------------------------------------------------------------------ decoding

    def get_codes_from_indices(self, indices: Any) -> Any:
        """Codes ``(..., dim)`` for integer ``indices (...)`` (unit codes for cosine codebooks)."""
        xp = self._xp
        if B._is_array(indices) and B.library_name(indices) != B.library_name(self.codebook):
            raise TypeError(
                f"indices is a {B.library_name(indices)} array but this module holds "
                f"{B.library_name(self.codebook)} arrays; move one of them"
            )
        if not B._is_array(indices) or not xp.isdtype(indices.dtype, "integral"):
            raise TypeError("indices must be an integer array")
        flat = xp.reshape(indices, (-1,))
        if flat.shape[0] and (int(xp.min(flat)) < 0 or int(xp.max(flat)) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size})")
        codebook = self.codebook
        if self.use_cosine_sim:
            codebook, _ = l2norm_forward(codebook)
        return xp.reshape(xp.take(codebook, flat, axis=0), tuple(indices.shape) + (self.dim,))

    def get_output_from_indices(self, indices: Any) -> Any:
        """The quantized output for ``indices``; equals the eval-mode forward output."""
        return self.get_codes_from_indices(indices)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Copies of the state as arrays of the module's library (``initted`` is a 0-d bool)."""
        xp = self._xp
        return {
            "codebook": xp.asarray(self.codebook, copy=True),
            "cluster_size": xp.asarray(self.cluster_size, copy=True),
            "embed_avg": xp.asarray(self.embed_avg, copy=True),
            "initted": xp.asarray(self.initted),
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a state from :meth:`state_dict` (any library); shapes are checked first."""
        missing = [k for k in _STATE_KEYS if k not in state]
        extra = [k for k in state if k not in _STATE_KEYS]
        if missing or extra:
            raise KeyError(f"state_dict keys mismatch: missing {missing}, unexpected {extra}")
        K, D = self.codebook_size, self.dim
        expected = {"codebook": (K, D), "cluster_size": (K,), "embed_avg": (K, D), "initted": ()}
        host = {}
        for k, shape in expected.items():
            a = np.asarray(B.to_numpy(state[k]))
            if a.shape != shape:
                raise ValueError(f"state_dict[{k!r}] must have shape {shape}, got {a.shape}")
            if k != "initted":
                if not np.issubdtype(a.dtype, np.floating):
                    raise TypeError(f"state_dict[{k!r}] must be floating point, got {a.dtype}")
                if not np.all(np.isfinite(a)):
                    raise ValueError(f"state_dict[{k!r}] contains NaN or infinite values")
            elif a.dtype != np.bool_ and not (np.issubdtype(a.dtype, np.integer) and a in (0, 1)):
                raise TypeError(f"state_dict['initted'] must be a boolean, got {a!r}")
            if k == "cluster_size" and np.any(a < 0):
                raise ValueError("state_dict['cluster_size'] holds EMA counts, which must be >= 0")
            host[k] = a
        for k in ("codebook", "cluster_size", "embed_avg"):
            setattr(self, k, self._from_host(host[k]))
        self.initted = bool(host["initted"])
        self._cache = None


class ResidualVQ(_Quantizer):
    """Residual vector quantization (SoundStream, arXiv 2107.03312; RQ-VAE, arXiv 2203.01941).

    ``quantized, indices, losses = rq(x)`` with ``x (..., dim)``, ``indices (..., Q)`` and one loss
    per depth ``losses (Q,)`` (not summed, as in vector-quantize-pytorch); then
    ``dx = rq.backward(dquantized, dlosses=ones(Q))``.

    Parameters
    ----------
    dim, num_quantizers : D and Q
    codebook_size : K per depth (alias ``n_embed``)
    shared_codebook : one codebook for every depth (RQ-VAE).  Its EMA statistics take one step
        per depth within a forward and the codes are recomputed once after the last depth, so
        every depth of a forward sees the same codebook (vector-quantize-pytorch's design).  The
        old statistics therefore decay by ``decay ** Q`` per forward, and the deepest depth's
        statistics weigh the most; with many depths a decay closer to 1 may be wanted.  The
        orthogonal regulariser (``orthogonal_reg_weight``) is then evaluated on the codebook the
        depths quantized with, before that update (as in vector-quantize-pytorch); without a
        shared codebook, each depth's on its codebook after the depth's update
    gradient_routing : ``"per_depth"`` (default, vector-quantize-pytorch: the decoder gradient
        reaches the input once per depth) or ``"sum"`` (RQ-VAE: one estimator on the total);
        see :mod:`vqref.core.residual`
    seed : seed or numpy Generator (each depth gets its own stream)
    **vq_kwargs : every :class:`VectorQuantize` option, applied at every depth (decay,
        commitment/commitment_weight, kmeans_init, kmeans_iters, use_cosine_sim,
        orthogonal_reg_weight, rotation_trick, threshold_ema_dead_code, ...)
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int | None = None,
        n_embed: int | None = None,
        shared_codebook: bool = False,
        gradient_routing: str = "per_depth",
        seed: Any = None,
        **vq_kwargs: Any,
    ):
        from .core.residual import GRADIENT_ROUTINGS

        self.num_quantizers = _check_int("num_quantizers", num_quantizers, 1)
        codebook_size = _alias("codebook_size", codebook_size, "n_embed", n_embed, None)
        if codebook_size is None:
            raise TypeError("ResidualVQ needs codebook_size (or its alias n_embed)")
        if gradient_routing not in GRADIENT_ROUTINGS:
            raise ValueError(f"gradient_routing must be one of {GRADIENT_ROUTINGS}, got {gradient_routing!r}")
        vq_kwargs.pop("num_quantizers", None)
        self.shared_codebook = bool(shared_codebook)
        self.gradient_routing = gradient_routing
        self._rng = B.as_generator(seed)
        n_layers = 1 if self.shared_codebook else self.num_quantizers
        seeds = self._rng.spawn(n_layers)
        # Each depth's configuration and state lives in a VectorQuantize; with a shared codebook
        # there is one, used at every depth.
        self.layers = [VectorQuantize(dim, codebook_size, seed=seeds[i], **vq_kwargs) for i in range(n_layers)]
        self.dim = self.layers[0].dim
        self.codebook_size = self.layers[0].codebook_size
        self.training = True
        self._cache = None
        self.grads: dict = {}

    # ------------------------------------------------------------------ helpers

    def _layer(self, level: int) -> VectorQuantize:
        return self.layers[0 if self.shared_codebook else level]

    @property
    def _xp(self):
        return self.layers[0].xp

    def config(self) -> dict:
        cfg = self.layers[0].config()
        cfg.pop("num_quantizers", None)
        cfg.update(
            num_quantizers=self.num_quantizers,
            shared_codebook=self.shared_codebook,
            gradient_routing=self.gradient_routing,
        )
        return cfg

    def __repr__(self) -> str:
        return (
            f"ResidualVQ(dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_size}, "
            f"shared_codebook={self.shared_codebook}, gradient_routing={self.gradient_routing!r})"
        )

    def to(self, xp: Any, device: Any = None) -> "ResidualVQ":
        for layer in self.layers:
            layer.to(xp, device)
        self._cache = None
        self.grads.clear()  # in place: views of this dict stay valid
        return self

    def _names(self) -> list[str]:
        return [""] if self.shared_codebook else [f"{i}." for i in range(self.num_quantizers)]

    @property
    def params(self) -> ParamView:
        """Live learnable arrays: ``"codebook"`` (shared) or ``"0.codebook"``, ``"1.codebook"``, ..."""
        getters, setters = {}, {}
        for prefix, layer in zip(self._names(), self.layers):
            if layer.codebook_is_learnable:
                getters[prefix + "codebook"] = (lambda lay=layer: lay.codebook)
                setters[prefix + "codebook"] = layer._set_codebook
        return ParamView(getters, setters)

    # ------------------------------------------------------------------ forward / backward

    def forward(self, x: Any):
        """Quantize ``x (..., dim)``; returns ``quantized (..., dim)``, ``indices (..., Q)``, ``losses (Q,)``."""
        from .core.ema import accumulate_statistics, batch_statistics, recompute_codebook
        from .core.residual import residual_forward

        first = self.layers[0]
        first._check_array("x", x, last_dim=self.dim)
        xp = self._xp
        Q = self.num_quantizers
        lead = tuple(x.shape[:-1])
        xf = xp.reshape(x, (-1, self.dim))  # (N, D)
        states = [EMAState(l.codebook, l.cluster_size, l.embed_avg) for l in self.layers]
        initted = [l.initted for l in self.layers]
        rng_states = [l._rng.bit_generator.state for l in self.layers]
        opts = dict(
            commitment_weight=first.commitment_weight,
            codebook_weight=first.codebook_weight,
            learnable_codebook=first.learnable_codebook,
            use_cosine_sim=first.use_cosine_sim,
            rotation_trick=first.rotation_trick,
            orthogonal_reg_weight=0.0,  # added per depth at the end, on the right codebook
            chunk_size=first.chunk_size,
        )
        try:
            if self.training and not all(initted):
                # k-means on the first batch, depth by depth: depth l clusters the residuals
                # left by the already-initialised depths before it.  A shared codebook is
                # initialised from the first depth's input.
                residual = xf
                for level in range(Q):
                    i = 0 if self.shared_codebook else level
                    if not initted[i]:
                        states[i] = self.layers[i]._kmeans_state(residual)
                        initted[i] = True
                    out, _ = quantize_forward(residual, xp.astype(states[i].codebook, x.dtype), **opts)
                    residual = residual - out.quantized
            codebooks = [xp.astype(states[0 if self.shared_codebook else l].codebook, x.dtype) for l in range(Q)]
            if self.shared_codebook:
                codebooks = [codebooks[0]] * Q
            out, cache = residual_forward(xf, codebooks, routing=self.gradient_routing, **opts)

            if self.training:
                data = [
                    xp.astype(out.residuals[l] if c.x_norm is None else c.x_norm.y, first.dtype)
                    for l, c in enumerate(cache.depths)
                ]
                idx = [out.indices[:, l] for l in range(Q)]
                if not self.shared_codebook:
                    for l in range(Q):
                        states[l] = self.layers[l]._state_update(states[l], data[l], idx[l], cache.depths[l])
                else:
                    # one EMA step of the statistics per depth, the codes recomputed once at the end
                    st = states[0]
                    if first.ema_update or first.threshold_ema_dead_code > 0:
                        for l in range(Q):
                            counts, sums = batch_statistics(data[l], idx[l], self.codebook_size)
                            st = accumulate_statistics(st, counts, sums, decay=first.decay)
                    if first.ema_update:
                        st = recompute_codebook(st, eps=first.eps, normalize=first.use_cosine_sim)
                    if first.threshold_ema_dead_code > 0:
                        st, _ = expire_dead_codes(
                            st, xp.concat(data, axis=0), threshold=first.threshold_ema_dead_code,
                            rng=first._rng, normalize=first.use_cosine_sim,
                        )
                    states[0] = st

            if first.orthogonal_reg_weight > 0:
                # Each depth's regulariser is a loss on that depth's codebook parameter, evaluated
                # on the codebook the forward leaves behind, as in VectorQuantize.forward: after
                # the depth's EMA step and restarts (vector-quantize-pytorch's order).  A shared
                # codebook is the exception: its update waits for the last depth, and
                # vector-quantize-pytorch evaluates every depth's term before it, on the codebook
                # the depths quantized with; so does vqref, and its gradient is the gradient of
                # that reported loss (docs/deviations.md 6.2-6.3).  The subsets come from each
                # depth's assignment.
                w = first.orthogonal_reg_weight
                orths, depths = [], []
                for level in range(Q):
                    if self.shared_codebook:
                        point = codebooks[level]  # (K, D) the forward's codebook
                    else:
                        point = xp.astype(states[level].codebook, x.dtype)  # (K, D) after the update
                    ids = self._layer(level)._orthogonal_code_ids(out.indices[:, level])
                    orth, depth = _orthogonal_term(point, ids, w, cache.depths[level])
                    orths.append(orth)
                    depths.append(depth)
                out = out._replace(losses=out.losses + w * xp.stack(orths))  # (Q,)
                cache = cache._replace(depths=tuple(depths))
        except BaseException:
            for layer, rs in zip(self.layers, rng_states):
                layer._rng.bit_generator.state = rs
            raise
        if not self.training:
            for layer, rs in zip(self.layers, rng_states):
                layer._rng.bit_generator.state = rs

        if self.training:
            for layer, st, ini in zip(self.layers, states, initted):
                layer.codebook, layer.cluster_size, layer.embed_avg = st
                layer.initted = ini
            self._cache = cache
            self._cache_shape = tuple(x.shape)
            self._cache_dtype = x.dtype
        self.last_residuals = out.residuals
        quantized = xp.reshape(out.quantized, tuple(x.shape))
        indices = xp.reshape(out.indices, lead + (Q,))
        return quantized, indices, out.losses

    def backward(self, dquantized: Any, dlosses: Any = 1.0) -> Any:
        """Gradient for the input of the last training forward; codebook gradients in ``self.grads``.

        Parameters
        ----------
        dquantized : (..., dim)
        dlosses : (Q,) array or a scalar for every depth (default 1.0: the losses are summed)
        """
        from .core.residual import residual_backward

        if self._cache is None:
            raise RuntimeError("backward() needs a training-mode forward first (and each forward allows one backward)")
        first = self.layers[0]
        first._check_array("dquantized", dquantized, self._cache_shape)
        xp = self._xp
        Q = self.num_quantizers
        if B._is_array(dlosses):
            if tuple(dlosses.shape) not in ((), (Q,)):
                raise ValueError(f"dlosses must have shape ({Q},) or (), got {tuple(dlosses.shape)}")
            first._check_array("dlosses", dlosses, tuple(dlosses.shape))
            dlosses = xp.astype(dlosses, self._cache_dtype)
        else:
            dlosses = _check_real("dlosses", dlosses)
        dq = xp.astype(xp.reshape(dquantized, (-1, self.dim)), self._cache_dtype)
        dx, dcodebooks = residual_backward(dq, dlosses, self._cache)
        self._cache = None
        self.grads.clear()  # in place: views of this dict stay valid
        for prefix, layer, level_grads in zip(self._names(), self.layers, self._group(dcodebooks)):
            if layer.codebook_is_learnable:
                total = None
                for g in level_grads:
                    if g is not None:
                        total = g if total is None else total + g
                if total is None:
                    total = xp.zeros((self.codebook_size, self.dim), dtype=layer.dtype, device=B.get_device(dx))
                self.grads[prefix + "codebook"] = xp.astype(total, layer.dtype)
        return xp.reshape(dx, self._cache_shape)

    def _group(self, per_depth: list) -> list[list]:
        # a shared codebook collects the gradients of every depth (one scatter-add per depth)
        return [per_depth] if self.shared_codebook else [[g] for g in per_depth]

    # ------------------------------------------------------------------ decoding

    def get_codes_from_indices(self, indices: Any) -> Any:
        """Per-depth codes ``(Q, ..., dim)`` for ``indices (..., Q)``."""
        xp = self._xp
        if B._is_array(indices) and B.library_name(indices) != B.library_name(self.layers[0].codebook):
            raise TypeError(
                f"indices is a {B.library_name(indices)} array but this module holds "
                f"{B.library_name(self.layers[0].codebook)} arrays; move one of them"
            )
        if not B._is_array(indices) or indices.ndim < 1 or indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"indices must be an integer array of shape (..., {self.num_quantizers})")
        return xp.stack(
            [self._layer(l).get_codes_from_indices(indices[..., l]) for l in range(self.num_quantizers)], axis=0
        )

    def get_output_from_indices(self, indices: Any) -> Any:
        """``sum_l codes_l``, shape ``(..., dim)``: equals the eval-mode forward output."""
        codes = self.get_codes_from_indices(indices)
        out = codes[0, ...]
        for l in range(1, self.num_quantizers):
            out = out + codes[l, ...]
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """``codebook``, ``cluster_size``, ``embed_avg``, ``initted`` per depth, prefixed ``"l."``
        (no prefix with a shared codebook)."""
        out = {}
        for prefix, layer in zip(self._names(), self.layers):
            out.update({prefix + k: v for k, v in layer.state_dict().items()})
        return out

    def load_state_dict(self, state: dict) -> None:
        expected = {prefix + k for prefix in self._names() for k in _STATE_KEYS}
        if set(state) != expected:
            raise KeyError(
                f"state_dict keys mismatch: missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}"
            )
        # check every depth before changing any, so a bad state leaves the module as it was
        snapshots = [layer.state_dict() for layer in self.layers]
        try:
            for prefix, layer in zip(self._names(), self.layers):
                layer.load_state_dict({k: state[prefix + k] for k in _STATE_KEYS})
        except BaseException:
            for layer, snap in zip(self.layers, snapshots):
                layer.load_state_dict(snap)
            raise
        self._cache = None


def _read_npz(path: str) -> tuple[dict, dict]:
    try:
        with np.load(path, allow_pickle=False) as f:
            files = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, KeyError, zlib.error) as e:
        # truncated or corrupted archives surface as BadZipFile, unknown compression methods as
        # NotImplementedError, damaged deflate streams as zlib.error
        raise ValueError(f"{path} is not a readable vqref .npz file: {e}") from None
    if "config" not in files:
        raise ValueError(f"{path} is not a vqref file: it has no 'config' entry")
    try:
        config = json.loads(str(files.pop("config")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its configuration is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its config entry must be a JSON object, got {type(config).__name__}")
    return config, files
