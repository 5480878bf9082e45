"""Quantize dropout in ResidualVQ: vqref against vector-quantize-pytorch, step by step.

The two libraries draw the dropout depth from different generators (vqp: ``random.Random`` seeded
from torch; vqref: the module's own numpy generator).  Each step reads the depth vqref is about to
draw (from a copy of its generator) and hands vqp a ``rand_quantize_dropout_fixed_seed`` that
makes ``random.Random`` draw the same depth; everything else is compared as without dropout:
outputs, indices (-1 past the depth), losses (0 past it), dx, gradients, the EMA state (the
dropped depths' unchanged).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import ResidualVQ as TorchRVQ

from vqref import backend as B
from vqref.core.rows import dropout_last_depths

from .conftest import batch, make_pair
from .options_harness import option_step, run_option_steps

D, K, Q = 32, 48, 4
SHAPE = (4, 96, D)


def vqp_seed_for(r, samples: int, drawn: list | None = None) -> int:
    """A seed with which vqp's ``random.Random(seed).randrange(cutoff, Q)`` (and its rounding to the
    multiple) gives the depth vqref's next training forward draws (appended to ``drawn``)."""
    gen = r.state.rngs[-1]  # a copy of the dropout generator
    m, cutoff, Q = r.quantize_dropout_multiple_of, r.quantize_dropout_cutoff_index, r.num_quantizers
    want = int(dropout_last_depths(gen, samples, Q, cutoff=cutoff, multiple_of=m, per_sample=False)[0])
    if drawn is not None:
        drawn.append(want)
    for seed in range(10_000):
        idx = random.Random(seed).randrange(cutoff, Q)
        if m != 1:
            idx = -(-(idx + 1) // m) * m - 1
        if min(idx, Q - 1) == want:
            return seed
    raise AssertionError("no seed found")


CONFIGS = {
    "ema": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, quantize_dropout=True, rotation_trick=False),
    "cutoff, multiple, rotation": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=Q, quantize_dropout=True, quantize_dropout_cutoff_index=1,
        quantize_dropout_multiple_of=2, rotation_trick=True,
    ),
    "dead codes, projection": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=Q, quantize_dropout=True, threshold_ema_dead_code=2, codebook_dim=12,
        rotation_trick=False,
    ),
    "learnable": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=Q, quantize_dropout=True, learnable_codebook=True, ema_update=False,
        rotation_trick=False,
    ),
    "shared": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=Q, quantize_dropout=True, shared_codebook=True, rotation_trick=False
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dropout_steps_agree(name):
    t, r = make_pair(CONFIGS[name], seed=0)
    rng = np.random.default_rng(1)
    depths = []

    def kwargs(module):
        return {"rand_quantize_dropout_fixed_seed": vqp_seed_for(module, SHAPE[0], depths)}

    run_option_steps(t, r, lambda: batch(rng, SHAPE), steps=4, vqp_kwargs=kwargs,
                     lr=0.5 if "learnable" in name else None)  # fmt: skip
    assert len(depths) == 4 and min(depths) < Q - 1, depths  # some steps dropped depths


def test_the_depth_is_what_makes_them_agree():
    # negative control: with a seed that draws another depth, vqp's step is a different one
    t, r = make_pair(CONFIGS["ema"], seed=0)
    x = batch(np.random.default_rng(2), SHAPE)
    seed = vqp_seed_for(r, SHAPE[0])
    want = random.Random(seed).randrange(0, Q)
    other = next(s for s in range(100) if random.Random(s).randrange(0, Q) != want)
    ref, vqp, _, _ = option_step(t, r, x, None, vqp_kwargs={"rand_quantize_dropout_fixed_seed": other})
    assert not np.array_equal(ref.indices < 0, vqp.indices < 0)


def test_decoding_the_first_depths_agrees_with_vqp():
    t, r = make_pair(CONFIGS["dead codes, projection"], seed=0)
    x = batch(np.random.default_rng(3), SHAPE)
    t.eval(), r.eval()
    _, it, _ = t(torch.from_numpy(x))
    for n in (1, 2, Q):
        coarse_t = t.get_output_from_indices(it[..., :n]).detach().numpy()
        coarse = B.to_numpy(r.get_output_from_indices(B.from_numpy(it.numpy()[..., :n], r.xp)))
        np.testing.assert_allclose(coarse, coarse_t, rtol=1e-5, atol=1e-6)
