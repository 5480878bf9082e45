"""Beam-search encoding in ResidualVQ (``beam_size``, ``eval_beam_size``, ``beam_score``).

The codes must be the search's of :mod:`vqref.core.beam` on the module's codebooks (computed here
by calling the search directly), the forward and backward those of the greedy stack with these
codes held fixed (torch autograd), the EMA step the one of these codes, and the error score never
worse than greedy.  ``ResidualClustering.to_residual_vq`` encodes as ``predict``.
"""

from __future__ import annotations

import numpy as np
import pytest

from vqref import ResidualClustering, ResidualVQ
from vqref import backend as B
from vqref.core.beam import beam_search_codes, reconstruction_errors, residual_encode_beam
from vqref.testing.torch_reference.layer import layer_grads

D, K, Q = 4, 6, 3
N = 40


def host(a):
    return np.asarray(B.to_numpy(a))


def codebooks(rq, dtype=None):
    return [B.from_numpy(host(layer.codebook), rq.xp, dtype=dtype or rq.dtype) for layer in rq.layers]


@pytest.mark.parametrize("score", ["cumulative", "error"])
@pytest.mark.parametrize("cosine", [False, True])
def test_eval_codes_are_the_searchs(bk, rng, score, cosine):
    rq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0, dtype=bk.dtype_name, xp=bk.module,
                    beam_size=2, eval_beam_size=4, beam_score=score, use_cosine_sim=cosine)  # fmt: skip
    rq.eval()
    x = bk.asarray(rng.standard_normal((N, D)) * 0.1)
    q, idx, _ = rq(x)
    cbs = codebooks(rq, x.dtype)
    if score == "cumulative":
        expected = beam_search_codes(x, cbs, 4, use_cosine_sim=cosine, score="cumulative")
    else:
        expected = residual_encode_beam(x, cbs, 4, use_cosine_sim=cosine, score="error").codes
    np.testing.assert_array_equal(host(idx), host(expected))
    np.testing.assert_allclose(host(rq.get_output_from_indices(idx)), host(q), rtol=bk.rtol, atol=bk.rtol)
    greedy = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0, dtype=bk.dtype_name, xp=bk.module,
                        use_cosine_sim=cosine).eval()(x)[1]  # fmt: skip
    assert not np.array_equal(host(idx), host(greedy))  # the search changed some codes
    if score == "error":  # never worse than greedy, row by row
        mine = host(reconstruction_errors(x, cbs, idx, use_cosine_sim=cosine))
        theirs = host(reconstruction_errors(x, cbs, greedy, use_cosine_sim=cosine))
        assert np.all(mine <= theirs)


def test_width_one_is_greedy(rng):
    x = rng.standard_normal((N, D))
    a = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0, beam_size=1)
    b = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0)
    for _ in range(2):
        for m in (a, b):
            m(x)
    assert all(np.array_equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("kw", [dict(), dict(learnable_codebook=True, ema_update=False, rotation_trick=True),
                                dict(codebook_dim=3, use_cosine_sim=True, threshold_ema_dead_code=0.5)],
                         ids=["ema", "learnable-rotation", "projection-cosine-dead"])  # fmt: skip
def test_training_with_beam_codes(rng, kw):
    rq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0, dtype="float64", beam_size=3, decay=0.7,
                    **kw)  # fmt: skip
    state = {k: host(v).copy() for k, v in rq.state_dict().items()}
    x, dq = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    q, idx, losses = rq(x)
    dx = rq.backward(dq, np.array([0.5, 1.0, 1.5]))
    proj = None
    z = x
    if rq.has_projections:
        proj = {"W_in": state["project_in.W"], "b_in": state["project_in.b"], "W_out": state["project_out.W"],
                "b_out": state["project_out.b"]}  # fmt: skip
        z = x @ proj["W_in"] + proj["b_in"]
    books = [state[f"{level}.codebook"] for level in range(Q)]
    expected = beam_search_codes(z, books, 3, use_cosine_sim=rq.use_cosine_sim, score="cumulative")
    np.testing.assert_array_equal(idx, expected)  # the codes of the search
    opts = {k: kw[k] for k in ("use_cosine_sim", "rotation_trick", "learnable_codebook") if k in kw}
    ref_q, ref_losses, ref_dx, ref_dcb, _ = layer_grads(x, books, idx, dq, np.array([0.5, 1.0, 1.5]),
                                                         projections=proj, **opts)  # fmt: skip
    np.testing.assert_allclose(q, ref_q, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-12)
    if rq.learnable_codebook:
        for level in range(Q):
            np.testing.assert_allclose(rq.grads[f"{level}.codebook"], ref_dcb[level], rtol=1e-10, atol=1e-12)
    if rq.ema_update:  # the EMA counts follow the search's codes
        for level in range(Q):
            counts = np.bincount(idx[:, level], minlength=K)
            expected_counts = state[f"{level}.cluster_size"] + 0.3 * (counts - state[f"{level}.cluster_size"])
            if rq.threshold_ema_dead_code > 0:
                keep = expected_counts >= rq.threshold_ema_dead_code
            else:
                keep = np.ones(K, dtype=bool)
            np.testing.assert_allclose(rq.layers[level].cluster_size[keep], expected_counts[keep], rtol=1e-12)


def test_beam_with_dropout_and_a_mask(rng):
    rq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=3, dtype="float64", beam_size=3,
                    quantize_dropout=True, quantize_dropout_per_sample=True, beam_score="error")  # fmt: skip
    books = [host(layer.codebook).copy() for layer in rq.layers]
    x = rng.standard_normal((8, 5, D))
    mask = rng.random((8, 5)) < 0.7
    _, idx, _ = rq(x, mask=mask)
    assert np.all(idx[~mask] == -1)
    for b in range(8):  # each sample's present tokens are searched over the depths it reaches
        rows = mask[b]
        if not rows.any():
            continue
        depth = int((idx[b][rows] >= 0).sum(-1)[0])
        expected = residual_encode_beam(x[b][rows], books[:depth], 3, score="error").codes
        np.testing.assert_array_equal(idx[b][rows][:, :depth], expected)


@pytest.mark.parametrize("kw, name", [
    (dict(beam_size=2, stochastic_sample_codes=True), "stochastic_sample_codes"),
    (dict(beam_size=2, straight_through=True), "straight_through"),
    (dict(eval_beam_size=2), "eval_beam_size needs beam_size"),
    (dict(beam_size=2, beam_score_quantizer_weights=[1.0, 2.0]), "one weight per depth"),
    (dict(beam_size=2, beam_score="error", beam_score_quantizer_weights=[1.0] * Q), "beam_score='cumulative'"),
    (dict(beam_size=2, beam_score="best"), "beam_score"),
    (dict(beam_size=0), "beam_size"),
])  # fmt: skip
def test_bad_beam_options_are_refused(kw, name):
    with pytest.raises(ValueError, match=name):
        ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, **kw)


def test_residual_clustering_to_residual_vq_encodes_as_predict(rng):
    X = rng.standard_normal((200, D))
    rc = ResidualClustering(Q, K, beam_size=4, seed=0).fit(X)
    rq = rc.to_residual_vq()
    assert rq.eval_beam_size == 4 and rq.beam_score == "error" and rq.beam_size == 1
    _, idx, _ = rq(X)
    np.testing.assert_array_equal(idx, rc.predict(X))
    greedy = ResidualClustering(Q, K, seed=0).fit(X).to_residual_vq()
    assert greedy.eval_beam_size is None
