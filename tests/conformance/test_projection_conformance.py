"""Factorised codes (``codebook_dim``): vqref against vector-quantize-pytorch, step by step.

The codebooks live in d = codebook_dim < dim; ``project_in`` and ``project_out`` are learnable
affine maps.  Each step compares the outputs, indices, losses, dx, the gradients of the
projections and of a learnable codebook, and the state (codebooks and projections); with a
learning rate both libraries also take a gradient step on every learnable array, so the
trajectories of the projections are compared too.  Decoding from indices goes through
``project_out`` in both (vector-quantize-pytorch's issue #113 was a decoder that skipped it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import ResidualVQ as TorchRVQ
from vector_quantize_pytorch import VectorQuantize as TorchVQ

from vqref import backend as B

from .conftest import batch, make_pair
from .options_harness import option_step, run_option_steps

D, K, d = 32, 48, 12
SHAPE = (4, 96, D)

CONFIGS = {
    "ema": (lambda: TorchVQ(dim=D, codebook_size=K, codebook_dim=d, rotation_trick=False), None),
    "cosine, dead codes": (
        lambda: TorchVQ(dim=D, codebook_size=K, codebook_dim=d, use_cosine_sim=True, threshold_ema_dead_code=2,
                        rotation_trick=False),
        None,
    ),
    "learnable, rotation": (
        lambda: TorchVQ(dim=D, codebook_size=K, codebook_dim=d, learnable_codebook=True, ema_update=False,
                        rotation_trick=True, commitment_weight=0.5),
        0.5,
    ),
    "kmeans": (lambda: TorchVQ(dim=D, codebook_size=K, codebook_dim=d, kmeans_init=True, kmeans_iters=4), None),
    "residual": (lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=3, codebook_dim=d, rotation_trick=False),
                 0.5),
    "residual, shared, orthogonal": (
        lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=2, codebook_dim=d, shared_codebook=True,
                         orthogonal_reg_weight=0.3, rotation_trick=False),
        None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_projected_steps_agree(name):
    make, lr = CONFIGS[name]
    t, r = make_pair(make, seed=0)
    rng = np.random.default_rng(1)
    centres = 8 if "kmeans" in name else 0
    reports = run_option_steps(t, r, lambda: batch(rng, SHAPE, centres=centres), lr=lr,
                               cosine="cosine" in name, codebook_grads="shared" not in name)  # fmt: skip
    assert sum(rep.compared_rows for rep in reports) > 0.99 * 3 * SHAPE[0] * SHAPE[1]


def test_the_gradient_step_moves_the_projections_in_both():
    # negative control of the trajectory: without the projections' gradient step vqp diverges from vqref
    t, r = make_pair(CONFIGS["residual"][0], seed=0)
    rng = np.random.default_rng(2)
    x = batch(rng, SHAPE)
    g = (rng.standard_normal(SHAPE) * 1e-3).astype(np.float32)
    ref, vqp, _, _ = option_step(t, r, x, g)
    r.params["project_in.W"] = r.params["project_in.W"] - 0.5 * ref.grads["project_in.W"]
    assert not np.allclose(B.to_numpy(r.state_array("project_in.W")).T, t.project_in.weight.detach().numpy())


@pytest.mark.parametrize("make", [CONFIGS["ema"][0], CONFIGS["residual"][0]], ids=["vq", "residual"])
def test_decoding_goes_through_project_out(make):
    t, r = make_pair(make, seed=0)
    x = batch(np.random.default_rng(3), SHAPE)
    t.eval(), r.eval()
    qt, it, _ = t(torch.from_numpy(x))
    q, idx, _ = r(x)
    np.testing.assert_array_equal(B.to_numpy(idx), it.numpy())
    np.testing.assert_allclose(B.to_numpy(q), qt.detach().numpy(), rtol=1e-5, atol=1e-6)
    decoded_t = t.get_output_from_indices(it).detach().numpy()
    decoded = B.to_numpy(r.get_output_from_indices(idx))
    np.testing.assert_allclose(decoded, decoded_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(decoded, B.to_numpy(q), rtol=1e-5, atol=1e-6)  # the eval output itself
    # the codes themselves are in the low dimension, before project_out, in both
    codes_t = t.get_codes_from_indices(it).detach().numpy()
    assert codes_t.shape[-1] == d and B.to_numpy(r.get_codes_from_indices(idx)).shape[-1] == d
    np.testing.assert_allclose(B.to_numpy(r.get_codes_from_indices(idx)), codes_t, rtol=1e-6, atol=1e-7)
