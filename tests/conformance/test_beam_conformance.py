"""Beam-search encoding in ResidualVQ: vqref against vector-quantize-pytorch, step by step.

vqp's ``beam_size`` keeps, per row, the b paths with the least weighted sum of per-depth
commitment errors; vqref's ``beam_score="cumulative"`` is that search (:mod:`vqref.core.beam`),
so the codes, outputs, losses and gradients agree, in training (``beam_size``) and in eval
(``eval_beam_size``), and so does the state of a codebook trained by gradient.  vqp's EMA update
after a beam search reaches the first depth only (docs/deviations.md §14.5): with an EMA
codebook the steps agree on everything but the deeper depths' state, which vqref updates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import ResidualVQ as TorchRVQ

from vqref import backend as B

from .conftest import batch, make_pair
from .options_harness import run_option_steps

D, K, Q = 16, 24, 3
SHAPE = (4, 64, D)

CONFIGS = {
    "learnable": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, beam_size=3, learnable_codebook=True,
                                  ema_update=False, rotation_trick=False),
    "weights, rotation": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, beam_size=4,
                                          beam_score_quantizer_weights=[1.0, 0.5, 2.0], rotation_trick=True,
                                          learnable_codebook=True, ema_update=False),
    "cosine, frozen": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, beam_size=3, use_cosine_sim=True,
                                       ema_update=False, rotation_trick=False),
    "learnable, projection": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, beam_size=2,
                                              codebook_dim=6, learnable_codebook=True, ema_update=False,
                                              rotation_trick=False),
    "shared": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, beam_size=3, shared_codebook=True,
                               learnable_codebook=True, ema_update=False, rotation_trick=False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_beam_steps_agree(name):
    t, r = make_pair(CONFIGS[name], seed=0)
    assert r.beam_size == t.beam_size and r.beam_score == "cumulative"
    rng = np.random.default_rng(1)
    run_option_steps(t, r, lambda: batch(rng, SHAPE), cosine="cosine" in name,
                     lr=None if "frozen" in name else 0.5)  # fmt: skip


def test_eval_beam_codes_agree_and_differ_from_greedy():
    make = lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, beam_size=2, eval_beam_size=5,
                            rotation_trick=False)  # noqa: E731  # fmt: skip
    t, r = make_pair(make, seed=0)
    x = batch(np.random.default_rng(2), (2, 200, D)) * 0.3
    t.eval(), r.eval()
    qt, it, lt = t(torch.from_numpy(x))
    q, idx, losses = r(x)
    np.testing.assert_array_equal(B.to_numpy(idx), it.numpy())
    np.testing.assert_allclose(B.to_numpy(q), qt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(B.to_numpy(losses), lt.detach().numpy(), rtol=1e-5)
    greedy = t.eval()(torch.from_numpy(x), beam_size=1)[1]
    assert not torch.equal(greedy, it)  # the search chose other codes than greedy encoding


def test_vqps_ema_after_a_beam_search_updates_the_first_depth_only():
    # vqp takes the per-depth inputs of its EMA update as ``all_residuals[..., 0, :]``, which picks
    # depth 0 (not beam 0), so its update loop ends after the first depth: the deeper codebooks
    # keep their counts and codes (and their dead codes are never restarted).  vqref updates every
    # depth from the search's codes; depth 0 agrees.
    make = lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, beam_size=3, rotation_trick=False)  # noqa: E731
    t, r = make_pair(make, seed=0)
    x = batch(np.random.default_rng(3), SHAPE)
    before = [layer._codebook.cluster_size.clone() for layer in t.layers]
    _, it, _ = t(torch.from_numpy(x))
    _, idx, _ = r(x)
    np.testing.assert_array_equal(B.to_numpy(idx), it.numpy())
    np.testing.assert_allclose(B.to_numpy(r.layers[0].cluster_size), t.layers[0]._codebook.cluster_size[0].numpy(),
                               rtol=1e-6)  # fmt: skip
    for level in range(1, Q):
        assert torch.equal(t.layers[level]._codebook.cluster_size, before[level])  # vqp: untouched
        counts = np.bincount(B.to_numpy(idx).reshape(-1, Q)[:, level], minlength=K)
        np.testing.assert_allclose(B.to_numpy(r.layers[level].cluster_size), 1 + 0.2 * (counts - 1), rtol=1e-6)


def test_kmeans_with_a_beam_fails_in_vqp_and_clusters_the_greedy_residuals_in_vqref(monkeypatch):
    # vqp would initialise a deeper depth inside its forward on the candidates' residuals, and its
    # k-means fails on their shape; vqref initialises every depth before the search, on the greedy
    # residuals (n rows each).
    import vqref.core.state as state

    make = lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=2, beam_size=3, kmeans_init=True,
                            kmeans_iters=2, rotation_trick=False)  # noqa: E731  # fmt: skip
    t, r = make_pair(make, seed=0)
    x = batch(np.random.default_rng(4), SHAPE, centres=6)
    with pytest.raises(RuntimeError):
        t(torch.from_numpy(x))
    mine = []
    init = state.kmeans_init_state
    monkeypatch.setattr(state, "kmeans_init_state", lambda data, *a, **kw: (mine.append(tuple(data.shape)),
                                                                            init(data, *a, **kw))[1])  # fmt: skip
    r(x)
    n = SHAPE[0] * SHAPE[1]
    assert mine == [(n, D), (n, D)] and all(layer.initted for layer in r.layers)


def test_the_orthogonal_regulariser_sees_the_searchs_codes_in_vqref_and_every_candidates_in_vqp():
    # vqp collects the active codes of the orthogonal regulariser from every candidate of the
    # search (topk), vqref from the codes the search returns.
    from .conftest import host_orthogonal_loss

    make = lambda: TorchRVQ(dim=D, codebook_size=64, num_quantizers=2, beam_size=3, learnable_codebook=True,
                            ema_update=False, orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True,
                            rotation_trick=False)  # noqa: E731  # fmt: skip
    t, r = make_pair(make, seed=0)
    books = [B.to_numpy(layer.codebook).astype(np.float64) for layer in r.layers]
    x = batch(np.random.default_rng(5), (1, 12, D))  # few rows: the search's codes are a few of the 64
    _, it, lt = t(torch.from_numpy(x))
    _, idx, losses = r(x)
    idx = B.to_numpy(idx).reshape(-1, 2)
    np.testing.assert_array_equal(idx, it.numpy().reshape(-1, 2))
    commitment = np.array([float(B.to_numpy(c)) for c in r.last_losses["commitment"]])
    final = np.array([host_orthogonal_loss(books[level], np.unique(idx[:, level])) for level in range(2)])
    np.testing.assert_allclose(B.to_numpy(losses), commitment + final, rtol=1e-4)  # vqref: the search's codes
    assert not np.allclose(lt.detach().numpy(), commitment + final, rtol=1e-4)  # vqp: every candidate's
