"""One forward and one backward of ``VectorQuantize`` / ``ResidualVQ``, as functions of the state.

Symbols: N tokens, n kept by a mask, D = dim, d = codebook_dim, H heads, G streams (H with a
codebook per head, else 1), Q depths, K_l codes at depth l.

:func:`forward_step` computes everything one forward changes -- the new state arrays, flags and
generators, the backward's cache, the usage statistics -- from the committed state, and returns
it without committing anything (the module commits it in one assignment).  A module with several
groups (:class:`vqref.GroupedResidualVQ`) calls it once per group and commits once.  In order:

    1. the frame: kept rows, heads' order           core.layer.frame
    2. project in, cut into streams                 core.layer.layer_in_forward
    3. per stream (a residual stack; Q = 1: plain VQ):
       a. [quantize dropout: the rows of each depth] core.rows.depth_rows
       b. [k-means on the first batch]              core.state.residual_kmeans_init
       c. [codes by beam search]                    core.beam
       d. quantize (nearest, sampled or given)      core.residual.residual_forward
       e. usage statistics; EMA step, restarts      core.residual.usage_stats,
                                                    core.state.residual_training_update
       f. [orthogonal regulariser]                  core.residual.residual_add_orthogonal
    4. merge the streams, project out, scatter      core.layer.layer_out_forward

:func:`backward_step` runs the backwards of 4, 3d/3f and 2 in reverse.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from ..core.beam import beam_search_codes, residual_encode_beam
from ..core.ema import EMAState
from ..core.layer import (
    Projection,
    frame,
    layer_in_backward,
    layer_in_forward,
    layer_out_backward,
    layer_out_forward,
    stream_row_ids,
)
from ..core.residual import (
    codebook_gradients,
    depth_batches,
    orthogonal_code_subsets,
    residual_add_orthogonal,
    residual_backward,
    residual_forward,
    usage_stats,
)
from ..core.rows import depth_rows, dropout_last_depths, put_indices, sample_of_rows, sampling_noise
from ..core.state import residual_kmeans_init, residual_training_update
from ..distributed import as_comm, check_same
from ..validation import check_fits, check_real, fits
from .views import PendingResidual

__all__ = ["StepResult", "StepCache", "Dropout", "forward_step", "backward_step", "stream_states", "draw_dropout",
           "upstream_gradients", "state_gradients"]  # fmt: skip

# a backward computes in its forward input's dtype
_FIT_FIX = "scale the upstream gradient or run the forward on float64 input"

_KEYS = ("codebook", "cluster_size", "embed_avg")


class StepCache(NamedTuple):
    layer_in: Any  # core.layer.LayerInCache
    streams: tuple  # G core.residual.ResidualCache
    layer_out: Any  # core.layer.LayerOutCache


class StepResult(NamedTuple):
    arrays: dict  # the new state arrays (training), else {}
    flags: dict  # the new flags (training), else {}
    cache: Any  # StepCache (training), else None
    stats: dict  # usage statistics
    quantized: Array  # (N, D)
    indices: Array  # (N, Q) for a stack, (N, H) with heads, (N,) else; -1 for absent rows and stopped depths
    losses: Array  # (Q,) for a stack, else 0-d
    terms: dict  # the unweighted loss terms (vq.last_losses)
    residuals: tuple  # the Q + 1 residuals (n, d) of the stream (one stream only; the last one a
    # PendingResidual, formed when read), else ()


class _Stream(NamedTuple):
    prefixes: list  # the state prefixes of its codebooks (one per codebook)
    states: list  # EMAState per codebook
    initted: list  # bool per codebook
    gens: list  # numpy Generator per codebook
    head: int | None  # the head of a codebook per head (its slice of the state), or None


def stream_states(m: Any, arrays: Any, flags: Any, gens: list, prefix: str = "") -> list:
    """The streams of module ``m`` with their codebooks' EMA states, flags and generators.

    ``prefix``: the group's prefix of the state entries (GroupedResidualVQ), else ``""``.
    """
    if m.separate_codebook_per_head:
        return [
            _Stream([prefix], [EMAState(*(arrays[prefix + k][h, ...] for k in _KEYS))], [flags[prefix + "initted"]],
                    [gens[h]], h)
            for h in range(m.heads)
        ]  # fmt: skip
    prefixes = [prefix + p for p in m.codebook_prefixes()]
    states = [EMAState(*(arrays[p + k] for k in _KEYS)) for p in prefixes]
    return [_Stream(prefixes, states, [flags[p + "initted"] for p in prefixes], gens[: len(prefixes)], None)]


class Dropout(NamedTuple):
    """A training step's quantize dropout (host values)."""

    last: np.ndarray  # (S,) int, the last depth of each of this rank's samples
    deepest: int  # the deepest last depth of every sample (of every rank): the depths that run


def draw_dropout(m: Any, gen: np.random.Generator, lead: tuple, comm: Any = None) -> Dropout | None:
    """Each sample's last depth ``l*`` for a training forward with quantize dropout, or None.

    With a communicator of several ranks the draws are made for the samples of every rank (the
    generators agree: checked) and this rank's are kept, as one process drawing for the batch.
    Depths 0..deepest run (on the rows that reach them, on each rank maybe none), the others
    are skipped.
    """
    if not (m.quantize_dropout and m.num_quantizers > 1):
        return None
    comm = as_comm(comm)
    samples = lead[0] if lead else 1
    counts = comm.allgather(samples) if comm.size > 1 else [samples]
    check_same(comm, "dropout generator state", gen.bit_generator.state)
    drawn = dropout_last_depths(
        gen, sum(counts), m.num_quantizers, cutoff=m.quantize_dropout_cutoff_index,
        multiple_of=m.quantize_dropout_multiple_of, per_sample=m.quantize_dropout_per_sample,
    )  # fmt: skip
    start = sum(counts[: comm.rank])
    deepest = int(drawn.max()) if drawn.size else -1
    return Dropout(drawn[start : start + samples], deepest)


def _projection(arrays: Any, name: str, dtype: Any, xp: Any) -> Projection | None:
    if name + ".W" not in arrays:
        return None
    return Projection(xp.astype(arrays[name + ".W"], dtype), xp.astype(arrays[name + ".b"], dtype))


def forward_step(
    m: Any,
    state: Any,
    x: Array,
    *,
    mask: Any,
    training: bool,
    opts: dict,
    gens: list,
    last_depths: Dropout | None = None,
    prefix: str = "",
    comm: Any = None,
    kmeans_comm: Any = None,
) -> StepResult:
    """One forward of module ``m`` from its committed ``state`` (nothing is committed).

    Parameters
    ----------
    m : the module (its options are read)
    state : the committed QuantizerState
    x : (..., D) the input
    mask : (...) bool or None
    training : a training forward (state updates, cache)
    opts : the options of :func:`vqref.core.quantize.quantize_forward`
    gens : copies of the codebooks' generators (drawn from; the caller commits them)
    last_depths : the quantize dropout of this step (:func:`draw_dropout`), or None
    prefix : the state entries' prefix (a group of GroupedResidualVQ)
    comm : communicator of a data-parallel step (``None``: one process).  x is this rank's part
        of the batch; the state updates, the losses, the usage statistics and the random draws
        per row are those of the whole batch (docs/distributed.md §10)
    kmeans_comm : the communicator of k-means (default ``comm``; one process without
        ``sync_kmeans``)
    """
    comm = as_comm(comm)
    kmeans_comm = comm if kmeans_comm is None else as_comm(kmeans_comm)
    xp = state.xp
    lead = tuple(x.shape[:-1])
    xf = xp.reshape(x, (-1, m.dim))  # (N, D)
    if training:  # the cache refers to the input: a private copy, so changing x cannot change a gradient
        xf = B.copied(xf)  # (N, D) on numpy block by block on worker threads
    fr = frame(lead, mask, heads=m.heads, separate=m.separate_codebook_per_head,
               passthrough=not m.return_zeros_for_masked_padding, like=xf)  # fmt: skip
    arrays = state.arrays
    p_in = _projection(arrays, prefix + "project_in", x.dtype, xp)
    p_out = _projection(arrays, prefix + "project_out", x.dtype, xp)
    inputs, in_cache = layer_in_forward(xf, p_in, fr)  # G streams
    streams = stream_states(m, arrays, state.flags, gens, prefix)
    ranks = _ranks(comm, fr, lead, inputs[0].shape[0])
    total, noise_ids = stream_row_ids(lead, fr)
    positions = x.shape[-2] if x.ndim >= 3 else 1  # the diversity loss's positions, as vqp
    kept = np.arange(fr.num_rows, dtype=np.int64) if fr.rows is None else np.asarray(fr.rows)
    row_of = kept if fr.order is None else kept[fr.order // fr.heads]  # (rows,) the batch row of each stream row
    last = None if last_depths is None else last_depths.last[sample_of_rows(lead, row_of)]  # (rows,)
    deepest = None if last_depths is None else last_depths.deepest
    grouped = mask is not None or last is not None or ranks.size > 1
    groups = ((row_of + ranks.row_offset) % positions) if grouped else None  # (rows,) or the full grid
    ids = [np.arange(total, dtype=np.int64) + ranks.noise_offset if i is None else i + ranks.noise_offset
           for i in noise_ids] if ranks.size > 1 else noise_ids  # fmt: skip
    results = [
        _quantize_stream(m, z, st, training=training, opts=opts, comm=comm, kmeans_comm=kmeans_comm,
                         plan=_Plan(last, groups, ranks.noise_total if ranks.size > 1 else total, ids[g], ranks,
                                    deepest))
        for g, (z, st) in enumerate(zip(inputs, streams))
    ]  # fmt: skip
    out, out_cache = layer_out_forward([r.out.quantized for r in results], xf, p_out, fr)  # (N, D)
    return _assemble(m, fr, streams, results, out, StepCache(in_cache, tuple(r.cache for r in results), out_cache),
                     training, prefix)  # fmt: skip


class _Ranks(NamedTuple):
    """Where this rank's rows sit in the whole batch of a data-parallel step (one rank: itself)."""

    size: int  # R
    stream_total: int  # the stream rows of every rank: what the losses average over
    row_offset: int  # this rank's first row in the whole batch (the diversity positions)
    noise_total: int  # the rows of the whole batch's stream, masked ones too (the noise)
    noise_offset: int  # this rank's first row in it


def _ranks(comm: Any, fr: Any, lead: tuple, stream_rows: int) -> _Ranks:
    """One allgather of the ranks' row counts (nothing with one rank)."""
    per_row = fr.heads if (fr.order is not None) else 1  # a shared codebook's heads: H stream rows per row
    mine = (fr.num_rows, stream_rows, fr.num_rows * per_row)
    if comm.size == 1:
        return _Ranks(1, stream_rows, 0, mine[2], 0)
    counts = np.asarray(comm.allgather(mine), dtype=np.int64)  # (R, 3)
    before = counts[: comm.rank].sum(axis=0)
    return _Ranks(comm.size, int(counts[:, 1].sum()), int(before[0]), int(counts[:, 2].sum()), int(before[2]))


class _Plan(NamedTuple):
    last_depth: Any  # (rows,) host int, each stream row's last depth (quantize dropout), or None
    groups: Any  # (rows,) host int, each stream row's diversity position, or None (the full grid)
    noise_rows: int  # rows of the whole batch's stream
    noise_ids: Any  # (rows,) host int, this stream's rows in it, or None
    ranks: Any = None  # _Ranks
    deepest: Any = None  # the deepest depth that runs (quantize dropout), or None (every depth)


class _StreamResult(NamedTuple):
    out: Any  # ResidualOutput
    cache: Any  # ResidualCache
    states: list
    initted: list
    stats: dict


def _quantize_stream(m: Any, z: Array, st: _Stream, *, training: bool, opts: dict, plan: _Plan, comm: Any,
                     kmeans_comm: Any) -> _StreamResult:  # fmt: skip
    """Steps 3a-3f for one stream ``z (rows, d)``: a residual stack over its codebooks."""
    xp = B.get_namespace(z)
    Q = 1 if st.head is not None else m.num_quantizers
    sizes = [m.codebook_sizes[0 if st.head is not None else level] for level in range(Q)]
    shared = len(st.states) == 1 and Q > 1
    states, initted = list(st.states), list(st.initted)
    # a. the rows that reach each depth (quantize dropout, in training).  Depths 0..deepest run,
    #    also on a rank (or a masked batch) whose rows none of them reach: every rank decides from
    #    the same draws, so their collectives match
    many = plan.ranks.size > 1
    rows = None if plan.last_depth is None else depth_rows(plan.last_depth, Q)
    reached = [True] * Q if plan.deepest is None else [level <= plan.deepest for level in range(Q)]
    ran_depths = sum(reached)
    # b. k-means on the first training batch, depth by depth (the depths that run; a batch
    #    without rows leaves the codebooks uninitialised for the next one)
    if training and not all(initted) and plan.ranks.stream_total > 0:
        kmeans_opts = dict(opts, codebook_diversity_loss_weight=0.0)  # only the codes' values are needed
        states, initted = residual_kmeans_init(
            z, states, initted, num_depths=ran_depths, shared=shared, iters=m.kmeans_iters, rngs=st.gens,
            eps=m.eps, use_cosine_sim=m.use_cosine_sim, dtype=states[0].codebook.dtype, quantize_options=kmeans_opts,
            comm=kmeans_comm,
        )  # fmt: skip
        m.check_finite(st.prefixes, states, "k-means initialisation")
    codebooks = [
        xp.astype(states[0 if len(states) == 1 else level].codebook, z.dtype, copy=False) for level in range(Q)
    ]
    # c. codes by beam search
    codes = _beam_codes(m, z, codebooks, plan.last_depth, training)
    # d. quantize (Gumbel noise from the generators when sampling)
    noise = None
    if training and m.stochastic_sample_codes and opts["sample_codebook_temp"] > 0:
        noise = sampling_noise(st.gens, plan.noise_rows, sizes, like=z, rows=plan.noise_ids)
    groups = None if plan.groups is None else B.from_numpy(plan.groups, xp, device=B.get_device(z))
    out, cache = residual_forward(z, codebooks, routing=m.gradient_routing, indices=codes, noise=noise,
                                  depth_rows=rows, diversity_groups=groups, total_rows=plan.ranks.stream_total,
                                  skip=[not r for r in reached], last_residual=False, **opts,
                                  **({"diversity_comm": comm} if many else {}))  # fmt: skip
    # e. usage statistics; EMA step and dead-code restarts on what each depth quantized
    batches = depth_batches(cache)
    ran = [b is not None for b in batches]
    stats = usage_stats(out.indices, sizes, [s.cluster_size for s in states], threshold=m.threshold_ema_dead_code,
                        decay=m.decay if training else None, ran=ran, comm=comm)  # fmt: skip
    if training:
        states = _update(m, states, batches, st.gens, shared, comm)
        m.check_finite(st.prefixes, states, "EMA update and dead-code restarts")
    # f. the orthogonal regulariser, on the codebook parameter as this forward leaves it
    if m.orthogonal_reg_weight > 0:
        code_ids = orthogonal_code_subsets(
            out.indices, sizes, active_only=m.orthogonal_reg_active_codes_only, max_codes=m.orthogonal_reg_max_codes,
            rngs=st.gens, ran=ran, comm=comm,
        )  # fmt: skip
        points = codebooks if shared else [xp.astype(s.codebook, z.dtype) for s in states]
        # a term of the codebook, evaluated on every rank: each rank's share of its gradient is 1 / R
        weight = m.orthogonal_reg_weight / plan.ranks.size
        out, cache = residual_add_orthogonal(out, cache, points, weight=weight, code_ids=code_ids)
    if many:  # the whole batch's losses on every rank: the ranks' shares added (a diversity term is whole)
        whole = [xp.zeros((), dtype=z.dtype) if d is None else m.codebook_diversity_loss_weight * d
                 for d in (out.diversities or [None] * Q)]  # fmt: skip
        diversity = xp.stack(whole)  # (Q,)
        out = out._replace(losses=comm.allreduce_sum(out.losses - diversity) + diversity)
    return _StreamResult(out, cache, states, initted, stats)


def _update(m: Any, states: list, batches: list, gens: list, shared: bool, comm: Any) -> list:
    """The EMA step and restarts of the codebooks whose depths ran (the others keep their state)."""
    xp = B.get_namespace(states[0].codebook)
    run = [level for level, b in enumerate(batches) if b is not None]
    dtype = states[0].codebook.dtype  # the state's
    # (n_l, d) each, normalised for cosine; read only, so no copy when the dtype already matches
    data = [xp.astype(batches[level][0], dtype, copy=False) for level in run]
    idx = [batches[level][1] for level in run]
    options = dict(decay=m.decay, eps=m.eps, ema=m.ema_update, dead_code_threshold=m.threshold_ema_dead_code,
                   normalize=m.use_cosine_sim)  # fmt: skip
    if shared:
        return residual_training_update(states, data, idx, shared=True, rngs=gens[:1], comm=comm, **options)
    new = residual_training_update([states[level] for level in run], data, idx, shared=False,
                                   rngs=[gens[level] for level in run], comm=comm, **options)  # fmt: skip
    states = list(states)
    for level, s in zip(run, new):
        states[level] = s
    return states


def _beam_codes(m: Any, z: Array, codebooks: list, last_depth: Any, training: bool) -> Array | None:
    """The codes of a beam search over the depths each row reaches, (rows, Q) int (-1 past a row's
    last depth), or None for greedy encoding (a width of 1 or none)."""
    width = m.beam_size if training else m.eval_beam_size
    if width is None or width <= 1:
        return None
    xp = B.get_namespace(z)
    Q = len(codebooks)
    if z.shape[0] == 0:  # a rank without rows
        return xp.zeros((0, Q), dtype=xp.int64, device=B.get_device(z))
    last = np.full(z.shape[0], Q - 1, dtype=np.int64) if last_depth is None else np.asarray(last_depth)
    blocks, order = [], []
    for depth in np.unique(last):
        rows = np.flatnonzero(last == depth)  # (r,) the rows that stop after this depth
        zr = z if rows.shape[0] == z.shape[0] else xp.take(z, B.from_numpy(rows, xp, device=B.get_device(z)), axis=0)
        cbs = codebooks[: depth + 1]
        if m.beam_score == "error":
            found = residual_encode_beam(zr, cbs, width, use_cosine_sim=m.use_cosine_sim, chunk_size=m.chunk_size).codes
        else:
            weights = None if m.beam_score_quantizer_weights is None else m.beam_score_quantizer_weights[: depth + 1]
            found = beam_search_codes(zr, cbs, width, use_cosine_sim=m.use_cosine_sim, score="cumulative",
                                      score_weights=weights, chunk_size=m.chunk_size)  # fmt: skip
        pad = xp.full((rows.shape[0], Q - depth - 1), -1, dtype=xp.int64, device=B.get_device(z))
        blocks.append(xp.concat([found, pad], axis=1))  # (r, Q)
        order.append(rows)
    if len(blocks) == 1:
        return blocks[0]
    inverse = np.argsort(np.concatenate(order), kind="stable")  # back to the rows' order
    return xp.take(xp.concat(blocks, axis=0), B.from_numpy(inverse, xp, device=B.get_device(z)), axis=0)


def _assemble(m: Any, fr: Any, streams: list, results: list, quantized: Array, cache: StepCache, training: bool,
              prefix: str) -> StepResult:  # fmt: skip
    """The step's outputs and new state from the streams' results."""
    xp = B.get_namespace(quantized)
    G = len(results)
    if G > 1:  # a codebook per head: H streams of one depth
        idx = xp.concat([r.out.indices for r in results], axis=1)  # (n, H)
        losses = xp.mean(xp.stack([r.out.losses[0] for r in results]), axis=0)  # () the mean over heads
        stats = {k: tuple(r.stats[k][0] for r in results) for k in results[0].stats}
    else:
        idx, losses, stats = results[0].out.indices, results[0].out.losses, results[0].stats  # (rows, Q), (Q,)
        if fr.order is not None:  # one codebook for every head: back to the (n, H) grid
            idx = xp.reshape(put_indices(idx, fr.order, idx.shape[0], xp), (-1, fr.heads))  # (n, H)
            losses = losses[0]
    indices = put_indices(idx, fr.rows, fr.num_rows, xp)  # (N, Q) or (N, H), -1 for the absent rows
    if not m.is_stack and fr.heads == 1:
        indices, losses = indices[:, 0], losses[0]
    if not m.is_stack:
        stats = {k: v[0] if G == 1 else v for k, v in stats.items()}
    arrays, flags = {}, {}
    if training:
        for st, r in zip(streams, results):
            for p, s in zip(st.prefixes, r.states):
                if st.head is None:
                    arrays.update({p + k: getattr(s, k) for k in _KEYS})
            flags.update({p + "initted": i for p, i in zip(st.prefixes, r.initted)})
        if streams[0].head is not None:  # a codebook per head: one (H, K, d) entry
            arrays.update({prefix + k: xp.stack([getattr(r.states[0], k) for r in results]) for k in _KEYS})
            flags = {prefix + "initted": all(r.initted[0] for r in results)}
    terms = {}
    for key, field in (("commitment", "commitments"), ("orthogonal", "orthogonals"), ("diversity", "diversities")):
        values = [getattr(r.out, field) for r in results]
        if values[0] is None or not values[0]:
            terms[key] = None
        elif G > 1:
            terms[key] = xp.mean(xp.stack([v[0] for v in values]), axis=0)
        else:
            terms[key] = values[0] if m.is_stack else values[0][0]
    residuals = ()
    if G == 1:
        out = results[0].out
        residuals = out.residuals
        if residuals[-1] is None:  # r_Q was left out (last_residual=False)
            residuals = residuals[:-1] + (PendingResidual(residuals[-2], out.codes[-1]),)
    return StepResult(arrays, flags, cache if training else None, stats, quantized, indices, losses, terms, residuals)


def backward_step(dquantized: Array, dlosses: Any, cache: StepCache, m: Any) -> tuple[Array, dict]:
    """Gradients of :func:`forward_step` for x (N, D) and the learnable arrays (compute dtype).

    Parameters
    ----------
    dquantized : (N, D)
    dlosses : the upstream gradient of the losses: (Q,) or a number for a stack, a number else
    cache : StepCache
    m : the module (its layout)

    Returns
    -------
    dx : (N, D)
    grads : state entry (without a group prefix) -> gradient, for the projections and the
        codebooks that received one (None where nothing reached a codebook)
    """
    doutputs, dWo, dbo, dx_pass = layer_out_backward(dquantized, cache.layer_out)
    G = len(cache.streams)
    dl = dlosses / G if G > 1 else dlosses  # with a codebook per head the loss is the mean over heads
    dstreams, dcodebooks = [], []
    for dout, rc in zip(doutputs, cache.streams):
        dz, dcbs = residual_backward(dout, dl, rc, codebooks=m.codebook_is_learnable)  # no unused codebook gradient
        dstreams.append(dz)
        dcodebooks.append(dcbs)
    dx, dWi, dbi = layer_in_backward(dstreams, cache.layer_in)
    if dx_pass is not None:
        dx = dx + dx_pass  # absent rows that return x
    grads = {}
    if dWi is not None:
        grads.update({"project_in.W": dWi, "project_in.b": dbi, "project_out.W": dWo, "project_out.b": dbo})
    if m.codebook_is_learnable:
        if G > 1:
            per_head = [d[0] for d in dcodebooks]
            grads["codebook"] = None if all(g is None for g in per_head) else per_head
        else:
            names = [p + "codebook" for p in m.codebook_prefixes()]
            grads.update(zip(names, codebook_gradients(dcodebooks[0], shared=len(names) == 1 and m.num_quantizers > 1)))
    return dx, grads


def upstream_gradients(m: Any, dquantized: Array, dloss: Any, name: str, *, shape: tuple, dtype: Any,
                       loss_shapes: tuple) -> tuple[Array, Any]:  # fmt: skip
    """The upstream gradients of a backward, checked and in the forward input's dtype.

    ``dquantized`` must be a finite float array of the module's library with the forward input's
    ``shape``; ``dloss`` a real number or an array of one of ``loss_shapes``; both must fit the
    forward input's dtype (the backward computes in it).  Returns ``(dquantized, dloss)``.
    """
    xp = m.xp
    dtype_name = "float32" if dtype == xp.float32 else "float64"
    m.check_input("dquantized", dquantized, shape=shape)
    check_fits("dquantized", dquantized, dtype_name, "the forward's input", _FIT_FIX)
    if isinstance(dloss, np.generic):
        dloss = dloss.item()  # a numpy scalar is the Python value it holds, on every backend
    if B.is_array(dloss):
        if tuple(dloss.shape) not in loss_shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, loss_shapes))}, got {tuple(dloss.shape)}")
        m.check_input(name, dloss, shape=tuple(dloss.shape))
        check_fits(name, dloss, dtype_name, "the forward's input", _FIT_FIX)
        dloss = xp.astype(dloss, dtype)
    else:
        dloss = check_real(name, dloss)
        check_fits(name, dloss, dtype_name, "the forward's input", _FIT_FIX)
    return xp.astype(dquantized, dtype, copy=False), dloss  # read only: no copy of a matching dtype


def state_gradients(m: Any, core_grads: dict, names: Any, like: Array, prefix: str = "") -> dict:
    """The gradients of the learnable state arrays ``names`` in the state's dtype, from
    :func:`backward_step`'s (keyed without ``prefix``): zeros where nothing reached an array, a
    codebook per head stacked to (H, K, d); refused when a value overflows the state's dtype."""
    xp, state_dtype = m.xp, m.dtype
    dtype_name = "float32" if state_dtype == xp.float32 else "float64"
    spec = m.state_spec()
    grads = {}
    for name in names:
        g = core_grads.get(name[len(prefix) :])
        if isinstance(g, list):  # a codebook per head: (H, K, d), zeros where nothing reached a head
            kd = spec[name][1:]
            g = xp.stack([xp.zeros(kd, dtype=like.dtype, device=B.get_device(like)) if h is None else h for h in g])
        if g is None:  # no term reached this array
            g = xp.zeros(spec[name], dtype=state_dtype, device=B.get_device(like))
        # checked before the cast to the state dtype, which would turn a large float64 value into inf
        if not (B.all_finite(g) and fits(g, dtype_name)):
            raise ValueError(
                f"the gradient of {name} overflows the module's {dtype_name} state; scale the upstream gradients"
            )
        grads[name] = xp.astype(g, state_dtype)
    return grads
