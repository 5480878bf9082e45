"""ResidualVQ: the residual recursion, gradient routings, EMA (per depth and shared), k-means
initialisation, decoding, state and validation (docs/math.md §2; invariants in §2.7).

Symbols: N tokens, D features, K codes per depth, Q depths.  Sizes are distinct (N != K != D != Q)
so that a transposition is a shape error, not a wrong number.

Oracles are written here on the host in float64: a brute-force residual quantizer, the EMA
recursion, Lloyd's fixed point and the closed-form loss gradient; gradient estimators are checked
against the torch autograd reference (``vqref.testing.torch_reference.residual``).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.core.residual import residual_backward, residual_forward
from vqref.testing import check_vjp, rel_error
from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference
from vqref.testing.torch_reference.residual import residual_vq_grads

N, D, K, Q = 11, 5, 7, 3


# ------------------------------------------------------------------------------------ helpers


def make(bk, num_quantizers=Q, **kw):
    kw.setdefault("seed", 0)
    return ResidualVQ(dim=D, num_quantizers=num_quantizers, codebook_size=K, dtype=bk.dtype_name, xp=bk.module, **kw)


def prefixes(shared, q=Q):
    return [""] if shared else [f"{level}." for level in range(q)]


def with_codebooks(bk, codebooks, shared=False, **kw):
    """A ResidualVQ whose codebooks are the host arrays ``codebooks`` (one when shared)."""
    rq = make(bk, num_quantizers=kw.pop("num_quantizers", Q), shared_codebook=shared, **kw)
    state = {}
    for p, C in zip(prefixes(shared, rq.num_quantizers), codebooks):
        state.update({p + "codebook": C, p + "cluster_size": np.ones(K), p + "embed_avg": C, p + "initted": True})
    rq.load_state_dict(state)
    return rq


def random_codebooks(rng, q=Q, shared=False):
    """Codebooks on shrinking scales, as a trained residual stack has them (one when shared)."""
    if shared:
        return [rng.standard_normal((K, D))]
    return [rng.standard_normal((K, D)) * 0.5**level for level in range(q)]


def snapshot(module):
    state = {k: B.to_numpy(v).copy() for k, v in module.state_dict().items()}
    layers = getattr(module, "layers", [module])
    return state, [layer.generator.bit_generator.state for layer in layers]


def assert_same_state(a, b):
    (sa, ra), (sb, rb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert ra == rb


def _unit(a):
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6)


def np_residual(x, codebooks, q=Q, cosine=False):
    """Brute-force residual quantization in float64: indices (N, q), residuals r_0..r_q, codes.

    Euclidean: k = argmin_k ||r - c_k||^2 by direct differences.  Cosine (vector-quantize-pytorch's
    semantics): k = argmax_k r^ . c^_k, and the unit code c^_k is subtracted from r.
    """
    r = np.asarray(x, dtype=np.float64)
    idx, residuals, codes = [], [r], []
    for level in range(q):
        C = np.asarray(codebooks[0 if len(codebooks) == 1 else level], dtype=np.float64)
        if cosine:
            C = _unit(C)
            k = np.argmax(_unit(r) @ C.T, axis=1)
        else:
            k = np.argmin(((r[:, None, :] - C[None, :, :]) ** 2).sum(-1), axis=1)
        idx.append(k)
        codes.append(C[k])
        r = r - C[k]
        residuals.append(r)
    return np.stack(idx, axis=1), residuals, codes


TECHNIQUES = {
    "ste": dict(commitment_weight=0.6),
    "rotation": dict(rotation_trick=True, commitment_weight=0.6),
    "cosine": dict(use_cosine_sim=True, commitment_weight=0.6),
    "cosine-rotation": dict(use_cosine_sim=True, rotation_trick=True),
    "learnable": dict(ema_update=False, learnable_codebook=True, commitment_weight=0.7),
    "split": dict(ema_update=False, learnable_codebook=True, commitment_weight=0.25, codebook_weight=1.0),
    "orthogonal": dict(orthogonal_reg_weight=0.3),
}
_TORCH_KEYS = (
    "commitment_weight",
    "codebook_weight",
    "learnable_codebook",
    "use_cosine_sim",
    "rotation_trick",
    "orthogonal_reg_weight",
)


def torch_options(kw):
    out = {k: kw[k] for k in _TORCH_KEYS if k in kw}
    out.setdefault("commitment_weight", 1.0)
    return out


def core_options(kw):
    """The options :func:`residual_forward` takes, from module keyword arguments."""
    out = torch_options(kw)
    if "learnable_codebook" not in out:
        out["learnable_codebook"] = False
    return out


# ------------------------------------------------------------------------ forward invariants


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_shapes_dtypes_and_the_residual_identity(bk, rng, shared):
    rq = make(bk, shared_codebook=shared, decay=0.9)
    rq(bk.asarray(rng.standard_normal((4, D))))  # one EMA step, so the codebooks are not the initial ones
    x_host = rng.standard_normal((2, 3, 4, D))
    x = bk.asarray(x_host)
    q, idx, losses = rq(x)
    assert q.shape == (2, 3, 4, D) and q.dtype == bk.dtype
    assert idx.shape == (2, 3, 4, Q) and idx.dtype == bk.xp.int64
    assert losses.shape == (Q,) and losses.dtype == bk.dtype
    res = [bk.np(r).astype(np.float64) for r in rq.last_residuals]
    assert len(res) == Q + 1
    xf = bk.np(x).astype(np.float64).reshape(-1, D)
    np.testing.assert_array_equal(res[0], xf)
    # sum of codes + final residual == x (to rounding: Q subtractions, Q - 1 additions)
    qf = bk.np(q).astype(np.float64).reshape(-1, D)
    tol = 1e-13 if bk.is64 else 2e-6
    np.testing.assert_allclose(qf + res[-1], xf, rtol=0, atol=tol * np.abs(xf).max())
    # stage-wise commitment == cumulative commitment (docs/math.md §2.3):
    # sum_l ||r_l - q_l||^2 = sum_d ||x - xhat^(d)||^2, and loss_l = beta mse(r_l, q_l) = beta ||r_{l+1}||^2 / M
    M = xf.size
    expected = np.array([np.sum(r**2) / M for r in res[1:]])
    np.testing.assert_allclose(bk.np(losses), expected, rtol=1e-10 if bk.is64 else 2e-5)


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_indices_match_a_brute_force_residual_quantizer(bk, rng, shared, cosine):
    cbs = random_codebooks(rng, shared=shared)
    x = rng.standard_normal((N, D))
    rq = with_codebooks(bk, cbs, shared=shared, use_cosine_sim=cosine).eval()
    q, idx, _ = rq(bk.asarray(x))
    ref_idx, ref_res, ref_codes = np_residual(bk.np(bk.asarray(x)), cbs_as(bk, cbs), cosine=cosine)
    np.testing.assert_array_equal(bk.np(idx), ref_idx)
    np.testing.assert_allclose(bk.np(q), sum(ref_codes), rtol=bk.rtol, atol=bk.rtol)


def cbs_as(bk, cbs):
    """The codebooks as the module stores them (rounded to its dtype), back on the host."""
    return [bk.np(bk.asarray(C)).astype(np.float64) for C in cbs]


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 17),
    q=st.integers(1, 4),
    shared=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    dtype=st.sampled_from(["float64", "float32"]),
)
def test_residual_norms_never_increase_with_a_zero_code(seed, n, q, shared, scale, dtype):
    # docs/math.md §2.2: ||r_{l+1}|| <= ||r_l|| is guaranteed only when 0 is a code: the nearest code is
    # then at most as far as 0 is, i.e. ||r_l - c_k|| <= ||r_l - 0||.
    g = np.random.default_rng(seed)
    cbs = [scale * g.standard_normal((K, D)) for _ in range(1 if shared else q)]
    for C in cbs:
        C[g.integers(K)] = 0.0
    rq = ResidualVQ(dim=D, num_quantizers=q, codebook_size=K, shared_codebook=shared, dtype=dtype, seed=0)
    state = {}
    for p, C in zip(prefixes(shared, q), cbs):
        state.update({p + "codebook": C, p + "cluster_size": np.ones(K), p + "embed_avg": C, p + "initted": True})
    rq.load_state_dict(state)
    x = (scale * g.standard_normal((n, D))).astype(dtype)
    rq.eval()(x)
    norms = np.stack([np.linalg.norm(r.astype(np.float64), axis=1) for r in rq.last_residuals])  # (q + 1, n)
    slack = 0.0 if dtype == "float64" else 1e-5
    assert np.all(norms[1:] <= norms[:-1] * (1 + slack) + 1e-300)


def test_one_depth_equals_vector_quantize(bk, rng):
    C = rng.standard_normal((K, D))
    rq = with_codebooks(bk, [C], num_quantizers=1, decay=0.75, commitment_weight=0.4)
    vq = VectorQuantize(D, K, decay=0.75, commitment_weight=0.4, dtype=bk.dtype_name, xp=bk.module, seed=0)
    vq.load_state_dict({"codebook": C, "cluster_size": np.ones(K), "embed_avg": C, "initted": True})
    for _ in range(3):
        x = bk.asarray(rng.standard_normal((2, N, D)))
        g = bk.asarray(rng.standard_normal((2, N, D)))
        q1, i1, l1 = rq(x)
        q2, i2, l2 = vq(x)
        np.testing.assert_array_equal(bk.np(q1), bk.np(q2))
        np.testing.assert_array_equal(bk.np(i1)[..., 0], bk.np(i2))
        np.testing.assert_array_equal(bk.np(l1), bk.np(l2)[None])
        np.testing.assert_array_equal(bk.np(rq.backward(g, dlosses=0.7)), bk.np(vq.backward(g, dloss=0.7)))
        for k in ("codebook", "cluster_size", "embed_avg"):
            np.testing.assert_array_equal(bk.np(rq.state_dict()["0." + k]), bk.np(vq.state_dict()[k]), err_msg=k)


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_permuting_tokens_permutes_outputs(bk, rng, shared):
    rq = with_codebooks(bk, random_codebooks(rng, shared=shared), shared=shared).eval()
    x = rng.standard_normal((N, D))
    perm = rng.permutation(N)
    q, idx, losses = rq(bk.asarray(x))
    qp, idxp, lossesp = rq(bk.asarray(x[perm]))
    np.testing.assert_array_equal(bk.np(qp), bk.np(q)[perm])
    np.testing.assert_array_equal(bk.np(idxp), bk.np(idx)[perm])
    np.testing.assert_allclose(bk.np(lossesp), bk.np(losses), rtol=1e-12 if bk.is64 else 1e-5)


# ----------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
@pytest.mark.parametrize("technique", list(TECHNIQUES))
@pytest.mark.parametrize("routing", ["per_depth", "sum"])
def test_gradients_match_torch_autograd(bk64, rng, routing, technique, shared):
    kw = dict(TECHNIQUES[technique])
    cbs = random_codebooks(rng, shared=shared)
    x = rng.standard_normal((N, D))
    g = rng.standard_normal((N, D))
    dl = rng.standard_normal(Q)
    rq = with_codebooks(bk64, cbs, shared=shared, gradient_routing=routing, **kw)
    q, idx, losses = rq(bk64.asarray(x))
    ref_idx, _, _ = np_residual(x, cbs, cosine=kw.get("use_cosine_sim", False))
    np.testing.assert_array_equal(bk64.np(idx), ref_idx)
    dx = rq.backward(bk64.asarray(g), dlosses=bk64.asarray(dl))
    opts = torch_options(kw)
    w = opts.get("orthogonal_reg_weight", 0.0)
    if w and not shared:
        # Each depth's orthogonal term is evaluated on that depth's codebook after its EMA step
        # (decay 0.8, eps 1e-5, from its residual): the torch reference without the term, plus
        # the term's value and gradient at the updated codebooks, computed independently here.
        _, res, _ = np_residual(x, cbs)
        after = []
        for level in range(Q):
            onehot = np.eye(K)[ref_idx[:, level]]
            cs = 0.8 + 0.2 * onehot.sum(0)
            ea = 0.8 * cbs[level] + 0.2 * onehot.T @ res[level]
            after.append(ea / _smoothed(cs, 1e-5)[:, None])
            np.testing.assert_allclose(bk64.np(rq.layers[level].codebook), after[level], rtol=1e-12, atol=1e-14)
        tq, tlosses, tdx, tdcbs = residual_vq_grads(
            x, cbs, ref_idx, g, dl, routing=routing, shared=shared, **dict(opts, orthogonal_reg_weight=0.0)
        )
        for level in range(Q):
            value, grad = orthogonal_loss_reference(after[level], dloss=w * dl[level])
            tlosses[level] += w * value
            tdcbs[level] = tdcbs[level] + grad
        # negative control: the terms on the codebooks the depths quantized with
        _, stale, _, _ = residual_vq_grads(x, cbs, ref_idx, g, dl, routing=routing, shared=shared, **opts)
        assert rel_error(losses, stale) > 1e-3
    else:
        # without an orthogonal weight, or with a shared codebook, whose update waits for the
        # last depth: every term on the codebook the depths quantized with
        tq, tlosses, tdx, tdcbs = residual_vq_grads(
            x, cbs * (Q if shared else 1), ref_idx, g, dl, routing=routing, shared=shared, **opts
        )
    assert rel_error(q, tq) < 1e-12
    assert rel_error(losses, tlosses) < 1e-12
    assert rel_error(dx, tdx) < 1e-10
    # negative control: the other routing's reference is far from this dx
    other = "sum" if routing == "per_depth" else "per_depth"
    _, _, odx, _ = residual_vq_grads(
        x, cbs * (Q if shared else 1), ref_idx, g, dl, routing=other, shared=shared, **torch_options(kw)
    )
    assert rel_error(dx, odx) > 1e-3
    learnable = kw.get("learnable_codebook", False) or kw.get("orthogonal_reg_weight", 0) > 0
    if learnable:
        assert sorted(rq.grads) == sorted(p + "codebook" for p in prefixes(shared))
        for p, tdc in zip(prefixes(shared), tdcbs):
            assert rel_error(rq.grads[p + "codebook"], tdc) < 1e-10
    else:
        assert rq.grads == {} and all(np.all(t == 0) for t in tdcbs)


def test_shared_codebook_gradient_is_the_sum_of_per_depth_scatter_adds(bk64, rng):
    # docs/math.md §2.4: dL/dC = (2 beta / M) sum_l dl_l E_l^T (q_l - r_l), one scatter-add per depth
    # into the same buffer (a code chosen at several depths collects all its contributions).
    beta = 0.8
    C = rng.standard_normal((K, D)) * 0.6
    x = rng.standard_normal((N, D))
    dl = rng.standard_normal(Q)
    rq = with_codebooks(bk64, [C], shared=True, ema_update=False, learnable_codebook=True, commitment_weight=beta)
    rq(bk64.asarray(x))
    rq.backward(bk64.asarray(np.zeros((N, D))), dlosses=bk64.asarray(dl))
    idx, res, codes = np_residual(x, [C])
    M = N * D
    expected = np.zeros((K, D))
    for level in range(Q):
        np.add.at(expected, idx[:, level], dl[level] * 2 * beta / M * (codes[level] - res[level]))
    assert np.unique(idx).size < idx.size  # some code is chosen more than once: the sum matters
    assert rel_error(rq.grads["codebook"], expected) < 1e-12
    # the core returns one scatter-add per depth; the module adds them up
    _, cache = residual_forward(bk64.asarray(x), [bk64.asarray(C)] * Q, learnable_codebook=True, commitment_weight=beta)
    _, per_depth = residual_backward(bk64.asarray(np.zeros((N, D))), bk64.asarray(dl), cache)
    assert len(per_depth) == Q
    assert rel_error(sum(bk64.np(d) for d in per_depth), expected) < 1e-12
    _, _, _, (tdC,) = residual_vq_grads(
        x, [C], idx, np.zeros((N, D)), dl, shared=True, learnable_codebook=True, commitment_weight=beta
    )
    assert rel_error(expected, tdC) < 1e-12


@pytest.mark.parametrize("routing, factor", [("per_depth", Q), ("sum", 1)])
def test_decoder_gradient_reaches_the_input_q_times_per_depth_and_once_for_sum(bk64, rng, routing, factor):
    # docs/math.md §2.4, patterns P3 (per_depth: dx = Q g + loss terms) and P1 (sum: dx = g + loss terms).
    beta = 0.6
    cbs = random_codebooks(rng)
    x = rng.standard_normal((N, D))
    g = rng.standard_normal((N, D))
    dl = rng.standard_normal(Q)
    rq = with_codebooks(bk64, cbs, ema_update=False, commitment_weight=beta, gradient_routing=routing)
    rq(bk64.asarray(x))
    dx_full = bk64.np(rq.backward(bk64.asarray(g), dlosses=bk64.asarray(dl)))
    rq(bk64.asarray(x))
    dx_loss = bk64.np(rq.backward(bk64.asarray(np.zeros((N, D))), dlosses=bk64.asarray(dl)))
    np.testing.assert_allclose(dx_full - dx_loss, factor * g, rtol=1e-13, atol=1e-13)
    # the loss part: sum_l dl_l (2 beta / M)(r_l - q_l) = sum_l dl_l (2 beta / M) r_{l+1}
    _, res, _ = np_residual(x, cbs)
    expected = sum(dl[level] * 2 * beta / (N * D) * res[level + 1] for level in range(Q))
    np.testing.assert_allclose(dx_loss, expected, rtol=1e-12, atol=1e-15)


_FD_TECHNIQUES = ["ste", "cosine", "learnable"]  # the loss part; the estimators are checked against torch


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
@pytest.mark.parametrize("technique", _FD_TECHNIQUES)
@pytest.mark.parametrize("routing", ["per_depth", "sum"])
def test_loss_gradient_for_x_matches_finite_differences(bk64, rng, routing, technique, shared):
    # With the codes fixed, r_l = x - sum_{j<l} c_j has identity Jacobian for x, so the loss
    # *value* is an honest function of x and finite differences see the same gradient as the
    # backward (no stop-gradient sits on the path from x to a commitment term).  The codebook
    # is not checked this way: r_l depends on earlier codes only through sg[.], which finite
    # differences would see; torch covers it.
    opts = core_options(TECHNIQUES[technique])
    cbs = [bk64.asarray(C) for C in random_codebooks(rng, shared=shared)] * (Q if shared else 1)
    x = bk64.asarray(rng.standard_normal((N - 4, D)))  # fewer rows: finite differences cost 4 forwards per entry
    idx = residual_forward(x, cbs, **opts)[0].indices
    dl = bk64.asarray(rng.standard_normal(Q))
    xp = bk64.xp

    def weighted_losses(x):
        out, _ = residual_forward(x, cbs, routing=routing, indices=idx, **opts)
        return xp.sum(dl * out.losses)

    def vjp(dout, x):
        _, cache = residual_forward(x, cbs, routing=routing, indices=idx, **opts)
        return (residual_backward(xp.zeros_like(x), dout * dl, cache)[0],)

    def guard(x):  # the codes the forward would choose must not change under the perturbation
        return residual_forward(x, cbs, **opts)[0].indices

    one = bk64.asarray(np.array(1.0))
    check_vjp(weighted_losses, vjp, [x], dout=one, guard=guard, rtol=1e-7)

    # negative control: EnCodec's pattern P2 (docs/math.md §2.4), where only depth 0's commitment term
    # reaches x, must fail the same check
    mask = bk64.asarray(np.eye(Q)[0])

    def vjp_p2(dout, x):
        _, cache = residual_forward(x, cbs, routing=routing, indices=idx, **opts)
        return (residual_backward(xp.zeros_like(x), dout * dl * mask, cache)[0],)

    assert check_vjp(weighted_losses, vjp_p2, [x], dout=one, raise_on_failure=False).passed is False


@pytest.mark.parametrize("routing", ["per_depth", "sum"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_float32_matches_float64(rng, routing, shared):
    cbs = random_codebooks(rng, shared=shared)
    x = rng.standard_normal((3 * N, D))
    g = rng.standard_normal((3 * N, D))
    dl = rng.standard_normal(Q)
    out = {}
    for dt in ("float64", "float32"):
        rq = ResidualVQ(
            dim=D,
            num_quantizers=Q,
            codebook_size=K,
            shared_codebook=shared,
            gradient_routing=routing,
            ema_update=False,
            learnable_codebook=True,
            rotation_trick=True,
            dtype=dt,
            seed=0,
        )
        state = {}
        for p, C in zip(prefixes(shared), cbs):
            state.update({p + "codebook": C, p + "cluster_size": np.ones(K), p + "embed_avg": C, p + "initted": True})
        rq.load_state_dict(state)
        q, idx, losses = rq(x.astype(dt))
        dx = rq.backward(g.astype(dt), dlosses=dl.astype(dt))
        assert q.dtype == dt and losses.dtype == dt and dx.dtype == dt
        out[dt] = (q, idx, losses, dx, *[rq.grads[p + "codebook"] for p in prefixes(shared)])
    np.testing.assert_array_equal(out["float32"][1], out["float64"][1])
    for a, b in zip(out["float32"][2:], out["float64"][2:]):
        assert a.dtype == np.float32
        assert rel_error(a, b) < 1e-5
    assert rel_error(out["float32"][0], out["float64"][0]) < 1e-6


# ---------------------------------------------------------------------------------------- EMA


def _smoothed(cs, eps):
    return (cs + eps) / (cs.sum() + cs.shape[0] * eps) * cs.sum()


def test_per_depth_ema_matches_an_independent_reference(bk, rng):
    gamma, eps = 0.7, 1e-4
    cbs = cbs_as(bk, random_codebooks(rng))
    rq = with_codebooks(bk, cbs, decay=gamma, eps=eps)
    cs = [np.ones(K) for _ in range(Q)]
    ea = [C.copy() for C in cbs]
    for _ in range(3):
        x = rng.standard_normal((4 * N, D))
        _, idx, _ = rq(bk.asarray(x))
        ref_idx, res, _ = np_residual(bk.np(bk.asarray(x)), cbs)
        np.testing.assert_array_equal(bk.np(idx), ref_idx)
        for level in range(Q):  # each depth from its own residual r_l and its own codes
            onehot = np.eye(K)[ref_idx[:, level]]
            cs[level] = gamma * cs[level] + (1 - gamma) * onehot.sum(0)
            ea[level] = gamma * ea[level] + (1 - gamma) * onehot.T @ res[level]
            cbs[level] = ea[level] / _smoothed(cs[level], eps)[:, None]
        state = rq.state_dict()
        for level in range(Q):
            np.testing.assert_allclose(bk.np(state[f"{level}.cluster_size"]), cs[level], rtol=bk.rtol * 10)
            np.testing.assert_allclose(bk.np(state[f"{level}.embed_avg"]), ea[level], rtol=bk.rtol * 10, atol=1e-6)
            np.testing.assert_allclose(bk.np(state[f"{level}.codebook"]), cbs[level], rtol=bk.rtol * 10, atol=1e-6)


def test_shared_ema_takes_q_statistic_steps_and_one_codebook_update(bk, rng):
    # docs/math.md §2.5, vqref's (and vector-quantize-pytorch's) schedule: every depth of a
    # forward quantizes with the pre-step codebook; the statistics take Q successive EMA steps
    # (one per depth, from that depth's residual); the codes are recomputed once, after the last
    # depth.
    gamma, eps = 0.8, 1e-3
    C = cbs_as(bk, random_codebooks(rng, shared=True))[0]
    rq = with_codebooks(bk, [C], shared=True, decay=gamma, eps=eps)
    cs, ea = np.ones(K), C.copy()
    for _ in range(3):
        x = rng.standard_normal((4 * N, D))
        pre, state_before = C.copy(), (cs.copy(), ea.copy())
        _, idx, _ = rq(bk.asarray(x))
        ref_idx, res, codes = np_residual(bk.np(bk.asarray(x)), [pre])
        np.testing.assert_array_equal(bk.np(idx), ref_idx)  # every depth used the pre-step codebook
        for level in range(Q):  # the codes each depth subtracted are rows of the pre-step codebook
            code = bk.np(rq.last_residuals[level]).astype(np.float64) - bk.np(rq.last_residuals[level + 1])
            np.testing.assert_allclose(code, pre[ref_idx[:, level]], rtol=0, atol=1e-12 if bk.is64 else 1e-5)
        for level in range(Q):
            onehot = np.eye(K)[ref_idx[:, level]]
            cs = gamma * cs + (1 - gamma) * onehot.sum(0)
            ea = gamma * ea + (1 - gamma) * onehot.T @ res[level]
        C = ea / _smoothed(cs, eps)[:, None]
        # RQ-VAE's alternative (a full EMA step after each depth, so depth l + 1 already sees
        # the codebook updated by depth l) ends elsewhere: the test can tell the two apart.
        alt_cs, alt_ea, alt_C, r = state_before[0].copy(), state_before[1].copy(), pre.copy(), res[0]
        for level in range(Q):
            k = np.argmin(((r[:, None, :] - alt_C[None, :, :]) ** 2).sum(-1), axis=1)
            onehot = np.eye(K)[k]
            alt_cs = gamma * alt_cs + (1 - gamma) * onehot.sum(0)
            alt_ea = gamma * alt_ea + (1 - gamma) * onehot.T @ r
            r = r - alt_C[k]
            alt_C = alt_ea / _smoothed(alt_cs, eps)[:, None]
        state = rq.state_dict()
        np.testing.assert_allclose(bk.np(state["cluster_size"]), cs, rtol=bk.rtol * 10)
        np.testing.assert_allclose(bk.np(state["embed_avg"]), ea, rtol=bk.rtol * 10, atol=1e-6)
        np.testing.assert_allclose(bk.np(state["codebook"]), C, rtol=bk.rtol * 10, atol=1e-6)
        assert np.abs(bk.np(state["codebook"]) - alt_C).max() > 1e-3


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_eval_mode_changes_nothing_and_decodes_its_indices(bk, rng, shared, cosine):
    rq = make(bk, shared_codebook=shared, use_cosine_sim=cosine, threshold_ema_dead_code=0.5)
    for _ in range(2):
        rq(bk.asarray(rng.standard_normal((N, D))))
    before = snapshot(rq)
    rq.eval()
    x = bk.asarray(rng.standard_normal((2, 3, D)))
    q, idx, _ = rq(x)
    q2, idx2, _ = rq(x)
    assert_same_state(before, snapshot(rq))
    np.testing.assert_array_equal(bk.np(q), bk.np(q2))
    np.testing.assert_array_equal(bk.np(rq.get_output_from_indices(idx)), bk.np(q))
    codes = rq.get_codes_from_indices(idx)
    assert codes.shape == (Q, 2, 3, D) and codes.dtype == bk.dtype
    state = before[0]
    for level in range(Q):
        C = state[("" if shared else f"{level}.") + "codebook"].astype(np.float64)
        if cosine:
            C = _unit(C)
        np.testing.assert_allclose(bk.np(codes)[level], C[bk.np(idx)[..., level]], rtol=1e-6 if not bk.is64 else 1e-14)
    # training mode again: the state moves
    rq.train()
    rq(x)
    assert not np.array_equal(
        snapshot(rq)[0][("" if shared else "0.") + "codebook"], state[("" if shared else "0.") + "codebook"]
    )


# ---------------------------------------------------------------------------- k-means init


def _assert_lloyd_fixed_point(r, C):
    """Every non-empty centroid is the mean of the rows of r nearest to it."""
    a = np.argmin(((r[:, None, :] - C[None, :, :]) ** 2).sum(-1), axis=1)
    for k in np.unique(a):
        np.testing.assert_allclose(C[k], r[a == k].mean(0), rtol=1e-10, atol=1e-12)
    return a


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_kmeans_init_fits_each_depth_to_the_residuals_of_the_depths_before(bk64, rng, shared):
    # docs/math.md §3.3.  ema_update=False and eps=0 keep the state exactly what the k-means init
    # produced; enough Lloyd iterations reach a fixed point, which identifies the data fitted.
    n = 60
    x = rng.standard_normal((n, D)) * np.array([3.0, 2.0, 1.0, 0.5, 0.25])
    rq = make(bk64, shared_codebook=shared, kmeans_init=True, kmeans_iters=50, ema_update=False, eps=0.0)
    assert not any(bool(bk64.np(v)) for k, v in rq.state_dict().items() if k.endswith("initted"))
    rq(bk64.asarray(x))
    state = {k: bk64.np(v) for k, v in rq.state_dict().items()}
    cbs = [state[p + "codebook"] for p in prefixes(shared)]
    _, res, _ = np_residual(x, cbs)
    if shared:
        a = _assert_lloyd_fixed_point(x, cbs[0])  # fitted to the first depth's input x
        np.testing.assert_array_equal(state["cluster_size"], np.bincount(a, minlength=K))
        # ... and not to the residuals of all depths pooled together
        pooled = np.concatenate(res[:Q])
        with pytest.raises(AssertionError):
            _assert_lloyd_fixed_point(pooled, cbs[0])
    else:
        for level in range(Q):
            a = _assert_lloyd_fixed_point(res[level], cbs[level])
            np.testing.assert_array_equal(state[f"{level}.cluster_size"], np.bincount(a, minlength=K))
        with pytest.raises(AssertionError):  # depth 1 was not fitted to x itself
            _assert_lloyd_fixed_point(x, cbs[1])
    assert all(bool(v) for k, v in state.items() if k.endswith("initted"))
    # the second batch does not re-initialise
    rq(bk64.asarray(rng.standard_normal((n, D))))
    for k in state:
        np.testing.assert_array_equal(bk64.np(rq.state_dict()[k]), state[k], err_msg=k)


# ---------------------------------------------------------------------------------- state


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_state_dict_save_load_roundtrip(bk, rng, tmp_path, shared):
    rq = make(bk, shared_codebook=shared, decay=0.9, gradient_routing="sum")
    for _ in range(3):
        rq(bk.asarray(rng.standard_normal((N, D))))
    state = rq.state_dict()
    keys = {p + k for p in prefixes(shared) for k in ("codebook", "cluster_size", "embed_avg", "initted")}
    assert set(state) == keys
    rq.eval()
    x = bk.asarray(rng.standard_normal((N, D)))
    q0, i0, l0 = rq(x)
    other = make(bk, shared_codebook=shared, decay=0.9, gradient_routing="sum", seed=99).eval()
    other.load_state_dict(state)
    q1, i1, l1 = other(x)
    np.testing.assert_array_equal(bk.np(q0), bk.np(q1))
    np.testing.assert_array_equal(bk.np(i0), bk.np(i1))
    np.testing.assert_array_equal(bk.np(l0), bk.np(l1))
    path = str(tmp_path / "rq.npz")
    rq.save(path)
    third = make(bk, shared_codebook=shared, decay=0.9, gradient_routing="sum", seed=5).eval()
    third.load(path)
    np.testing.assert_array_equal(bk.np(third(x)[0]), bk.np(q0))
    fourth = ResidualVQ.from_file(path, xp=bk.module).eval()
    assert fourth.shared_codebook == shared and fourth.gradient_routing == "sum" and fourth.num_quantizers == Q
    np.testing.assert_array_equal(bk.np(fourth(x)[1]), bk.np(i0))
    # a different configuration is refused and leaves the module as it was
    wrong = make(bk, shared_codebook=shared, decay=0.9, gradient_routing="per_depth")
    before = snapshot(wrong)
    with pytest.raises(ValueError, match="different configuration.*gradient_routing"):
        wrong.load(path)
    assert_same_state(before, snapshot(wrong))
    # per-depth and shared states are not interchangeable
    with pytest.raises(KeyError, match="keys mismatch"):
        make(bk, shared_codebook=not shared).load_state_dict(state)


def test_bad_depth_state_leaves_every_depth_untouched(rng):
    rq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0)
    rq(rng.standard_normal((N, D)))
    before = snapshot(rq)
    bad = {k: B.to_numpy(v).copy() for k, v in rq.state_dict().items()}
    bad["0.codebook"] = bad["0.codebook"] + 1.0  # valid
    bad["2.embed_avg"] = np.full((K, D), np.nan)  # invalid, found after depths 0 and 1 loaded
    with pytest.raises(ValueError, match="NaN"):
        rq.load_state_dict(bad)
    assert_same_state(before, snapshot(rq))


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "bad, err, msg",
    [
        (np.zeros((4, D + 1)), ValueError, r"x must have shape \(\.\.\., 5\)"),
        (np.full((4, D), np.nan), ValueError, "NaN or infinite"),
        (np.zeros((4, D), dtype=np.int64), TypeError, "floating-point"),
        (np.zeros((0, D)), ValueError, "empty"),
    ],
    ids=["wrong-dim", "nan", "int", "empty"],
)
@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_bad_input_is_rejected_and_state_untouched(bk, rng, bad, err, msg, shared):
    rq = make(bk, shared_codebook=shared, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.0)
    before = snapshot(rq)  # before the k-means init: a failed first call must not initialise
    with pytest.raises(err, match=msg):
        rq(bk.asarray(bad, dtype=None))
    assert_same_state(before, snapshot(rq))
    rq(bk.asarray(rng.standard_normal((N, D))))
    before = snapshot(rq)
    with pytest.raises(err, match=msg):
        rq(bk.asarray(bad, dtype=None))
    assert_same_state(before, snapshot(rq))


def test_backward_errors_leave_the_cache_and_state(bk, rng):
    rq = make(bk, ema_update=False, learnable_codebook=True)
    zeros = bk.asarray(np.zeros((N, D)))
    with pytest.raises(RuntimeError, match="backward.*forward"):
        rq.backward(zeros)
    rq(bk.asarray(rng.standard_normal((N, D))))
    before = snapshot(rq)
    with pytest.raises(ValueError, match=r"dquantized must have shape \(11, 5\)"):
        rq.backward(bk.asarray(np.zeros((N + 1, D))))
    for bad in (np.ones(Q + 1), np.ones((Q, 1)), np.ones((1, Q))):
        with pytest.raises(ValueError, match=r"dlosses must have shape \(3,\)"):
            rq.backward(zeros, dlosses=bk.asarray(bad))
    with pytest.raises(ValueError, match="NaN"):
        rq.backward(zeros, dlosses=bk.asarray(np.array([1.0, np.nan, 1.0])))
    with pytest.raises(ValueError, match="NaN"):
        rq.backward(bk.asarray(np.full((N, D), np.nan)))
    assert_same_state(before, snapshot(rq))
    assert rq.grads == {}
    dx = rq.backward(zeros, dlosses=bk.asarray(np.ones(Q)))  # the failed calls did not consume the cache
    assert dx.shape == (N, D) and sorted(rq.grads) == [f"{level}.codebook" for level in range(Q)]
    with pytest.raises(RuntimeError, match="backward"):
        rq.backward(zeros)  # twice


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(num_quantizers=0), "num_quantizers must be >= 1"),
        (dict(gradient_routing="encodec"), "gradient_routing must be one of"),
        (dict(codebook_size=None), "needs codebook_size"),
        (dict(n_embed=K + 1), "disagree"),
        (dict(commitment=0.5, commitment_weight=0.25), "disagree"),
        (dict(learnable_codebook=True), "needs ema_update=False"),
    ],
)
def test_bad_configuration(kw, msg):
    args = dict(dim=D, num_quantizers=Q, codebook_size=K)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=msg):
        ResidualVQ(**args)


def test_aliases_pass_to_every_depth():
    rq = ResidualVQ(dim=D, num_quantizers=Q, n_embed=K + 2, commitment=0.25, decay=0.5)
    assert rq.codebook_size == K + 2
    assert all(
        layer.commitment_weight == 0.25 and layer.decay == 0.5 and layer.codebook_size == K + 2 for layer in rq.layers
    )


# ----------------------------------------------------- VectorQuantize(num_quantizers=Q > 1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kmeans_init=True, kmeans_iters=3),
        dict(use_cosine_sim=True, orthogonal_reg_weight=0.5, rotation_trick=True, kmeans_init=True),
        dict(shared_codebook=True, decay=0.9, threshold_ema_dead_code=0.5, commitment=0.3),
        dict(ema_update=False, learnable_codebook=True, gradient_routing="sum"),
    ],
    ids=["kmeans", "cosine-orth-rotation", "shared-dead-codes", "learnable-sum"],
)
def test_vector_quantize_with_num_quantizers_quantizes_like_residual_vq(rng, kw):
    vq = VectorQuantize(D, K, num_quantizers=Q, seed=7, **kw)  # positional dim, codebook_size
    rq = ResidualVQ(dim=D, codebook_size=K, num_quantizers=Q, seed=7, **kw)
    # a VectorQuantize with Q depths (isinstance tells the truth: it was built by VectorQuantize)
    assert type(vq) is VectorQuantize and vq.is_stack and not isinstance(vq, ResidualVQ)
    assert isinstance(rq, VectorQuantize) and rq.is_stack  # a residual stack is a vector quantizer
    assert {
        **vq.config(),
        "shared_codebook": rq.shared_codebook,
        "gradient_routing": rq.gradient_routing,
    } == rq.config()
    for _ in range(3):
        x = rng.standard_normal((2, N, D)).astype(np.float32)
        g = rng.standard_normal((2, N, D)).astype(np.float32)
        for a, b in zip(vq(x), rq(x)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(vq.backward(g), rq.backward(g))
        assert vq.grads.keys() == rq.grads.keys()
        for k in vq.grads:
            np.testing.assert_array_equal(vq.grads[k], rq.grads[k])
        for k, v in vq.state_dict().items():
            np.testing.assert_array_equal(v, rq.state_dict()[k], err_msg=k)
    assert type(VectorQuantize(D, K, num_quantizers=1)) is VectorQuantize


def test_vector_quantize_with_numpy_integer_num_quantizers(rng):
    vq = VectorQuantize(D, K, num_quantizers=np.int64(Q), seed=0)
    assert type(vq) is VectorQuantize and vq.is_stack
    assert vq(rng.standard_normal((N, D)))[1].shape == (N, Q)


def test_same_seed_is_bit_identical(rng):
    x = rng.standard_normal((N, D)).astype(np.float32)
    kw = dict(dim=D, num_quantizers=Q, codebook_size=K, seed=3, kmeans_init=True, threshold_ema_dead_code=0.5)
    a, b = ResidualVQ(**kw), ResidualVQ(**kw)
    for _ in range(3):
        for u, v in zip(a(x), b(x)):
            np.testing.assert_array_equal(u, v)


def test_numpy_and_strict_agree(rng):
    import array_api_strict as xs

    x = rng.standard_normal((4 * N, D))
    res = []
    for mod in (np, xs):
        rq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=3, dtype="float64", xp=mod, kmeans_init=True)
        for _ in range(3):
            q, i, l = rq(B.from_numpy(x, B.namespace_from_module(mod)))
        res.append((B.to_numpy(q), B.to_numpy(i), B.to_numpy(l), *[B.to_numpy(v) for v in rq.state_dict().values()]))
    for a, b in zip(*res):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ the last residual, formed when read

_LAST_RESIDUAL_CASES = {
    "ste": dict(),
    "cosine": dict(use_cosine_sim=True),
    "rotation": dict(rotation_trick=True),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "stack": dict(num_quantizers=3),
    "stack-shared-sum": dict(num_quantizers=3, shared_codebook=True, gradient_routing="sum"),
    "dropout": dict(num_quantizers=3, quantize_dropout=True, quantize_dropout_cutoff_index=1),
    "projection": dict(codebook_dim=4),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_LAST_RESIDUAL_CASES))
def test_the_last_residual_is_formed_when_read_and_is_the_step_s(bk, rng, case, training):
    """``last_residuals[-1]`` is ``r_{Q-1} - c_{Q-1}`` of the call, read at any time before the next
    call (after the backward too), equal to the sum identity, and formed once."""
    import copy

    kw = dict(_LAST_RESIDUAL_CASES[case])
    vq = VectorQuantize(dim=D, codebook_size=K, seed=0, dtype=bk.dtype_name, xp=bk.module, **kw)
    assert vq.last_residuals == ()  # before the first call
    vq(bk.asarray(rng.standard_normal((16, D))))  # a first step: codebooks off their initial values
    vq.train(training)
    x = bk.asarray(rng.standard_normal((5, 4, D)))
    cb = [bk.np(layer.codebook).astype(np.float64) for layer in vq.layers]  # the codebooks the call uses
    q, idx, loss = vq(x)
    early = copy.deepcopy(vq)  # read now, from a copy; the module itself is read after its backward
    res_early = [bk.np(r).astype(np.float64) for r in early.last_residuals]
    if training:
        vq.backward(bk.asarray(rng.standard_normal((5, 4, D))))
    res = vq.last_residuals
    assert vq.last_residuals[-1] is res[-1]  # formed once
    Q = vq.num_quantizers
    assert len(res) == Q + 1
    for a, b in zip(res_early, res):
        np.testing.assert_array_equal(a, bk.np(b).astype(np.float64))  # the backward changed nothing
    # r_Q = r_{Q-1} - c_{Q-1}, with the codes read back from the indices (c = 0 past a row's last depth)
    codes = idx if Q > 1 else idx[..., None]
    if kw.get("use_cosine_sim"):
        cb = [c / np.linalg.norm(c, axis=1, keepdims=True) for c in cb]
    last = bk.np(codes).reshape(-1, Q)[:, -1]
    code = np.where((last >= 0)[:, None], cb[-1][np.maximum(last, 0)], 0.0)
    tol = 1e-12 if bk.is64 else 1e-5
    np.testing.assert_allclose(res_early[-1], res_early[-2] - code, rtol=0, atol=tol)
    if "codebook_dim" not in kw:  # without projections: x = quantized + r_Q (in x's space)
        xf, qf = bk.np(x).astype(np.float64).reshape(-1, D), bk.np(q).astype(np.float64).reshape(-1, D)
        np.testing.assert_allclose(qf + res_early[-1], xf, rtol=0, atol=tol * Q * 4)
