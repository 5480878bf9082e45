"""Lookup-free quantization: the ops, the composition, and the module.

The smooth steps (soft clamp, scores against every code, softmax, clamped entropy, the entropy
penalty, softplus, the cosine projection) are checked against float64 finite differences with a
random upstream gradient, each with a negative control; the whole backward (straight through the
sign, a surrogate) against the torch autograd reference of vqref.testing.torch_reference.lfq,
written with ``.detach()``; the fast path of the scores against the definition.  Sizes are
distinct: N = 11 tokens, C = 2 codebooks of d = 3 bits (K = 8 codes), dim = 5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vqref import LFQ
from vqref.core.lfq import LFQOptions, LFQParams, lfq_backward, lfq_codes, lfq_forward
from vqref.ops.entropy import (
    entropy_backward,
    entropy_forward,
    entropy_penalty_backward,
    entropy_penalty_forward,
    softmax_backward,
    softmax_forward,
    softplus_backward,
    softplus_forward,
)
from vqref.ops.lfq import (
    bits_to_indices,
    code_scores_backward,
    code_scores_forward,
    cosine_linear_backward,
    cosine_linear_forward,
    indices_to_bits,
    sign_codebook,
    sign_ste_forward,
    soft_clamp_backward,
    soft_clamp_forward,
)
from vqref.testing import check_vjp, rel_error
from vqref.testing.torch_reference.lfq import lfq_grads as torch_lfq

N, C, d, DIM = 11, 2, 3, 5
K = 2**d


def host_codes(d: int, value: float) -> np.ndarray:
    """All 2^d codes in index order, written independently: entry j is bit d-1-j of the index."""
    k = np.arange(2**d)
    bits = np.array([[(int(i) >> (d - 1 - j)) & 1 for j in range(d)] for i in k], dtype=np.float64)
    return value * (2 * bits - 1)  # (K, d)


# ---------------------------------------------------------------- ops: codes and indices


def test_sign_codes_indices_and_the_codebook(bk, rng):
    z = rng.standard_normal((N, d))
    z[0, 1] = 0.0  # a tie between both signs: -s, bit 0, as vector-quantize-pytorch
    q, _ = sign_ste_forward(bk.asarray(z), scale=0.5)
    assert q.dtype == bk.dtype
    np.testing.assert_array_equal(bk.np(q), np.where(z > 0, 0.5, -0.5))
    idx = bk.np(bits_to_indices(bk.asarray(z)))
    expected = [sum(int(z[i, j] > 0) << (d - 1 - j) for j in range(d)) for i in range(N)]
    np.testing.assert_array_equal(idx, expected)
    assert idx.dtype == np.int64 and idx[0] == expected[0] and (expected[0] >> (d - 2)) & 1 == 0
    all_idx = bk.asarray(np.arange(K), dtype=bk.xp.int64)
    np.testing.assert_array_equal(bk.np(indices_to_bits(all_idx, d)), host_codes(d, 1.0) > 0)
    np.testing.assert_array_equal(bk.np(bits_to_indices(sign_codebook(d, 0.5, like=bk.asarray(z)))), np.arange(K))
    np.testing.assert_array_equal(bk.np(sign_codebook(d, 0.5, like=bk.asarray(z))), host_codes(d, 0.5))


def test_the_sign_code_is_the_nearest_code_of_the_cube(rng):
    z = rng.standard_normal((40, 6))
    codes = host_codes(6, 1.0)
    dist = ((z[:, None, :] - codes[None, :, :]) ** 2).sum(-1)  # brute force over all 64 codes
    np.testing.assert_array_equal(bits_to_indices(z), np.argmin(dist, axis=1))


# ---------------------------------------------------------------- ops: smooth steps, finite differences


def test_code_scores_fast_path_equals_the_definition_and_the_distance(bk, rng):
    z = bk.asarray(rng.standard_normal((N, d)))
    fast, fcache = code_scores_forward(z, value=0.7)
    slow, scache = code_scores_forward(z, value=0.7, fast=False)
    codes = host_codes(d, 0.7)
    zh = bk.np(z).astype(np.float64)
    # the score is minus the squared distance up to a constant per row, as the docstring derives
    expected = -((zh[:, None, :] - codes[None]) ** 2).sum(-1) + (zh**2).sum(-1, keepdims=True) + d * 0.49
    assert fast.shape == (N, K) and fast.dtype == bk.dtype and fcache.codebook is None
    assert rel_error(bk.np(fast), expected) < bk.rtol and rel_error(bk.np(slow), expected) < bk.rtol
    ds = bk.asarray(rng.standard_normal((N, K)))
    assert rel_error(bk.np(code_scores_backward(ds, fcache)), bk.np(code_scores_backward(ds, scache))) < bk.rtol


@pytest.mark.parametrize("fast", [True, False])
def test_code_scores_backward_matches_finite_differences(bk64, rng, fast):
    z = bk64.asarray(rng.standard_normal((N, 4)))
    fwd = lambda z: code_scores_forward(z, value=0.6, fast=fast)[0]  # noqa: E731
    check_vjp(fwd, lambda g, z: (code_scores_backward(g, code_scores_forward(z, value=0.6, fast=fast)[1]),), [z])
    broken = lambda g, z: (0.5 * code_scores_backward(g, code_scores_forward(z, value=0.6, fast=fast)[1]),)  # noqa: E731
    assert not check_vjp(fwd, broken, [z], raise_on_failure=False).passed


def test_soft_clamp_and_softmax_and_softplus_backward_match_finite_differences(bk64, rng):
    z = bk64.asarray(2 * rng.standard_normal((N, 4)))
    fwd = lambda z: soft_clamp_forward(z, value=1.5)[0]  # noqa: E731
    check_vjp(fwd, lambda g, z: (soft_clamp_backward(g, soft_clamp_forward(z, value=1.5)[1]),), [z])
    broken = lambda g, z: (g * (1 - soft_clamp_forward(z, value=1.5)[1].t),)  # noqa: E731  (1 - t, not 1 - t^2)
    assert not check_vjp(fwd, broken, [z], raise_on_failure=False).passed
    s = bk64.asarray(rng.standard_normal((N, C, K)))
    sm = lambda s: softmax_forward(s, inv_temperature=1.7)[0]  # noqa: E731
    check_vjp(sm, lambda g, s: (softmax_backward(g, softmax_forward(s, inv_temperature=1.7)[1]),), [s])
    no_tau = lambda g, s: (
        softmax_backward(g, softmax_forward(s, inv_temperature=1.7)[1]._replace(inv_temperature=1.0)),
    )  # noqa: E731
    assert not check_vjp(sm, no_tau, [s], raise_on_failure=False).passed
    t = bk64.asarray(np.array([-60.0, -3.0, -0.2, 0.0, 0.4, 19.0, 25.0]))
    check_vjp(lambda t: softplus_forward(t)[0], lambda g, t: (softplus_backward(g, softplus_forward(t)[1]),), [t])
    np.testing.assert_allclose(bk64.np(softplus_forward(t)[0]), np.logaddexp(0.0, bk64.np(t)), rtol=1e-15, atol=0)


def test_cosine_projection_backward_matches_finite_differences(bk64, rng):
    x, W = bk64.asarray(rng.standard_normal((N, DIM))), bk64.asarray(rng.standard_normal((DIM, C * d)))
    fwd = lambda x, W: cosine_linear_forward(x, W, scale=1.3)[0]  # noqa: E731
    check_vjp(fwd, lambda g, x, W: cosine_linear_backward(g, cosine_linear_forward(x, W, scale=1.3)[1]), [x, W])
    y = bk64.np(fwd(x, W))
    assert np.all(np.abs(y) <= 1.3 + 1e-12)  # scaled cosines


def test_clamped_entropy_backward_matches_finite_differences_and_its_negative_control(bk64, rng):
    p = rng.dirichlet(np.ones(K), size=(N, C))
    p[0, 0] = [3e-6, 1 - 3e-6 - 6 * 2e-6] + [2e-6] * 6  # entries below the clamp
    p = bk64.asarray(p)
    fwd = lambda p: entropy_forward(p)[0]  # noqa: E731
    guard = lambda p: p >= 1e-5  # noqa: E731  no entry crosses the clamp under the perturbation
    check_vjp(fwd, lambda g, p: (entropy_backward(g, entropy_forward(p)[1]),), [p], guard=guard)

    def unclamped(g, p):  # the derivative of the exact entropy, -(log p + 1): wrong below the clamp
        return (g[..., None] * (-bk64.xp.log(p) - 1),)

    assert not check_vjp(fwd, unclamped, [p], guard=guard, raise_on_failure=False).passed


def test_entropy_clamp_boundary_lets_the_gradient_through_as_torch_does(bk64):
    torch = pytest.importorskip("torch")
    eps = 1e-5
    p = np.array([[eps, np.nextafter(eps, 0), np.nextafter(eps, 1), 1 - 3 * eps]])
    g = np.array([0.7])
    pt = torch.tensor(p, requires_grad=True)
    (-(pt * pt.clamp(min=eps).log()).sum(-1) * torch.tensor(g)).sum().backward()
    h, cache = entropy_forward(bk64.asarray(p))
    dp = bk64.np(entropy_backward(bk64.asarray(g), cache))
    np.testing.assert_allclose(dp, pt.grad.numpy(), rtol=1e-13)
    # at p = eps exactly the gradient passes (-log eps - 1); just below it does not (-log eps)
    np.testing.assert_allclose(dp[0, :2], 0.7 * np.array([-np.log(eps) - 1, -np.log(eps)]), rtol=1e-13)


@pytest.mark.parametrize(
    "bk64", [("numpy", "float64")], indirect=True
)  # finite differences: numpy only (slow on strict)
@pytest.mark.parametrize("tau", [0.3, 4.0])
def test_entropy_penalty_backward_matches_finite_differences(bk64, rng, tau):
    s = bk64.asarray(rng.standard_normal((N, C, K)))

    def fwd(s):
        return entropy_penalty_forward(s, inv_temperature=tau, diversity_gamma=0.8)[0].loss

    def vjp(g, s):
        return (entropy_penalty_backward(g, entropy_penalty_forward(s, inv_temperature=tau, diversity_gamma=0.8)[1]),)

    def guard(s):
        return softmax_forward(s, inv_temperature=tau)[0] >= 1e-5

    check_vjp(fwd, vjp, [s], guard=guard, seed=3)

    def no_diversity(g, s):  # the batch entropy's share dropped: must fail
        cache = entropy_penalty_forward(s, inv_temperature=tau, diversity_gamma=0.8)[1]
        return (entropy_penalty_backward(g, cache._replace(diversity_gamma=0.0)),)

    assert not check_vjp(fwd, no_diversity, [s], guard=guard, seed=3, raise_on_failure=False).passed


def test_per_sample_entropy_factorises_over_bits_and_the_batch_entropy_does_not(bk64, rng):
    """With sign codes the softmax is a product of d per-bit sigmoids (docs/math.md section 8)."""
    v, tau = 0.5, 0.8
    z = rng.standard_normal((N, d))
    scores, _ = code_scores_forward(bk64.asarray(z), value=v)
    p = bk64.np(softmax_forward(scores, inv_temperature=tau)[0])  # (N, K)
    pi = 1 / (1 + np.exp(-4 * tau * v * z))  # (N, d) P(bit j = 1)
    bits = host_codes(d, 1.0) > 0  # (K, d)
    product = np.prod(np.where(bits[None], pi[:, None, :], 1 - pi[:, None, :]), axis=-1)  # (N, K)
    np.testing.assert_allclose(p, product, rtol=1e-12)
    assert p.min() > 1e-5  # no clamp: the penalty's entropy is the exact entropy here
    out, _ = entropy_penalty_forward(bk64.asarray(scores[:, None, :]), inv_temperature=tau, diversity_gamma=1.0)
    binary = -(pi * np.log(pi) + (1 - pi) * np.log(1 - pi))  # (N, d)
    assert abs(float(out.per_sample) - binary.sum(1).mean()) < 1e-12
    # two rows with opposite signs: their mean has two equally likely codes (entropy log 2), while
    # the product of the mean bit probabilities would be uniform over all 2^d codes (d log 2)
    two, _ = code_scores_forward(bk64.asarray(np.array([[40.0] * d, [-40.0] * d])), value=1.0)  # (2, K)
    out2, _ = entropy_penalty_forward(bk64.xp.reshape(two, (2, 1, K)), inv_temperature=1.0, diversity_gamma=1.0)
    assert abs(float(out2.batch) - math.log(2)) < 1e-9 and float(out2.per_sample) < 1e-9


# ---------------------------------------------------------------- core: against torch autograd

CONFIGS = {
    "plain": dict(),
    "spherical-commit": dict(spherical=True, s=0.5, w_commit=0.3),
    "projected": dict(proj=True, clamp=1.5, softplus=5.0),
    "cosine-rotated": dict(proj=True, cosine=1.2, R=True, w_commit=0.2, gamma=0.6),
}


def _setup(rng, cfg: dict):
    """Host inputs, parameters and the matching core options for one configuration."""
    proj = cfg.get("proj", False)
    dim = DIM if proj else C * d
    params = {}
    if proj:
        params = dict(W_in=rng.standard_normal((dim, C * d)) * 0.6, W_out=rng.standard_normal((C * d, dim)),
                      b_out=rng.standard_normal(dim))  # fmt: skip
        if "cosine" not in cfg:
            params["b_in"] = rng.standard_normal(C * d) * 0.1
    if cfg.get("R"):
        params["R"] = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = rng.standard_normal((N, dim))
    opts = dict(num_codebooks=C, codebook_dim=d, codebook_scale=cfg.get("s", 1.0), spherical=cfg.get("spherical", False),
                soft_clamp=cfg.get("clamp"), commitment_loss_weight=cfg.get("w_commit", 0.0),
                diversity_gamma=cfg.get("gamma", 1.0), inv_temperature=2.0, softplus_offset=cfg.get("softplus"),
                cosine_scale=cfg.get("cosine"))  # fmt: skip
    return x, params, LFQOptions(**opts)


def _core_params(bk, params: dict) -> LFQParams:
    names = dict(W_in="project_in_W", b_in="project_in_b", W_out="project_out_W", b_out="project_out_b", R="rotation")
    return LFQParams(**{names[k]: bk.asarray(v) for k, v in params.items()})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_core_backward_matches_torch_autograd(bk64, rng, name):
    cfg = CONFIGS[name]
    x, params, opts = _setup(rng, cfg)
    g, daux = rng.standard_normal((N, x.shape[1])), 1.7
    rows = np.array([0, 2, 3, 7, 10])
    out, cache = lfq_forward(bk64.asarray(x), _core_params(bk64, params), opts, entropy_rows=bk64.asarray(rows))
    dx, grads = lfq_backward(bk64.asarray(g), daux, cache)
    ref = torch_lfq(x, C=C, d=d, g=g, daux=daux, s=opts.codebook_scale, spherical=opts.spherical, clamp=opts.soft_clamp,
                    w_commit=opts.commitment_loss_weight, gamma=opts.diversity_gamma, tau=2.0,
                    softplus=opts.softplus_offset, cosine=opts.cosine_scale, rows=rows, **params)  # fmt: skip
    assert rel_error(bk64.np(out.quantized), ref["quantized"]) < 1e-12
    assert abs(float(out.aux_loss) - ref["aux"]) < 1e-12 and abs(float(out.per_sample_entropy) - ref["per"]) < 1e-12
    assert abs(float(out.batch_entropy) - ref["batch"]) < 1e-12
    assert rel_error(bk64.np(dx), ref["dx"]) < 1e-10
    for k, key in dict(W_in="project_in_W", b_in="project_in_b", W_out="project_out_W", b_out="project_out_b").items():
        if k in params:
            assert rel_error(bk64.np(grads[key]), ref["d" + k]) < 1e-10, k
    assert set(grads) == {key for k, key in dict(W_in="project_in_W", b_in="project_in_b", W_out="project_out_W",
                                                b_out="project_out_b").items() if k in params}  # fmt: skip


@pytest.mark.parametrize(
    "bk64", [("numpy", "float64")], indirect=True
)  # finite differences: numpy only (slow on strict)
@pytest.mark.parametrize("name", ["plain", "spherical-commit", "cosine-rotated"])
def test_auxiliary_loss_gradient_matches_finite_differences(bk64, rng, name):
    """The losses are true derivatives: finite differences of daux * aux(x, W_in) with the signs fixed."""
    x, params, opts = _setup(rng, CONFIGS[name])
    xp = bk64.xp
    p = _core_params(bk64, params)
    rows = bk64.asarray(np.array([1, 4, 5, 6, 9, 10]))
    zero_g = bk64.asarray(np.zeros((N, x.shape[1])))
    daux = bk64.asarray(np.array(0.83))
    w_in = p.project_in_W if p.project_in_W is not None else bk64.asarray(np.zeros((1, 1)))

    def run(x, w):
        return lfq_forward(x, p._replace(project_in_W=w) if p.project_in_W is not None else p, opts, entropy_rows=rows)

    def fwd(x, w):
        return xp.asarray(run(x, w)[0].aux_loss)

    def vjp(g, x, w):
        dx, grads = lfq_backward(zero_g, g, run(x, w)[1])
        return dx, grads.get("project_in_W")

    res = check_vjp(fwd, vjp, [bk64.asarray(x), w_in], dout=daux, guard=lambda x, w: run(x, w)[0].indices, rtol=1e-6)
    assert res.passed


@pytest.mark.parametrize(
    "bk64", [("numpy", "float64")], indirect=True
)  # finite differences: numpy only (slow on strict)
def test_a_broken_entropy_backward_fails_the_module_check(bk64, rng, monkeypatch):
    import vqref.core.lfq as core

    x, params, opts = _setup(rng, CONFIGS["plain"])
    opts = opts._replace(fast=False)  # the definition (the blocked path has its own control)
    xb, zero_g, daux = bk64.asarray(x), bk64.asarray(np.zeros_like(x)), bk64.asarray(np.array(0.83))
    fwd = lambda x: bk64.xp.asarray(lfq_forward(x, LFQParams(), opts)[0].aux_loss)  # noqa: E731
    vjp = lambda g, x: (lfq_backward(zero_g, g, lfq_forward(x, LFQParams(), opts)[1])[0],)  # noqa: E731
    guard = lambda x: lfq_forward(x, LFQParams(), opts)[0].indices  # noqa: E731
    assert check_vjp(fwd, vjp, [xb], dout=daux, guard=guard).passed
    original = core.entropy_penalty_backward
    monkeypatch.setattr(core, "entropy_penalty_backward", lambda g, c: original(g, c._replace(diversity_gamma=0.0)))
    assert not check_vjp(fwd, vjp, [xb], dout=daux, guard=guard, raise_on_failure=False).passed


@pytest.mark.parametrize("name", ["cosine-rotated", "projected"])  # the cosine map; the affine projections
def test_core_fast_and_definition_scores_give_the_same_step(bk, rng, name):
    x, params, opts = _setup(rng, CONFIGS[name])
    g = bk.asarray(rng.standard_normal((N, x.shape[1])))
    res = []
    for fast in (True, False):
        out, cache = lfq_forward(bk.asarray(x), _core_params(bk, params), opts._replace(fast=fast))
        res.append((out, lfq_backward(g, 1.0, cache)))
    (o1, (dx1, g1)), (o2, (dx2, g2)) = res
    np.testing.assert_array_equal(bk.np(o1.indices), bk.np(o2.indices))
    assert abs(float(o1.aux_loss) - float(o2.aux_loss)) <= 10 * bk.rtol * (1 + abs(float(o2.aux_loss)))
    assert rel_error(bk.np(dx1), bk.np(dx2)) < 10 * bk.rtol
    assert all(rel_error(bk.np(g1[k]), bk.np(g2[k])) < 10 * bk.rtol for k in g1)


def test_codes_of_the_indices_are_the_outputs(bk, rng):
    x, params, opts = _setup(rng, CONFIGS["cosine-rotated"])
    p = _core_params(bk, params)
    out, _ = lfq_forward(bk.asarray(x), p, opts)
    codes = lfq_codes(out.indices, p, opts, dtype=bk.dtype)
    assert rel_error(bk.np(codes), bk.np(out.quantized)) < 10 * bk.rtol


# ---------------------------------------------------------------- the module


def _module(bk, **kw):
    return LFQ(xp=bk.module, dtype=bk.dtype_name, seed=3, **kw)


def test_module_matches_the_torch_reference_on_every_backend(bk, rng):
    lfq = _module(bk, dim=DIM, codebook_size=K, num_codebooks=C, spherical=True, commitment_loss_weight=0.4,
                  frac_per_sample_entropy=0.6)  # fmt: skip
    x, g = rng.standard_normal((3, 4, DIM)), rng.standard_normal((3, 4, DIM))
    rows = np.sort(lfq.state.rngs[0].choice(12, size=int(12 * 0.6), replace=False))  # the forward's draw
    (q, idx, aux), br = lfq(bk.asarray(x), inv_temperature=3.0, return_loss_breakdown=True)
    dx = lfq.backward(bk.asarray(g), 0.9)
    assert q.dtype == bk.dtype and dx.dtype == bk.dtype and idx.shape == (3, 4, C) and aux.shape == ()
    host = {k: np.asarray(bk.np(v), dtype=np.float64) for k, v in lfq.params.items()}
    ref = torch_lfq(x.reshape(12, DIM).astype(bk.dtype_name), C=C, d=d, g=g.reshape(12, DIM), daux=0.9,
                    spherical=True, w_commit=0.4, tau=3.0, rows=rows, W_in=host["project_in.W"],
                    b_in=host["project_in.b"], W_out=host["project_out.W"], b_out=host["project_out.b"])  # fmt: skip
    tol = 1e-10 if bk.is64 else 2e-4
    assert rel_error(bk.np(q).reshape(12, DIM), ref["quantized"]) < tol
    assert abs(float(bk.np(aux)) - ref["aux"]) < tol and abs(float(bk.np(br.per_sample_entropy)) - ref["per"]) < tol
    assert rel_error(bk.np(dx).reshape(12, DIM), ref["dx"]) < tol
    assert rel_error(bk.np(lfq.grads["project_in.W"]), ref["dW_in"]) < tol
    assert set(lfq.grads) == {"project_in.W", "project_in.b", "project_out.W", "project_out.b"}


def test_float32_matches_float64(rng):
    x, g = rng.standard_normal((N, DIM)), rng.standard_normal((N, DIM))
    res = {}
    for dt in ("float64", "float32"):
        lfq = LFQ(dim=DIM, codebook_size=K, num_codebooks=C, seed=0, dtype="float64")
        (q, i, a) = lfq(x.astype(dt), inv_temperature=2.0)
        res[dt] = (q, i, a, lfq.backward(g.astype(dt)))
        assert q.dtype == dt and a.dtype == dt and res[dt][3].dtype == dt
    np.testing.assert_array_equal(res["float32"][1], res["float64"][1])
    assert rel_error(res["float32"][3], res["float64"][3]) < 1e-5


def test_stats_after_every_forward(bk, rng):
    lfq = _module(bk, codebook_size=K, num_codebooks=C)
    assert lfq.stats == {}
    x = bk.asarray(rng.standard_normal((N, C * d)))
    _, idx, _ = lfq(x)
    host = bk.np(idx)
    for c in range(C):
        _, counts = np.unique(host[:, c], return_counts=True)
        p = counts / N
        assert abs(lfq.stats["perplexity"][c] - np.exp(-(p * np.log(p)).sum())) < 1e-12
        assert lfq.stats["usage"][c] == len(counts) / K and lfq.stats["used_codes"][c] == len(counts)
    single = _module(bk, codebook_size=K).eval()
    _, idx1, _ = single(bk.asarray(rng.standard_normal((N, d))))
    assert isinstance(single.stats["perplexity"], float) and single.stats["used_codes"] == len(np.unique(bk.np(idx1)))
    mask = bk.asarray(np.arange(N) < 4)  # stats count the masked tokens only
    single(bk.asarray(rng.standard_normal((N, d))), mask=mask)
    assert single.stats["used_codes"] <= 4


def test_eval_computes_the_loss_keeps_no_cache_and_changes_only_stats(rng):
    lfq = LFQ(codebook_size=K, num_codebooks=C, frac_per_sample_entropy=0.5, seed=1, dtype="float64")
    x = rng.standard_normal((N, C * d))
    gen_before = lfq.state.rngs[0].bit_generator.state
    lfq.eval()
    _, _, a1 = lfq(x, inv_temperature=2.0)
    _, _, a2 = lfq(x, inv_temperature=2.0)
    assert float(a1) != 0.0 and float(a1) == float(a2)  # the same subset each time: nothing committed
    assert lfq.state.rngs[0].bit_generator.state == gen_before and lfq.state.cache is None
    with pytest.raises(RuntimeError, match="training-mode forward"):
        lfq.backward(x)
    lfq.train()
    _, _, a3 = lfq(x, inv_temperature=2.0)  # training draws the same subset, and commits the generator
    assert float(a3) == float(a1) and lfq.state.rngs[0].bit_generator.state != gen_before


def test_random_subset_size_and_reproducibility(rng):
    x = rng.standard_normal((N, d))
    a = LFQ(codebook_size=K, frac_per_sample_entropy=0.3, seed=5, dtype="float64")
    b = LFQ(codebook_size=K, frac_per_sample_entropy=0.3, seed=5, dtype="float64")
    full = LFQ(codebook_size=K, seed=5, dtype="float64")
    rows = np.sort(np.random.default_rng(5).choice(N, size=3, replace=False))  # int(11 * 0.3) = 3
    (_, _, la), ba = a(x, inv_temperature=2.0, return_loss_breakdown=True)
    _, _, lb = b(x, inv_temperature=2.0)
    assert float(la) == float(lb)
    (_, _, lf), bf = full(x[rows], inv_temperature=2.0, return_loss_breakdown=True)  # the subset, by hand
    assert abs(float(la) - float(lf)) < 1e-14 and abs(float(ba.batch_entropy) - float(bf.batch_entropy)) < 1e-14
    tiny = LFQ(codebook_size=K, frac_per_sample_entropy=0.01, seed=5, dtype="float64")  # int(11 * 0.01) = 0
    (_, _, lt), bt = tiny(x, inv_temperature=2.0, return_loss_breakdown=True)
    one = int(np.random.default_rng(5).choice(N, size=1, replace=False)[0])
    assert np.isfinite(float(lt)) and abs(float(bt.batch_entropy) - float(bt.per_sample_entropy)) < 1e-14
    assert abs(float(lt) - float(full(x[one : one + 1], inv_temperature=2.0)[2])) < 1e-14


def test_mask_restricts_the_losses_to_its_tokens(bk64, rng):
    x, g = rng.standard_normal((2, 6, d)), rng.standard_normal((2, 6, d))
    mask = rng.random((2, 6)) < 0.5
    mask[0, 0] = True
    lfq = LFQ(codebook_size=K, commitment_loss_weight=0.5, seed=0, dtype="float64", xp=bk64.module)
    (q, idx, aux), br = lfq(bk64.asarray(x), inv_temperature=2.0, mask=bk64.asarray(mask), return_loss_breakdown=True)
    dx = bk64.np(lfq.backward(bk64.asarray(g)))
    sub = LFQ(codebook_size=K, commitment_loss_weight=0.5, seed=0, dtype="float64", xp=bk64.module)
    (_, _, aux_s), br_s = sub(bk64.asarray(x[mask]), inv_temperature=2.0, return_loss_breakdown=True)
    dx_s = bk64.np(sub.backward(bk64.asarray(g[mask])))
    assert abs(float(aux) - float(aux_s)) < 1e-14 and abs(float(br.batch_entropy) - float(br_s.batch_entropy)) < 1e-14
    assert rel_error(dx[mask], dx_s) < 1e-12
    np.testing.assert_array_equal(dx[~mask], g[~mask])  # unmasked tokens: the decoder's gradient only
    # a mask without tokens: zero losses, never NaN
    (_, _, aux0), br0 = lfq(bk64.asarray(x), mask=bk64.asarray(np.zeros((2, 6), bool)), return_loss_breakdown=True)
    assert float(aux0) == 0.0 and float(br0.batch_entropy) == 0.0 and lfq.stats["used_codes"] == 0
    np.testing.assert_array_equal(bk64.np(lfq.backward(bk64.asarray(g))), g)


def test_indices_to_codes_is_the_eval_output(bk, rng):
    for kw, shape, idx_shape in [
        (dict(dim=DIM, codebook_size=K, num_codebooks=C, orthogonal_rotation=True), (N, DIM), (N, C)),
        (dict(codebook_size=K, spherical=True, codebook_scale=0.5), (N, d), (N,)),
        (dict(codebook_size=K, keep_num_codebooks_dim=True), (N, d), (N, 1)),
    ]:
        lfq = _module(bk, **kw).eval()
        q, idx, _ = lfq(bk.asarray(rng.standard_normal(shape)))
        assert tuple(idx.shape) == idx_shape
        assert rel_error(bk.np(lfq.indices_to_codes(idx)), bk.np(q)) < 10 * bk.rtol
    raw = lfq.indices_to_codes(idx, project_out=False)
    assert raw.shape == (N, d)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        lfq.indices_to_codes(bk.asarray(np.full((2, 1), 8), dtype=bk.xp.int64))


def test_channel_first_inputs(rng):
    lfq = LFQ(codebook_size=K, seed=0, dtype="float64")  # channel_first=None: 4-D inputs are (B, d, H, W)
    x = rng.standard_normal((2, d, 3, 4))
    q, idx, _ = lfq(x)
    assert q.shape == x.shape and idx.shape == (2, 3, 4)
    np.testing.assert_array_equal(q, np.where(x > 0, 1.0, -1.0))
    np.testing.assert_array_equal(lfq.indices_to_codes(idx), q)  # image indices decode channel-first
    dx = lfq.backward(np.ones_like(x) * 0.0)
    assert dx.shape == x.shape
    first = LFQ(codebook_size=K, channel_first=True, seed=0, dtype="float64")
    q3, idx3, _ = first(np.moveaxis(x[0], 0, 0).reshape(d, 12)[None])  # (1, d, 12)
    assert q3.shape == (1, d, 12) and idx3.shape == (1, 12)
    np.testing.assert_array_equal(idx3.reshape(3, 4), idx[0])


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        (dict(), ValueError, "dim or codebook_size"),
        (dict(codebook_size=12), ValueError, "power of 2.*16"),
        (dict(codebook_size=1), ValueError, "codebook_size must be >= 2"),
        (dict(dim=70), ValueError, "int64"),
        (dict(codebook_size=8, num_codebooks=2, keep_num_codebooks_dim=False), ValueError, "keep_num_codebooks_dim"),
        (dict(dim=5, codebook_size=8, has_projections=False), ValueError, "has_projections=False"),
        (dict(codebook_size=8, codebook_scale=0.0), ValueError, "codebook_scale must be > 0"),
        (dict(codebook_size=8, frac_per_sample_entropy=0.0), ValueError, r"\(0, 1\]"),
        (dict(codebook_size=8, frac_per_sample_entropy=1.5), ValueError, "<= 1.0"),
        (dict(codebook_size=8, soft_clamp_input_value=0.5), ValueError, ">= codebook_scale"),
        (dict(codebook_size=8, spherical=1), TypeError, "spherical must be True or False"),
        (dict(codebook_size=8, entropy_loss_weight=-1.0), ValueError, "entropy_loss_weight must be >= 0"),
        (dict(codebook_size=8, channel_first="yes"), TypeError, "channel_first"),
    ],
)
def test_bad_configuration(kw, err, msg):
    with pytest.raises(err, match=msg):
        LFQ(**kw)


def test_bad_calls_are_refused_with_the_argument_named(rng):
    lfq = LFQ(codebook_size=K, seed=0)
    x = rng.standard_normal((N, d)).astype(np.float32)
    for call, err, msg in [
        (lambda: lfq(rng.standard_normal((N, 4))), ValueError, r"\(\.\.\., 3\)"),
        (lambda: lfq(x, inv_temperature=0.0), ValueError, "inv_temperature must be > 0"),
        (lambda: lfq(x, mask=np.ones(N)), TypeError, "mask must be a boolean"),
        (lambda: lfq(x, mask=np.ones(N - 1, bool)), ValueError, "leading shape"),
        (lambda: lfq(x, mask=[True] * N), TypeError, "mask must be a boolean array"),
        (lambda: lfq(x, return_loss_breakdown=1), TypeError, "return_loss_breakdown"),
        (lambda: lfq(np.full((N, d), 1e37, np.float32)), ValueError, "not finite"),
    ]:
        with pytest.raises(err, match=msg), np.errstate(over="ignore", invalid="ignore"):
            call()
    lfq(x)
    for call, err, msg in [
        (lambda: lfq.backward(x[:3]), ValueError, "shape"),
        (lambda: lfq.backward(x, daux_loss=np.ones(2)), ValueError, "daux_loss must have shape"),
        (lambda: lfq.backward(x, daux_loss="1"), TypeError, "daux_loss must be a real number"),
        (lambda: lfq.backward(np.full((N, d), 1e300)), ValueError, "float32"),
    ]:
        with pytest.raises(err, match=msg):
            call()
    lfq.backward(x, daux_loss=np.float32(2.0))  # the refused calls left the cache in place


def test_initial_state_follows_torch_defaults_and_the_seed():
    lfq = LFQ(dim=201, codebook_size=16, num_codebooks=50, orthogonal_rotation=True, seed=11, dtype="float64")
    W, b = lfq.params["project_in.W"], lfq.params["project_in.b"]  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a = 1 / np.sqrt(201)
    assert W.shape == (201, 200) and np.abs(W).max() <= a and np.abs(b).max() <= a
    assert abs(W.var() / (a * a / 3) - 1) < 0.02  # the variance of U(-a, a)
    R = lfq.state_array("orthogonal_rot")
    np.testing.assert_allclose(R.T @ R, np.eye(4), atol=1e-12)
    assert "orthogonal_rot" not in lfq.params  # a buffer, as in torch: never trained
    same = LFQ(dim=201, codebook_size=16, num_codebooks=50, orthogonal_rotation=True, seed=11, dtype="float64")
    np.testing.assert_array_equal(same.params["project_out.W"], lfq.params["project_out.W"])
    cosine = LFQ(dim=300, codebook_size=16, num_codebooks=100, cosine_sim_project_in=True, seed=1, dtype="float64")
    Wc = cosine.params["project_in.W"]  # CosineSimLinear: standard normal, no bias
    assert set(cosine.params) == {"project_in.W", "project_out.W", "project_out.b"}
    assert abs(Wc.std() - 1) < 0.02 and abs(Wc.mean()) < 0.02
