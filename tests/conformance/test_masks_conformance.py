"""Masks: vqref against vector-quantize-pytorch, step by step (docs/deviations.md §14.1).

Both libraries get the same float32 batch ``(B, T, D)`` and the same boolean mask ``(B, T)`` of
present tokens.  The kept rows are compared as the harness compares a whole batch
(:func:`compare_step`: outputs, indices, losses, dx, codebook gradients, the EMA state); the
absent rows must be 0 with the index -1 and no gradient in both.  The configurations are those
where vector-quantize-pytorch handles a mask as it documents; where it does not (cosine
codebooks, projections or heads in ``VectorQuantize``, the diversity loss, the active codes of
the orthogonal regulariser, a shared codebook's last restart, a batch without tokens) the test
pins both behaviours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import ResidualVQ as TorchRVQ
from vector_quantize_pytorch import VectorQuantize as TorchVQ

from vqref import backend as B

from .conftest import batch, host_orthogonal_loss, make_pair, resync, vqp_draws_like_vqref
from .options_harness import compare, option_step

D, K = 32, 64
SHAPE = (4, 96, D)

CONFIGS = {
    "ema": lambda: TorchVQ(dim=D, codebook_size=K, rotation_trick=False),
    "dead codes": lambda: TorchVQ(dim=D, codebook_size=K, threshold_ema_dead_code=2, rotation_trick=False),
    "kmeans": lambda: TorchVQ(dim=D, codebook_size=K, kmeans_init=True, kmeans_iters=5, rotation_trick=False),
    "learnable, rotation": lambda: TorchVQ(
        dim=D, codebook_size=K, learnable_codebook=True, ema_update=False, rotation_trick=True
    ),
    "orthogonal": lambda: TorchVQ(dim=D, codebook_size=K, orthogonal_reg_weight=0.5, rotation_trick=False),
    "residual": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=3, rotation_trick=False),
    "residual, dead codes": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=2, threshold_ema_dead_code=2, rotation_trick=False
    ),
    "residual, projection": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=2, codebook_dim=12, rotation_trick=True
    ),
    "residual, shared": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=2, shared_codebook=True,
                                          rotation_trick=False),
}  # fmt: skip


def _mask(rng):
    lens = rng.integers(SHAPE[1] // 3, SHAPE[1] + 1, SHAPE[0])  # variable-length sequences, padded at the end
    return np.arange(SHAPE[1])[None, :] < lens[:, None]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_masked_steps_agree(name):
    t, r = make_pair(CONFIGS[name], seed=0)
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = batch(rng, SHAPE, centres=8 if "kmeans" in name else 0)
        mask = _mask(rng)
        g = (rng.standard_normal(SHAPE) * (2.0 / (mask.sum() * D))).astype(np.float32)
        ref, vqp, full_r, full_t = option_step(t, r, x, g, mask=mask)
        absent = ~mask.reshape(-1)
        for mine, theirs, what in zip(full_r, full_t, ("quantized", "indices", "dx")):
            np.testing.assert_array_equal(mine[absent], 0 if what != "indices" else -1, err_msg=what)
            np.testing.assert_array_equal(theirs[absent], 0 if what != "indices" else -1, err_msg=what)
        report = compare(ref, vqp, x.reshape(-1, D)[mask.reshape(-1)], r, t)
        if report.mismatched_rows:
            resync(r, t)


def test_masked_rows_are_out_of_the_step_in_both_libraries():
    # negative control of the comparison: the same step without the mask is a different step
    t, r = make_pair(CONFIGS["dead codes"], seed=0)
    rng = np.random.default_rng(2)
    x = batch(rng, SHAPE)
    mask = _mask(rng)
    g = np.zeros(SHAPE, np.float32)
    with vqp_draws_like_vqref(t, r, int(mask.sum())):
        t(torch.from_numpy(x), mask=torch.from_numpy(mask))
    r(x)  # vqref without the mask: the padding enters the EMA
    theirs = t._codebook.cluster_size[0].numpy()
    assert not np.allclose(B.to_numpy(r.cluster_size), theirs, rtol=1e-5)
    del g


# ------------------------------------------------------------------ where vector-quantize-pytorch differs


def test_cosine_commitment_under_a_mask_is_measured_on_the_normalised_input():
    # vqp's masked commitment loss compares the unit code with the raw input (orig_input), where
    # its unmasked loss uses the normalised input; vqref uses the normalised input in both cases.
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, use_cosine_sim=True, rotation_trick=False), seed=0)
    rng = np.random.default_rng(3)
    x = batch(rng, SHAPE) * 3.0
    mask = _mask(rng)
    xt = torch.from_numpy(x)
    qt, it, lt = t(xt, mask=torch.from_numpy(mask))
    q, i, loss = r(x, mask=mask)
    kept = mask.reshape(-1)
    rows = x.reshape(-1, D)[kept].astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    codes = B.to_numpy(q).reshape(-1, D)[kept].astype(np.float64)
    np.testing.assert_array_equal(B.to_numpy(i), it.numpy())
    assert float(loss) == pytest.approx(np.mean((unit - codes) ** 2), rel=1e-5)  # vqref: the normalised input
    assert float(lt) == pytest.approx(np.mean((rows - codes) ** 2), rel=1e-5)  # vqp: the raw input


def test_projections_or_heads_with_a_mask_fail_in_vqp():
    # vqp's VectorQuantize compares its codes with the unprojected input under a mask: shapes
    # that do not broadcast; vqref projects, quantizes and maps back as without a mask.
    rng = np.random.default_rng(4)
    x = batch(rng, SHAPE)
    mask = _mask(rng)
    for kwargs in (dict(codebook_dim=12), dict(heads=2, codebook_dim=8, separate_codebook_per_head=True)):
        t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, rotation_trick=False, **kwargs), seed=0)
        with pytest.raises(RuntimeError):
            t(torch.from_numpy(x), mask=torch.from_numpy(mask))
        q, idx, loss = r(x, mask=mask)
        assert np.isfinite(float(loss)) and np.all(B.to_numpy(idx)[~mask] == -1)


def test_a_batch_without_tokens_gives_vqp_nan_and_vqref_zero():
    t, r = make_pair(CONFIGS["ema"], seed=0)
    x = batch(np.random.default_rng(5), SHAPE)
    none = np.zeros(SHAPE[:-1], dtype=bool)
    _, _, lt = t(torch.from_numpy(x), mask=torch.from_numpy(none))
    _, _, loss = r(x, mask=none)
    assert np.isnan(float(lt)) and float(loss) == 0.0
    np.testing.assert_allclose(B.to_numpy(r.cluster_size), t._codebook.cluster_size[0].numpy(), rtol=1e-6)


def test_the_active_codes_of_the_orthogonal_regulariser_leave_out_the_padding():
    # vqp collects the active codes before it marks the padding's indices -1, so codes that only
    # padding chose count as active; vqref counts the codes of the present tokens.  A codebook
    # that the forward does not move (ema_update=False), and no commitment term, isolate it.
    make = lambda: TorchVQ(dim=D, codebook_size=K, orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True,
                           learnable_codebook=True, ema_update=False, rotation_trick=False,
                           commitment_weight=0.0)  # noqa: E731  # fmt: skip
    t, r = make_pair(make, seed=0)
    rng = np.random.default_rng(6)
    x = batch(rng, SHAPE)
    mask = _mask(rng)
    codebook = B.to_numpy(r.codebook).astype(np.float64)
    _, lt = t(torch.from_numpy(x), mask=torch.from_numpy(mask))[::2]
    _, idx, loss = r(x, mask=mask)
    present = np.unique(B.to_numpy(idx)[mask])
    _, all_idx, _ = r.eval()(x)  # the codes every token, padding included, takes (the codebook did not move)
    everything = np.unique(B.to_numpy(all_idx))
    assert len(everything) > len(present)  # the padding chose codes the tokens did not
    assert float(loss) == pytest.approx(host_orthogonal_loss(codebook, present), rel=1e-4)
    assert float(lt) == pytest.approx(host_orthogonal_loss(codebook, everything), rel=1e-4)


def test_a_shared_codebooks_last_restart_draws_padding_in_vqp_only():
    # vqp restarts a shared codebook's dead codes once more after the last depth, from every row
    # of every depth *without* the mask; vqref draws only present tokens.  With few tokens (fewer
    # than the dead codes) vqp's per-depth restarts leave codes dead, and its last restart then
    # takes padding rows.  The padding here is far from the tokens, so its rows are recognisable.
    make = lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=2, shared_codebook=True,
                            threshold_ema_dead_code=50.0, rotation_trick=False)  # noqa: E731  # fmt: skip
    t, r = make_pair(make, seed=0)
    rng = np.random.default_rng(8)
    x = batch(rng, SHAPE)
    mask = np.zeros(SHAPE[:-1], dtype=bool)
    mask[0, :5] = True  # 5 tokens, 64 codes
    x[~mask] += 100.0  # the padding
    torch.manual_seed(0)
    t(torch.from_numpy(x), mask=torch.from_numpy(mask))
    r(x, mask=mask)
    far = lambda codebook: int((np.abs(codebook) > 50).any(axis=1).sum())  # noqa: E731
    assert far(t.layers[0]._codebook.embed.detach()[0].numpy()) > 0  # vqp: codes taken from padding rows
    assert far(B.to_numpy(r.codebook)) == 0  # vqref: every restarted code is a present token's row


def test_vqp_decodes_padding_to_the_bias_of_project_out():
    t, r = make_pair(CONFIGS["residual, projection"], seed=0)
    padding = np.full((2, 3, 2), -1, dtype=np.int64)
    decoded_t = t.get_output_from_indices(torch.from_numpy(padding)).detach().numpy()
    np.testing.assert_allclose(decoded_t, np.broadcast_to(t.project_out.bias.detach().numpy(), (2, 3, D)), rtol=1e-6)
    np.testing.assert_array_equal(B.to_numpy(r.get_output_from_indices(padding)), 0.0)
