"""Every deliberate difference from vector-quantize-pytorch, pinned (one test per docs/deviations.md entry).

Each test shows both sides: what vector-quantize-pytorch ("vqp") does, computed by running it,
and what vqref does instead, checked against an independent float64 expectation where there is
one.  The eval-mode loss is pinned in test_vector_quantize_conformance.py and
test_residual_conformance.py, next to the eval-mode comparisons.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import ResidualVQ as TorchRVQ
from vector_quantize_pytorch import VectorQuantize as TorchVQ
from vector_quantize_pytorch.vector_quantize_pytorch import orthogonal_loss_fn, rotate_to

import vqref
from vqref import backend as B
from vqref.core.ema import codebook_from_state
from vqref.core.state import kmeans_init_state
from vqref.interop import from_vector_quantize_pytorch
from vqref.ops.rotation import rotation_trick_backward, rotation_trick_forward
from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

from .conftest import (
    _Plan,
    batch,
    capture_assignment_codebooks,
    make_pair,
    near_tie_rows,
    vqp_step,
    vqref_step,
)

D, K = 16, 32


def load_codebook(t, codebook: np.ndarray) -> None:
    """Set a vqp module's codebook and its EMA statistics (N_k = 1, m_k = c_k)."""
    cb = t._codebook
    with torch.no_grad():
        cb.embed.copy_(torch.from_numpy(codebook.astype(np.float32))[None])
        cb.embed_avg.copy_(cb.embed)
        cb.cluster_size.fill_(1.0)


# ------------------------------------------------------------------ gradient estimator


def test_default_estimator_is_the_straight_through_estimator(rng):
    assert vqref.VectorQuantize(D, K).rotation_trick is False
    assert TorchVQ(dim=D, codebook_size=K).rotation_trick is True
    # the same state, vqp's default (rotation) against vqref's default (STE): the forward values
    # agree, the input gradients do not; vqref with rotation_trick=True gives vqp's
    t, _ = make_pair(lambda: TorchVQ(dim=D, codebook_size=K))
    state = from_vector_quantize_pytorch(t).state_dict()
    x = batch(rng, (64, D))
    g = rng.standard_normal((64, D)).astype(np.float32)
    vqp = vqp_step(t, x, g)
    outs = {}
    for rotation in (False, True):
        r = vqref.VectorQuantize(D, K, rotation_trick=rotation)
        r.load_state_dict(state)
        outs[rotation] = vqref_step(r, x, g)
        np.testing.assert_allclose(outs[rotation].quantized, vqp.quantized, rtol=1e-5, atol=1e-6)
    assert not np.allclose(outs[False].dx, vqp.dx, rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(outs[True].dx, vqp.dx, rtol=1e-4, atol=1e-6)
    # the STE's gradient is the upstream one plus the commitment term, exactly
    xf = x.astype(np.float64)
    expected = g + 2.0 / x.size * (xf - outs[False].quantized)
    np.testing.assert_allclose(outs[False].dx, expected, rtol=1e-5, atol=1e-7)


def test_estimator_applies_whether_or_not_the_input_requires_grad(rng):
    # vqp applies its estimator only if the input requires grad.  Without that, its output is
    # the lookup itself, and with a learnable codebook the decoder's gradient flows into the
    # codebook (one_hot^T g).  vqref always applies the estimator: the codebook never receives
    # the decoder's gradient, only the losses'.
    make = lambda: TorchVQ(dim=D, codebook_size=K, learnable_codebook=True, ema_update=False, rotation_trick=False)
    t, r = make_pair(make)
    x = batch(rng, (64, D))
    g = torch.from_numpy(rng.standard_normal((64, D)).astype(np.float32))
    grads = {}
    for requires in (False, True):
        xt = torch.from_numpy(x).requires_grad_(requires)
        q, idx, loss = t(xt)
        ((q * g).sum() + loss).backward()
        grads[requires] = t._codebook.embed.grad[0].clone()
        t._codebook.embed.grad = None
    onehot = torch.nn.functional.one_hot(idx, K).float()
    torch.testing.assert_close(grads[False] - grads[True], onehot.T @ g, rtol=1e-5, atol=1e-5)
    r(x)
    r.backward(g.numpy(), 1.0)
    np.testing.assert_allclose(r.grads["codebook"], grads[True].numpy(), rtol=1e-4, atol=1e-7)


def test_rotation_trick_value_and_antipodal_rows(rng):
    # Generic rows: the same surrogate gradient lambda R^T g.  Forward value: vqref returns q
    # itself, vqp lambda R x, equal to q up to rounding.  At an exactly antipodal row
    # (x = -a q) vqp's Householder form degenerates to a reflection (det -1) and vqref takes a
    # rotation by pi in a fixed plane (det +1); both keep lengths and send the component
    # along x to its negative.
    N = 40
    e = rng.standard_normal((N, D)).astype(np.float32)
    q = rng.standard_normal((N, D)).astype(np.float32)
    q[0] = -0.5 * e[0]  # antipodal
    g = rng.standard_normal((N, D)).astype(np.float32)
    et = torch.from_numpy(e).requires_grad_()
    out_t = rotate_to(et, torch.from_numpy(q))
    out_t.backward(torch.from_numpy(g))
    out_r, cache = rotation_trick_forward(e, q)
    de_r = rotation_trick_backward(g, cache)
    np.testing.assert_array_equal(out_r, q)
    np.testing.assert_allclose(out_t.detach().numpy(), q, rtol=1e-4, atol=1e-5)
    de_t = et.grad.numpy()
    np.testing.assert_allclose(de_r[1:], de_t[1:], rtol=1e-4, atol=1e-5)
    lam = np.linalg.norm(q[0].astype(np.float64)) / np.linalg.norm(e[0].astype(np.float64))
    u = e[0] / np.linalg.norm(e[0])
    reflection = lam * (g[0] - 2 * (u @ g[0]) * u)
    np.testing.assert_allclose(de_t[0], reflection, rtol=1e-4, atol=1e-5)  # vqp
    assert not np.allclose(de_r[0], de_t[0], rtol=1e-3, atol=1e-4)  # vqref differs ...
    assert np.linalg.norm(de_r[0]) == pytest.approx(lam * np.linalg.norm(g[0]), rel=1e-5)  # ... keeps length
    assert u @ de_r[0] == pytest.approx(-lam * (u @ g[0]), rel=1e-4, abs=1e-6)
    diff = de_r[0] - de_t[0]  # a rank-one change orthogonal to u: the second axis of the plane
    assert abs(u @ diff) < 1e-5 * np.linalg.norm(diff)


# ------------------------------------------------------------------ k-means


def test_kmeans_initialisation_runs_only_in_training_mode(rng):
    t = TorchVQ(dim=D, codebook_size=K, kmeans_init=True).eval()
    r = vqref.VectorQuantize(D, K, kmeans_init=True, seed=0).eval()
    x = batch(rng, (100, D))
    t(torch.from_numpy(x))
    assert bool(t._codebook.initted)  # vqp: the first call initialises, in any mode
    before = {k: np.array(v, copy=True) for k, v in r.state_dict().items()}
    _, idx, _ = r(x)
    assert r.initted is False  # vqref: eval never changes the module
    for k, v in r.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), before[k])
    np.testing.assert_array_equal(idx, 0)  # the all-zero placeholder codebook: every row ties, code 0
    r.train()
    r(x)
    assert r.initted is True


def test_empty_kmeans_cluster_keeps_its_centroid(rng):
    # A cluster that is empty in k-means' last assignment has count 0 and sum 0.  vqp sets
    # code = sum / smoothed count = the zero vector; vqref keeps the cluster's k-means mean,
    # still a sensible code (with count 0, so dead-code restarts still see it as unused).
    N, iters = 200, 1
    gen = np.random.default_rng(5)
    plan = _Plan(gen)
    plan.draw_kmeans(N, K)
    rows = plan.kmeans_rows
    # Halves of small integers: every distance either library computes is exact in float32
    # (the codebook mean divides by K = 32, a power of two), so the tie between the two equal
    # means below is an exact tie that both break toward the lower index.  With arbitrary
    # floats the BLAS kernel may round the two equal columns differently and split the tie.
    x = np.round(batch(rng, (N, D), centres=12) * 2) / 2
    x[rows[9]] = x[rows[4]]  # two initial means on one point: cluster 9 gets nothing
    t = TorchVQ(dim=D, codebook_size=K, kmeans_init=True, kmeans_iters=iters)
    t._codebook.sample_fn = lambda samples, num: samples[:, torch.as_tensor(rows)]
    t._codebook.init_embed_(torch.from_numpy(x)[None])
    state = kmeans_init_state(x, K, iters=iters, rng=gen, eps=1e-5)
    code_t = t._codebook.embed[0].numpy()
    assert t._codebook.cluster_size[0, 9] == 0 and state.cluster_size[9] == 0
    np.testing.assert_array_equal(code_t[9], 0.0)  # vqp
    np.testing.assert_array_equal(state.codebook[9], x[rows[9]])  # vqref: the k-means mean
    others = np.arange(K) != 9
    np.testing.assert_allclose(state.codebook[others], code_t[others], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.cluster_size, t._codebook.cluster_size[0].numpy())


# ------------------------------------------------------------------ distances


def test_nearest_code_on_offset_data(rng):
    # Data far from the origin compared with their spread: vqp's uncentred float32 expansion
    # loses the ranking, vqref's centred one keeps it.  Every vqp mismatch is a near tie at
    # float32 rounding of the uncentred form, which is what the suite tolerates.
    offset, spread = 300.0, 0.05
    codes = (offset + spread * rng.standard_normal((K, D))).astype(np.float32)
    x = (offset + spread * rng.standard_normal((400, D))).astype(np.float32)
    truth = ((x[:, None, :].astype(np.float64) - codes[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    t = TorchVQ(dim=D, codebook_size=K).eval()
    load_codebook(t, codes)
    r = from_vector_quantize_pytorch(t)
    _, idx_t, _ = t(torch.from_numpy(x))
    _, idx_r, _ = r(x)
    np.testing.assert_array_equal(idx_r, truth)
    assert (idx_t.numpy() != truth).mean() > 0.2
    first = near_tie_rows(x, [codes.astype(np.float64)], idx_r[:, None], idx_t.numpy()[:, None], cosine=False)
    assert (first == 0).sum() == (idx_t.numpy() != truth).sum()


def test_float64_input_is_quantized_in_float64():
    # vqp runs its codebook (distances, EMA) in float32 whatever the input dtype; vqref
    # computes in the input's dtype with the float32 state cast up.
    codes = np.zeros((2, 2), np.float32)
    codes[0, 0], codes[1, 0] = 1.0, 1.0 + 2.0**-20
    x = np.array([[1.0 + 2.0**-21 + 2.0**-30, 0.0]])  # closer to code 1, by 2^-29 (float64)
    t = TorchVQ(dim=2, codebook_size=2).eval()
    load_codebook(t, codes)
    r = from_vector_quantize_pytorch(t)
    _, idx_t, _ = t(torch.from_numpy(x))
    q_r, idx_r, _ = r(x)
    assert int(idx_r[0]) == 1 and q_r.dtype == np.float64
    assert int(idx_t[0]) == 0  # the float32 rounding of x lies exactly between the codes


def test_cosine_codebook_is_renormalised_in_the_forward(rng):
    # vqp relies on its stored cosine codes being unit length (true after its own updates) and
    # scores x^ . c with the stored codes; vqref normalises the codes in every forward.  They
    # differ only for a codebook loaded with codes that are not unit length.
    codes = rng.standard_normal((K, D)) * rng.uniform(0.2, 3.0, size=(K, 1))
    x = batch(rng, (300, D))
    t = TorchVQ(dim=D, codebook_size=K, use_cosine_sim=True).eval()
    load_codebook(t, codes)
    r = from_vector_quantize_pytorch(t)
    q_t, idx_t, _ = t(torch.from_numpy(x))
    q_r, idx_r, _ = r(x)
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    c32 = codes.astype(np.float32).astype(np.float64)
    ch = c32 / np.linalg.norm(c32, axis=1, keepdims=True)
    np.testing.assert_array_equal(idx_r, (xh @ ch.T).argmax(1))  # vqref: nearest by angle
    np.testing.assert_array_equal(idx_t.numpy(), (xh @ c32.T).argmax(1))  # vqp: largest raw dot
    assert (idx_r != idx_t.numpy()).any()
    np.testing.assert_allclose(np.linalg.norm(q_r, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(q_t.numpy(), c32[idx_t.numpy()], rtol=1e-6)


# ------------------------------------------------------------------ orthogonal regulariser


def test_orthogonal_step_with_ema_is_overwritten_by_the_next_recompute(rng):
    # With an EMA codebook the regulariser makes the codebook a parameter, but the next
    # training forward recomputes it from the EMA statistics: the gradient step only changes
    # that forward's assignment.  Same in both libraries.
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, orthogonal_reg_weight=1.0, rotation_trick=False))
    x1, x2 = batch(rng, (80, D)), batch(rng, (80, D))
    g = np.zeros_like(x1)
    vqp = vqp_step(t, x1, g)
    vqref_step(r, x1, g)
    with torch.no_grad():
        t._codebook.embed -= 50.0 * torch.from_numpy(vqp.grads["codebook"])[None]
    before_step = np.array(r.codebook, copy=True)
    r.params["codebook"] = r.params["codebook"] - 50.0 * r.grads["codebook"]
    stepped = np.array(r.codebook, copy=True)
    assert np.abs(stepped - before_step).max() > 0.1 * np.abs(before_step).max()
    _, idx_r, _ = r(x2)
    t(torch.from_numpy(x2))
    for cs, ea, cb in [
        (r.cluster_size, r.embed_avg, r.codebook),
        (t._codebook.cluster_size[0].numpy(), t._codebook.embed_avg[0].numpy(), t._codebook.embed[0].detach().numpy()),
    ]:
        np.testing.assert_allclose(cb, codebook_from_state(cs, ea, eps=1e-5), rtol=1e-5, atol=1e-7)
    # the step did decide the second assignment
    d = ((x2[:, None].astype(np.float64) - stepped[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx_r, d.argmin(1))
    d0 = ((x2[:, None].astype(np.float64) - before_step[None]) ** 2).sum(-1)
    assert (d0.argmin(1) != idx_r).any()


def test_vqp_shared_codebook_orthogonal_gradient_uses_overwritten_codes(rng):
    # vqp bug: with a shared codebook, EMA and the regulariser, ResidualVQ recomputes the
    # codebook in place (embed.data.copy_) after the last depth but before the backward, so
    # autograd differentiates the regulariser with the *new* codes in its saved tensors: a
    # gradient of nothing.  vqref returns the gradient of the loss it reported.
    Q, w = 2, 1.0
    make = lambda: TorchRVQ(
        dim=D,
        codebook_size=K,
        num_quantizers=Q,
        shared_codebook=True,
        orthogonal_reg_weight=w,
        commitment_weight=0.0,
        rotation_trick=False,
    )
    t, r = make_pair(make)
    before = t.layers[0]._codebook.embed.detach()[0].clone()
    x = batch(rng, (80, D))
    _, _, losses = t(torch.from_numpy(x))
    after = t.layers[0]._codebook.embed.detach()[0].clone()
    losses.sum().backward()
    grad_t = t.layers[0]._codebook.embed.grad[0]
    # vqp's gradient is reproduced by differentiating with the saved codebook overwritten
    p = torch.nn.Parameter(before.clone()[None])
    stale = Q * w * orthogonal_loss_fn(p)
    p.data.copy_(after[None])
    stale.backward()
    torch.testing.assert_close(grad_t, p.grad[0], rtol=1e-4, atol=1e-6)
    # vqref: the loss value agrees, and the gradient is that of the reported loss
    _, _, losses_r = r(x)
    r.backward(np.zeros_like(x), np.ones(Q, np.float32))
    np.testing.assert_allclose(losses_r, losses.detach().numpy(), rtol=1e-5)
    value, clean = orthogonal_loss_reference(before.numpy(), dloss=Q * w)
    np.testing.assert_allclose(r.grads["codebook"], clean, rtol=1e-4, atol=1e-7)
    assert not np.allclose(grad_t.numpy(), clean, rtol=1e-2, atol=1e-4)


# ------------------------------------------------------------------ dead codes


def test_dead_code_candidates_come_from_the_host_generator(rng):
    # vqref draws restart candidates from the module's numpy Generator (the same seed restarts
    # the same codes with the same rows on every backend); vqp from torch's global generator.
    x = batch(rng, (200, D))
    runs = []
    for seed in (7, 7, 8):
        r = vqref.VectorQuantize(D, K, threshold_ema_dead_code=3.0, seed=seed)
        r(x)
        runs.append(np.array(r.codebook, copy=True))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    # candidates: one distinct row per code (N >= K), so restarted codes never coincide
    restarted = runs[0][r.cluster_size == 3.0]
    assert len(restarted) > 1 and len(np.unique(restarted, axis=0)) == len(restarted)


def test_more_dead_codes_than_rows(rng):
    # N < K and every code dead: vqp restarts N codes with distinct rows and leaves the others
    # for later steps; vqref restarts all of them, drawing rows with replacement.
    N, T = 10, 50.0
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K, threshold_ema_dead_code=T, rotation_trick=False))
    x = batch(rng, (N, D))
    t(torch.from_numpy(x))
    r(x)
    cs_t = t._codebook.cluster_size[0].numpy()
    assert (cs_t == T).sum() == N
    rows_t = t._codebook.embed[0].numpy()[cs_t == T]
    assert len(np.unique(rows_t, axis=0)) == N
    assert (r.cluster_size == T).sum() == K
    rows_r = np.asarray(r.codebook)
    assert all((np.abs(x - row).max(1) == 0).any() for row in rows_r)  # every code is a batch row
    assert len(np.unique(rows_r, axis=0)) <= N


def test_shared_codebook_restarts_after_the_last_depth_only(rng):
    # vqp: with a shared codebook each depth's codebook forward also expires codes, so a later
    # depth of the same forward can quantize with restarted codes (and the final restart runs
    # again on all depths).  vqref restarts once, after the last depth: every depth of a
    # forward sees the codebook the forward started with.
    Q = 3
    make = lambda: TorchRVQ(
        dim=D,
        codebook_size=K,
        num_quantizers=Q,
        shared_codebook=True,
        threshold_ema_dead_code=4.0,
        rotation_trick=False,
    )
    t, r = make_pair(make)
    x = batch(rng, (120, D))
    seen: list = []
    with capture_assignment_codebooks(t, seen, []):
        t(torch.from_numpy(x))
    assert not np.array_equal(seen[0], seen[1])  # vqp: depth 1 used restarted codes
    start = np.array(r.layers[0].codebook, copy=True)
    _, idx, _ = r(x)
    res = r.last_residuals
    for level in range(Q):
        # the code each depth subtracted is a row of the starting codebook (to rounding)
        np.testing.assert_allclose(res[level] - res[level + 1], start[idx[:, level]], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ residual stacks and API


def test_residual_decoder_gradient_reaches_the_input_once_per_depth(rng):
    # Same as vqp: each depth's estimator passes g to its residual and every residual has
    # identity Jacobian, so dx = Q g with the STE.  vqref also offers "sum" routing (one
    # estimator on the total, RQ-VAE), which vqp does not have.
    Q = 3
    t, r = make_pair(lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=Q, rotation_trick=False))
    x = batch(rng, (50, D))
    g = rng.standard_normal((50, D)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    q, _, _ = t(xt)
    (q * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), Q * g, rtol=1e-6)
    state = r.state_dict()
    r(x)
    np.testing.assert_allclose(r.backward(g, np.zeros(Q, np.float32)), Q * g, rtol=1e-6)
    s = vqref.ResidualVQ(dim=D, codebook_size=K, num_quantizers=Q, gradient_routing="sum")
    s.load_state_dict(state)
    s(x)
    np.testing.assert_allclose(s.backward(g, np.zeros(Q, np.float32)), g, rtol=1e-6)


def test_loss_shapes(rng):
    x = batch(rng, (2, 20, D))
    t, r = make_pair(lambda: TorchVQ(dim=D, codebook_size=K))
    assert tuple(t(torch.from_numpy(x))[2].shape) == tuple(np.shape(r(x)[2])) == ()
    t, r = make_pair(lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=3))
    assert tuple(t(torch.from_numpy(x))[2].shape) == tuple(np.shape(r(x)[2])) == (3,)
    t.eval(), r.eval()
    lt, lr = t(torch.from_numpy(x))[2], r(x)[2]
    assert tuple(lt.shape) == np.shape(lr) == (3,) and torch.all(lt == 0) and np.all(lr > 0)


def test_num_quantizers_and_seed_aliases():
    # The spellings of tests/test_seed_examples.py: vqref's VectorQuantize(num_quantizers=Q > 1) is a
    # residual stack of Q depths, and n_embed / commitment alias codebook_size / commitment_weight.  vqp's
    # VectorQuantize has no num_quantizers and neither class knows the aliases.
    rq = vqref.VectorQuantize(dim=D, codebook_size=K, num_quantizers=4)
    assert type(rq) is vqref.VectorQuantize and rq.is_stack and rq.num_quantizers == 4
    rq = vqref.ResidualVQ(dim=D, n_embed=K, num_quantizers=2, commitment=0.25)
    assert rq.codebook_size == K and rq.layers[0].commitment_weight == 0.25
    with pytest.raises(TypeError, match="num_quantizers"):
        TorchVQ(dim=D, codebook_size=K, num_quantizers=4)
    with pytest.raises(TypeError, match="codebook_size"):
        TorchRVQ(dim=D, n_embed=K, num_quantizers=2)
    with pytest.raises(TypeError, match="commitment"):
        TorchRVQ(dim=D, codebook_size=K, num_quantizers=2, commitment=0.25)


def test_forward_takes_no_per_call_options(rng):
    # vqp's forward takes mask/lens, indices (cross-entropy mode), topk, freeze_codebook,
    # sample_codebook_temp, ema_update_weight, accum_ema_update, ema_update; vqref's forward
    # takes the input, mask and sample_codebook_temp only (state changes follow train()/eval()
    # and the constructor's options).
    r = vqref.VectorQuantize(D, K)
    x = batch(rng, (2, 5, D))
    for option in ("lens", "indices", "topk", "freeze_codebook"):
        with pytest.raises(TypeError):
            r.forward(x, **{option: None})


def test_residual_subtracts_the_code_itself(rng):
    # vqp's next residual is r - sg[o], o the estimator's output, which equals the code only to
    # rounding (x + (q - x) for the STE, lambda R x for the rotation trick).  vqref subtracts the
    # code: r_1 = x - q bit for bit.  The residuals differ at the rounding level.
    t, r = make_pair(lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=2, rotation_trick=True))
    x = batch(rng, (200, D))
    seen = []
    cb1 = t.layers[1]._codebook
    original = cb1.init_embed_
    cb1.init_embed_ = lambda data, mask=None: (seen.append(data[0].detach().numpy().copy()), original(data, mask=mask))
    try:
        _, idx_t, _ = t(torch.from_numpy(x).requires_grad_())
    finally:
        del cb1.init_embed_
    start = np.array(r.layers[0].codebook, copy=True)  # depth 0's codebook before the step
    _, idx_r, _ = r(x)
    exact = x - start[np.asarray(idx_r)[:, 0]]  # float32, x - q
    np.testing.assert_array_equal(np.asarray(B.to_numpy(r.last_residuals[1])), exact)  # vqref
    np.testing.assert_array_equal(idx_t.numpy()[:, 0], np.asarray(idx_r)[:, 0])
    assert not np.array_equal(seen[0], exact)  # vqp: rounding-level differences
    np.testing.assert_allclose(seen[0], exact, rtol=0, atol=1e-5)
