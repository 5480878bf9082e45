"""Conformance of ``LFQ`` and ``ResidualLFQ`` with vector-quantize-pytorch ("vqp") 1.32.0.

Recipe (as the rest of the suite, docs/deviations.md section 10): build the vqp module under
``torch.manual_seed``, convert it with :func:`vqref.interop.from_vector_quantize_pytorch`, feed
both the same float32 batches in training mode, and compare step by step: quantized, indices,
the auxiliary loss and its parts, the input gradient and the projection gradients; then take an
SGD step on the projections in both and go on.  The decoder's share of dx (upstream ``g``, no
loss gradient) and the losses' share (``daux = 1``, ``g = 0``) are compared separately, each
relative to its own size, so that neither can hide inside the tolerance of the other.

Random subsets (``frac_per_sample_entropy < 1``).  vqp draws the tokens of its entropy penalty
as ``torch.randn(n).argsort() < int(n * frac)``; :func:`vqp_subsets_like_vqref` replays a copy of
vqref's generator and hands vqp, through that ``torch.randn`` call, values whose ranks select
exactly vqref's tokens.  Neither library's code is changed.

The documented differences (docs/deviations.md section 12) are pinned at the end.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import vector_quantize_pytorch as vqp

from vqref import LFQ, ResidualLFQ
from vqref.interop import export_state_dict, from_vector_quantize_pytorch, to_vector_quantize_pytorch

LR = 0.05


def make_pair(make, seed: int = 0):
    torch.manual_seed(seed)
    t = make()
    return t, from_vector_quantize_pytorch(t, seed=seed)


def _subset(gen: np.random.Generator, n: int, frac: float) -> np.ndarray:
    # vqref.quantizers.lfq_options.token_rows without a mask
    return np.sort(gen.choice(n, size=max(1, int(n * frac)), replace=False))


@contextlib.contextmanager
def vqp_subsets_like_vqref(r, n: int):
    """Within the block, vqp's ``torch.randn(n)`` (its random token subset) selects the tokens that
    vqref's next forward draws, depth by depth."""
    frac = r.frac_per_sample_entropy
    if frac >= 1.0:
        yield
        return
    gen = copy.deepcopy(r.state.rngs[0])
    real = torch.randn

    def ranks(*size, **kw):
        if size != (n,):
            return real(*size, **kw)
        chosen = _subset(gen, n, frac)
        order = np.empty(n, dtype=np.int64)  # argsort(v)[i] < n_s exactly for the chosen i
        picked = np.zeros(n, bool)
        picked[chosen] = True
        order[picked] = np.arange(chosen.size)
        order[~picked] = np.arange(chosen.size, n)
        v = np.empty(n)
        v[order] = np.arange(n)
        return torch.tensor(v, dtype=torch.float32)

    with mock.patch.object(torch, "randn", ranks):
        yield


def _torch_param(t, name: str):
    """vqp's parameter for vqref's state name, in vqref's layout (W input-major)."""
    module, kind = name.rsplit(".", 1)
    p = dict(t.named_parameters())[module + (".weight" if kind == "W" else ".bias")]
    cosine = type(getattr(t, module)).__name__ == "CosineSimLinear"
    return p, (kind == "W" and not cosine)


def _close(a, b, rtol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b), initial=0.0), 1e-30)
    err = np.max(np.abs(a - b), initial=0.0) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def step(t, r, x, g, *, tau: float = 100.0, residual: bool = False, dlosses=None):
    """One training step of both modules on float32 ``x``; compares everything, then takes an SGD
    step on the projections of both."""
    xt = torch.tensor(x, requires_grad=True)
    with vqp_subsets_like_vqref(r, int(np.prod(x.shape[:-1]))):
        if residual:
            qt, it, lt = t(xt)
            aux_t = (lt * torch.tensor(dlosses)).sum()
        else:
            (qt, it, lt), br_t = t(xt, inv_temperature=tau, return_loss_breakdown=True)
            aux_t = lt
    if residual:
        q, i, losses = r(x)
    else:
        (q, i, losses), br = r(x, inv_temperature=tau, return_loss_breakdown=True)
    np.testing.assert_array_equal(i, it.numpy())
    _close(q, qt.detach().numpy(), 1e-5, "quantized")
    _close(losses, lt.detach().numpy(), 2e-5, "aux loss")
    if not residual:
        for a, b, what in zip(br, br_t, ("per-sample entropy", "batch entropy", "commitment")):
            _close(a, b.detach().numpy(), 2e-5, what)
    names = r.learnable_names()
    tparams = [_torch_param(t, n)[0] for n in names]
    zero_l = np.zeros_like(dlosses) if residual else 0.0
    one_l = dlosses if residual else 1.0
    for (gq, gl), part in (((g, zero_l), "decoder"), ((np.zeros_like(g), one_l), "losses")):
        target = (qt * torch.tensor(gq)).sum() + (aux_t if part == "losses" else 0.0 * aux_t)
        grads_t = torch.autograd.grad(target, [xt, *tparams], retain_graph=True, allow_unused=True)
        other = copy.deepcopy(r)  # keeps the pending backward
        dx = other.backward(gq, gl)
        _close(dx, grads_t[0].numpy(), 1e-4, f"dx ({part})")
        for name, gt in zip(names, grads_t[1:]):
            gt = np.zeros(other.grads[name].shape) if gt is None else gt.numpy()
            transposed = _torch_param(t, name)[1]
            _close(other.grads[name], gt.T if transposed else gt, 1e-4, f"{name} ({part})")
    # the real step: both gradients at once, then SGD on the projections in both
    ((qt * torch.tensor(g)).sum() + aux_t).backward()
    r.backward(g, one_l)
    with torch.no_grad():
        for name, p in zip(names, tparams):
            p -= LR * p.grad
            p.grad = None
    for name in names:
        r.params[name] = r.params[name] - LR * r.grads[name]
    return i


LFQ_CONFIGS = {
    "default": dict(codebook_size=16, dim=4),
    "spherical-scaled": dict(codebook_size=16, dim=4, spherical=True, codebook_scale=0.7),
    "three-codebooks-commitment": dict(
        codebook_size=8, dim=9, num_codebooks=3, commitment_loss_weight=0.25, diversity_gamma=0.5
    ),  # fmt: skip
    "projections": dict(codebook_size=16, dim=10, num_codebooks=2),
    "forced-projections-no-bias": dict(codebook_size=8, dim=3, has_projections=True, projection_has_bias=False),
    "cosine-rotation-clamp-softplus": dict(
        codebook_size=8,
        dim=7,
        cosine_sim_project_in=True,
        orthogonal_rotation=True,
        soft_clamp_input_value=1.2,
        experimental_softplus_entropy_loss=True,
    ),  # fmt: skip
    "random-subset": dict(codebook_size=16, dim=4, frac_per_sample_entropy=0.4),
    "keep-codebook-axis": dict(codebook_size=16, dim=4, keep_num_codebooks_dim=True),
}


@pytest.mark.parametrize("name", sorted(LFQ_CONFIGS))
def test_lfq_converted_from_vqp_agrees_step_by_step(name, rng):
    t, r = make_pair(lambda: vqp.LFQ(**LFQ_CONFIGS[name]))
    assert isinstance(r, LFQ) and from_vector_quantize_pytorch(to_vector_quantize_pytorch(r)).config() == r.config()
    dim = t.dim
    for tau in (100.0, 1.5, 3.0):
        x = rng.standard_normal((2, 12, dim)).astype(np.float32)
        g = rng.standard_normal(x.shape).astype(np.float32)
        step(t, r, x, g, tau=tau)


RLFQ_CONFIGS = {
    "projected": dict(dim=6, codebook_size=16, num_quantizers=3),
    "spherical-commitment-clamp": dict(
        dim=4,
        codebook_size=16,
        num_quantizers=2,
        spherical=True,
        commitment_loss_weight=0.3,
        soft_clamp_input_value=2.0,
    ),  # fmt: skip
    "rotation-random-subset": dict(
        dim=5, codebook_size=8, num_quantizers=3, frac_per_sample_entropy=0.5, orthogonal_rotation=True
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(RLFQ_CONFIGS))
def test_residual_lfq_converted_from_vqp_agrees_step_by_step(name, rng):
    t, r = make_pair(lambda: vqp.ResidualLFQ(**RLFQ_CONFIGS[name]))
    assert isinstance(r, ResidualLFQ)
    Q = r.num_quantizers
    for _ in range(3):
        x = rng.standard_normal((2, 12, r.dim)).astype(np.float32)
        g = rng.standard_normal(x.shape).astype(np.float32)
        step(t, r, x, g, residual=True, dlosses=rng.uniform(0.5, 1.5, Q).astype(np.float32))


def test_vqref_modules_converted_to_vqp_agree(rng):
    for r in (
        LFQ(codebook_size=8, dim=5, num_codebooks=2, spherical=True, orthogonal_rotation=True, seed=3),
        LFQ(codebook_size=16, dim=6, cosine_sim_project_in=True, cosine_sim_project_in_scale=2.0, seed=4),
    ):
        t = to_vector_quantize_pytorch(r)
        assert type(t) is vqp.LFQ and t.training
        x = rng.standard_normal((2, 12, r.dim)).astype(np.float32)
        step(t, r, x, rng.standard_normal(x.shape).astype(np.float32), tau=2.0)
    rq = ResidualLFQ(dim=6, codebook_size=16, num_quantizers=2, commitment_loss_weight=0.2, seed=5)
    t = to_vector_quantize_pytorch(rq)
    assert type(t) is vqp.ResidualLFQ
    back = from_vector_quantize_pytorch(t)  # and back: the same configuration and state
    assert back.config() == rq.config()
    for k, v in rq.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
    x = rng.standard_normal((2, 12, 6)).astype(np.float32)
    step(t, rq, x, rng.standard_normal(x.shape).astype(np.float32), residual=True, dlosses=np.ones(2, np.float32))


def test_export_state_dict_loads_strictly_into_vqp():
    for r, t in (
        (LFQ(codebook_size=8, dim=5, orthogonal_rotation=True), vqp.LFQ(codebook_size=8, dim=5, orthogonal_rotation=True)),
        (LFQ(codebook_size=8, dim=3), vqp.LFQ(codebook_size=8, dim=3)),
        (ResidualLFQ(dim=5, codebook_size=8, num_quantizers=2, orthogonal_rotation=True),
         vqp.ResidualLFQ(dim=5, codebook_size=8, num_quantizers=2, orthogonal_rotation=True)),
    ):  # fmt: skip
        sd = export_state_dict(r)
        assert set(sd) == set(t.state_dict())
        t.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)


def test_channel_first_images_agree(rng):
    t, r = make_pair(lambda: vqp.LFQ(codebook_size=16, dim=4, commitment_loss_weight=0.5))
    x = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)  # (B, dim, H, W): vqp's default reads it channel-first
    g = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    qt, it, lt = t(xt, inv_temperature=2.0)
    ((qt * torch.tensor(g)).sum() + lt).backward()
    q, i, aux = r(x, inv_temperature=2.0)
    dx = r.backward(g)
    assert q.shape == x.shape and i.shape == (2, 3, 5)
    np.testing.assert_array_equal(i, it.numpy())
    _close(q, qt.detach().numpy(), 1e-6, "quantized")
    _close(aux, lt.item(), 2e-5, "aux")
    _close(dx, xt.grad.numpy(), 1e-4, "dx")


def test_the_harness_notices_a_wrong_option(rng):
    """Negative control: a converted module with another diversity_gamma fails the comparison."""
    t, r = make_pair(lambda: vqp.LFQ(codebook_size=16, dim=4))
    t.diversity_gamma = 0.9
    x = rng.standard_normal((2, 12, 4)).astype(np.float32)
    with pytest.raises(AssertionError):
        step(t, r, x, rng.standard_normal(x.shape).astype(np.float32), tau=2.0)


def test_without_the_replay_the_random_subsets_differ(rng, monkeypatch):
    """Negative control of the replay: with vqp's own draws the losses of the two libraries differ."""
    monkeypatch.setattr(sys.modules[__name__], "vqp_subsets_like_vqref", lambda r, n: contextlib.nullcontext())
    for make, residual in ((lambda: vqp.LFQ(**LFQ_CONFIGS["random-subset"]), False),
                           (lambda: vqp.ResidualLFQ(**RLFQ_CONFIGS["rotation-random-subset"]), True)):  # fmt: skip
        t, r = make_pair(make)
        x = rng.standard_normal((2, 12, r.dim)).astype(np.float32)
        g = rng.standard_normal(x.shape).astype(np.float32)
        with pytest.raises(AssertionError, match="aux loss"):
            step(t, r, x, g, tau=2.0, residual=residual, dlosses=np.ones(3, np.float32) if residual else None)


# ------------------------------------------------------------------ documented differences


def test_eval_mode_outputs_agree_and_vqp_returns_a_zero_loss(rng):
    t, r = make_pair(lambda: vqp.LFQ(codebook_size=16, dim=4))
    x = rng.standard_normal((2, 12, 4)).astype(np.float32)
    _, _, aux_train = copy.deepcopy(r)(x, inv_temperature=2.0)
    t.eval(), r.eval()
    (qt, it, lt), br = t(torch.tensor(x), inv_temperature=2.0, return_loss_breakdown=True)
    q, i, aux = r(x, inv_temperature=2.0)
    np.testing.assert_array_equal(q, qt.numpy())
    np.testing.assert_array_equal(i, it.numpy())
    assert lt.item() == 0.0 and br.batch_entropy.item() == 0.0  # vqp: no loss in eval
    assert float(aux) == float(aux_train) != 0.0  # vqref: the same loss as in training
    rt, rr = make_pair(lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2))
    rt.eval(), rr.eval()
    np.testing.assert_array_equal(rt(torch.tensor(x))[2].detach().numpy(), np.zeros(2))
    assert np.all(rr(x)[2] != 0.0)


def test_mask_vqp_batch_entropy_is_the_per_sample_entropy(rng):
    """vqp flattens the masked tokens with their codebook axis, so its 'batch' entropy is taken row by
    row: it equals the per-sample entropy.  vqref takes the entropy of the masked tokens' mean."""
    t, r = make_pair(lambda: vqp.LFQ(codebook_size=16, dim=4))
    x = rng.standard_normal((2, 12, 4)).astype(np.float32)
    mask = rng.random((2, 12)) < 0.6
    _, br_t = t(torch.tensor(x), inv_temperature=2.0, mask=torch.tensor(mask), return_loss_breakdown=True)
    assert br_t.batch_entropy.item() == pytest.approx(br_t.per_sample_entropy.item(), rel=1e-6)
    _, br = r(x, inv_temperature=2.0, mask=mask, return_loss_breakdown=True)
    # vqref's value is vqp's own on the masked tokens alone, without a mask
    _, br_sub = t(torch.tensor(x[mask][None]), inv_temperature=2.0, return_loss_breakdown=True)
    _close(br.batch_entropy, br_sub.batch_entropy.item(), 2e-5, "masked batch entropy")
    _close(br.per_sample_entropy, br_t.per_sample_entropy.item(), 2e-5, "masked per-sample entropy")
    assert abs(float(br.batch_entropy) - float(br.per_sample_entropy)) > 0.1


def test_empty_token_sets_give_nan_in_vqp_and_zero_losses_in_vqref(rng):
    x = rng.standard_normal((1, 3, 4)).astype(np.float32)
    t, r = make_pair(lambda: vqp.LFQ(codebook_size=16, dim=4, frac_per_sample_entropy=0.2))  # int(3 * 0.2) = 0
    assert np.isnan(t(torch.tensor(x))[2].item())
    assert np.isfinite(float(r(x)[2]))  # vqref draws max(1, int(n frac)) = 1 token
    t, r = make_pair(lambda: vqp.LFQ(codebook_size=16, dim=4))
    none = np.zeros((1, 3), bool)
    assert np.isnan(t(torch.tensor(x), mask=torch.tensor(none))[2].item())
    assert float(r(x, mask=none)[2]) == 0.0


def test_float64_input_is_quantized_in_float64(rng):
    x = np.array([[[1e-50, -1.0, 2.0, -3.0]]])  # 1e-50 is positive in float64 and 0 in float32
    t, r = make_pair(lambda: vqp.LFQ(codebook_size=16, dim=4))
    r64 = from_vector_quantize_pytorch(t, dtype="float64")
    _, it, _ = t(torch.tensor(x))  # force_quantization_f32: the sign of float32(1e-50) = 0, so -1
    _, i, _ = r64(x)
    assert it.item() == 0b0010 and i.item() == 0b1010
    exact = vqp.LFQ(codebook_size=16, dim=4, force_quantization_f32=False).double()  # (float32 buffers fail)
    assert exact(torch.tensor(x))[1].item() == i.item()


def test_residual_decoding_of_spherical_and_rotated_stacks(rng):
    """vqp's get_output_from_indices sums the raw codebooks (+-2^-l), not what its depths output."""
    for kw in (dict(spherical=True), dict(orthogonal_rotation=True)):
        t, r = make_pair(lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, **kw))
        t.eval(), r.eval()
        x = rng.standard_normal((2, 12, 4)).astype(np.float32)
        qt, it, _ = t(torch.tensor(x))
        q, i, _ = r(x)
        np.testing.assert_array_equal(i, it.numpy())
        _close(r.get_output_from_indices(i), q, 1e-6, "vqref decoding")
        assert np.max(np.abs(t.get_output_from_indices(it).detach().numpy() - qt.numpy())) > 0.1


def test_spherical_outputs_are_exactly_the_code(rng):
    t, r = make_pair(lambda: vqp.LFQ(codebook_size=16, dim=4, spherical=True, codebook_scale=0.7))
    x = rng.standard_normal((4, 50, 4)).astype(np.float32)
    q, _, _ = r(x)
    qt, _, _ = t(torch.tensor(x, requires_grad=True))
    assert np.unique(np.abs(q)).size == 1  # one value, the code's entry 0.7 / 2
    assert np.unique(np.abs(qt.detach().numpy())).size > 1  # vqp: u + (q - u), within a few ulps
    _close(q, qt.detach().numpy(), 1e-6, "quantized")


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="straight_through_activation=Tanh"):
        from_vector_quantize_pytorch(vqp.LFQ(codebook_size=16, dim=4, straight_through_activation=torch.nn.Tanh()))
    with pytest.raises(ValueError, match="quantize_dropout=True"):
        from_vector_quantize_pytorch(vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2, quantize_dropout=True))
    odd = vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, straight_through_activation=torch.nn.Tanh())
    odd.layers[2].diversity_gamma = 0.5
    with pytest.raises(ValueError, match=r"straight_through_activation.*depth 2 configured differently"):
        from_vector_quantize_pytorch(odd)
    with pytest.raises(TypeError, match="LFQ"):
        export_state_dict(object())
    # no effect in vqref (deviations 12.5): accepted either way
    assert from_vector_quantize_pytorch(vqp.LFQ(codebook_size=16, dim=4, force_quantization_f32=False)).dim == 4
