"""Gumbel sampling, the straight-through Gumbel-softmax and soft estimators, the diversity loss.

True derivatives (the logits, the softmax, the clamped entropy, the diversity loss, the soft
assignment and the whole soft quantizer with its codes held fixed) are checked against float64
finite differences with a random upstream gradient; the straight-through Gumbel-softmax (a
surrogate) against a torch autograd reference written here from the paper, with ``.detach()``
where the math has sg[.].  Each checker has a negative control.  Sampling: reproducible per seed,
frequencies against ``softmax(l / tau)`` by a chi-square test, tau -> 0 gives the nearest code.
vector-quantize-pytorch itself is compared in tests/conformance/test_gumbel_conformance.py.

Symbols: N = 11 rows, K = 7 codes, D = 5 features (distinct on purpose), P positions.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref.core import quantize as core_quantize
from vqref.core.quantize import EstimatorGrads, quantize_backward, quantize_forward
from vqref.ops.gumbel import (
    ENTROPY_EPS,
    clamped_entropy_backward,
    clamped_entropy_forward,
    code_logits_backward,
    code_logits_forward,
    diversity_loss_backward,
    diversity_loss_forward,
    gumbel_max_sample,
    gumbel_noise,
    gumbel_softmax_backward,
    gumbel_softmax_forward,
    soft_assignment_backward,
    soft_assignment_forward,
    softmax_backward,
    softmax_forward,
)
from vqref.testing import check_against_torch, check_vjp

N, K, D = 11, 7, 5


def _problem(rng, n=N, k=K, d=D):
    """x (n, d) and a codebook (k, d), every distance well above the 1e-4 clamp."""
    return rng.standard_normal((n, d)), rng.standard_normal((k, d)) * 1.5


# ------------------------------------------------------------------ host oracles (independent of vqref)


def np_logits(x, c, cosine=False):
    if cosine:
        xh = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
        ch = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-6)
        return xh @ ch.T
    return -np.sqrt(np.maximum(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1), 1e-8))


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_diversity(logits, T, P):
    p = np_softmax(T * logits)
    pbar = np.stack([p[n::P].mean(0) for n in range(P)])  # rows i with i mod P == n
    h = -(pbar * np.log(np.maximum(pbar, 1e-5))).sum(-1)
    return -h.mean()


# ------------------------------------------------------------------ ops: true derivatives


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_logits_value_and_finite_differences(bk64, rng, metric):
    x, c = _problem(rng)
    logits, _ = code_logits_forward(bk64.asarray(x), bk64.asarray(c), metric=metric)
    expected = x @ c.T if metric == "dot" else np_logits(x, c)
    np.testing.assert_allclose(bk64.np(logits), expected, rtol=1e-12, atol=1e-12)
    check_vjp(
        lambda a, b: code_logits_forward(a, b, metric=metric)[0],
        lambda g, a, b: code_logits_backward(g, code_logits_forward(a, b, metric=metric)[1]),
        [bk64.asarray(x), bk64.asarray(c)], seed=1, rtol=1e-7,
    )  # fmt: skip


def test_logits_clamp_at_its_boundary_matches_torch():
    # ||x - c||^2 = (1e-4)^2 = 1e-8 exactly in float64: on the clamp, where torch's clamp lets the
    # gradient through; just inside it (and at 0) the gradient through that code is zero.
    import torch

    for gap, passes in ((1e-4, True), (0.999e-4, False), (0.0, False), (1.001e-4, True)):
        x, c = np.zeros((1, 1)), np.full((1, 1), gap)
        logits, cache = code_logits_forward(x, c)
        dx, dc = code_logits_backward(np.ones((1, 1)), cache)
        xt = torch.tensor(x, requires_grad=True)
        ct = torch.tensor(c, requires_grad=True)
        ref = -(xt**2 + ct**2 - 2 * xt * ct).clamp(min=1e-8).sqrt()
        ref.sum().backward()
        np.testing.assert_allclose(logits, ref.detach().numpy(), rtol=1e-15)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=0)
        np.testing.assert_allclose(dc, ct.grad.numpy(), rtol=1e-12, atol=0)
        assert (dx[0, 0] != 0) == passes, gap


def test_softmax_entropy_gumbel_softmax_and_soft_assignment_match_finite_differences(bk64, rng):
    z = bk64.asarray(rng.standard_normal((N, K)) * 2)
    check_vjp(lambda a: softmax_forward(a)[0], lambda g, a: (softmax_backward(g, softmax_forward(a)[1]),), [z], seed=2)
    noise = bk64.asarray(gumbel_noise((N, K), 5, like=z))
    for tau, g in ((0.7, noise), (2.5, None)):
        check_vjp(
            lambda a: gumbel_softmax_forward(a, temperature=tau, noise=g)[0],
            lambda d, a: (gumbel_softmax_backward(d, gumbel_softmax_forward(a, temperature=tau, noise=g)[1]),),
            [z], seed=3,
        )  # fmt: skip
    y = bk64.asarray(np_softmax(rng.standard_normal((N, K))))
    check_vjp(
        lambda a, b: soft_assignment_forward(a, b)[0],
        lambda d, a, b: soft_assignment_backward(d, soft_assignment_forward(a, b)[1]),
        [y, bk64.asarray(rng.standard_normal((K, D)))], seed=4,
    )  # fmt: skip
    # the entropy with some entries on each side of the clamp (not on it: there it has a kink)
    p = rng.uniform(0.01, 1.0, (3, K))
    p[:, :2] = rng.uniform(1e-7, 5e-6, (3, 2))
    check_vjp(
        lambda a: clamped_entropy_forward(a)[0],
        lambda d, a: (clamped_entropy_backward(d, clamped_entropy_forward(a)[1]),),
        [bk64.asarray(p)], seed=5, h=1e-9, rtol=1e-6,
    )  # fmt: skip


def test_entropy_clamp_at_its_boundary():
    # d(-p log max(p, eps))/dp: -(log p + 1) where p >= eps (at p = eps the gradient passes, as
    # torch's clamp lets it), -log eps below
    p = np.array([[ENTROPY_EPS, ENTROPY_EPS * 0.5, 0.0, 0.25]])
    h, cache = clamped_entropy_forward(p)
    dp = clamped_entropy_backward(np.ones(1), cache)
    log_eps = np.log(ENTROPY_EPS)
    np.testing.assert_allclose(dp[0], [-(log_eps + 1), -log_eps, -log_eps, -(np.log(0.25) + 1)], rtol=1e-14)
    np.testing.assert_allclose(h, [-(ENTROPY_EPS * log_eps + 0.5 * ENTROPY_EPS * log_eps + 0.25 * np.log(0.25))])


@pytest.mark.parametrize("positions", [1, 3])
def test_diversity_loss_value_and_finite_differences(bk64, rng, positions):
    n = 4 * positions
    logits = rng.standard_normal((n, K)) * 0.05  # T = 100 makes these sharp but not one-hot
    loss, _ = diversity_loss_forward(bk64.asarray(logits), inverse_temperature=100.0, positions=positions)
    assert loss.shape == ()
    np.testing.assert_allclose(float(bk64.np(loss)), np_diversity(logits, 100.0, positions), rtol=1e-12)
    check_vjp(
        lambda a: diversity_loss_forward(a, inverse_temperature=100.0, positions=positions)[0],
        lambda d, a: (diversity_loss_backward(d, diversity_loss_forward(a, inverse_temperature=100.0,
                                                                        positions=positions)[1]),),
        [bk64.asarray(logits)], seed=6, h=1e-7, rtol=1e-6,
    )  # fmt: skip


def test_diversity_groups_rows_by_position_and_refuses_a_non_divisor(rng):
    logits = rng.standard_normal((6, K))
    # positions = 2: rows 0, 2, 4 form one group; a loss grouping consecutive rows would differ
    by_position = np_diversity(logits, 3.0, 2)
    consecutive = np_diversity(logits.reshape(2, 3, K).transpose(1, 0, 2).reshape(6, K), 3.0, 2)
    assert not np.isclose(by_position, consecutive)
    np.testing.assert_allclose(diversity_loss_forward(logits, inverse_temperature=3.0, positions=2)[0], by_position)
    with pytest.raises(ValueError, match="positions must divide"):
        diversity_loss_forward(logits, positions=4)


def test_finite_difference_checker_catches_a_wrong_backward(rng):
    # negative controls: a softmax backward without the centring term, a soft assignment whose
    # codebook gradient is the hard one, and the entropy's clamp ignored
    z = rng.standard_normal((N, K))
    with pytest.raises(AssertionError):
        check_vjp(lambda a: softmax_forward(a)[0], lambda g, a: (softmax_forward(a)[0] * g,), [z], seed=2)
    y = np_softmax(rng.standard_normal((N, K)))
    c = rng.standard_normal((K, D))
    wrong = lambda d, a, b: (d @ b.T, np.eye(K)[np.argmax(a, 1)].T @ d)  # noqa: E731
    with pytest.raises(AssertionError):
        check_vjp(lambda a, b: soft_assignment_forward(a, b)[0], wrong, [y, c], seed=4)
    p = rng.uniform(1e-7, 5e-6, (2, K))
    no_clamp = lambda d, a: (-d[:, None] * (np.log(a) + 1),)  # noqa: E731
    with pytest.raises(AssertionError):
        check_vjp(lambda a: clamped_entropy_forward(a)[0], no_clamp, [p], seed=5, h=1e-9)


# ------------------------------------------------------------------ sampling


def test_gumbel_noise_is_reproducible_clamped_and_standard(bk):
    a = bk.np(gumbel_noise((N, K), 3, like=bk.asarray(np.zeros(1))))
    b = gumbel_noise((N, K), np.random.default_rng(3), like=np.zeros(1))
    np.testing.assert_array_equal(a, b.astype(a.dtype))  # same numbers on every backend, cast
    assert a.dtype == bk.dtype_name

    class Zeros(np.random.Generator):  # u = 0: both logarithms clamped at 1e-20, a finite value
        def random(self, size=None, out=None):
            return np.zeros(size) if out is None else np.copyto(out, 0.0)

    for fast in (True, False):  # the blocked fast path and the definition
        g = gumbel_noise((1, 2), Zeros(np.random.PCG64()), like=np.zeros(1), fast=fast)
        np.testing.assert_allclose(g, -np.log(-np.log(1e-20)))
    big = gumbel_noise((200_000,), 0, like=np.zeros(1))
    assert abs(big.mean() - np.euler_gamma) < 0.01 and abs(big.var() - np.pi**2 / 6) < 0.03


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gumbel_max_frequencies_follow_softmax_of_logits_over_tau(tau):
    logits = np.array([-1.0, -0.3, -0.8, -2.0, -0.5])
    n = 40_000
    noise = gumbel_noise((n, 5), 11, like=np.zeros(1))
    idx = gumbel_max_sample(np.tile(logits, (n, 1)), noise, temperature=tau)
    counts = np.bincount(idx, minlength=5)

    def chi2(p):
        return float(((counts - n * p) ** 2 / (n * p)).sum())

    assert chi2(np_softmax(logits / tau)) < 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    assert chi2(np_softmax(logits)) > 100  # negative control: the distribution without tau


def test_small_temperature_gives_the_nearest_code_and_zero_is_refused(rng):
    x, c = _problem(rng)
    logits, _ = code_logits_forward(x, c)
    noise = gumbel_noise((N, K), 2, like=x)
    np.testing.assert_array_equal(gumbel_max_sample(logits, noise, temperature=1e-6), np.argmax(logits, 1))
    assert not np.array_equal(gumbel_max_sample(logits, noise, temperature=5.0), np.argmax(logits, 1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gumbel_max_sample(logits, noise, temperature=0.0)
    # a tiny temperature gives no NaN in float32: the row maximum is subtracted first, so the
    # other entries overflow to -inf (probability 0) and the largest stays at 0
    with np.errstate(over="ignore"):
        y, _ = gumbel_softmax_forward(logits.astype(np.float32), temperature=1e-40)
    assert np.all(np.isfinite(y)) and np.array_equal(np.argmax(y, 1), np.argmax(logits, 1))


# ------------------------------------------------------------------ the quantizer: soft is a true derivative


def _stacked(out):
    return np.concatenate([np.reshape(out.quantized, -1), np.reshape(out.loss, (1,))])


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_soft_quantizer_matches_finite_differences(bk64, rng, cosine):
    x, c = _problem(rng)
    xp = bk64.xp
    idx = bk64.asarray(np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), 1), dtype=xp.int64)  # held fixed
    opts = dict(soft_assignment=True, sample_codebook_temp=0.6, use_cosine_sim=cosine, indices=idx,
                codebook_diversity_loss_weight=0.3, codebook_diversity_temperature=2.0,
                learnable_codebook=True, commitment_weight=0.25)  # fmt: skip

    def f(a, b):
        out = quantize_forward(a, b, **opts)[0]
        return xp.concat([xp.reshape(out.quantized, (-1,)), xp.reshape(out.loss, (1,))])

    def vjp(g, a, b):
        _, cache = quantize_forward(a, b, **opts)
        return quantize_backward(xp.reshape(g[:-1], (N, D)), g[-1], cache)

    check_vjp(f, vjp, [bk64.asarray(x), bk64.asarray(c)], seed=7, rtol=1e-7)


# ------------------------------------------------------------------ straight-through Gumbel vs torch


def torch_quantize(x, c, *, tau, noise, indices, beta, cosine, div_w, div_T, estimator="gumbel"):
    """The straight-through Gumbel-softmax quantizer written from Jang et al. (arXiv 1611.01144):
    value ``z C`` with the one-hot z, gradient through ``y = softmax(l / tau + g)`` in z's place."""
    import torch
    import torch.nn.functional as F

    if cosine:
        x, c = F.normalize(x, dim=-1, eps=1e-6), F.normalize(c, dim=-1, eps=1e-6)
        logits = x @ c.T
    else:
        d2 = (x**2).sum(-1, keepdim=True) + (c**2).sum(-1) - 2 * x @ c.T
        logits = -d2.clamp(min=1e-8).sqrt()
    idx = torch.as_tensor(np.array(indices))  # a writable copy
    z = F.one_hot(idx, c.shape[0]).to(x.dtype)
    g = 0.0 if noise is None else torch.as_tensor(noise)
    y = torch.softmax(logits / tau + g, dim=-1)
    if estimator == "gumbel":
        out = (z + y - y.detach()) @ c
    else:  # the plain STE, for the negative control
        out = x + (z @ c - x).detach()
    loss = beta * ((x - (z @ c).detach()) ** 2).mean()
    if div_w:
        p = torch.softmax(div_T * logits, dim=-1).mean(0)
        loss = loss + div_w * (p * p.clamp(min=1e-5).log()).sum()
    return out, loss


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
@pytest.mark.parametrize("sampled", [False, True], ids=["nearest", "sampled"])
def test_straight_through_gumbel_matches_torch_with_detach(bk64, rng, cosine, sampled):
    x, c = _problem(rng)
    noise = gumbel_noise((N, K), 9, like=bk64.asarray(x)) if sampled else None
    opts = dict(straight_through=True, sample_codebook_temp=0.8, use_cosine_sim=cosine, noise=noise,
                codebook_diversity_loss_weight=0.2, codebook_diversity_temperature=3.0, commitment_weight=0.5)  # fmt: skip
    out, cache = quantize_forward(bk64.asarray(x), bk64.asarray(c), **opts)
    k = bk64.np(out.indices)
    if sampled:
        np.testing.assert_array_equal(k, np.argmax(np_logits(x, c, cosine) / 0.8 + bk64.np(noise), 1))
    else:
        np.testing.assert_array_equal(k, np.argmax(np_logits(x, c, cosine), 1))
    # the value is the code itself, bit for bit: the STE's output for the same codes
    ste = quantize_forward(bk64.asarray(x), bk64.asarray(c), use_cosine_sim=cosine, indices=out.indices)[0]
    np.testing.assert_array_equal(bk64.np(out.quantized), bk64.np(ste.quantized))
    g, dl = rng.standard_normal((N, D)), 0.7
    dx, dc = quantize_backward(bk64.asarray(g), dl, cache)
    host_noise = None if noise is None else bk64.np(noise)
    ref = lambda a, b: torch_quantize(a, b, tau=0.8, noise=host_noise, indices=k, beta=0.5, cosine=cosine,  # noqa: E731
                                      div_w=0.2, div_T=3.0)  # fmt: skip
    check_against_torch(ref, [x, c], (g, np.asarray(dl)), [dx, dc], rtol=1e-10)


def test_torch_check_catches_the_ste_in_place_of_the_gumbel_estimator(rng, monkeypatch):
    x, c = _problem(rng)
    g = rng.standard_normal((N, D))
    opts = dict(straight_through=True, sample_codebook_temp=0.8, commitment_weight=0.5)
    ref = lambda a, b: torch_quantize(a, b, tau=0.8, noise=None, indices=k, beta=0.5, cosine=False,  # noqa: E731
                                      div_w=0.0, div_T=1.0)  # fmt: skip
    out, cache = quantize_forward(x, c, **opts)
    k = out.indices
    assert check_against_torch(ref, [x, c], (g, np.asarray(1.0)), quantize_backward(g, 1.0, cache)).passed
    # 1. the STE's gradient (what vector-quantize-pytorch's final step gives) fails
    monkeypatch.setattr(core_quantize, "estimator_backward", lambda d, ca, **kw: EstimatorGrads(d, None, None))
    res = check_against_torch(
        ref, [x, c], (g, np.asarray(1.0)), quantize_backward(g, 1.0, cache), raise_on_failure=False
    )
    assert not res.passed
    monkeypatch.undo()
    # 2. the codebook gradient of the soft assignment (y^T g instead of z^T g) fails
    soft = quantize_forward(x, c, **{**opts, "straight_through": False, "soft_assignment": True})[1]
    dx_soft, dc_soft = quantize_backward(g, 1.0, soft)
    dx, _ = quantize_backward(g, 1.0, cache)
    np.testing.assert_allclose(dx_soft, dx, rtol=1e-12)  # y's way to x is the same without noise
    res = check_against_torch(ref, [x, c], (g, np.asarray(1.0)), [dx, dc_soft], raise_on_failure=False)
    assert not res.passed and res.errors[0] < 1e-10 < res.errors[1]


def test_estimators_are_exclusive_and_soft_does_not_sample(rng):
    x, c = _problem(rng)
    with pytest.raises(ValueError, match="at most one"):
        quantize_forward(x, c, straight_through=True, rotation_trick=True)
    with pytest.raises(ValueError, match="does not sample"):
        quantize_forward(x, c, soft_assignment=True, noise=gumbel_noise((N, K), 0, like=x))


# ------------------------------------------------------------------ the module


def _vq(bk, **kw):
    return VectorQuantize(D, K, seed=3, xp=bk.name, dtype=bk.dtype_name, **kw)


def test_sampling_is_reproducible_per_seed_on_every_backend(bk, rng):
    x = rng.standard_normal((40, D))
    a, b = _vq(bk, stochastic_sample_codes=True), _vq(bk, stochastic_sample_codes=True)
    other = VectorQuantize(D, K, seed=4, dtype=bk.dtype_name, stochastic_sample_codes=True)
    other.load_state_dict({k: bk.np(v) for k, v in a.state_dict().items()})  # the same codebook, another seed
    ia, ib = bk.np(a(bk.asarray(x))[1]), bk.np(b(bk.asarray(x))[1])
    np.testing.assert_array_equal(ia, ib)
    assert ia.dtype == np.int64 and ia.shape == (40,)
    ref = VectorQuantize(D, K, seed=3, dtype=bk.dtype_name, stochastic_sample_codes=True)
    np.testing.assert_array_equal(ia, ref(x.astype(bk.dtype_name))[1])  # numpy's numbers on every backend
    assert not np.array_equal(ia, other(x.astype(bk.dtype_name))[1])


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("estimator", ["ste", "rotation", "gumbel", "diversity"])
def test_a_sample_forms_the_logits_only_for_a_soft_path(bk, rng, cosine, estimator):
    """With noise, the STE and the rotation trick sample without keeping the logits (their backward
    never reaches them); the straight-through Gumbel-softmax and the diversity loss keep them.
    Either way the codes are the sample of the definition, the logits' Gumbel-max."""
    x, c = _problem(rng, n=40)
    noise = gumbel_noise((40, K), 7, like=x)
    kw = dict(rotation_trick=estimator == "rotation", straight_through=estimator == "gumbel",
              codebook_diversity_loss_weight=0.3 if estimator == "diversity" else 0.0)  # fmt: skip
    xs, cs, gs = bk.asarray(x), bk.asarray(c), bk.asarray(noise)
    out, cache = quantize_forward(xs, cs, use_cosine_sim=cosine, sample_codebook_temp=0.7, noise=gs, **kw)
    assert (cache.logits is None) is (estimator in ("ste", "rotation"))
    xh, ch = (
        (x / np.linalg.norm(x, axis=1, keepdims=True), c / np.linalg.norm(c, axis=1, keepdims=True))
        if cosine
        else (x, c)
    )
    logits, _ = code_logits_forward(xh, ch, metric="dot" if cosine else "euclidean", fast=False)
    want = gumbel_max_sample(logits, noise, temperature=0.7, fast=False)
    np.testing.assert_array_equal(bk.np(out.indices), want)
    assert not np.array_equal(want, np.argmax(logits, axis=1))  # the noise moved some codes: a real sample
    dx, _ = quantize_backward(bk.asarray(rng.standard_normal((40, D))), bk.asarray(np.float64(1.0)), cache)
    assert np.all(np.isfinite(bk.np(dx)))


def test_sampling_only_in_training_with_a_positive_temperature(rng):
    x = rng.standard_normal((60, D))
    vq = VectorQuantize(D, K, seed=0, dtype="float64", stochastic_sample_codes=True, ema_update=False)
    nearest = np.argmin(((x[:, None] - vq.codebook[None]) ** 2).sum(-1), 1)
    before = vq.generator.bit_generator.state
    np.testing.assert_array_equal(vq(x, sample_codebook_temp=0.0)[1], nearest)  # per call: no sampling
    assert vq.generator.bit_generator.state == before  # and nothing drawn
    sampled = vq(x)[1]
    assert not np.array_equal(sampled, nearest) and vq.generator.bit_generator.state != before
    np.testing.assert_array_equal(vq(x, sample_codebook_temp=1e-7)[1], nearest)  # tau -> 0
    vq.eval()
    np.testing.assert_array_equal(vq(x)[1], nearest)


@pytest.mark.parametrize(
    "kw, call, msg",
    [
        ({}, dict(sample_codebook_temp=-1.0), r"sample_codebook_temp must be >= 0"),
        ({}, dict(sample_codebook_temp="1"), r"sample_codebook_temp must be a real number"),
        (
            dict(straight_through=True),
            dict(sample_codebook_temp=0.0),
            r"straight_through=True needs sample_codebook_temp > 0",
        ),
        (
            dict(soft_assignment=True),
            dict(sample_codebook_temp=0),
            r"soft_assignment=True needs sample_codebook_temp > 0",
        ),
    ],
)
def test_a_refused_call_changes_nothing(rng, kw, call, msg):
    vq = VectorQuantize(D, K, seed=0, stochastic_sample_codes=not kw, **kw)
    x = rng.standard_normal((N, D)).astype(np.float32)
    vq(x)
    before = (vq.state_dict(), vq.generator.bit_generator.state, vq.stats, vq.state.cache)
    with pytest.raises((ValueError, TypeError), match=msg):
        vq(x, **call)
    after = (vq.state_dict(), vq.generator.bit_generator.state, vq.stats, vq.state.cache)
    assert before[1:3] == after[1:3] and before[3] is after[3]
    for k in before[0]:
        np.testing.assert_array_equal(before[0][k], after[0][k])


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(straight_through=True, rotation_trick=True), r"rotation_trick and straight_through"),
        (dict(soft_assignment=True, straight_through=True), r"straight_through and soft_assignment"),
        (dict(soft_assignment=True, stochastic_sample_codes=True), r"soft_assignment .*stochastic_sample_codes=False"),
        (dict(straight_through=True, sample_codebook_temp=0.0), r"straight_through=True needs sample_codebook_temp"),
        (
            dict(soft_assignment=True, num_quantizers=2, gradient_routing="sum"),
            r"soft_assignment=True .*gradient_routing",
        ),
        (dict(sample_codebook_temp=-0.5), r"sample_codebook_temp must be >= 0"),
        (dict(codebook_diversity_loss_weight=-1.0), r"codebook_diversity_loss_weight must be >= 0"),
        (dict(codebook_diversity_temperature=float("inf")), r"codebook_diversity_temperature must be finite"),
        (dict(straight_through=1), r"straight_through must be True or False"),
    ],
)
def test_invalid_options_are_refused_by_name(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        VectorQuantize(D, K, **kw)


def test_soft_module_outputs_the_expected_code_in_training_and_the_nearest_in_eval(bk, rng):
    x = rng.standard_normal((3, 4, D))
    vq = _vq(bk, soft_assignment=True, sample_codebook_temp=0.7, ema_update=False)
    c = bk.np(vq.codebook).astype(np.float64)
    q, idx, _ = vq(bk.asarray(x))
    xf = x.reshape(-1, D)
    assert q.dtype == bk.dtype and q.shape == x.shape
    np.testing.assert_allclose(
        bk.np(q).reshape(-1, D), np_softmax(np_logits(xf, c) / 0.7) @ c, rtol=bk.rtol, atol=bk.rtol
    )
    np.testing.assert_array_equal(bk.np(idx).reshape(-1), np.argmax(np_logits(xf, c), 1))
    vq.eval()
    q_eval, idx_eval, _ = vq(bk.asarray(x))
    np.testing.assert_array_equal(bk.np(q_eval), bk.np(vq.get_output_from_indices(idx_eval)))


def test_straight_through_module_gradient_is_the_papers_not_the_ste(rng):
    x = rng.standard_normal((N, D))
    st = VectorQuantize(D, K, seed=1, dtype="float64", straight_through=True, sample_codebook_temp=0.9,
                        orthogonal_reg_weight=1e-9, commitment_weight=0.5)  # fmt: skip
    ste = VectorQuantize(D, K, seed=1, dtype="float64", commitment_weight=0.5)
    q, k, _ = st(x)
    q2, k2, _ = ste(x)
    np.testing.assert_array_equal(q, q2)
    g = rng.standard_normal((N, D))
    dx = st.backward(g, 1.0)
    assert not np.allclose(dx, ste.backward(g, 1.0))
    c = st.state.arrays["codebook"]  # the EMA moved it: the assignment used the one before the step
    c0 = VectorQuantize(D, K, seed=1, dtype="float64").codebook
    ref = lambda a, b: torch_quantize(a, b, tau=0.9, noise=None, indices=k, beta=0.5, cosine=False,  # noqa: E731
                                      div_w=0.0, div_T=1.0)  # fmt: skip
    res = check_against_torch(ref, [x, c0], (g, np.asarray(1.0)), [dx, None], raise_on_failure=False)
    assert res.errors[0] < 1e-10 and not np.array_equal(c, c0)
    # the codebook is learnable through the regulariser: the straight-through path reaches it too
    assert res.reference[1].any() and np.abs(st.grads["codebook"] - res.reference[1]).max() < 1e-6


def test_diversity_loss_in_the_module_averages_per_position(bk, rng):
    x = rng.standard_normal((4, 3, D))  # P = 3 positions of a batch of 4
    vq = _vq(bk, codebook_diversity_loss_weight=0.5, codebook_diversity_temperature=5.0, commitment_weight=0.0)
    c = bk.np(vq.codebook).astype(np.float64)
    _, _, loss = vq(bk.asarray(x))
    expected = 0.5 * np_diversity(np_logits(x.reshape(-1, D), c), 5.0, 3)
    np.testing.assert_allclose(float(bk.np(loss)), expected, rtol=bk.rtol * 10)
    np.testing.assert_allclose(float(bk.np(vq.last_losses["diversity"])), expected / 0.5, rtol=bk.rtol * 10)
    two_d = _vq(bk, codebook_diversity_loss_weight=0.5, codebook_diversity_temperature=5.0, commitment_weight=0.0)
    _, _, loss2 = two_d(bk.asarray(x.reshape(-1, D)))  # (N, D): one group of all rows
    np.testing.assert_allclose(float(bk.np(loss2)), 0.5 * np_diversity(np_logits(x.reshape(-1, D), c), 5.0, 1),
                               rtol=bk.rtol * 10)  # fmt: skip


def test_residual_stack_samples_each_depth_from_its_generator(rng):
    x = rng.standard_normal((50, D)).astype(np.float32)
    a = ResidualVQ(dim=D, num_quantizers=3, codebook_size=K, seed=5, stochastic_sample_codes=True,
                   straight_through=True, codebook_diversity_loss_weight=0.1)  # fmt: skip
    b = copy.deepcopy(a)
    qa, ia, la = a(x)
    qb, ib, lb = b(x)
    np.testing.assert_array_equal(ia, ib)
    assert ia.shape == (50, 3) and la.shape == (3,)
    dx = a.backward(rng.standard_normal(x.shape).astype(np.float32), np.ones(3, np.float32))
    assert dx.dtype == np.float32 and np.all(np.isfinite(dx))
    with pytest.raises(ValueError, match="gradient_routing"):
        ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, straight_through=True, gradient_routing="sum")


def test_old_model_files_load_with_the_defaults_of_the_new_options(tmp_path):
    import json

    vq = VectorQuantize(D, K, seed=0)
    path = tmp_path / "old.npz"
    vq.save(str(path))
    with np.load(path) as f:
        entries = {k: f[k] for k in f.files}
    config = json.loads(str(entries["config"]))
    for key in ("stochastic_sample_codes", "sample_codebook_temp", "straight_through", "soft_assignment",
                "codebook_diversity_loss_weight", "codebook_diversity_temperature"):  # fmt: skip
        del config[key]
    entries["config"] = np.asarray(json.dumps(config))
    np.savez(path, **entries)
    old = VectorQuantize.from_file(str(path))
    assert old.config() == vq.config()
    new = VectorQuantize(D, K, seed=0, straight_through=True, sample_codebook_temp=0.3,
                         codebook_diversity_loss_weight=0.2)  # fmt: skip
    new.save(str(tmp_path / "new.npz"))
    assert VectorQuantize.from_file(str(tmp_path / "new.npz")).config() == new.config()


def test_deeper_kmeans_of_a_sampling_stack_clusters_the_nearest_codes_residuals(rng):
    # docs/deviations.md §13: k-means initialises every depth before the forward samples, from the
    # residuals of the nearest codes.  decay = 1 keeps the codebooks at their k-means values, and
    # tau = 100 samples nearly uniformly: had depth 1 clustered sampled residuals, it would differ.
    x = rng.standard_normal((64, D)).astype(np.float32)
    kw = dict(dim=D, num_quantizers=2, codebook_size=K, seed=2, kmeans_init=True, decay=1.0)
    sampling = ResidualVQ(**kw, stochastic_sample_codes=True, sample_codebook_temp=100.0)
    nearest = ResidualVQ(**kw)
    _, idx_s, _ = sampling(x)
    _, idx_n, _ = nearest(x)
    assert (idx_s[:, 0] != idx_n[:, 0]).mean() > 0.5  # the forward did sample
    for level in range(2):
        np.testing.assert_array_equal(sampling.layers[level].codebook, nearest.layers[level].codebook)
