"""Codebook state transitions of a training step: k-means initialisation, EMA, restarts.

Symbols: N vectors, D features, K codes.

These are the non-differentiable updates a quantizer makes in training mode, as pure functions
``new_state = f(state, batch, ...)`` over :class:`vqref.core.ema.EMAState`.  The modules call
them visibly after the forward; they never run in eval mode.

Order within a training step (as in vector-quantize-pytorch):

1. on the first batch, k-means initialisation (if enabled), *before* the assignment;
2. the assignment and outputs use the codebook from before this step's update;
3. the EMA step from this batch's statistics;
4. dead-code restarts.

Data-parallel training: every function here takes an optional communicator ``comm`` (see
:mod:`vqref.distributed`; default: one process).  Each rank passes its part of the batch and
the ranks end in the state one process reaches on the whole batch: the batch counts and sums
are added over ranks before the EMA step, k-means reduces its per-cluster counts and sums in
every iteration, and the rows that k-means starts from and that restarted codes take are drawn
from the global batch by global row number, the same numbers on every rank.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .. import backend as B
from ..backend import Array
from ..distributed import as_comm
from .ema import (
    EMAState,
    accumulate_statistics,
    batch_statistics,
    codebook_from_state,
    expire_dead_codes,
    recompute_codebook,
)

__all__ = [
    "initial_codebook",
    "kmeans_init_state",
    "training_update",
    "global_statistics",
    "shared_training_update",
    "residual_kmeans_init",
    "residual_training_update",
]


def initial_codebook(
    num_codes: int, dim: int, *, rng: np.random.Generator, kmeans_init: bool = False, use_cosine_sim: bool = False
) -> np.ndarray:
    """A codebook to start from, on the host in float64: ``(K, D)``.

    Uniform in ``+-sqrt(6 / (K D))``, which is what torch's ``kaiming_uniform_`` gives a
    ``(1, K, D)`` tensor in vector-quantize-pytorch; rows l2-normalised for cosine codebooks.
    With k-means initialisation the codebook is a placeholder of zeros, replaced on the first
    training batch, and no random number is drawn (so the generator's first draws are k-means'
    initial means).
    """
    from ..ops.l2norm import l2norm

    if kmeans_init:
        return np.zeros((num_codes, dim))
    bound = math.sqrt(6.0 / (num_codes * dim))
    init = rng.uniform(-bound, bound, size=(num_codes, dim))  # (K, D)
    return l2norm(init) if use_cosine_sim else init


def kmeans_init_state(
    x: Array,
    num_codes: int,
    *,
    iters: int,
    rng: Any,
    eps: float,
    use_cosine_sim: bool = False,
    dtype: Any = None,
    comm: Any = None,
) -> EMAState:
    """Initial EMA state from k-means on one batch (SoundStream, arXiv 2107.03312).

    The EMA statistics are seeded consistently with the centroids: ``N_k = n_k`` (the cluster
    sizes) and ``m_k = mu_k n_k``, so that ``c_k = m_k / N~_k`` holds (docs/math.md §3.2) and
    one EMA step on the same batch leaves the codes at the centroids.

    Parameters
    ----------
    x : (N, D) float, the batch (already l2-normalised for cosine codebooks)
    num_codes : K
    iters : Lloyd iterations
    rng : numpy Generator (initial means are sampled on the host)
    eps : Laplace smoothing constant
    use_cosine_sim : spherical k-means and unit-norm codes
    dtype : dtype of the state (default: x's)
    comm : communicator (``None``: one process); x is then this rank's part of the batch, and
        every rank returns the state of the whole batch's k-means

    Returns
    -------
    EMAState(codebook (K, D), cluster_size (K,), embed_avg (K, D))

    Notes
    -----
    vector-quantize-pytorch lets a code whose cluster came out empty become ``0 / N~_k = 0``, the
    zero vector.  vqref keeps that code at its k-means mean (a sampled batch row) instead, with a
    zero count, so it is still a sensible code; see docs/deviations.md.
    """
    from .kmeans import kmeans

    xp = B.get_namespace(x)
    dtype = x.dtype if dtype is None else dtype
    res = kmeans(x, num_codes, iters, rng=rng, use_cosine_sim=use_cosine_sim, comm=comm)  # counts: global
    means = xp.astype(res.means, dtype)  # (K, D)
    counts = xp.astype(res.counts, dtype)  # (K,)
    embed_avg = means * counts[:, None]  # (K, D)
    codebook = codebook_from_state(counts, embed_avg, eps=eps, normalize=use_cosine_sim)
    codebook = xp.where((counts == 0)[:, None], means, codebook)
    return EMAState(codebook, counts, embed_avg)


def training_update(
    state: EMAState,
    x: Array,
    indices: Array,
    *,
    decay: float,
    eps: float,
    ema: bool = True,
    dead_code_threshold: float = 0.0,
    rng: Any = None,
    normalize: bool = False,
    comm: Any = None,
) -> EMAState:
    """The state update after one training forward: EMA step, then dead-code restarts.

    Parameters
    ----------
    state : EMAState before the step
    x : (N, D) the quantized vectors (l2-normalised for cosine codebooks), in the state's dtype
    indices : (N,) their codes
    decay, eps : EMA decay and Laplace smoothing
    ema : whether the EMA step runs (False: frozen or gradient-trained codebook)
    dead_code_threshold : restart codes with ``N_k`` below this (0 = off)
    rng : numpy Generator for the restarts
    normalize : unit-norm codes (cosine codebooks)
    comm : communicator (``None``: one process); x and indices are then this rank's rows (maybe
        none), and every rank returns the state of the whole batch's update
    """
    comm = as_comm(comm)
    if ema or dead_code_threshold > 0:
        # The counts are tracked whenever restarts need them, even if the codes do not follow.
        counts, sums = global_statistics(x, indices, state.codebook.shape[0], comm)
        state = accumulate_statistics(state, counts, sums, decay=decay)
    if ema:
        state = recompute_codebook(state, eps=eps, normalize=normalize)
    if dead_code_threshold > 0:
        state, _ = expire_dead_codes(state, x, threshold=dead_code_threshold, rng=rng, normalize=normalize, comm=comm)
    return state


def global_statistics(x: Array, indices: Array, num_codes: int, comm: Any) -> tuple[Any, Any]:
    """The batch counts ``n_k`` and sums ``s_k`` of every rank's rows together.

    Both are sums over rows, so the global batch's are the sums of the ranks' (an allreduce of
    each); one process: :func:`vqref.core.ema.batch_statistics` as it is.

    Parameters
    ----------
    x : (N_r, D) this rank's vectors;  indices : (N_r,) their codes;  num_codes : K
    comm : communicator

    Returns
    -------
    counts : (K,), sums : (K, D), x's dtype, the same on every rank
    """
    counts, sums = batch_statistics(x, indices, num_codes)  # (K,), (K, D) of this rank's rows
    return comm.allreduce_sum(counts), comm.allreduce_sum(sums)


def shared_training_update(
    state: EMAState,
    xs: Sequence[Array],
    indices: Sequence[Array],
    *,
    decay: float,
    eps: float,
    ema: bool = True,
    dead_code_threshold: float = 0.0,
    rng: Any = None,
    normalize: bool = False,
    comm: Any = None,
) -> EMAState:
    """The state update of one codebook shared by Q depths (RQ-VAE, arXiv 2203.01941).

    Each depth's statistics take one EMA step, in depth order; the codes are recomputed once,
    after the last depth, so that every depth of the forward saw the same codebook (as
    vector-quantize-pytorch does).  The old statistics therefore decay by ``decay ** Q`` per
    forward.  Dead-code restarts then draw their candidates from all depths' vectors.

    Parameters
    ----------
    state : EMAState of the shared codebook
    xs : Q arrays (N, D), what each depth quantized (normalised for cosine codebooks), state dtype
    indices : Q arrays (N,), each depth's codes
    decay, eps, ema, dead_code_threshold, rng, normalize, comm : as :func:`training_update`
        (with several ranks the candidates of a restart are the global batch of every depth:
        depth after depth, each in rank order, as one process concatenates them)
    """
    comm = as_comm(comm)
    if ema or dead_code_threshold > 0:
        for x, idx in zip(xs, indices):
            counts, sums = global_statistics(x, idx, state.codebook.shape[0], comm)
            state = accumulate_statistics(state, counts, sums, decay=decay)
    if ema:
        state = recompute_codebook(state, eps=eps, normalize=normalize)
    if dead_code_threshold > 0:
        state, _ = expire_dead_codes(
            state, list(xs), threshold=dead_code_threshold, rng=rng, normalize=normalize, comm=comm
        )
    return state


def residual_kmeans_init(
    x: Array,
    states: Sequence[EMAState],
    initted: Sequence[bool],
    *,
    num_depths: int,
    shared: bool,
    iters: int,
    rngs: Sequence[Array],
    eps: float,
    use_cosine_sim: bool,
    dtype: Any,
    quantize_options: dict,
    comm: Any = None,
) -> tuple[list, list]:
    """k-means initialisation of a residual stack on its first batch, depth by depth.

    Depth l clusters the residuals that the depths before it leave (each quantizing with its
    already initialised codebook), so every codebook starts at the centroids of what it will
    see (SoundStream, arXiv 2107.03312).  A shared codebook is initialised from the first
    depth's input.  With one depth this is :func:`kmeans_init_state` on the batch.

    Parameters
    ----------
    x : (N, D) the batch
    states : one EMAState per codebook (1 if shared, else Q)
    initted : one flag per codebook; initialised codebooks are kept
    num_depths : Q
    shared : one codebook for every depth
    iters : Lloyd iterations
    rngs : one numpy Generator per codebook (draws the initial means)
    eps : Laplace smoothing constant
    use_cosine_sim : spherical k-means on l2-normalised vectors, unit codes
    dtype : dtype of the state
    quantize_options : options of :func:`vqref.core.quantize.quantize_forward` used to compute
        the residuals between depths
    comm : communicator (``None``: one process); x is then this rank's rows.  Each depth's
        k-means runs over every rank's residuals, and the residuals passed on are computed
        per row, so every rank initialises the codebooks one process would on the whole batch

    Returns
    -------
    states, initted : new lists (the inputs are not modified)
    """
    from ..ops.l2norm import l2norm_forward
    from .quantize import quantize_forward

    xp = B.get_namespace(x)
    comm = as_comm(comm)
    states, initted = list(states), list(initted)
    residual = x
    for level in range(num_depths):
        i = 0 if shared else level
        if not initted[i]:
            data = l2norm_forward(residual)[0] if use_cosine_sim else residual  # (N, D)
            states[i] = kmeans_init_state(
                data,
                states[i].codebook.shape[0],
                iters=iters,
                rng=rngs[i],
                eps=eps,
                use_cosine_sim=use_cosine_sim,
                dtype=dtype,
                comm=comm,
            )
            initted[i] = True
        if level + 1 < num_depths:
            out, _ = quantize_forward(residual, xp.astype(states[i].codebook, x.dtype), **quantize_options)
            residual = residual - out.quantized  # (N, D)
    return states, initted


def residual_training_update(
    states: Sequence[EMAState],
    xs: Sequence[Array],
    indices: Sequence[Array],
    *,
    shared: bool,
    rngs: Sequence[Array],
    comm: Any = None,
    **options: Any,
) -> list:
    """The state update of a residual stack after a training forward.

    Separate codebooks: :func:`training_update` per depth, on what that depth quantized, with
    that depth's generator.  A shared codebook: :func:`shared_training_update`.

    Parameters
    ----------
    states : one EMAState per codebook
    xs : Q arrays (N, D), each depth's quantized vectors (normalised for cosine), state dtype
    indices : Q arrays (N,)
    shared : one codebook for every depth
    rngs : one numpy Generator per codebook
    comm : communicator (``None``: one process), see :func:`training_update`
    **options : decay, eps, ema, dead_code_threshold, normalize (see :func:`training_update`)

    Returns
    -------
    list of the new EMAStates
    """
    if shared:
        return [shared_training_update(states[0], xs, indices, rng=rngs[0], comm=comm, **options)]
    return [
        training_update(st, x, idx, rng=rng, comm=comm, **options) for st, x, idx, rng in zip(states, xs, indices, rngs)
    ]
