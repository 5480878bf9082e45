"""Per-depth codebook sizes in ResidualVQ: vqref against vector-quantize-pytorch, step by step."""

from __future__ import annotations

import numpy as np
import pytest
from vector_quantize_pytorch import ResidualVQ as TorchRVQ

from .conftest import batch, make_pair
from .options_harness import run_option_steps

D = 32
SIZES = (64, 16, 40)
SHAPE = (4, 96, D)

CONFIGS = {
    "ema, dead codes": lambda: TorchRVQ(dim=D, codebook_size=SIZES, threshold_ema_dead_code=2, rotation_trick=False),
    "kmeans": lambda: TorchRVQ(dim=D, codebook_size=SIZES, kmeans_init=True, kmeans_iters=4, rotation_trick=False),
    "learnable, orthogonal subsets": lambda: TorchRVQ(
        dim=D, codebook_size=SIZES, learnable_codebook=True, ema_update=False, orthogonal_reg_weight=0.2,
        orthogonal_reg_active_codes_only=True, rotation_trick=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_steps_with_per_depth_sizes_agree(name):
    t, r = make_pair(CONFIGS[name], seed=0)
    assert r.codebook_sizes == SIZES and [layer.codebook.shape[0] for layer in r.layers] == list(SIZES)
    rng = np.random.default_rng(1)
    kmeans = name == "kmeans"
    run_option_steps(t, r, lambda: batch(rng, SHAPE, centres=8 if kmeans else 0, levels=3 if kmeans else 1),
                     lr=0.5 if "learnable" in name else None)  # fmt: skip
