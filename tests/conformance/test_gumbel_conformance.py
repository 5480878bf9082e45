"""Gumbel sampling, the straight-through Gumbel-softmax and the codebook diversity loss: vqref
against vector-quantize-pytorch, step by step (harness in conftest.py).

Sampling.  vqp draws its Gumbel noise from torch's generator, vqref from the module's numpy
generators.  :func:`vqp_noise_like_vqref` replays a copy of each vqref generator (the draws
vqref's next training forward makes, depth after depth) and hands vqp exactly that noise through
its module-level ``gumbel_noise`` function, so both sample the same codes and every step can be
compared as a deterministic one, EMA state included.

straight_through.  vqp computes the Gumbel-softmax surrogate and then discards it: its final
straight-through step ``x + sg[q - x]`` overwrites the gradient, so its input gradient is the plain
STE's.  vqref's is the paper's estimator (docs/deviations.md §13); both behaviours are pinned here,
vqref's against a float64 reference built from vqp's own ``cdist`` and ``gumbel_sample`` without
that final step.

Symbols: N rows, D = 16 features, K = 24 codes, Q depths.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
import vector_quantize_pytorch.vector_quantize_pytorch as vqp_module
from vector_quantize_pytorch import ResidualVQ as TorchRVQ
from vector_quantize_pytorch import VectorQuantize as TorchVQ

import vqref
from vqref import backend as B
from vqref.interop import from_vector_quantize_pytorch, to_vector_quantize_pytorch
from vqref.ops.gumbel import gumbel_noise

from .conftest import batch, compare_step, make_pair, resync, run_steps, vqp_step, vqref_layers, vqref_step

D, K = 16, 24
SHAPE = (4, 32, D)  # N = 128 rows at 32 positions

# ------------------------------------------------------------------ the diversity loss

# Codebooks that do not move during the forward: every number is compared, dx included.
DIVERSITY = {
    "vq-frozen": (dict(rotation_trick=False, ema_update=False, codebook_diversity_loss_weight=0.1), None),
    "vq-frozen-temperature-10": (
        dict(
            rotation_trick=False,
            ema_update=False,
            codebook_diversity_loss_weight=0.5,
            codebook_diversity_temperature=10.0,
        ),
        None,
    ),
    "vq-cosine-frozen": (
        dict(rotation_trick=False, ema_update=False, use_cosine_sim=True, codebook_diversity_loss_weight=0.1),
        None,
    ),
    "vq-learnable": (
        dict(
            rotation_trick=False,
            learnable_codebook=True,
            ema_update=False,
            codebook_diversity_loss_weight=0.2,
            codebook_diversity_temperature=10.0,  # with T = 100 float32 rounding in p shows in the state
        ),
        1.0,
    ),
    "vq-orthogonal-rotation-frozen": (
        dict(orthogonal_reg_weight=1.0, ema_update=False, codebook_diversity_loss_weight=0.1),
        0.2,
    ),
    "rvq-3-frozen": (
        dict(num_quantizers=3, rotation_trick=False, ema_update=False, codebook_diversity_loss_weight=0.1),
        None,
    ),
}


def _make(kw):
    if "num_quantizers" in kw:
        return lambda: TorchRVQ(dim=D, codebook_size=K, **kw)
    return lambda: TorchVQ(dim=D, codebook_size=K, **kw)


@pytest.mark.parametrize("name", list(DIVERSITY))
def test_diversity_loss_agrees_step_by_step(name):
    kw, lr = DIVERSITY[name]
    reports = run_steps(_make(kw), steps=3, shape=SHAPE, lr=lr)
    assert sum(r.compared_rows for r in reports) >= 0.99 * 3 * SHAPE[0] * SHAPE[1]


# With an EMA codebook vqp takes the diversity gradient at the codebook after this step's EMA
# update (docs/deviations.md §13): everything but dx is compared step by step here, and dx below.
DIVERSITY_EMA = {
    "vq-ema": dict(rotation_trick=False, codebook_diversity_loss_weight=0.1),
    "vq-ema-cosine": dict(rotation_trick=False, use_cosine_sim=True, codebook_diversity_loss_weight=0.1),
    "rvq-2-ema": dict(num_quantizers=2, rotation_trick=False, codebook_diversity_loss_weight=0.1),
}


@pytest.mark.parametrize("name", list(DIVERSITY_EMA))
def test_diversity_loss_with_an_ema_codebook_agrees_but_for_vqps_gradient(name):
    t, r = make_pair(_make(DIVERSITY_EMA[name]))
    rng = np.random.default_rng(1)
    N = SHAPE[0] * SHAPE[1]
    for _ in range(3):
        x = batch(rng, SHAPE)
        g = (rng.standard_normal(SHAPE) * (2.0 / (N * D))).astype(np.float32)
        theirs = vqp_step(t, x, g)
        ours = vqref_step(r, x, g)
        ours.dx, theirs.dx = None, None  # the deviation: see the next test
        report = compare_step(ours, theirs, x, r, t, cosine=vqref_layers(r)[0].use_cosine_sim)
        assert report.mismatched_rows == 0


def _diversity_dx(x, codebook, *, weight, T, positions, post_update=None):
    """dx of ``weight * diversity(-cdist(x, C))`` by torch autograd.  ``post_update``: the codebook
    the backward reads instead (vqp's in-place EMA update writes it into the forward's tensor)."""
    xt = torch.from_numpy(x).requires_grad_()
    et = torch.from_numpy(codebook.copy())
    logits = -vqp_module.cdist(xt[None], et[None])[0]
    if post_update is not None:
        et.data.copy_(torch.from_numpy(post_update))  # as vqp's EMA: past the version counter
    p = torch.softmax(T * logits, dim=-1).reshape(-1, positions, codebook.shape[0]).mean(0)
    (-vqp_module.entropy(p).mean() * weight).backward()
    return xt.grad.numpy()


def test_vqp_takes_the_diversity_gradient_at_the_updated_codebook():
    torch.manual_seed(0)
    t = TorchVQ(dim=D, codebook_size=K, rotation_trick=False, codebook_diversity_loss_weight=0.1, commitment_weight=0.0)
    r = from_vector_quantize_pytorch(t, dtype="float64")
    before = np.array(r.codebook, dtype=np.float64)
    x = batch(np.random.default_rng(5), SHAPE)
    theirs = vqp_step(t, x, np.zeros(SHAPE, np.float32))
    after = t._codebook.embed[0].detach().numpy().astype(np.float64)
    ours = vqref_step(r, x.astype(np.float64), np.zeros(SHAPE))
    xf = x.reshape(-1, D).astype(np.float64)
    true = _diversity_dx(xf, before, weight=0.1, T=100.0, positions=SHAPE[1])
    as_vqp = _diversity_dx(xf, before, weight=0.1, T=100.0, positions=SHAPE[1], post_update=after)
    scale = np.abs(true).max()
    np.testing.assert_allclose(ours.dx, true, rtol=1e-9, atol=1e-9 * scale)  # vqref: the true gradient
    np.testing.assert_allclose(theirs.dx, as_vqp, rtol=1e-3, atol=1e-4 * scale)  # vqp: at the updated codebook
    assert np.abs(true - as_vqp).max() > 0.1 * scale


def test_diversity_loss_value_is_vqps_per_position_entropy():
    # vqp: p = softmax(T l), averaged over the batch separately at every position n, minus the
    # mean entropy; vqref's last_losses["diversity"] is that number, for (B, n, D) and (N, D) inputs
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, rotation_trick=False, codebook_diversity_loss_weight=0.3))
    rng = np.random.default_rng(3)
    for shape in ((5, 7, D), (9, D)):
        x = batch(rng, shape)
        _, _, _, breakdown = t(torch.from_numpy(x), return_loss_breakdown=True)
        r(x)
        np.testing.assert_allclose(float(r.last_losses["diversity"]), float(breakdown.codebook_diversity), rtol=1e-5)
        t.load_state_dict({k: v for k, v in t.state_dict().items()})  # (the step moved both alike)
        resync(r, t)


# ------------------------------------------------------------------ sampling


@contextlib.contextmanager
def vqp_noise_like_vqref(r, N: int):
    """Within the block, vqp's Gumbel noise is the noise vqref's next training forward draws."""
    layers = vqref_layers(r)
    shared = r.is_stack and r.shared_codebook
    gens = [copy.deepcopy(layers[0].generator)] if shared else [copy.deepcopy(layer.generator) for layer in layers]
    calls = []

    def noise(t):
        gen = gens[0 if len(gens) == 1 else len(calls)]
        calls.append(1)
        g = gumbel_noise((N, K), gen, like=np.zeros(1, np.float32))  # (N, K), as vqref casts it
        return torch.from_numpy(np.ascontiguousarray(g)).reshape(t.shape)

    original = vqp_module.gumbel_noise
    vqp_module.gumbel_noise = noise
    try:
        yield calls
    finally:
        vqp_module.gumbel_noise = original


def run_sampled_steps(make_vqp, *, steps: int = 3, shape: tuple = SHAPE, seed: int = 0) -> list:
    t, r = make_pair(make_vqp, seed=seed)
    rng = np.random.default_rng(seed + 1)
    N = int(np.prod(shape[:-1]))
    reports = []
    for _ in range(steps):
        x = batch(rng, shape)
        g = (rng.standard_normal(shape) * (2.0 / (N * D))).astype(np.float32)
        with vqp_noise_like_vqref(r, N) as calls:
            theirs = vqp_step(t, x, g)
        assert len(calls) == (r.num_quantizers if r.is_stack else 1)  # vqp sampled at every depth
        ours = vqref_step(r, x, g)
        reports.append(compare_step(ours, theirs, x, r, t, cosine=vqref_layers(r)[0].use_cosine_sim))
        if reports[-1].mismatched_rows:
            resync(r, t)
    return reports


SAMPLED = {
    "vq-tau-1": lambda: TorchVQ(dim=D, codebook_size=K, rotation_trick=False, stochastic_sample_codes=True),
    "vq-tau-0.3-cosine": lambda: TorchVQ(
        dim=D,
        codebook_size=K,
        rotation_trick=False,
        stochastic_sample_codes=True,
        sample_codebook_temp=0.3,
        use_cosine_sim=True,
    ),  # fmt: skip
    "vq-rotation-diversity-frozen": lambda: TorchVQ(
        dim=D,
        codebook_size=K,
        stochastic_sample_codes=True,
        sample_codebook_temp=2.0,
        ema_update=False,
        codebook_diversity_loss_weight=0.1,
    ),
    "rvq-2": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=2, rotation_trick=False, stochastic_sample_codes=True
    ),
    "rvq-shared": lambda: TorchRVQ(
        dim=D,
        codebook_size=K,
        num_quantizers=2,
        rotation_trick=False,
        stochastic_sample_codes=True,
        shared_codebook=True,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_codes_agree_step_by_step_given_the_same_noise(name):
    reports = run_sampled_steps(SAMPLED[name])
    assert all(r.mismatched_rows == 0 for r in reports)


def test_the_noise_is_what_makes_them_agree():
    # negative control: without the replayed noise, vqp samples other codes
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, rotation_trick=False, stochastic_sample_codes=True))
    x = batch(np.random.default_rng(1), SHAPE)
    torch.manual_seed(0)
    theirs = vqp_step(t, x, None)
    ours = vqref_step(r, x, None)
    assert (theirs.indices != ours.indices).mean() > 0.2


# ------------------------------------------------------------------ straight_through: the deviation


def test_vqp_straight_through_input_gradient_is_the_plain_ste():
    torch.manual_seed(0)
    st = TorchVQ(dim=D, codebook_size=K, rotation_trick=False, straight_through=True, sample_codebook_temp=0.5)
    plain = TorchVQ(dim=D, codebook_size=K, rotation_trick=False)
    plain.load_state_dict(st.state_dict())
    rng = np.random.default_rng(2)
    x, g = batch(rng, SHAPE), rng.standard_normal(SHAPE).astype(np.float32)
    a, b = vqp_step(st, x, g), vqp_step(plain, x, g)
    np.testing.assert_array_equal(a.indices, b.indices)
    # the Gumbel-softmax surrogate left no trace (to the rounding of the value z + y - sg[y])
    np.testing.assert_allclose(a.dx, b.dx, rtol=1e-6, atol=1e-6 * np.abs(b.dx).max())


def _reference_straight_through(x, embed, g, *, tau, commitment):
    """The paper's estimator from vqp's own pieces, in float64, without vqp's final STE."""
    xt = torch.from_numpy(x.reshape(1, -1, D)).requires_grad_()
    et = torch.from_numpy(embed[None]).requires_grad_()
    logits = -vqp_module.cdist(xt, et)
    _, onehot = vqp_module.gumbel_sample(logits, temperature=tau, stochastic=False, straight_through=True)
    quantize = torch.einsum("hnc,hcd->hnd", onehot, et)
    loss = commitment * torch.nn.functional.mse_loss(xt, quantize.detach())
    ((quantize * torch.from_numpy(g.reshape(1, -1, D))).sum() + loss).backward()
    return xt.grad.numpy()[0], et.grad.numpy()[0]


def test_vqref_straight_through_is_the_papers_estimator():
    torch.manual_seed(0)
    t = TorchVQ(dim=D, codebook_size=K, rotation_trick=False, straight_through=True, sample_codebook_temp=0.5,
                commitment_weight=0.7)  # fmt: skip
    r = from_vector_quantize_pytorch(t, dtype="float64")
    assert r.straight_through and r.sample_codebook_temp == 0.5
    rng = np.random.default_rng(4)
    x = batch(rng, SHAPE)
    g = (rng.standard_normal(SHAPE) * (2.0 / (SHAPE[0] * SHAPE[1] * D))).astype(np.float32)
    embed = np.array(r.codebook, dtype=np.float64)
    theirs = vqp_step(t, x, g)
    ours = vqref_step(r, x.astype(np.float64), g.astype(np.float64))
    # values, indices, losses and the state agree; the input gradient is the deviation
    np.testing.assert_array_equal(ours.indices, theirs.indices)
    np.testing.assert_allclose(ours.quantized, theirs.quantized, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r.cluster_size), t._codebook.cluster_size[0].numpy(), rtol=1e-5)
    ref_dx, _ = _reference_straight_through(x.astype(np.float64), embed, g.astype(np.float64), tau=0.5, commitment=0.7)
    np.testing.assert_allclose(ours.dx, ref_dx, rtol=1e-10, atol=1e-10 * np.abs(ref_dx).max())
    assert np.abs(ours.dx - theirs.dx).max() > 0.1 * np.abs(theirs.dx).max()


# ------------------------------------------------------------------ conversion


def test_the_new_options_convert_both_ways():
    kw = dict(stochastic_sample_codes=True, sample_codebook_temp=0.4, straight_through=True,
              codebook_diversity_loss_weight=0.3, codebook_diversity_temperature=7.0)  # fmt: skip
    for t in (TorchVQ(dim=D, codebook_size=K, rotation_trick=False, **kw),
              TorchRVQ(dim=D, codebook_size=K, num_quantizers=2, rotation_trick=False, **kw)):  # fmt: skip
        r = from_vector_quantize_pytorch(t)
        first = r.layers[0] if r.is_stack else r
        assert {k: getattr(first, k) for k in kw} == kw
        back = to_vector_quantize_pytorch(r)
        layer = back.layers[0] if hasattr(back, "layers") else back
        assert layer._codebook.gumbel_sample.keywords == {"stochastic": True, "straight_through": True}
        assert layer._codebook.sample_codebook_temp == 0.4
        assert layer.codebook_diversity_loss_weight == 0.3 and layer.codebook_diversity_temperature == 7.0


def test_vqref_only_combinations_are_refused_on_export():
    with pytest.raises(ValueError, match="soft_assignment"):
        to_vector_quantize_pytorch(vqref.VectorQuantize(D, K, soft_assignment=True))
    with pytest.raises(ValueError, match="straight_through=True with learnable_codebook"):
        to_vector_quantize_pytorch(vqref.VectorQuantize(D, K, straight_through=True, learnable_codebook=True,
                                                        ema_update=False))  # fmt: skip
    # vqp refuses that combination itself
    with pytest.raises(AssertionError):
        TorchVQ(dim=D, codebook_size=K, straight_through=True, learnable_codebook=True, ema_update=False,
                rotation_trick=False)  # fmt: skip


def test_the_state_after_a_sampled_step_is_read_back(rng):
    # sampling changes what the EMA sees; a converted module carries the sampled step's state
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, rotation_trick=False, stochastic_sample_codes=True))
    x = batch(rng, SHAPE)
    with vqp_noise_like_vqref(r, SHAPE[0] * SHAPE[1]):
        vqp_step(t, x, None)
    vqref_step(r, x, None)
    again = from_vector_quantize_pytorch(t)
    np.testing.assert_allclose(B.to_numpy(again.codebook), B.to_numpy(r.codebook), rtol=1e-5, atol=1e-6)
