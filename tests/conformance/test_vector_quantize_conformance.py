"""VectorQuantize: vqref against vector-quantize-pytorch, step by step (harness in conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import VectorQuantize as TorchVQ

from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

from .conftest import (
    batch,
    compare_step,
    gradients_agree,
    host_orthogonal_loss,
    make_pair,
    near_tie_rows,
    run_steps,
    vqp_draws_like_vqref,
    vqp_step,
    vqref_step,
)

D, K = 32, 64
SHAPE = (4, 128, D)  # N = 512 rows

# name -> (vqp constructor kwargs, learnable-codebook SGD rate or None, clustered data)
CONFIGS = {
    "ema-ste-euclidean": (dict(rotation_trick=False), None, 0),
    "ema-rotation-euclidean": (dict(rotation_trick=True), None, 0),
    "ema-ste-cosine": (dict(rotation_trick=False, use_cosine_sim=True), None, 0),
    "ema-rotation-cosine": (dict(use_cosine_sim=True), None, 0),  # vqp's default estimator
    "ema-decay-eps-commitment": (dict(decay=0.95, eps=1e-3, commitment_weight=0.25, rotation_trick=False), None, 0),
    "frozen-codebook": (dict(ema_update=False, rotation_trick=False), None, 0),
    "learnable-ste": (dict(learnable_codebook=True, ema_update=False, rotation_trick=False), 20.0, 0),
    "learnable-rotation": (dict(learnable_codebook=True, ema_update=False, rotation_trick=True), 20.0, 0),
    "learnable-commitment-0.25": (
        dict(learnable_codebook=True, ema_update=False, rotation_trick=False, commitment_weight=0.25),
        20.0,
        0,
    ),
    "kmeans-euclidean": (dict(kmeans_init=True, kmeans_iters=10), None, 12),
    "kmeans-cosine": (dict(kmeans_init=True, kmeans_iters=10, use_cosine_sim=True), None, 12),
    "orthogonal-learnable": (
        dict(orthogonal_reg_weight=10.0, learnable_codebook=True, ema_update=False, rotation_trick=False),
        20.0,
        0,
    ),
    "orthogonal-frozen-active-max-codes": (
        dict(
            orthogonal_reg_weight=0.5,
            ema_update=False,
            orthogonal_reg_active_codes_only=True,
            orthogonal_reg_max_codes=24,
        ),
        20.0,
        0,
    ),
    "orthogonal-max-codes-ema-off-rotation": (
        dict(orthogonal_reg_weight=1.0, ema_update=False, orthogonal_reg_max_codes=16),
        5.0,
        0,
    ),
    "dead-codes-euclidean": (dict(threshold_ema_dead_code=2.0, rotation_trick=False), None, 0),
    "dead-codes-cosine-kmeans": (
        dict(threshold_ema_dead_code=4.0, use_cosine_sim=True, kmeans_init=True, kmeans_iters=4),
        None,
        6,
    ),
    "dead-codes-without-ema": (dict(threshold_ema_dead_code=1.5, ema_update=False), None, 0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_steps_agree(name):
    kwargs, lr, centres = CONFIGS[name]
    reports = run_steps(lambda: TorchVQ(dim=D, codebook_size=K, **kwargs), steps=4, shape=SHAPE, centres=centres, lr=lr)
    assert sum(r.compared_rows for r in reports) >= 0.99 * 4 * 512  # near ties stay rare


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rotation_trick=True),
        # restarts move codes before the regulariser sees them, and the subset is drawn after
        # the restart candidates in both libraries
        dict(rotation_trick=False, threshold_ema_dead_code=2.0, orthogonal_reg_max_codes=24),
    ],
    ids=["ema", "ema-dead-codes-max-codes"],
)
def test_orthogonal_regulariser_with_ema_loss_and_gradient_agree(kwargs):
    # Both libraries evaluate the regulariser (value and gradient) on the codebook after this
    # step's EMA update: losses and codebook gradients are compared like everything else.
    make = lambda: TorchVQ(dim=D, codebook_size=K, orthogonal_reg_weight=0.5, **kwargs)
    run_steps(make, steps=3, shape=SHAPE)


def test_both_evaluate_the_orthogonal_regulariser_on_the_updated_codebook(rng):
    # The evaluation point, computed independently: the loss is commitment + w * orth(codebook
    # after the EMA step) in both libraries (float64 from the definition), and vqref's codebook
    # gradient is torch autograd's at that codebook, not at the one the batch was quantized with.
    w = 0.5
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, orthogonal_reg_weight=w, rotation_trick=False))
    x = batch(rng, SHAPE)
    before = t._codebook.embed.detach()[0].numpy().copy()
    q, idx, loss, parts = t(torch.from_numpy(x), return_loss_breakdown=True)
    after = t._codebook.embed.detach()[0].numpy()
    assert np.abs(after - before).max() > 1e-3  # the EMA step moved the codes
    loss, commitment = float(loss.detach()), float(parts.commitment.detach())
    assert loss == pytest.approx(commitment + w * host_orthogonal_loss(after), rel=1e-5)
    assert abs(loss - (commitment + w * host_orthogonal_loss(before))) > 1e-5

    np.testing.assert_array_equal(r.codebook, before)
    _, _, loss_r = r(x)
    r.backward(np.zeros_like(x), 1.0)
    after_r = np.asarray(r.codebook, dtype=np.float64)
    np.testing.assert_allclose(after_r, after, rtol=1e-5, atol=1e-7)
    assert float(loss_r) == pytest.approx(commitment + w * host_orthogonal_loss(after_r), rel=1e-5)
    assert float(r.last_losses["orthogonal"]) == pytest.approx(host_orthogonal_loss(after_r), rel=1e-5)
    _, grad_after = orthogonal_loss_reference(after_r, dloss=w)
    _, grad_before = orthogonal_loss_reference(before, dloss=w)
    np.testing.assert_allclose(r.grads["codebook"], grad_after, rtol=1e-4, atol=1e-4 * np.abs(grad_after).max())
    assert not np.allclose(r.grads["codebook"], grad_before, rtol=1e-2, atol=1e-2 * np.abs(grad_after).max())


def test_eval_mode_orthogonal_regulariser_is_on_the_current_codebook(rng):
    # No update in eval mode: the term is evaluated on the codebook the module holds, which it
    # keeps.  (vqp returns loss 0 in eval, test_eval_mode_outputs_agree_and_vqp_returns_a_zero_loss.)
    w = 0.5
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, orthogonal_reg_weight=w, rotation_trick=False))
    r.eval()
    x = batch(rng, SHAPE)
    before = np.array(r.codebook, copy=True)
    q, _, loss = r(x)
    np.testing.assert_array_equal(r.codebook, before)
    commitment = np.mean((x.reshape(-1, D).astype(np.float64) - np.asarray(q, np.float64).reshape(-1, D)) ** 2)
    assert float(loss) == pytest.approx(commitment + w * host_orthogonal_loss(before), rel=1e-5)


def test_eval_mode_outputs_agree_and_vqp_returns_a_zero_loss(rng):
    # Deliberate difference: in eval mode vqp returns loss 0 (no losses are computed), vqref the
    # loss of the batch.  quantized and indices agree, and neither library changes its state.
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, commitment_weight=0.7))
    t.eval()
    r.eval()
    x = batch(rng, SHAPE)
    state_before = {k: v.clone() for k, v in t.state_dict().items()}
    vqp = vqp_step(t, x, None)
    ref = vqref_step(r, x, None)
    np.testing.assert_array_equal(ref.indices, vqp.indices)
    np.testing.assert_allclose(ref.quantized, vqp.quantized, rtol=0, atol=0)  # eval: a gather in both
    assert vqp.losses.shape == (1,) and float(vqp.losses[0]) == 0.0
    xf = x.reshape(-1, D).astype(np.float64)
    expected = 0.7 * np.mean((xf - ref.quantized.astype(np.float64)) ** 2)
    assert float(ref.losses[0]) == pytest.approx(expected, rel=1e-5)
    for k, v in t.state_dict().items():
        assert torch.equal(v, state_before[k])
    np.testing.assert_array_equal(np.asarray(r.codebook), state_before["_codebook.embed"][0].numpy())


def test_the_gradient_comparison_detects_a_wrong_loss_gradient(rng):
    # Negative control: dx computed without the loss's share (dloss = 0) must fail the check
    # that the right dx passes; so must dx without the decoder's share.
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, rotation_trick=True))
    x = batch(rng, SHAPE)
    N = 512
    g = (rng.standard_normal(SHAPE) * (2.0 / (N * D))).astype(np.float32)
    with vqp_draws_like_vqref(t, r, N):
        vqp = vqp_step(t, x, g)
    r_state = r.state_dict()
    q, idx, loss = r(x)
    right = r.backward(g, 1.0).reshape(-1, D)
    assert gradients_agree(right, vqp.dx)
    r.load_state_dict(r_state)
    r(x)
    no_loss = r.backward(g, 0.0).reshape(-1, D)
    assert not gradients_agree(no_loss, vqp.dx)
    r.load_state_dict(r_state)
    r(x)
    no_decoder = r.backward(np.zeros_like(g), 1.0).reshape(-1, D)
    assert not gradients_agree(no_decoder, vqp.dx)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda r: setattr(r, "decay", 0.79),  # a slightly different EMA decay
        lambda r: setattr(r, "commitment_weight", 1.001),  # a slightly different loss weight
        lambda r: setattr(r, "rotation_trick", False),  # the other estimator
    ],
    ids=["decay", "commitment", "estimator"],
)
def test_the_step_comparison_detects_a_different_configuration(rng, corrupt):
    # Negative controls for the harness: a small change on vqref's side must fail compare_step.
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, rotation_trick=True))
    corrupt(r)
    x = batch(rng, SHAPE)
    g = (rng.standard_normal(SHAPE) * (2.0 / (512 * D))).astype(np.float32)
    with vqp_draws_like_vqref(t, r, 512):
        vqp = vqp_step(t, x, g)
    ref = vqref_step(r, x, g)
    with pytest.raises(AssertionError):
        compare_step(ref, vqp, x, r, t, cosine=False)


def test_index_mismatches_must_be_near_ties(rng):
    x = batch(rng, (200, D))
    codes = rng.standard_normal((K, D))
    idx = ((x[:, None].astype(np.float64) - codes[None]) ** 2).sum(-1).argmin(1)[:, None]
    other = idx.copy()
    other[3] = (other[3] + 1) % K  # a clear mismatch
    with pytest.raises(AssertionError, match="not near ties"):
        near_tie_rows(x, [codes], idx, other, cosine=False)
    # an exact tie is accepted: duplicate the chosen code of row 5 and point one side at it
    codes2 = np.concatenate([codes, codes[idx[5]]], axis=0)
    tied = idx.copy()
    tied[5] = K
    first = near_tie_rows(x, [codes2], idx, tied, cosine=False)
    assert list(np.nonzero(first == 0)[0]) == [5]
