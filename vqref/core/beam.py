"""Beam-search encoding for residual quantization (multi-path encoding).

Symbols: N vectors, D features, K codes per depth (K_l when depths differ), Q depths, b beam
width (partial codes kept per row), n rows of one block.

The problem.  Given Q fixed codebooks, the best code of a row is

    (k_0, ..., k_{Q-1}) = argmin  ||x - sum_l c_{l, k_l}||^2                              (1)

over K^Q tuples.  Greedy residual encoding (:func:`vqref.core.residual.residual_forward`) takes
each depth's nearest code to what is left, ``k_l = argmin_k ||r_l - c_{l,k}||^2`` with
``r_{l+1} = r_l - c_{l,k_l}``: O(Q K D) per row, but a good first choice can spoil the later ones.

Beam search (FAISS's ``ResidualQuantizer.max_beam_size``; the multi-path encoding of improved
residual VQ, Liu et al., arXiv 1509.05195) keeps the b best partial codes instead of one.  A
partial code of depth l has the partial sum ``s = sum_{m<l} c_{m,k_m}`` and the residual
``r = x - s``.  At depth l every beam j is extended by every code k of that depth, and each
candidate (j, k) gets the error its partial sum leaves,

    E_jk = ||x - (s_j + c_{l,k})||^2 = ||r_j - c_{l,k}||^2                                (2)

The b candidates with the least error survive as the beams of depth l + 1; after the last depth
the best beam is the code.  b = 1 is the greedy encoder.

Derivation of the cost.  (2) is a squared distance between the b residuals and the K codes, so
one depth costs a (b x D)(D x K) matrix product per row (the centred expansion of
:func:`vqref.ops.distance.squared_distance_forward`) and the choice of b among b K scores: O(Q b K D) time
and O(b K + b D) memory per row, and rows are processed in blocks of n so that a block holds
O(n b K) numbers.  Keeping every child (j, k) is not wasteful: a candidate that is not among
its own parent's b best children has b better siblings, so the b best of all candidates are
always among the b best children of each beam (vector-quantize-pytorch expands each beam by
its b nearest codes only; both keep the same set).  When b >= K^(Q-1) no partial code of depth
< Q is ever dropped and the last depth compares all K^Q tuples: the search is exact (1).

Beam search can lose to greedy.  Pruning by the partial error (2) may drop the greedy prefix at
some depth although it leads to a better final code than every surviving beam.  In one
dimension, with x = 0, b = 2 and the codebooks {1, 1.01}, {-1.008, -1.012}, {0.008}: depth 0
keeps 1 and 1.01; at depth 1 both children of 1.01 (errors 0.002^2) beat greedy's 1 - 1.008
(error 0.008^2), which is dropped; but greedy's last code cancels its residual exactly, while
the survivors end at 0.006^2 and 0.01^2.  :func:`residual_encode_beam` therefore also encodes greedily and keeps,
row by row, whichever of the two codes reconstructs better (greedy on a tie).  Its errors are
never larger than greedy's -- exactly, since both are measured by the same direct differences.

Scores.  ``score="error"`` is (2), the reconstruction error of the partial sum (FAISS).
``score="cumulative"`` is vector-quantize-pytorch's ``beam_size`` search: each candidate carries
the weighted sum of the per-depth errors of its path,

    S_jk = S_j + w_l e_jk,     e_jk = ||r^_j - c^_{l,k}||^2                               (3)

with ``r^ = l2(r)`` for cosine codebooks (else r) and the weights ``beam_score_quantizer_weights``
(default 1).  For a Euclidean codebook ``e_l = ||r_{l+1}||^2``, so with unit weights (3) is the
sum of every intermediate residual energy, not the final one; the best path under (3) need not
reconstruct better than greedy, and there is no greedy safeguard (the codes are the search's,
as vector-quantize-pytorch returns them).  vector-quantize-pytorch scores with the mean over D
times the commitment weight, a positive factor that ranks the same.

Ties.  Candidates are ranked by a stable sort of their scores in the order (beam, code), with
beams ordered best first: among equal scores the lower beam wins, then the lower code.
(vector-quantize-pytorch ranks with ``torch.topk``, whose order among equal values is not
specified.)  The final pick is the first beam.

The selection has a definition and a fast path.  :func:`best_candidates_portable` is the
definition, a stable sort of every row (O(m log m) for m = b K candidates).  Only b of them are
kept, so on numpy :func:`best_candidates_argmin` takes b passes of ``argmin`` instead, each
covering its pick with +inf: ``argmin`` returns the first of equal minima, which is the order of
the stable sort, and b passes over m numbers cost far less than a sort for the widths used in
practice.  :func:`best_candidates` chooses in one line (the fast path for numpy arrays of finite
scores), and the tests pin one to the other, ties included.

Gradients.  The codes are constants (a search has no derivative).  A module passes them to
``residual_forward(x, codebooks, indices=codes)``, whose forward and backward are then exactly
those of greedy encoding with those codes -- vector-quantize-pytorch's gradient with beam-selected
codes is the same surrogate (every depth's estimator on its residual, residuals with identity
Jacobian).

Nothing here synchronises with the device or changes its inputs.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from .. import backend as B
from ..backend import Array
from ..ops.distance import squared_distance_forward
from ..ops.l2norm import l2norm
from ..validation import check_bool, check_choice, check_int, check_real
from .residual import residual_forward

__all__ = [
    "BeamEncoding",
    "BEAM_SCORES",
    "beam_search_codes",
    "residual_encode_beam",
    "residual_encode_greedy",
    "reconstruction_errors",
    "default_beam_chunk",
    "best_candidates",
    "best_candidates_portable",
    "best_candidates_argmin",
]

BEAM_SCORES = ("error", "cumulative")

# Candidates per block of rows: n * b * max(K, D) numbers (scores, their sort order, residuals).
_BLOCK_ELEMENTS = 1 << 22


class BeamEncoding(NamedTuple):
    codes: Array  # (N, Q) int64, the codes returned
    errors: Array  # (N,) ||x - x^||^2 of ``codes``
    search_errors: Array  # (N,) the error of the beam search's best path
    greedy_errors: Array  # (N,) the error of the greedy code


def default_beam_chunk(beam_size: int, num_codes: int, dim: int) -> int:
    """Rows per block so that a block holds about 2^22 candidates (see the module notes)."""
    return max(1, _BLOCK_ELEMENTS // (max(int(beam_size), 1) * max(int(num_codes), int(dim), 1)))


def _as_codebook_list(codebooks: Any, x: Array) -> list:
    """Q codebooks (K_l, D) of x's library and dtype, from a sequence or a (Q, K, D) array."""
    if B.is_array(codebooks):
        if codebooks.ndim != 3:
            raise ValueError(
                f"codebooks must be Q arrays (K, D) or one (Q, K, D) array, got shape {tuple(codebooks.shape)}"
            )
        codebooks = [codebooks[level, ...] for level in range(codebooks.shape[0])]
    if not isinstance(codebooks, (list, tuple)) or not codebooks:
        raise TypeError("codebooks must be a non-empty list of (K, D) arrays, one per depth")
    for level, c in enumerate(codebooks):
        if not B.is_array(c):
            raise TypeError(f"codebooks[{level}] must be an array, got {type(c).__name__}")
        B.get_namespace(x, c)  # one library, or a clear TypeError
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] != x.shape[1]:
            raise ValueError(f"codebooks[{level}] must have shape (K, {x.shape[1]}) with K >= 1, got {tuple(c.shape)}")
        if c.dtype != x.dtype:
            raise TypeError(f"codebooks[{level}] has dtype {c.dtype} but x has {x.dtype}; convert one of them")
    return list(codebooks)


def _check_inputs(
    x: Array, codebooks: Any, beam_size: Any, cosine: Any, score: Any, score_weights: Any, chunk_size: Any
):
    """The checks of :func:`beam_search_codes`; returns (codebooks list, beam_size, weights, chunk)."""
    if not B.is_array(x):
        raise TypeError(f"x must be an array (N, D), got {type(x).__name__}")
    xp = B.get_namespace(x)
    if x.ndim != 2 or not xp.isdtype(x.dtype, "real floating"):
        raise ValueError(f"x must be a 2-D float array (N, D), got shape {tuple(x.shape)} and dtype {x.dtype}")
    cbs = _as_codebook_list(codebooks, x)
    beam_size = check_int("beam_size", beam_size, 1)
    check_bool("use_cosine_sim", cosine)
    check_choice("score", score, BEAM_SCORES)
    weights = None
    if score_weights is not None:
        if score != "cumulative":
            raise ValueError("score_weights weigh the per-depth errors of score='cumulative'; drop them or set it")
        weights = [check_real(f"score_weights[{i}]", w, 0.0) for i, w in enumerate(score_weights)]
        if len(weights) != len(cbs):
            raise ValueError(f"score_weights needs one weight per depth ({len(cbs)}), got {len(weights)}")
    elif score == "cumulative":
        weights = [1.0] * len(cbs)
    chunk = None if chunk_size is None else check_int("chunk_size", chunk_size, 1)
    return cbs, beam_size, weights, chunk


def _subtracted(codebooks: Sequence[Array], use_cosine_sim: bool) -> list:
    """The vectors each depth subtracts: the codes, l2-normalised for cosine codebooks."""
    return [l2norm(c) if use_cosine_sim else c for c in codebooks]


def reconstruction_errors(x: Array, codebooks: Sequence[Array], codes: Array, *, use_cosine_sim: bool = False) -> Array:
    """``||x_i - sum_l c^_{l, k_il}||^2`` per row, by the residual recursion (direct differences).

    Parameters
    ----------
    x : (N, D) float
    codebooks : Q arrays (K_l, D) (cosine: raw codes; the unit codes are subtracted)
    codes : (N, Q') int with Q' <= Q: a prefix of the depths gives the coarser reconstruction's error

    Returns
    -------
    errors : (N,) float, x's dtype
    """
    xp = B.get_namespace(x, codes)
    residual = x
    for level, c in enumerate(_subtracted(codebooks[: codes.shape[1]], use_cosine_sim)):
        residual = residual - xp.take(c, codes[:, level], axis=0)  # r_{l+1} = r_l - c_l  (N, D)
    return xp.sum(residual * residual, axis=1)  # (N,)


def residual_encode_greedy(
    x: Array, codebooks: Sequence[Array], *, use_cosine_sim: bool = False, chunk_size: int | None = None
) -> Array:
    """Greedy residual codes (N, Q) int64: the indices of :func:`vqref.core.residual.residual_forward`."""
    out, _ = residual_forward(x, list(codebooks), use_cosine_sim=use_cosine_sim, chunk_size=chunk_size)
    return out.indices


def best_candidates(scores: Array, count: int) -> Array:
    """Columns of the ``count`` smallest scores of every row, best first; ties to the lower column.

    Parameters
    ----------
    scores : (n, m) float
    count : 1 <= count <= m

    Returns
    -------
    order : (n, count) int64, ``scores[i, order[i, 0]] <= scores[i, order[i, 1]] <= ...``

    Notes
    -----
    :func:`best_candidates_portable` is the definition; numpy arrays of finite scores take the
    fast path :func:`best_candidates_argmin` (see the module notes).
    """
    if B.is_numpy(B.get_namespace(scores)) and bool(np.isfinite(scores).all()):  # the one-line choice
        return best_candidates_argmin(scores, count)
    return best_candidates_portable(scores, count)


def best_candidates_portable(scores: Array, count: int) -> Array:
    """:func:`best_candidates` as a stable sort of every row, in Array API calls (every backend)."""
    xp = B.get_namespace(scores)
    return xp.argsort(scores, axis=1, stable=True)[:, :count]  # (n, count)


def best_candidates_argmin(scores: np.ndarray, count: int) -> np.ndarray:
    """numpy fast path of :func:`best_candidates`: ``count`` passes of ``argmin``; finite scores only.

    Each pass takes every row's smallest remaining score (the first of equal ones) and covers it
    with +inf in a private copy.  With an infinite score among the data a covered pick could
    be taken again, so :func:`best_candidates` sends such rows to the definition.
    """
    work = np.array(scores, copy=True)  # (n, m), changed below
    rows = np.arange(work.shape[0])  # (n,)
    order = np.empty((work.shape[0], count), dtype=np.int64)  # (n, count)
    for i in range(count):
        pick = np.argmin(work, axis=1)  # (n,)
        order[:, i] = pick
        work[rows, pick] = np.inf
    return order


def _search_block(x: Array, subtracted: Sequence[Array], beam_size: int, normalise: bool, weights: Any) -> Array:
    """Beam search over the rows of one block; the codes (n, Q) of each row's best final beam."""
    xp = B.get_namespace(x)
    n, D = x.shape
    device = B.get_device(x)
    R = xp.reshape(x, (n, 1, D))  # residual of every beam  (n, b_in, D)
    S = xp.zeros((n, 1), dtype=x.dtype, device=device)  # cumulative score of every beam  (n, b_in)
    history = xp.zeros((n, 1, 0), dtype=xp.int64, device=device)  # codes of every beam  (n, b_in, l)
    first_row = xp.arange(n, dtype=xp.int64, device=device)[:, None]  # (n, 1)
    for level, C in enumerate(subtracted):
        K, b_in = C.shape[0], R.shape[1]
        # 1. The error of every candidate (beam j, code k): (2), or (3)'s per-depth term.
        flat_R = xp.reshape(R, (n * b_in, D))  # (n b_in, D)
        A = l2norm(flat_R) if normalise else flat_R
        E = xp.reshape(squared_distance_forward(A, C)[0], (n, b_in, K))  # (n, b_in, K)
        score = E if weights is None else S[:, :, None] + weights[level] * E  # (n, b_in, K)
        # 2. Keep the b best; the stable sort breaks ties by (beam, code), lowest first.
        flat = xp.reshape(score, (n, b_in * K))  # (n, b_in K), candidate j * K + k
        b_out = min(beam_size, b_in * K)
        order = best_candidates(flat, b_out)  # (n, b_out), best first
        parent, code = order // K, order % K  # (n, b_out) each
        rows = xp.reshape(first_row * b_in + parent, (-1,))  # (n b_out,) the parents in flat_R
        # 3. The survivors' residuals, scores and codes.
        picked = xp.take(C, xp.reshape(code, (-1,)), axis=0)  # (n b_out, D)
        R = xp.reshape(xp.take(flat_R, rows, axis=0) - picked, (n, b_out, D))  # r - c_{l,k}
        S = xp.take_along_axis(flat, order, axis=1)  # (n, b_out)
        kept = xp.reshape(xp.take(xp.reshape(history, (n * b_in, level)), rows, axis=0), (n, b_out, level))
        history = xp.concat([kept, code[:, :, None]], axis=2)  # (n, b_out, l + 1)
    return history[:, 0, :]  # (n, Q): beams are sorted, the first is the best


def beam_search_codes(
    x: Array,
    codebooks: Any,
    beam_size: int,
    *,
    use_cosine_sim: bool = False,
    score: str = "error",
    score_weights: Sequence[float] | None = None,
    chunk_size: int | None = None,
) -> Array:
    """The plain beam search: each row's best final beam, (N, Q) int64 (no greedy safeguard).

    Parameters
    ----------
    x : (N, D) float
    codebooks : Q arrays (K_l, D) of x's library and dtype, or one (Q, K, D) array; for cosine
        codebooks the raw codes (their l2-normalised rows are subtracted, as residual VQ does)
    beam_size : b >= 1, partial codes kept per row (b = 1: greedy, up to near ties)
    use_cosine_sim : cosine codebooks (unit codes; with ``score="cumulative"`` the per-depth error
        is taken on the l2-normalised residual, as vector-quantize-pytorch's commitment term is)
    score : ``"error"`` (2), the partial reconstruction error, or ``"cumulative"`` (3)
    score_weights : Q weights w_l >= 0 of (3) (default all 1); only with ``score="cumulative"``
    chunk_size : rows per block (default :func:`default_beam_chunk`)

    Returns
    -------
    codes : (N, Q) int64
    """
    cbs, beam_size, weights, chunk = _check_inputs(
        x, codebooks, beam_size, use_cosine_sim, score, score_weights, chunk_size
    )
    xp = B.get_namespace(x)
    N, D = x.shape
    subtracted = _subtracted(cbs, use_cosine_sim)
    normalise = use_cosine_sim and score == "cumulative"
    step = chunk or default_beam_chunk(beam_size, max(c.shape[0] for c in cbs), D)
    blocks = [
        _search_block(x[start : min(start + step, N), :], subtracted, beam_size, normalise, weights)
        for start in range(0, N, step)
    ]
    if not blocks:  # N = 0
        return xp.zeros((0, len(cbs)), dtype=xp.int64, device=B.get_device(x))
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)


def residual_encode_beam(
    x: Array,
    codebooks: Any,
    beam_size: int,
    *,
    use_cosine_sim: bool = False,
    score: str = "error",
    score_weights: Sequence[float] | None = None,
    chunk_size: int | None = None,
) -> BeamEncoding:
    """Residual codes by beam search; with ``score="error"`` never worse than greedy, row by row.

    Parameters are those of :func:`beam_search_codes`.  ``beam_size=1`` returns the greedy codes
    of :func:`residual_encode_greedy` themselves (the search of width one is greedy encoding;
    taking greedy's codes keeps near ties resolved exactly as the quantizers resolve them).

    Returns
    -------
    BeamEncoding
        codes (N, Q) int64 -- ``score="error"``: per row the search's code where it reconstructs
        strictly better than the greedy code, else the greedy code; ``"cumulative"``: the search's
        codes.  errors (N,) their squared reconstruction errors; search_errors (N,) those of the
        search's codes; greedy_errors (N,) those of the greedy codes.  All errors are
        :func:`reconstruction_errors`, in x's dtype.
    """
    cbs, beam_size, _, _ = _check_inputs(x, codebooks, beam_size, use_cosine_sim, score, score_weights, chunk_size)
    xp = B.get_namespace(x)
    greedy = residual_encode_greedy(x, cbs, use_cosine_sim=use_cosine_sim, chunk_size=chunk_size)  # (N, Q)
    greedy_errors = reconstruction_errors(x, cbs, greedy, use_cosine_sim=use_cosine_sim)  # (N,)
    if beam_size == 1:
        return BeamEncoding(greedy, greedy_errors, greedy_errors, greedy_errors)
    options = dict(use_cosine_sim=use_cosine_sim, score=score, score_weights=score_weights, chunk_size=chunk_size)
    found = beam_search_codes(x, cbs, beam_size, **options)  # (N, Q)
    search_errors = reconstruction_errors(x, cbs, found, use_cosine_sim=use_cosine_sim)  # (N,)
    if score == "cumulative":
        return BeamEncoding(found, search_errors, search_errors, greedy_errors)
    better = search_errors < greedy_errors  # (N,) strictly: a tie keeps the greedy code
    codes = xp.where(better[:, None], found, greedy)  # (N, Q)
    errors = xp.where(better, search_errors, greedy_errors)  # (N,)
    return BeamEncoding(codes, errors, search_errors, greedy_errors)
