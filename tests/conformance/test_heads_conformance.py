"""Heads (``heads``, ``separate_codebook_per_head``): vqref against vector-quantize-pytorch.

vqp cuts the projected vector into H pieces; one codebook quantizes all pieces, listed sample
by sample and head by head (its k-means and dead-code restarts draw rows in that order), or each
head has its own codebook (a state ``(H, K, d)``).  Each step compares the outputs, the indices
``(..., H)``, the loss (the mean over the pieces), dx, the projections' and codebooks' gradients
and the whole state.  The heads' indices are compared exactly (these batches have no near ties).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import VectorQuantize as TorchVQ

from vqref import backend as B
from vqref.interop import export_state_dict

from .conftest import assert_close, batch, make_pair
from .options_harness import option_step

D, K = 24, 40
SHAPE = (4, 64, D)

CONFIGS = {
    "shared, ema": lambda: TorchVQ(dim=D, codebook_size=K, heads=3, codebook_dim=8, rotation_trick=False),
    "shared, kmeans, dead codes": lambda: TorchVQ(dim=D, codebook_size=K, heads=2, codebook_dim=12, kmeans_init=True,
                                                  kmeans_iters=3, threshold_ema_dead_code=2, rotation_trick=False),
    "shared, projection, rotation": lambda: TorchVQ(dim=D, codebook_size=K, heads=2, codebook_dim=5,
                                                    rotation_trick=True),
    "separate, ema": lambda: TorchVQ(dim=D, codebook_size=K, heads=3, codebook_dim=8, separate_codebook_per_head=True,
                                     rotation_trick=False),
    "separate, cosine": lambda: TorchVQ(dim=D, codebook_size=K, heads=2, codebook_dim=6,
                                                   separate_codebook_per_head=True, use_cosine_sim=True,
                                                   rotation_trick=False),
    "separate, learnable": lambda: TorchVQ(dim=D, codebook_size=K, heads=4, codebook_dim=6,
                                           separate_codebook_per_head=True, learnable_codebook=True,
                                           ema_update=False, rotation_trick=True, orthogonal_reg_weight=0.2),
}  # fmt: skip


def _compare(ref, vqp, r, t, separate: bool):
    np.testing.assert_array_equal(ref.indices, vqp.indices, err_msg="indices")
    assert_close(ref.quantized, vqp.quantized, rtol=1e-5, atol_rel=1e-5, what="quantized")
    assert_close(ref.losses, vqp.losses, rtol=2e-5, atol_rel=1e-6, what="loss")
    assert_close(ref.dx, vqp.dx, rtol=1e-4, atol_rel=1e-4, what="dx")
    theirs = dict(vqp.grads)
    if separate and "codebook" in theirs:  # vqp's gradient of the (H, K, d) codebook, head axis kept
        theirs["codebook"] = t._codebook.embed.grad_full
    assert sorted(ref.grads) == sorted(theirs)
    for key in ref.grads:
        assert_close(ref.grads[key], theirs[key], rtol=1e-4, atol_rel=1e-4, what=f"grad {key}")
    mine, state = export_state_dict(r), {k: v.numpy() for k, v in t.state_dict().items()}
    assert sorted(mine) == sorted(state)
    for key, value in state.items():
        if value.dtype == bool:
            assert bool(mine[key]) == bool(value), key
        else:
            assert_close(mine[key], value, rtol=1e-5, atol_rel=2e-6, what=f"state {key}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_heads_steps_agree(name):
    t, r = make_pair(CONFIGS[name], seed=0)
    separate = "separate" in name
    assert r.heads == t.heads and r.separate_codebook_per_head == separate
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = batch(rng, SHAPE, centres=6 if "kmeans" in name else 0)
        g = (rng.standard_normal(SHAPE) * (2.0 / (x.size / D * D))).astype(np.float32)
        hook = _keep_full_codebook_gradient(t) if separate and r.codebook_is_learnable else None
        ref, vqp, _, _ = option_step(t, r, x, g, rows=SHAPE[0] * SHAPE[1] * r.heads)
        if hook is not None:
            hook.remove()
        _compare(ref, vqp, r, t, separate)
        if r.codebook_is_learnable:  # a gradient step on the codebooks and projections, each with its own
            with torch.no_grad():
                t._codebook.embed -= 0.5 * torch.from_numpy(t._codebook.embed.grad_full)
            r.params["codebook"] = r.params["codebook"] - 0.5 * r.grads["codebook"]


def _keep_full_codebook_gradient(t):
    """Record the full (H, K, d) gradient of vqp's codebook (the harness keeps head 0's)."""
    embed = t._codebook.embed

    def keep(grad):
        embed.grad_full = grad.detach().numpy().copy()
        return grad

    return embed.register_hook(keep)


def test_the_shared_codebooks_pieces_are_drawn_in_vqps_order():
    # k-means of a shared codebook samples its initial means from the pieces in vqp's order
    # (sample, head, token): the harness hands vqp the rows vqref draws, and the codebooks agree
    # only if both number the pieces the same way.  A transposed order is a different codebook.
    t, r = make_pair(CONFIGS["shared, kmeans, dead codes"], seed=0)
    x = batch(np.random.default_rng(2), SHAPE, centres=6)
    option_step(t, r, x, None, rows=SHAPE[0] * SHAPE[1] * 2)
    np.testing.assert_allclose(B.to_numpy(r.codebook), t._codebook.embed.detach()[0].numpy(), rtol=1e-5, atol=1e-6)
    from vqref.core.layer import head_order

    order = head_order((2, 3), None, 2)  # 2 samples of 3 tokens, 2 heads: pieces (b, h, t)
    np.testing.assert_array_equal(order, [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11])


def test_decoding_one_codebooks_heads():
    # vqp returns the pieces' codes (..., H, d) and cannot map them through project_out; vqref puts
    # them side by side (..., H d) and decodes the eval output
    t, r = make_pair(CONFIGS["shared, projection, rotation"], seed=0)
    x = batch(np.random.default_rng(3), SHAPE)
    t.eval(), r.eval()
    qt, it, _ = t(torch.from_numpy(x))
    assert tuple(t.get_codes_from_indices(it).shape) == SHAPE[:-1] + (2, 5)
    with pytest.raises(RuntimeError):
        t.get_output_from_indices(it)
    q, idx, _ = r(x)
    np.testing.assert_array_equal(B.to_numpy(idx), it.numpy())
    assert tuple(r.get_codes_from_indices(idx).shape) == SHAPE[:-1] + (10,)
    np.testing.assert_allclose(B.to_numpy(r.get_output_from_indices(idx)), qt.detach().numpy(), rtol=1e-5, atol=1e-6)
