"""Beam-search residual encoding: the search, its guarantee, its gradients, clustering, conformance.

Symbols: N rows, D features, K codes per depth, Q depths, b beam width.  Sizes are distinct
(N != K != D != Q) so that a transposition is a shape error, not a wrong number.

Oracles are written here on the host in float64, independently of the code under test: a
brute-force search over all K^Q code tuples, a greedy residual encoder by direct differences,
and hand-made examples whose answers follow from the documented rules.  Gradients with
beam-selected codes are checked against the torch autograd reference; the ``cumulative`` score
against vector-quantize-pytorch's own ``beam_size`` search.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from vqref import backend as B
from vqref.cluster import ResidualClustering
from vqref.core.beam import (
    beam_search_codes,
    best_candidates,
    best_candidates_argmin,
    best_candidates_portable,
    reconstruction_errors,
    residual_encode_beam,
    residual_encode_greedy,
)
from vqref.core.residual import residual_backward, residual_forward
from vqref.testing import rel_error
from vqref.testing.torch_reference.residual import residual_vq_grads

N, D, K, Q = 23, 5, 7, 3


# ------------------------------------------------------------------------------------ oracles


def _unit(a):
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6)


def np_greedy(x, codebooks, cosine=False):
    """Greedy residual codes and final errors by direct differences (float64)."""
    r = np.asarray(x, dtype=np.float64).copy()
    codes = []
    for C in codebooks:
        C = np.asarray(C, dtype=np.float64)
        Cs = _unit(C) if cosine else C
        if cosine:
            k = np.argmax(_unit(r) @ Cs.T, axis=1)
        else:
            k = np.argmin(((r[:, None, :] - C[None]) ** 2).sum(-1), axis=1)
        r = r - Cs[k]
        codes.append(k)
    return np.stack(codes, axis=1), (r**2).sum(1)


def np_errors(x, codebooks, codes, cosine=False):
    """||x - sum_l c_l[k_l]||^2 per row, float64 (unit codes subtracted for cosine)."""
    r = np.asarray(x, dtype=np.float64).copy()
    for level in range(codes.shape[1]):
        C = np.asarray(codebooks[level], dtype=np.float64)
        r = r - (_unit(C) if cosine else C)[codes[:, level]]
    return (r**2).sum(1)


def brute_force(x, codebooks, weights=None, cosine=False):
    """Every tuple's objective (N, K^Q): the final error ||r_Q||^2 (weights None), or the
    cumulative score sum_l w_l ||r^_l - c^_l||^2 (r^ = l2(r) for cosine).  Cosine codebooks
    subtract their unit codes."""
    sizes = [c.shape[0] for c in codebooks]
    tuples = np.array(list(itertools.product(*[range(k) for k in sizes])))  # (T, Q)
    objective = np.zeros((x.shape[0], len(tuples)))
    r = np.repeat(np.asarray(x, dtype=np.float64)[:, None, :], len(tuples), axis=1)  # (N, T, D)
    for level, C in enumerate(codebooks):
        C = np.asarray(C, dtype=np.float64)
        c = (_unit(C) if cosine else C)[tuples[:, level]][None]  # (1, T, D)
        if weights is not None:
            objective += weights[level] * (((_unit(r) if cosine else r) - c) ** 2).sum(-1)
        r = r - c
    if weights is None:
        objective = (r**2).sum(-1)
    return tuples, objective


def random_problem(rng, n=N, d=D, sizes=(K,) * Q):
    x = rng.standard_normal((n, d))
    cbs = [rng.standard_normal((k, d)) * 0.6**level for level, k in enumerate(sizes)]
    return x, cbs


def on(bk, x, cbs):
    return bk.asarray(x), [bk.asarray(c) for c in cbs]


# ---------------------------------------------------------------------------- beam = 1, greedy


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_beam_of_one_is_greedy_encoding(bk, rng, cosine):
    x, cbs = random_problem(rng)
    X, C = on(bk, x, cbs)
    enc = residual_encode_beam(X, C, 1, use_cosine_sim=cosine)
    out, _ = residual_forward(X, C, use_cosine_sim=cosine)
    np.testing.assert_array_equal(bk.np(enc.codes), bk.np(out.indices))
    assert enc.codes.dtype == bk.xp.int64 and enc.errors.dtype == bk.dtype and enc.codes.shape == (N, Q)
    np.testing.assert_array_equal(bk.np(enc.errors), bk.np(enc.greedy_errors))
    # the plain search of width one makes greedy's choices (random data: no near ties)
    np.testing.assert_array_equal(bk.np(beam_search_codes(X, C, 1, use_cosine_sim=cosine)), bk.np(out.indices))
    np.testing.assert_array_equal(
        bk.np(beam_search_codes(X, C, 1, use_cosine_sim=cosine, score="cumulative")), bk.np(out.indices)
    )
    ref_codes, ref_err = np_greedy(x, cbs, cosine)
    np.testing.assert_array_equal(bk.np(enc.codes), ref_codes)
    np.testing.assert_allclose(bk.np(enc.errors), ref_err, rtol=bk.rtol * 10)


# ------------------------------------------------------------------------ exhaustive search


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
@pytest.mark.parametrize("score", ["error", "cumulative"])
def test_wide_enough_beam_is_exhaustive(bk, score, cosine):
    # K = 3, Q = 3: with b = K^(Q-1) = 9 no partial code is dropped before the last depth
    rng = np.random.default_rng(5)
    x, cbs = random_problem(rng, n=40, d=4, sizes=(3, 3, 3))
    weights = [1.0, 0.5, 2.0] if score == "cumulative" else None
    tuples, objective = brute_force(x, cbs, weights, cosine)
    best = np.argmin(objective, axis=1)
    srt = np.sort(objective, axis=1)
    clear = srt[:, 1] - srt[:, 0] > 1e-3  # rows whose optimum is unambiguous in float32 too
    assert clear.sum() > 30
    X, C = on(bk, x, cbs)
    opts = dict(score=score, score_weights=weights, use_cosine_sim=cosine)
    codes = bk.np(beam_search_codes(X, C, 9, **opts))
    np.testing.assert_array_equal(codes[clear], tuples[best][clear])
    if score == "error":
        enc = residual_encode_beam(X, C, 9, use_cosine_sim=cosine)
        np.testing.assert_allclose(bk.np(enc.errors), srt[:, 0], rtol=bk.rtol * 10, atol=1e-12 if bk.is64 else 1e-5)
    # negative control: a narrow beam misses the optimum on some rows of the same data
    narrow = bk.np(beam_search_codes(X, C, 2, **opts))
    assert np.any(np.any(narrow != tuples[best], axis=1) & clear)


# ----------------------------------------------------------------------- the greedy guarantee


@fuzz_settings(ci=30, nightly=400)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 30),
    d=st.integers(1, 6),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    beam=st.integers(1, 12),
    scale=st.floats(0.05, 20.0),
    cosine=st.booleans(),
)
def test_never_worse_than_greedy(seed, n, d, sizes, beam, scale, cosine):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)) * scale
    cbs = [g.standard_normal((k, d)) * scale * g.uniform(0.2, 1.0) ** level for level, k in enumerate(sizes)]
    enc = residual_encode_beam(x, cbs, beam, use_cosine_sim=cosine)
    codes = np.asarray(enc.codes)
    assert codes.shape == (n, len(sizes)) and np.all((codes >= 0) & (codes < np.array(sizes)))
    _, greedy_err = np_greedy(x, cbs, cosine)
    err = np_errors(x, cbs, codes, cosine)  # the returned codes' error, recomputed here
    np.testing.assert_allclose(enc.errors, err, rtol=1e-9, atol=1e-12 * scale**2)
    assert np.all(err <= greedy_err * (1 + 1e-9) + 1e-12 * scale**2)
    assert np.all(enc.errors <= enc.greedy_errors) and np.all(enc.errors <= enc.search_errors)


def _embed(values, d=3):
    """1-D values as rows of a d-D array (the other coordinates 0): sizes stay distinct."""
    out = np.zeros((len(values), d))
    out[:, 0] = values
    return out


def test_beam_strictly_improves_on_a_constructed_example(bk):
    # x = 0.  Greedy takes 1.0 then -0.95 (error 0.05^2); the pair 1.1, -1.1 is exact.
    x = np.zeros((1, 3))
    cbs = [_embed([1.0, 1.1, 3.0]), _embed([-1.1, -0.95, 3.0])]
    X, C = on(bk, x, cbs)
    enc = residual_encode_beam(X, C, 2)
    assert bk.np(enc.greedy_errors)[0] == pytest.approx(0.0025, rel=1e-4)
    np.testing.assert_array_equal(bk.np(residual_encode_greedy(X, C)), [[0, 1]])
    np.testing.assert_array_equal(bk.np(enc.codes), [[1, 0]])
    assert bk.np(enc.errors)[0] == 0.0 and bk.np(enc.search_errors)[0] == 0.0


def test_greedy_safeguard_when_the_search_prunes_the_greedy_prefix(bk):
    # x = 0, b = 2.  Depth 0 keeps 1.0 and 1.01; at depth 1 both children of 1.01 beat greedy's
    # continuation (1.0, -1.008), which is dropped, yet greedy's third code cancels it exactly.
    x = np.zeros((1, 3))
    cbs = [_embed([1.0, 1.01, 3.0]), _embed([-1.008, -1.012, 3.0]), _embed([0.008, 3.0, -3.0])]
    X, C = on(bk, x, cbs)
    enc = residual_encode_beam(X, C, 2)
    assert np_errors(x, cbs, np.array([[0, 0, 0]]))[0] < 1e-20
    np.testing.assert_array_equal(bk.np(beam_search_codes(X, C, 2)), [[1, 1, 0]])  # least partial errors
    assert bk.np(enc.search_errors)[0] > 3e-5  # the search lost
    np.testing.assert_array_equal(bk.np(enc.codes), [[0, 0, 0]])  # the safeguard
    assert bk.np(enc.errors)[0] == bk.np(enc.greedy_errors)[0]
    # a tie keeps greedy's code: here the search's (1, 0, 1) and greedy's (0, 0, 0) both leave
    # exactly 0.25^2 (every number is a dyadic fraction, so the errors are exact)
    cbs = [np.array([[1.0, 0.0], [0.0, 1.5]]), np.array([[0.0, -1.25], [0.0, -1.75], [-1.0, 2.0]])]
    cbs.append(np.array([[-1.0, 1.0], [0.0, -0.5]]))
    X, C = on(bk, np.zeros((1, 2)), cbs)
    enc = residual_encode_beam(X, C, 2)
    np.testing.assert_array_equal(bk.np(beam_search_codes(X, C, 2)), [[1, 0, 1]])
    assert bk.np(enc.search_errors)[0] == bk.np(enc.greedy_errors)[0] == 0.0625
    np.testing.assert_array_equal(bk.np(enc.codes), [[0, 0, 0]])


def test_cumulative_score_can_lose_to_greedy_and_keeps_its_path(bk):
    # x = 0, b = 2, the codes 2-D.  Greedy: a = (1, 0), u, v reconstructs x exactly, but its
    # depth-1 error 1.81 makes its cumulative score 2.81; b = (0, 1.02), u, w scores 1.055 and
    # leaves 0.02^2.  vector-quantize-pytorch's score returns the latter.
    x = np.zeros((1, 2))
    cbs = [np.array([[1.0, 0.0], [0.0, 1.02]]), np.array([[0.0, -0.9]]), np.array([[-1.0, 0.9], [0.0, -0.1]])]
    X, C = on(bk, x, cbs)
    enc = residual_encode_beam(X, C, 2, score="cumulative")
    np.testing.assert_array_equal(bk.np(residual_encode_greedy(X, C)), [[0, 0, 0]])
    np.testing.assert_array_equal(bk.np(enc.codes), [[1, 0, 1]])
    assert bk.np(enc.errors)[0] == pytest.approx(4e-4, rel=1e-3) and bk.np(enc.greedy_errors)[0] < 1e-12
    # the error score on the same problem finds the exact code
    np.testing.assert_array_equal(bk.np(residual_encode_beam(X, C, 2).codes), [[0, 0, 0]])


# -------------------------------------------------------------------------------------- ties


@pytest.mark.parametrize("score", ["error", "cumulative"])
def test_ties_go_to_the_lower_beam_then_the_lower_code(bk, score):
    # x = 0 lies at distance 1 from all four depth-0 codes: b = 2 keeps codes 0 and 1.  Only the
    # path through code 2 is exact, so the kept pair decides the answer.
    x = np.zeros((1, 2))
    C0 = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    C1 = np.array([[1.0, 0.0], [3.0, 3.0]])
    X, C = on(bk, x, [C0, C1])
    np.testing.assert_array_equal(bk.np(residual_encode_beam(X, C, 2, score=score).codes), [[1, 0]])
    np.testing.assert_array_equal(bk.np(residual_encode_beam(X, C, 3, score=score).codes), [[2, 0]])
    # a final tie between two beams: (0, 0) and (1, 1) both reconstruct x exactly
    C0, C1 = np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([[-1.0, 0.0], [1.0, 0.0]])
    X, C = on(bk, x, [C0, C1])
    np.testing.assert_array_equal(bk.np(beam_search_codes(X, C, 2, score=score)), [[0, 0]])
    # a tie between equal codes of one depth: the lower code
    C1 = np.array([[2.0, 2.0], [-1.0, 0.0], [-1.0, 0.0]])
    X, C = on(bk, x, [C0, C1])
    np.testing.assert_array_equal(bk.np(beam_search_codes(X, C, 2, score=score)), [[0, 1]])


# ------------------------------------------------------------------- selection: the fast path


def test_argmin_selection_is_the_stable_sort(bk):
    rng = np.random.default_rng(4)
    for scores in (
        rng.standard_normal((9, 13)),
        np.round(rng.standard_normal((9, 13)) * 2) / 2,  # many ties
        np.zeros((3, 6)),  # all tied
    ):
        S = bk.asarray(scores)
        for count in (1, 2, 5, 13 if scores.shape[1] == 13 else 6):
            ref = np.argsort(scores, axis=1, kind="stable")[:, :count]  # numpy's own stable sort
            np.testing.assert_array_equal(bk.np(best_candidates_portable(S, count)), ref)
            np.testing.assert_array_equal(best_candidates_argmin(bk.np(S), count), ref)
            np.testing.assert_array_equal(bk.np(best_candidates(S, count)), ref)
    # a score of +inf (overflow) or NaN: the fast path would take a covered pick again (or NaN
    # first); the choice sends such scores to the definition
    scores = np.array([[np.inf, 1.0, np.inf, 0.0], [2.0, np.nan, 1.0, 3.0]])
    np.testing.assert_array_equal(best_candidates(scores, 4), [[3, 1, 0, 2], [2, 0, 3, 1]])
    assert list(best_candidates_argmin(scores, 4)[0]) != [3, 1, 0, 2]  # why the choice matters


# ------------------------------------------------------------------------- shapes and options


def test_backends_agree_and_options_work(bk, rng):
    x, cbs = random_problem(rng, sizes=(K, 3, 5))  # a different K per depth
    X, C = on(bk, x, cbs)
    for kw in (dict(), dict(use_cosine_sim=True), dict(score="cumulative", score_weights=[0.5, 1.0, 2.0])):
        ref = residual_encode_beam(x, cbs, 4, **kw)
        enc = residual_encode_beam(X, C, 4, **kw)
        assert B.library_name(enc.codes) == bk.name and enc.errors.dtype == bk.dtype
        np.testing.assert_array_equal(bk.np(enc.codes), ref.codes)
        np.testing.assert_allclose(bk.np(enc.errors), ref.errors, rtol=bk.rtol * 10)
        # chunked rows give the same codes
        for chunk in (1, 5):
            np.testing.assert_array_equal(bk.np(residual_encode_beam(X, C, 4, chunk_size=chunk, **kw).codes), ref.codes)


def test_stacked_codebooks_empty_input_and_no_mutation(rng):
    x, cbs = random_problem(rng)
    before = [a.copy() for a in [x, *cbs]]
    enc = residual_encode_beam(x, np.stack(cbs), 3)  # one (Q, K, D) array
    np.testing.assert_array_equal(enc.codes, residual_encode_beam(x, cbs, 3).codes)
    for a, b in zip([x, *cbs], before):
        np.testing.assert_array_equal(a, b)
    empty = residual_encode_beam(np.zeros((0, D)), cbs, 3)
    assert empty.codes.shape == (0, Q) and empty.errors.shape == (0,)
    assert beam_search_codes(np.zeros((0, D)), cbs, 3).shape == (0, Q)
    # a prefix of the codes gives the coarser reconstruction's error
    np.testing.assert_allclose(reconstruction_errors(x, cbs, enc.codes[:, :1]), np_errors(x, cbs, enc.codes[:, :1]))


def test_zero_residuals_and_degenerate_codebooks_give_no_nan():
    x = np.zeros((4, D))
    cbs = [np.zeros((3, D)), np.ones((1, D))]  # all codes equal; K = 1
    for cosine in (False, True):
        for score in ("error", "cumulative"):
            enc = residual_encode_beam(x, cbs, 5, use_cosine_sim=cosine, score=score)
            assert np.all(np.isfinite(enc.errors)) and np.all(enc.codes[:, 0] == 0)


BAD = [
    (dict(beam_size=0), ValueError, "beam_size must be >= 1"),
    (dict(beam_size=2.0), TypeError, "beam_size must be an integer"),
    (dict(score="best"), ValueError, "score must be one of"),
    (dict(score_weights=[1.0, 1.0, 1.0]), ValueError, "score='cumulative'"),
    (dict(score="cumulative", score_weights=[1.0, 1.0]), ValueError, "one weight per depth (3)"),
    (dict(score="cumulative", score_weights=[1.0, -1.0, 1.0]), ValueError, "score_weights[1] must be >= 0"),
    (dict(use_cosine_sim="yes"), TypeError, "use_cosine_sim must be True or False"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(x=np.zeros(D)), ValueError, "x must be a 2-D float array"),
    (dict(x=np.zeros((N, D), dtype=np.int64)), ValueError, "x must be a 2-D float array"),
    (dict(codebooks=[]), TypeError, "non-empty list"),
    (dict(codebooks=np.zeros((K, D))), ValueError, "one (Q, K, D) array"),
    (dict(codebooks=[np.zeros((K, D)), np.zeros((K, D + 1))]), ValueError, "codebooks[1] must have shape (K, 5)"),
    (dict(codebooks=[np.zeros((0, D))]), ValueError, "with K >= 1"),
    (dict(codebooks=[np.zeros((K, D), dtype=np.float32)]), TypeError, "codebooks[0] has dtype float32"),
    (dict(codebooks=[[[0.0] * D]]), TypeError, "codebooks[0] must be an array"),
]


@pytest.mark.parametrize("change,error,match", BAD)
@pytest.mark.parametrize("fn", [residual_encode_beam, beam_search_codes])
def test_bad_arguments_are_refused_by_name(rng, fn, change, error, match):
    x, cbs = random_problem(rng)
    args = dict(x=x, codebooks=cbs, beam_size=3) | change
    with pytest.raises(error, match=re.escape(match)):
        fn(args.pop("x"), args.pop("codebooks"), args.pop("beam_size"), **args)


def test_mixed_libraries_are_refused(rng):
    import array_api_strict as xs

    x, cbs = random_problem(rng)
    with pytest.raises(TypeError, match="different libraries"):
        residual_encode_beam(xs.asarray(x), cbs, 2)


# ------------------------------------------------------------------ gradients with beam codes


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(routing="sum"),
        dict(use_cosine_sim=True, rotation_trick=True),
        dict(learnable_codebook=True, commitment_weight=0.3),
    ],
    ids=["per-depth-ste", "sum", "cosine-rotation", "learnable"],
)
def test_gradients_with_beam_codes_match_torch_autograd(bk64, options):
    options = dict(options)  # the parameter is shared between the backends
    rng = np.random.default_rng(7)
    x, cbs = random_problem(rng)
    cosine = options.get("use_cosine_sim", False)
    codes = np.asarray(residual_encode_beam(x, cbs, 4, use_cosine_sim=cosine).codes)
    greedy = np_greedy(x, cbs, cosine)[0]
    assert np.any(codes != greedy)  # the beam chose other codes on some rows
    g, dl = rng.standard_normal((N, D)), rng.standard_normal(Q)
    X, C = on(bk64, x, cbs)
    out, cache = residual_forward(X, C, indices=bk64.asarray(codes), **options)
    dx, dcbs = residual_backward(bk64.asarray(g), bk64.asarray(dl), cache)
    routing = options.pop("routing", "per_depth")
    q_ref, losses_ref, dx_ref, dcb_ref = residual_vq_grads(x, cbs, codes, g, dl, routing=routing, **options)
    assert rel_error(bk64.np(out.quantized), q_ref) < 1e-12
    assert rel_error(bk64.np(out.losses), losses_ref) < 1e-12
    assert rel_error(bk64.np(dx), dx_ref) < 1e-10
    for level in range(Q):
        if dcbs[level] is None:
            assert np.all(dcb_ref[level] == 0)
        else:
            assert rel_error(bk64.np(dcbs[level]), dcb_ref[level]) < 1e-10
    # negative controls: the reference with greedy's codes, and a backward that drops one
    # depth's estimator contribution, both disagree
    _, _, dx_greedy, _ = residual_vq_grads(x, cbs, greedy, g, dl, routing=routing, **options)
    assert rel_error(bk64.np(dx), dx_greedy) > 1e-6
    assert rel_error(bk64.np(dx) - g, dx_ref) > 1e-3


# ---------------------------------------------------------------------------- clustering


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_residual_clustering_encodes_with_the_beam(bk, rng, cosine):
    x = rng.standard_normal((60, D)) * rng.uniform(0.5, 2.0, size=D)
    X = bk.asarray(x)
    greedy = ResidualClustering(4, 5, iters=5, use_cosine_sim=cosine, seed=0).fit(X)
    beam = ResidualClustering(4, 5, iters=5, use_cosine_sim=cosine, seed=0, beam_size=6).fit(X)
    # the codebooks are fitted greedily in both cases: the same fit
    np.testing.assert_array_equal(bk.np(beam.cluster_centers_), bk.np(greedy.cluster_centers_))
    codebooks = [beam.cluster_centers_[level, ...] for level in range(4)]
    enc = residual_encode_beam(X, codebooks, 6, use_cosine_sim=cosine)
    codes = beam.predict(X)
    np.testing.assert_array_equal(bk.np(codes), bk.np(enc.codes))
    np.testing.assert_array_equal(bk.np(beam.labels_), bk.np(codes))
    np.testing.assert_array_equal(bk.np(greedy.predict(X)), bk.np(greedy.labels_))
    ids = bk.np(codes)
    assert np.any(ids != bk.np(greedy.labels_))  # the beam changed some codes
    np.testing.assert_array_equal(bk.np(beam.counts_), [np.bincount(ids[:, level], minlength=5) for level in range(4)])
    # never worse than greedy, row by row, and the energies describe labels_
    C = bk.np(beam.cluster_centers_)
    err_beam = np_errors(bk.np(X), C, ids, cosine)
    err_greedy = np_errors(bk.np(X), C, bk.np(greedy.labels_), cosine)
    assert np.all(err_beam <= err_greedy * (1 + 1e-5)) and err_beam.sum() < err_greedy.sum()
    tol = 1e-10 if bk.is64 else 1e-4
    for level in range(4):
        expected = np_errors(bk.np(X), C, ids[:, : level + 1], cosine).sum()
        assert beam.inertia_[level] == pytest.approx(expected, rel=tol)
    recon = bk.np(beam.decode(codes)).astype(np.float64)
    np.testing.assert_allclose(((bk.np(X) - recon) ** 2).sum(1), err_beam, rtol=tol, atol=tol)
    assert "beam_size=6" in repr(beam)


@pytest.mark.parametrize("value,error", [(0, ValueError), (True, TypeError), (2.5, TypeError)])
def test_residual_clustering_refuses_a_bad_beam_size(value, error):
    with pytest.raises(error, match="beam_size"):
        ResidualClustering(2, 3, beam_size=value)


# ------------------------------------------------------------------------------- benchmark


def test_bitrate_quality_curve_on_a_small_problem():
    from benchmarks.beam import bitrate_quality, table

    x = np.random.default_rng(3).standard_normal((90, 6))
    curve = bitrate_quality(x, levels=3, codebook_size=4, beam_sizes=(1, 3), seeds=(0, 1), iters=3)
    assert curve["mse"].shape == (2, 2, 3) and list(curve["levels"]) == [1, 2, 3]
    np.testing.assert_allclose(curve["bits"], [2.0, 4.0, 6.0])
    assert np.all(curve["mse"][1] <= curve["mse"][0] + 1e-12)  # never worse than greedy
    assert np.all(np.diff(curve["mse"][0], axis=1) < 0)  # more levels, less error (greedy)
    assert np.all((curve["search_worse"] >= 0) & (curve["search_worse"] <= 1))
    assert table(curve).count("\n") == 4 and "gain b=3" in table(curve)


# ---------------------------------------------------- conformance: vector-quantize-pytorch


def _vqp_rvq(cbs, beam, *, weights=None, **kw):
    """vector-quantize-pytorch's ResidualVQ holding ``cbs`` (float32); the STE unless asked."""
    import torch
    from vector_quantize_pytorch import ResidualVQ as TorchRVQ

    kw.setdefault("rotation_trick", False)  # vector-quantize-pytorch's default is True
    rq = TorchRVQ(
        dim=D, num_quantizers=len(cbs), codebook_size=K, beam_size=beam, beam_score_quantizer_weights=weights, **kw
    )
    with torch.no_grad():
        for layer, c in zip(rq.layers, cbs):
            layer._codebook.embed.copy_(torch.tensor(c, dtype=torch.float32)[None])
    return rq


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
@pytest.mark.parametrize("beam,weights", [(2, None), (4, None), (K, [1.0, 0.5, 2.0])])
def test_cumulative_score_is_vector_quantize_pytorchs_beam_search(cosine, beam, weights):
    import torch

    rng = np.random.default_rng(beam)
    x, cbs = random_problem(rng, n=64)
    cbs = [_unit(c) if cosine else c for c in cbs]
    x32, cbs32 = x.astype(np.float32), [c.astype(np.float32) for c in cbs]
    rq = _vqp_rvq(cbs32, beam, use_cosine_sim=cosine, weights=weights).eval()
    with torch.no_grad():
        _, idx, _ = rq(torch.tensor(x32)[None])
    ours = beam_search_codes(x32, cbs32, beam, score="cumulative", use_cosine_sim=cosine, score_weights=weights)
    np.testing.assert_array_equal(idx[0].numpy(), ours)
    # greedy (beam_size 1) is vector-quantize-pytorch's plain forward
    with torch.no_grad():
        _, idx1, _ = rq(torch.tensor(x32)[None], beam_size=1)
    np.testing.assert_array_equal(idx1[0].numpy(), residual_encode_beam(x32, cbs32, 1, use_cosine_sim=cosine).codes)


@pytest.mark.parametrize(
    "options", [dict(), dict(use_cosine_sim=True), dict(rotation_trick=True)], ids=["ste", "cosine", "rotation"]
)
def test_vqp_training_step_with_beam_codes_matches_residual_forward(options):
    # vector-quantize-pytorch's training forward with beam_size: its indices are the cumulative
    # search's, and its output, losses and input gradient are residual_forward's with those codes
    import torch

    rng = np.random.default_rng(11)
    cosine = options.get("use_cosine_sim", False)
    x, cbs = random_problem(rng, n=64)
    cbs = [(_unit(c) if cosine else c).astype(np.float32) for c in cbs]
    x32 = x.astype(np.float32)
    g = (rng.standard_normal(x.shape) * 2 / x.size).astype(np.float32)  # the loss gradient's scale
    rq = _vqp_rvq(cbs, 4, commitment_weight=0.7, **options).train()
    xt = torch.tensor(x32)[None].requires_grad_()
    q, idx, losses = rq(xt)
    ((q * torch.tensor(g)[None]).sum() + losses.sum()).backward()
    codes = beam_search_codes(x32, cbs, 4, score="cumulative", use_cosine_sim=cosine)
    np.testing.assert_array_equal(idx[0].numpy(), codes)
    out, cache = residual_forward(x32, cbs, indices=codes, commitment_weight=0.7, **options)
    dx, _ = residual_backward(g, np.ones(Q, dtype=np.float32), cache)
    assert rel_error(out.quantized, q[0].detach().numpy()) < 1e-6
    assert rel_error(out.losses, losses.detach().numpy()) < 1e-5
    assert rel_error(dx, xt.grad[0].numpy()) < 1e-5


def test_vqp_beam_wider_than_the_codebook_fails_where_vqref_searches():
    # vector-quantize-pytorch expands the first depth by min(b, K) codes and then cannot stack
    # the beams; vqref keeps min(b, K^l) beams at depth l
    import torch

    rng = np.random.default_rng(2)
    x, cbs = random_problem(rng)
    rq = _vqp_rvq(cbs, K + 2).eval()
    with pytest.raises(RuntimeError), torch.no_grad():
        rq(torch.tensor(x, dtype=torch.float32)[None])
    # vqref: b = K + 2 >= K^1 keeps every depth-1 prefix, so depths 0 and 1 are searched exhaustively
    tuples, objective = brute_force(x, cbs[:2], [1.0, 1.0])
    ours = beam_search_codes(x, cbs[:2], K + 2, score="cumulative")
    np.testing.assert_array_equal(ours, tuples[np.argmin(objective, axis=1)])
