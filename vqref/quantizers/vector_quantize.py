"""``VectorQuantize``: the VQ-VAE quantizer with vector-quantize-pytorch's API and manual gradients.

Symbols: N tokens (all leading axes of the input flattened), D = dim, K = codebook_size,
Q = num_quantizers (residual depths; 1 for plain VQ), d = codebook_dim, H = heads.

``quantized, indices, loss = vq(x)``, then ``dx = vq.backward(dquantized, dloss)``.  This file
validates, calls :func:`vqref.quantizers.vq_step.forward_step` (which calls the pure functions
of :mod:`vqref.core` in order) and commits the new state in one assignment (the transaction of
:mod:`vqref.quantizers.base`).  A training forward is:

    0. [quantize dropout: each sample's last depth]  vq_step.draw_dropout (its own generator)
    1. kept rows (mask), project in, heads           core.layer
    2. [k-means on the first batch]                  core.state.residual_kmeans_init
    3. quantize with the committed codebook          core.residual.residual_forward  (Q = 1: one depth;
       (nearest, sampled, or beam-searched codes)     Gumbel noise from the generators when sampling)
    4. EMA step, dead-code restarts                  core.state.residual_training_update
       and the usage statistics                      core.residual.usage_stats
    5. [orthogonal regulariser, evaluated on         core.residual.residual_add_orthogonal
        the codebook step 4 left behind]
    6. merge heads, project out, scatter rows        core.layer
    7. commit state, generators, cache, stats        self._commit(...)

An eval forward runs steps 1, 3, 5 and 6 with the nearest (or eval-beam) codes and commits only
the usage statistics (``vq.stats``).  With ``num_quantizers = Q > 1`` the same steps quantize
residually in Q depths (the module is then a residual stack; outputs gain a depth axis, see
:class:`vqref.ResidualVQ`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from ..backend import Array
from ..core.state import initial_codebook
from ..distributed import SingleProcess, as_comm, refuse_together
from ..validation import check_dtype_name, check_real, check_seed
from . import files
from .base import Quantizer
from .lfq_options import check_mask, linear_init
from .options import (
    CONFIG_DEFAULTS,
    CONFIG_KEYS,
    check_options,
    check_temperature,
    codebook_sizes,
    state_prefixes,
    state_spec,
)
from .views import CodebookViews, PendingResidual
from .vq_step import backward_step, draw_dropout, forward_step, state_gradients, upstream_gradients

__all__ = ["VectorQuantize"]


class VectorQuantize(CodebookViews, Quantizer):
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
    stochastic_sample_codes : in training, sample each code from ``softmax(l / tau)`` by Gumbel-max
        (l: minus the distance, or the cosine similarity) instead of taking the nearest; the noise
        comes from the module's generators
    sample_codebook_temp : tau >= 0 (default 1; 0: no sampling); also a per-call option of forward
    straight_through : the straight-through Gumbel-softmax estimator (arXiv 1611.01144): the output
        is the (sampled or nearest) code, the gradient reaches x and the codebook through
        ``y = softmax(l / tau + g)`` (no identity path from the output to x; docs/deviations.md)
    soft_assignment : (vqref only) in training output the soft code ``softmax(l / tau) C``, whose
        backward is its true derivative; eval still returns the nearest code
    codebook_diversity_loss_weight, codebook_diversity_temperature : weight and inverse temperature
        T (default 100) of the codebook diversity loss ``-mean_n H(mean_b softmax(T l))``, added
        to the loss (docs/math.md §9)
    num_quantizers : Q > 1 quantizes residually in Q depths, as :class:`vqref.ResidualVQ` (the
        module stays a ``VectorQuantize``; its outputs gain the depth axis)
    shared_codebook, gradient_routing, quantize_dropout, quantize_dropout_cutoff_index,
        quantize_dropout_multiple_of, quantize_dropout_per_sample, beam_size, eval_beam_size,
        beam_score_quantizer_weights, beam_score : residual options, see :class:`vqref.ResidualVQ`
    codebook_dim : d, the width of the codes (default dim).  With ``heads * d != dim`` the module
        learns ``project_in`` (dim -> H d) and ``project_out`` (H d -> dim), affine maps whose
        gradients appear in ``grads`` (``project_in.W``, ``project_in.b``, ...); the codes live
        in the low dimension (factorised codes, ViT-VQGAN arXiv 2110.04627), l2-normalised there
        with ``use_cosine_sim``
    heads : H, cut each (projected) vector into H pieces of d entries, each quantized on its own;
        indices ``(..., H)``; the loss is the mean over the pieces.  ``separate_codebook_per_head``:
        a codebook per head (product quantization; state ``(H, K, d)``), else one codebook for
        every piece (not with a residual stack)
    return_zeros_for_masked_padding : with a ``mask`` in forward, absent rows return zeros
        (default, as vector-quantize-pytorch) or the input itself
    comm : a :mod:`vqref.distributed` communicator for data-parallel training (default: one
        process): each rank passes its part of the batch, and the state, outputs, losses and
        statistics are those of the whole batch (docs/distributed.md §10).  Not part of the
        configuration (files, copies and pickles are single-process: assign ``vq.comm`` again)
    sync_codebook : synchronise the state updates over ``comm`` (default None: whenever it has
        more than one rank; False: every rank updates from its own rows, and the ranks part)
    sync_kmeans : k-means over every rank's rows too (default True; False: each rank its own)
    seed : seed or numpy Generator for every random choice (init, k-means, sampling, restarts).  A
        Generator is used for the initial codebook and then copied: later draws do not touch it
    dtype : dtype of the stored state (default "float32"); inputs may be float32 or float64, and
        outputs keep the input's dtype
    xp : array library of the state (numpy by default; cupy; array_api_strict); see :meth:`to`
    chunk_size : rows per chunk of the nearest-code search (default: automatic)

    After every forward, ``vq.stats`` holds the codes' perplexity, usage, used_codes and
    dead_fraction (tuples over depths for a stack): see :func:`vqref.core.residual.usage_stats`.
    """

    CONFIG_KEYS = CONFIG_KEYS
    CONFIG_DEFAULTS = CONFIG_DEFAULTS  # what a model file written before these options means
    _stacked = False  # ResidualVQ: outputs always carry the depth axis

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
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        soft_assignment: bool = False,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        num_quantizers: int | None = 1,
        shared_codebook: bool = False,
        gradient_routing: str = "per_depth",
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        return_zeros_for_masked_padding: bool = True,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        quantize_dropout_per_sample: bool = False,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights: Any = None,
        beam_score: str = "cumulative",
        sync_codebook: bool | None = None,
        sync_kmeans: bool = True,
        comm: Any = None,
        seed: Any = None,
        dtype: Any = "float32",
        xp: Any = None,
        device: Any = None,
        chunk_size: int | None = None,
    ):
        given = dict(locals())  # every option as passed: the constructor's arguments are the options
        names = [k for k in CONFIG_KEYS if k != "dtype"] + ["n_embed", "commitment"]
        options = check_options(type(self).__name__, stacked=self._stacked, **{k: given[k] for k in names})
        self.comm = comm
        for key, value in options.items():
            setattr(self, key, value)
        self.codebook_sizes = codebook_sizes(options)
        if self.codebook_dim is None:
            self.codebook_dim = self.dim
        if self.eval_beam_size is None:
            self.eval_beam_size = self.beam_size  # as vector-quantize-pytorch
        self._dtype_name = check_dtype_name("dtype", dtype)
        rng = check_seed("seed", seed)
        namespace = B.namespace_from_module(xp)
        self.training = True
        arrays, initted, rngs = self._initial_state(rng)
        self._init_state(arrays, initted, tuple(rngs), xp=namespace, device=device)

    def _initial_state(self, rng: np.random.Generator) -> tuple[dict, dict, list]:
        """Host arrays, flags and generators of a new module.  One generator per codebook (a stack
        gives each depth its own stream, a codebook per head each head); the projections are drawn
        from a further child of ``rng`` and quantize dropout draws from one of its own."""
        n = self.num_codebooks
        gens = rng.spawn(n) if (self.is_stack or self.separate_codebook_per_head) else [rng]
        d, opts = self.codebook_dim, dict(kmeans_init=self.kmeans_init, use_cosine_sim=self.use_cosine_sim)
        arrays, initted = {}, {}
        if self.separate_codebook_per_head:  # one (H, K, d) entry, a generator per head
            books = [initial_codebook(self.codebook_sizes[0], d, rng=g, **opts) for g in gens]
            arrays.update(codebook=np.stack(books), embed_avg=np.stack(books))
            arrays["cluster_size"] = np.ones((self.heads, self.codebook_sizes[0]))
            initted["initted"] = not self.kmeans_init
        else:
            for level, (prefix, gen) in enumerate(zip(self.codebook_prefixes(), gens)):
                codebook = initial_codebook(self.codebook_sizes[level], d, rng=gen, **opts)
                arrays.update({prefix + "codebook": codebook, prefix + "cluster_size": np.ones(codebook.shape[0]),
                               prefix + "embed_avg": codebook})  # fmt: skip
                initted[prefix + "initted"] = not self.kmeans_init
        if self.has_projections:
            proj = rng.spawn(1)[0]
            E = self.heads * d
            for name, (din, dout) in (("project_in", (self.dim, E)), ("project_out", (E, self.dim))):
                arrays.update({f"{name}.{k}": v for k, v in linear_init(proj, din, dout, True).items()})
        if self.quantize_dropout and self.num_quantizers > 1:
            gens = list(gens) + rng.spawn(1)
        return arrays, initted, list(gens)

    # ---------------------------------------------------------------- configuration

    @property
    def is_stack(self) -> bool:
        """True for a residual stack (several depths, or a ResidualVQ): outputs carry the depth axis."""
        return self._stacked or self.num_quantizers > 1

    @property
    def num_codebooks(self) -> int:
        """The number of codebooks: Q for a stack (1 if shared), H with a codebook per head, else 1."""
        if self.separate_codebook_per_head:
            return self.heads
        return 1 if (self.shared_codebook or not self.is_stack) else self.num_quantizers

    @property
    def has_projections(self) -> bool:
        """True when ``heads * codebook_dim != dim``: the module learns ``project_in`` and ``project_out``."""
        return self.heads * self.codebook_dim != self.dim

    @property
    def comm(self) -> Any:
        """The communicator of data-parallel training (:class:`vqref.distributed.SingleProcess` by default)."""
        return self._comm

    @comm.setter
    def comm(self, value: Any) -> None:
        self._comm = as_comm(value)

    def communicators(self) -> tuple:
        """``(state, kmeans)``: the communicators the state updates and k-means use (one process
        when they are not synchronised)."""
        synced = self.sync_codebook if self.sync_codebook is not None else self._comm.size > 1
        state = self._comm if synced else SingleProcess()
        return state, (state if self.sync_kmeans else SingleProcess())

    def __getstate__(self) -> dict:
        d = super().__getstate__()
        d["_comm"] = SingleProcess()  # a communicator is a connection, not state
        return d

    def codebook_prefixes(self) -> list:
        """The prefixes of the codebooks' state entries: ``[""]`` or ``["0.", "1.", ...]`` per depth."""
        return state_prefixes(self.num_quantizers, shared=self.shared_codebook, stacked=self._stacked)

    _prefixes = codebook_prefixes

    def config(self) -> dict:
        cfg = {k: getattr(self, k) for k in self.CONFIG_KEYS if k != "dtype"}
        cfg["dtype"] = self._dtype_name
        return cfg

    @classmethod
    def check_config(cls, config: dict) -> dict:
        options = check_options(
            cls.__name__, n_embed=None, commitment=None, stacked=cls._stacked,
            **{k: config[k] for k in CONFIG_KEYS if k != "dtype"},
        )  # fmt: skip
        options["dtype"] = check_dtype_name("dtype", config["dtype"])
        return options

    @classmethod
    def spec_from_config(cls, config: dict) -> dict:
        return state_spec(config, stacked=cls._stacked)

    def __repr__(self) -> str:
        names = ("use_cosine_sim", "kmeans_init", "rotation_trick", "learnable_codebook", "stochastic_sample_codes",
                 "straight_through", "soft_assignment")  # fmt: skip
        flags = [k for k in names if getattr(self, k)]
        depth = f", num_quantizers={self.num_quantizers}" if self.is_stack else ""
        return (
            f"{type(self).__name__}(dim={self.dim}, codebook_size={self.codebook_size}{depth}, decay={self.decay}, "
            f"commitment_weight={self.commitment_weight}{''.join(', ' + f + '=True' for f in flags)})"
        )

    @property
    def codebook_is_learnable(self) -> bool:
        """True when the codebook receives a gradient (a learnable codebook or the orthogonal
        regulariser, which makes it learnable as in vector-quantize-pytorch)."""
        return self.learnable_codebook or self.orthogonal_reg_weight > 0

    def learnable_names(self) -> tuple:
        """The projections (if any), then the codebooks when they are learnable."""
        names = ("project_in.W", "project_in.b", "project_out.W", "project_out.b") if self.has_projections else ()
        return names + (tuple(p + "codebook" for p in self._prefixes()) if self.codebook_is_learnable else ())

    # ---------------------------------------------------------------- the state, read-only

    def init_codebook(self, codebook: Array, cluster_size: Array = None) -> None:
        """Set the codebook (e.g. your own initial codes) with a consistent EMA state.

        ``cluster_size`` defaults to ones (one pseudo-count per code, the initial state of
        vector-quantize-pytorch); ``embed_avg`` is set to ``codebook * cluster_size`` so that the
        invariant ``codebook = embed_avg / smoothed(cluster_size)`` holds, and the module counts
        as initialised (no k-means on the next batch).  Single-codebook modules; any array
        library; checked like :meth:`load_state_dict`.
        """
        if self._prefixes() != [""] or self.separate_codebook_per_head:
            raise TypeError(
                f"init_codebook sets one codebook, and this module has {self.num_codebooks}; use load_state_dict"
            )
        K, D = self.codebook_sizes[0], self.codebook_dim
        for name, a in (("codebook", codebook), ("cluster_size", cluster_size)):
            if a is not None and not B.is_array(a):
                raise TypeError(f"{name} must be an array, got {type(a).__name__}")
        cs = np.ones(K) if cluster_size is None else np.asarray(B.to_numpy(cluster_size))
        # the two arguments checked as what they are, before their product is formed
        given, _ = files.check_state_entries(
            {"codebook": np.asarray(B.to_numpy(codebook)), "cluster_size": cs},
            {"codebook": (K, D), "cluster_size": (K,)},
            self._dtype_name,
        )
        cb, cs = given["codebook"], given["cluster_size"]
        with np.errstate(over="ignore"):
            embed_avg = cb.astype(np.float64) * cs.astype(np.float64)[:, None]  # (K, D)
        if not np.all(np.abs(embed_avg) <= np.finfo(self._dtype_name).max):
            raise ValueError(
                f"codebook * cluster_size (the EMA sums embed_avg) exceeds the {self._dtype_name} range of this "
                "module's state; use smaller counts or dtype='float64'"
            )
        state = self.state_dict()  # the projections, if any, as they are
        state.update({"codebook": cb, "cluster_size": cs, "embed_avg": embed_avg, "initted": True})
        self.load_state_dict(state)

    # ---------------------------------------------------------------- forward / backward

    def quantize_options(self, training: bool, temperature: float, positions: int) -> dict:
        """The options of :func:`vqref.core.quantize.quantize_forward` at every depth.  The soft
        estimators act in training only: an eval forward returns the nearest codes."""
        return dict(
            commitment_weight=self.commitment_weight,
            codebook_weight=self.codebook_weight,
            learnable_codebook=self.learnable_codebook,
            use_cosine_sim=self.use_cosine_sim,
            rotation_trick=self.rotation_trick,
            straight_through=self.straight_through and training,
            soft_assignment=self.soft_assignment and training,
            sample_codebook_temp=temperature,
            codebook_diversity_loss_weight=self.codebook_diversity_loss_weight,
            codebook_diversity_temperature=self.codebook_diversity_temperature,
            diversity_positions=positions,
            chunk_size=self.chunk_size,
        )

    def forward(self, x: Array, *, mask: Array = None, sample_codebook_temp: float | None = None):
        """Quantize ``x``.

        Parameters
        ----------
        x : (..., dim) float32 or float64 array of the module's library
        mask : optional (...) bool array of the module's library, the tokens that are present
            (False: padding).  Absent tokens are left out of everything -- codes, losses, EMA
            statistics, k-means and dead-code samples, ``stats`` -- and get the output 0 (or x,
            with ``return_zeros_for_masked_padding=False``), the index -1 and no gradient
        sample_codebook_temp : tau for this call only (default: the module's); see the class

        Returns
        -------
        quantized : (..., dim), x's dtype; its rows are (sums of) codebook rows (mapped by
            ``project_out`` when projected; the soft codes ``softmax(l / tau) C`` with
            ``soft_assignment`` in training)
        indices : (...) int64, (..., H) with heads, or (..., Q) for a stack (-1: absent token, or
            a depth a quantize dropout skipped)
        loss : 0-d ``commitment_weight * mse(x, sg[q])`` plus the enabled terms; (Q,) for a stack
        """
        training = self.training  # read once: train()/eval() from another thread cannot split a step
        comm, kmeans_comm = self.communicators()
        error = None
        try:
            tau = self._check_call(x, mask, sample_codebook_temp, training)
        except (TypeError, ValueError) as e:
            error = e
        refuse_together(comm, error)  # with several ranks: every rank stops, none waits
        # the diversity loss averages over the rows at each position of (..., P, dim), as vqp
        positions = x.shape[-2] if x.ndim >= 3 else 1
        with self._exclusive():
            return self._forward(x, mask, training, self.quantize_options(training, tau, positions), comm, kmeans_comm)

    def _check_call(self, x: Array, mask: Any, sample_codebook_temp: Any, training: bool) -> float:
        """The checks of a forward's arguments; returns the temperature of the call.  With
        several ranks a rank may hold no rows of a batch (its x empty)."""
        empty_rank = self._comm.size > 1 and B.is_array(x) and x.ndim >= 1 and B.numel(tuple(x.shape)) == 0
        self.check_input(
            "x", x, **({"shape": tuple(x.shape[:-1]) + (self.dim,)} if empty_rank else {"last_dim": self.dim})
        )
        if mask is not None:
            check_mask(mask, self._like(), tuple(x.shape[:-1]))
        tau = self.sample_codebook_temp
        if sample_codebook_temp is not None:
            tau = check_real("sample_codebook_temp", sample_codebook_temp, 0.0)
        soft = [k for k in ("straight_through", "soft_assignment") if getattr(self, k)]
        check_temperature(tau, soft[0] if soft else None)
        if training:
            self.check_fits_state("x", x)
        return tau

    def _forward(self, x: Array, mask: Any, training: bool, opts: dict, comm: Any, kmeans_comm: Any):
        xp = self.xp
        gens = self._rngs()  # copies: the committed generators are never drawn from
        n = self.num_codebooks
        last = draw_dropout(self, gens[n], tuple(x.shape[:-1]), comm) if training and len(gens) > n else None
        step = forward_step(self, self._state, x, mask=mask, training=training, opts=opts, gens=gens[:n],
                            last_depths=last, comm=comm, kmeans_comm=kmeans_comm)  # fmt: skip
        if training:
            pending = (step.cache, tuple(x.shape), x.dtype)
            new = self._updated(arrays=step.arrays, flags=step.flags, rngs=tuple(gens), cache=pending,
                                stats=step.stats)  # fmt: skip
        else:
            new = self._updated(stats=step.stats)  # eval: the usage statistics, nothing else
        self._commit(new)
        # diagnostics of the last call in either mode (not state): unweighted loss terms, residuals
        self.last_losses = step.terms
        # The outputs share memory with the backward cache (the codes, the indices): they are handed
        # out read-only (numpy) or as copies (other libraries), see Quantizer.shield.
        shield = self.shield if training else (lambda a: a)
        self._last_residuals = tuple(r if isinstance(r, PendingResidual) else shield(r) for r in step.residuals)
        lead = tuple(x.shape[:-1])
        quantized = shield(xp.reshape(step.quantized, tuple(x.shape)))
        indices = shield(xp.reshape(step.indices, lead + tuple(step.indices.shape[1:])))
        return quantized, indices, step.losses

    def check_finite(self, prefixes: list, states: list, step: str) -> None:
        """Refuse a training step whose new state is not finite.

        Values within the state dtype's range can still overflow in the state's arithmetic (the
        EMA sums, k-means means of rows near float32's 3.4e38); the step is refused before
        anything is committed, rather than leaving infinities in the codebook for every later call.
        """
        for p, st in zip(prefixes, states):
            for key in ("codebook", "cluster_size", "embed_avg"):
                if not B.all_finite(getattr(st, key)):
                    raise ValueError(
                        f"x would make {p + key} non-finite in the {step}: its values are too large for this "
                        f"module's {self._dtype_name} state; scale the data or build the module with dtype='float64'"
                    )

    def backward(self, dquantized: Array, dloss: Array = 1.0) -> Array:
        """Gradient for the input of the last training forward.

        Parameters
        ----------
        dquantized : (..., dim), the upstream gradient of ``quantized``
        dloss : the upstream gradient of ``loss``: a real number or 0-d array (a (Q,) array, or a
            number for every depth, for a stack); 1.0 when the loss is added to the objective

        Returns
        -------
        dx : (..., dim), the input's dtype.  Codebook gradients (when learnable) go to
            ``self.grads``.  The cache is consumed: a second backward raises.
        """
        return self._backward(dquantized, dloss, "dloss")

    def _backward(self, dquantized: Array, dloss: Array, dloss_name: str) -> Array:
        with self._exclusive():  # the cache is read under the lock: it is this forward's, and consumed once
            return self._backward_locked(dquantized, dloss, dloss_name)

    def _backward_locked(self, dquantized: Array, dloss: Array, dloss_name: str) -> Array:
        if self._state.cache is None:
            raise RuntimeError("backward() needs a training-mode forward first (and each forward allows one backward)")
        cache, shape, dtype = self._state.cache
        xp = self.xp
        allowed = ((self.num_quantizers,), ()) if self.is_stack else ((),)
        dq, dloss = upstream_gradients(self, dquantized, dloss, dloss_name, shape=shape, dtype=dtype,
                                       loss_shapes=allowed)  # fmt: skip
        dx, core_grads = backward_step(xp.reshape(dq, (-1, self.dim)), dloss, cache, self)
        grads = state_gradients(self, core_grads, self.learnable_names(), dx)
        self._commit(self._updated(cache=None))
        self.grads.clear()  # in place: views of this dict stay valid
        self.grads.update(grads)
        return xp.reshape(dx, shape)
