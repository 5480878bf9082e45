"""Masks: absent tokens are left out of everything (docs/math.md §11.1).

The oracle is the module itself on the kept rows alone: a masked forward must give, on the kept
rows, exactly what a module with the same seed gives for those rows as its whole batch -- the
same codes, losses, EMA state, k-means and dead-code draws, gradients and usage statistics --
and 0 (index -1, no gradient) on the absent ones.  That oracle does not run any mask code.
Gradients of the whole layer (mask, projections, heads, stacks) are checked against torch
autograd in float64; the position-grouped diversity loss against finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.core.quantize import grouped_diversity_backward, grouped_diversity_forward
from vqref.ops.gumbel import diversity_loss_backward, diversity_loss_forward
from vqref.testing import check_vjp
from vqref.testing.torch_reference.layer import layer_grads

D, K = 5, 7
SHAPE = (3, 4, D)  # N = 12 tokens

# configurations whose masked step must equal the kept rows' step
CONFIGS = {
    "ema": dict(),
    "kmeans": dict(kmeans_init=True, kmeans_iters=3),
    "dead codes": dict(threshold_ema_dead_code=1.5, decay=0.5),
    "cosine": dict(use_cosine_sim=True),
    "orthogonal, active codes": dict(orthogonal_reg_weight=0.3, orthogonal_reg_active_codes_only=True),
    "learnable": dict(ema_update=False, learnable_codebook=True, codebook_weight=0.5),
    "projection": dict(codebook_dim=3),
    "stack": dict(num_quantizers=3, kmeans_init=True, kmeans_iters=2, rotation_trick=True),
    "shared stack": dict(num_quantizers=2, shared_codebook=True, threshold_ema_dead_code=1.5, decay=0.5),
    "heads": dict(heads=2, codebook_dim=3),
    "separate heads": dict(heads=2, codebook_dim=2, separate_codebook_per_head=True, threshold_ema_dead_code=1.0),
}


def make(bk, seed=0, **kw):
    return VectorQuantize(D, K, seed=seed, dtype=bk.dtype_name, xp=bk.module, **kw)


def host(a):
    return np.asarray(B.to_numpy(a))


def snapshot(m):
    return {k: host(v).copy() for k, v in m.state_dict().items()}


def mask_of(rng, shape=SHAPE[:-1], p=0.6):
    m = rng.random(shape) < p
    m.reshape(-1)[[0, -1]] = [True, False]  # at least one token on each side
    return m


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_masked_step_is_the_step_of_the_kept_rows(bk, rng, name):
    kw = CONFIGS[name]
    masked, alone = make(bk, **kw), make(bk, **kw)
    for step in range(2):
        x = rng.standard_normal(SHAPE)
        mask = mask_of(rng)
        kept = np.flatnonzero(mask.reshape(-1))
        dq = rng.standard_normal(SHAPE)
        q, idx, loss = masked(bk.asarray(x), mask=bk.asarray(mask, dtype=bk.xp.bool))
        q2, idx2, loss2 = alone(bk.asarray(x.reshape(-1, D)[kept]))
        dx = host(masked.backward(bk.asarray(dq), 0.7))
        dx2 = host(alone.backward(bk.asarray(dq.reshape(-1, D)[kept]), 0.7))
        tol = dict(rtol=bk.rtol * 10, atol=bk.rtol)
        flat_q, flat_i = host(q).reshape(-1, D), host(idx).reshape(len(mask.reshape(-1)), -1)
        np.testing.assert_allclose(flat_q[kept], host(q2), **tol, err_msg=f"{name} quantized")
        np.testing.assert_array_equal(flat_q[~mask.reshape(-1)], 0.0)
        np.testing.assert_array_equal(flat_i[kept], host(idx2).reshape(len(kept), -1), err_msg=f"{name} indices")
        assert np.all(flat_i[~mask.reshape(-1)] == -1)
        np.testing.assert_allclose(host(loss), host(loss2), **tol, err_msg=f"{name} loss")
        dxf = dx.reshape(-1, D)
        np.testing.assert_allclose(dxf[kept], dx2, **tol, err_msg=f"{name} dx")
        np.testing.assert_array_equal(dxf[~mask.reshape(-1)], 0.0)
        for key in masked.grads:
            np.testing.assert_allclose(host(masked.grads[key]), host(alone.grads[key]), **tol, err_msg=key)
        a, b = snapshot(masked), snapshot(alone)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], **tol, err_msg=f"{name} state {key} (step {step})")
        for key, value in alone.stats.items():
            assert np.allclose(masked.stats[key], value, rtol=1e-12), key


def test_absent_rows_can_return_the_input(rng):
    m = VectorQuantize(D, K, seed=0, dtype="float64", return_zeros_for_masked_padding=False, codebook_dim=3)
    x, mask, dq = rng.standard_normal(SHAPE), mask_of(rng), rng.standard_normal(SHAPE)
    q, idx, _ = m(x, mask=mask)
    dx = m.backward(dq)
    np.testing.assert_array_equal(q[~mask], x[~mask])  # the input itself, bit for bit
    np.testing.assert_array_equal(dx[~mask], dq[~mask])  # and the identity for its gradient
    assert np.all(idx[~mask] == -1)
    m.eval()
    assert np.all(m(x, mask=mask)[0][~mask] == x[~mask])


def test_a_batch_without_tokens(bk, rng):
    m = make(bk, num_quantizers=2, threshold_ema_dead_code=1.0, orthogonal_reg_weight=0.5,
             orthogonal_reg_active_codes_only=True, codebook_diversity_loss_weight=0.3)  # fmt: skip
    before = snapshot(m)
    x = bk.asarray(rng.standard_normal(SHAPE))
    none = bk.asarray(np.zeros(SHAPE[:-1], dtype=bool), dtype=bk.xp.bool)
    q, idx, losses = m(x, mask=none)
    assert np.all(host(q) == 0) and np.all(host(idx) == -1)
    np.testing.assert_array_equal(host(losses), 0.0)  # not 0/0
    np.testing.assert_array_equal(host(m.backward(bk.asarray(rng.standard_normal(SHAPE)), 1.0)), 0.0)
    # the EMA still takes its step, with no row: the counts decay (vector-quantize-pytorch does the same)
    after = snapshot(m)
    np.testing.assert_allclose(after["0.cluster_size"], 0.8 * before["0.cluster_size"], rtol=bk.rtol)
    assert m.stats["used_codes"] == (0, 0)


def test_kmeans_waits_for_a_batch_with_tokens(rng):
    m = VectorQuantize(D, K, seed=0, kmeans_init=True, dtype="float64")
    m(rng.standard_normal(SHAPE), mask=np.zeros(SHAPE[:-1], dtype=bool))
    assert not m.initted
    x, mask = rng.standard_normal(SHAPE), mask_of(rng, p=0.9)
    m(x, mask=mask)
    alone = VectorQuantize(D, K, seed=0, kmeans_init=True, dtype="float64")
    alone(x[mask])
    assert m.initted
    np.testing.assert_allclose(m.codebook, alone.codebook, rtol=1e-12)


def test_sampled_codes_of_a_row_do_not_depend_on_the_mask(rng):
    kw = dict(stochastic_sample_codes=True, sample_codebook_temp=2.0, dtype="float64")
    x, mask = rng.standard_normal(SHAPE), mask_of(rng)
    _, all_idx, _ = VectorQuantize(D, K, seed=3, **kw)(x)
    _, some_idx, _ = VectorQuantize(D, K, seed=3, **kw)(x, mask=mask)
    np.testing.assert_array_equal(some_idx[mask], all_idx[mask])
    # the noise matters: another seed samples other codes
    _, other, _ = VectorQuantize(D, K, seed=4, **kw)(x)
    assert not np.array_equal(other, all_idx)


@pytest.mark.parametrize("bad, error", [
    (lambda m: m.astype(np.int64), TypeError),
    (lambda m: m[:, :2], ValueError),
    (lambda m: m.tolist(), TypeError),
    (lambda m: m.reshape(-1), ValueError),
])  # fmt: skip
def test_a_bad_mask_is_refused_by_name_and_changes_nothing(rng, bad, error):
    m = VectorQuantize(D, K, seed=0, stochastic_sample_codes=True, kmeans_init=True)
    before, gen = snapshot(m), m.generator.bit_generator.state
    with pytest.raises(error, match="mask"):
        m(rng.standard_normal(SHAPE), mask=bad(mask_of(rng)))
    after = snapshot(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert m.generator.bit_generator.state == gen and m.stats == {}


def test_a_mask_of_another_library_is_refused(rng):
    import array_api_strict as xs

    m = VectorQuantize(D, K, seed=0)
    with pytest.raises(TypeError, match="mask"):
        m(rng.standard_normal(SHAPE), mask=xs.asarray(mask_of(rng)))


# ------------------------------------------------------------------ gradients against torch autograd

LAYERS = {
    "plain": dict(),
    "projection, cosine": dict(codebook_dim=3, use_cosine_sim=True),
    "projection, rotation": dict(codebook_dim=3, rotation_trick=True),
    "heads": dict(heads=2, codebook_dim=2, learnable_codebook=True, ema_update=False),
    "separate heads": dict(heads=3, codebook_dim=2, separate_codebook_per_head=True, learnable_codebook=True,
                           ema_update=False),
    "stack, projection": dict(num_quantizers=3, codebook_dim=4, learnable_codebook=True, ema_update=False),
    "passthrough": dict(codebook_dim=3, return_zeros_for_masked_padding=False),
}  # fmt: skip


def _reference(m, x, mask, idx, dq, dloss, state):
    """torch autograd of the layer, with the module's codes and the state its forward used."""
    H = m.heads
    if m.separate_codebook_per_head:
        codebooks = [state["codebook"][h] for h in range(H)]
    elif m.is_stack:
        codebooks = [state[f"{level}.codebook"] for level in range(m.num_quantizers)]
    else:
        codebooks = [state["codebook"]]
    proj = None
    if m.has_projections:
        proj = {"W_in": state["project_in.W"], "b_in": state["project_in.b"], "W_out": state["project_out.W"],
                "b_out": state["project_out.b"]}  # fmt: skip
    opts = dict(use_cosine_sim=m.use_cosine_sim, rotation_trick=m.rotation_trick,
                learnable_codebook=m.learnable_codebook, commitment_weight=m.commitment_weight)  # fmt: skip
    return layer_grads(x.reshape(-1, D), codebooks, idx.reshape(x.reshape(-1, D).shape[0], -1), dq.reshape(-1, D),
                       dloss, mask=mask.reshape(-1), projections=proj, heads=H, separate=m.separate_codebook_per_head,
                       passthrough=not m.return_zeros_for_masked_padding, **opts)  # fmt: skip


def _agrees(m, x, mask, dq, dloss):
    state = snapshot(m)
    q, idx, loss = m(x, mask=mask)
    dx = m.backward(dq, dloss)
    ref_q, ref_losses, ref_dx, ref_dcb, ref_dproj = _reference(m, x, mask, idx, dq, dloss, state)
    close = lambda a, b: np.allclose(a, b, rtol=1e-10, atol=1e-12)  # noqa: E731
    ok = close(q.reshape(-1, D), ref_q) and close(np.atleast_1d(loss), ref_losses) and close(dx.reshape(-1, D), ref_dx)
    names = {"W_in": "project_in.W", "b_in": "project_in.b", "W_out": "project_out.W", "b_out": "project_out.b"}
    for k, v in ref_dproj.items():
        ok = ok and close(m.grads[names[k]], v)
    if m.codebook_is_learnable:
        mine = [m.grads["codebook"][h] for h in range(m.heads)] if m.separate_codebook_per_head else [
            m.grads[p + "codebook"] for p in m.codebook_prefixes()]  # fmt: skip
        ok = ok and all(close(a, b) for a, b in zip(mine, ref_dcb))
    return ok


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_layer_gradients_match_torch_autograd(rng, name):
    m = VectorQuantize(D, K, seed=1, dtype="float64", **LAYERS[name])
    x, mask, dq = rng.standard_normal(SHAPE), mask_of(rng), rng.standard_normal(SHAPE)
    dloss = np.array([0.3, 1.1, 2.0]) if m.is_stack else 1.7
    assert _agrees(m, x, mask, dq, dloss)


def test_the_autograd_check_fails_on_a_wrong_backward(rng, monkeypatch):
    from vqref.quantizers import vq_step

    original = vq_step.layer_in_backward

    def wrong(dstreams, cache):  # forgets the bias of project_in
        dx, dW, db = original(dstreams, cache)
        return dx, dW, 0 * db

    m = VectorQuantize(D, K, seed=1, dtype="float64", codebook_dim=3)
    x, mask, dq = rng.standard_normal(SHAPE), mask_of(rng), rng.standard_normal(SHAPE)
    assert _agrees(m, x, mask, dq, 1.0)
    monkeypatch.setattr(vq_step, "layer_in_backward", wrong)
    assert not _agrees(m, x, mask, dq, 1.0)


def test_usage_statistics_count_the_kept_tokens_only(rng):
    m = ResidualVQ(dim=D, codebook_size=K, num_quantizers=2, seed=0)
    x, mask = rng.standard_normal(SHAPE), mask_of(rng, p=0.3)
    _, idx, _ = m(x, mask=mask)
    used = [len(np.unique(idx[mask][:, level])) for level in range(2)]
    assert m.stats["used_codes"] == tuple(used)


# ------------------------------------------------------------------ the diversity loss of the rows present


def np_grouped_diversity(logits, groups, P, T):
    """The loss from its definition, in float64 numpy: each present position's mean distribution."""
    z = logits * T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    hs = []
    for n in range(P):
        rows = p[groups == n]
        if len(rows):
            pbar = rows.mean(0)
            hs.append(-(pbar * np.log(np.maximum(pbar, 1e-5))).sum())
    return -np.mean(hs) if hs else 0.0


def test_grouped_diversity_is_the_ops_loss_on_the_full_grid(bk64, rng):
    logits = bk64.asarray(rng.standard_normal((12, K)))
    groups = bk64.asarray(np.arange(12) % 4, dtype=bk64.xp.int64)
    a, ca = diversity_loss_forward(logits, inverse_temperature=3.0, positions=4)
    b, cb = grouped_diversity_forward(logits, groups, 4, inverse_temperature=3.0)
    np.testing.assert_allclose(bk64.np(a), bk64.np(b), rtol=1e-13)
    np.testing.assert_allclose(
        bk64.np(diversity_loss_backward(0.7, ca)), bk64.np(grouped_diversity_backward(0.7, cb)), atol=1e-15
    )


def test_grouped_diversity_value_and_finite_differences(bk64, rng):
    logits = rng.standard_normal((9, K))
    groups = np.array([0, 2, 2, 0, 3, 2, 0, 3, 3])  # position 1 has no row
    loss, _ = grouped_diversity_forward(bk64.asarray(logits), bk64.asarray(groups, dtype=bk64.xp.int64), 4,
                                        inverse_temperature=2.0)  # fmt: skip
    assert float(bk64.np(loss)) == pytest.approx(np_grouped_diversity(logits, groups, 4, 2.0), rel=1e-12)
    g = bk64.asarray(groups, dtype=bk64.xp.int64)
    f = lambda a: grouped_diversity_forward(a, g, 4, inverse_temperature=2.0)[0]  # noqa: E731
    vjp = lambda d, a: (grouped_diversity_backward(d, grouped_diversity_forward(a, g, 4, inverse_temperature=2.0)[1]),)  # noqa: E731
    check_vjp(f, vjp, [bk64.asarray(logits)], seed=1, rtol=1e-7)
    wrong = lambda d, a: (2 * vjp(d, a)[0],)  # noqa: E731
    assert not check_vjp(f, wrong, [bk64.asarray(logits)], seed=1, rtol=1e-7, raise_on_failure=False).passed
    empty, cache = grouped_diversity_forward(bk64.asarray(logits[:0]), g[:0], 4, inverse_temperature=2.0)
    assert float(bk64.np(empty)) == 0.0 and grouped_diversity_backward(1.0, cache).shape == (0, K)


def test_the_diversity_loss_under_a_mask_averages_each_position_over_its_tokens(rng):
    m = VectorQuantize(D, K, seed=0, dtype="float64", codebook_diversity_loss_weight=1.0,
                       codebook_diversity_temperature=3.0, commitment_weight=0.0)  # fmt: skip
    x, mask = rng.standard_normal(SHAPE), mask_of(rng)
    cb = np.array(m.codebook)
    _, _, loss = m(x, mask=mask)
    rows = x.reshape(-1, D)[mask.reshape(-1)]
    logits = -np.sqrt(np.maximum(((rows[:, None] - cb[None]) ** 2).sum(-1), 1e-8))
    groups = np.flatnonzero(mask.reshape(-1)) % SHAPE[1]  # each kept token's position
    assert float(loss) == pytest.approx(np_grouped_diversity(logits, groups, SHAPE[1], 3.0), rel=1e-10)


def test_padding_decodes_to_zero(rng):
    m = ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, codebook_dim=3, seed=0, dtype="float64")
    m.eval()
    x, mask = rng.standard_normal(SHAPE), mask_of(rng)
    q, idx, _ = m(x, mask=mask)
    decoded = m.get_output_from_indices(idx)
    np.testing.assert_array_equal(decoded[~mask], 0.0)  # not project_out(0), the bias
    np.testing.assert_allclose(decoded, q, rtol=1e-12, atol=1e-15)
