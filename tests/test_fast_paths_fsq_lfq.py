"""The fast paths of FSQ, LFQ and Gumbel sampling, pinned to their definitions.

Each fast path is a separate function that its public op chooses in one line; here each is run
against the definition (the public op with ``fast=False``) on sizes that cross block boundaries
(blocks shrunk to a few rows), in float32 and float64, with every branch exercised: the clamps
on both sides of their bound, ties in the argmax, blocks that end inside a row of codes.
Elementwise fast paths must give the definition's numbers bit for bit; those with a matrix
product per block or a softmax's logarithm taken differently agree to float rounding.

Symbols: N rows, K codes, D features, C codebooks, d bits (K = 2^d for LFQ).
"""

from __future__ import annotations

import numpy as np
import pytest

from vqref import FSQ, threads
from vqref.core.fsq import Projection, fsq_layer_backward, fsq_layer_forward
from vqref.core.lfq import LFQOptions, LFQParams, lfq_backward, lfq_forward
from vqref.ops import entropy_fast, gumbel_fast, linear_fast
from vqref.ops.entropy import entropy_penalty_backward, entropy_penalty_forward
from vqref.ops.gumbel import (
    code_logits_backward,
    code_logits_forward,
    gumbel_max_sample,
    gumbel_noise,
    gumbel_softmax_backward,
    gumbel_softmax_forward,
    sample_codes,
)
from vqref.ops.lfq import code_scores_backward, code_scores_forward, sign_codebook
from vqref.ops.linear import linear_backward, linear_forward
from vqref.testing import check_vjp, rel_error

N, K, D = 29, 13, 6

DTYPES = [np.float32, np.float64]


def _tol(dtype) -> float:
    return 2e-6 if dtype == np.float32 else 1e-13


# ------------------------------------------------------------------ Gumbel noise: bit for bit


@pytest.mark.parametrize("block", [1, 7, N * K, 10 * N * K])  # one entry, uneven blocks, exact, one block
def test_blocked_noise_is_the_definition_bit_for_bit(bk, block):
    like = bk.asarray(np.zeros(1))
    fast = gumbel_fast.gumbel_noise_blocked((N, K), np.random.default_rng(4), like=like, eps=1e-20, block=block)
    want = gumbel_noise((N, K), np.random.default_rng(4), like=like, fast=False)
    assert type(fast) is type(want) and fast.dtype == want.dtype and fast.shape == (N, K)
    np.testing.assert_array_equal(bk.np(fast), bk.np(want))


def test_blocked_noise_of_no_rows_is_empty_and_draws_nothing():
    gen = np.random.default_rng(2)
    state = gen.bit_generator.state
    g = gumbel_noise((0, K), gen, like=np.zeros(1, np.float32))
    assert g.shape == (0, K) and g.dtype == np.float32 and gen.bit_generator.state == state


def test_blocked_noise_continues_the_stream_and_advances_the_generator_alike():
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    gumbel_noise((N, K), a, like=np.zeros(1, np.float32))
    gumbel_noise((N, K), b, like=np.zeros(1, np.float32), fast=False)
    assert a.bit_generator.state == b.bit_generator.state  # the next draws are the same too
    # negative control: restarting the stream in every block gives other numbers
    restarted = np.concatenate(
        [gumbel_noise((1, K), np.random.default_rng(9), like=np.zeros(1), fast=False) for _ in range(N)]
    )
    want = gumbel_noise((N, K), np.random.default_rng(9), like=np.zeros(1), fast=False)
    assert not np.array_equal(restarted, want)


# ------------------------------------------------------------------ the (N, K) steps of Gumbel sampling


def _problem(rng, dtype):
    x = rng.standard_normal((N, D))
    codebook = rng.standard_normal((K, D))
    codebook[4] = x[3]  # a distance of 0: the clamp stops this gradient
    codebook[9] = x[11] + 3e-5  # squared distance 5.4e-9 < 1e-8 in exact arithmetic
    return x.astype(dtype), codebook.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [1, 2 * K + 3, 10**6])  # one row per block, uneven blocks, one block
def test_blocked_logits_match_the_definition(rng, dtype, block):
    x, codebook = _problem(rng, dtype)
    logits, (xc, cc, dist, passes) = gumbel_fast.code_logits_forward_blocked(x, codebook, clamp=1e-8, block=block)
    want, cache = code_logits_forward(x, codebook, fast=False)
    assert logits.dtype == dtype and dist.dtype == dtype
    np.testing.assert_allclose(logits, want, rtol=_tol(dtype), atol=_tol(dtype))
    np.testing.assert_allclose(dist, cache.dist, rtol=_tol(dtype), atol=_tol(dtype))
    np.testing.assert_array_equal(xc, cache.inner.xc)
    if dtype == np.float64:  # float32's expansion cannot resolve 1e-8: only float64 sees both sides
        np.testing.assert_array_equal(passes, cache.passes)
        assert not passes[3, 4] and not passes[11, 9] and passes.sum() == N * K - 2
    # the public op's choice: the same cache fields
    fast_logits, fast_cache = code_logits_forward(x, codebook)
    assert fast_cache.metric == "euclidean" and fast_cache.passes.dtype == bool
    np.testing.assert_allclose(fast_logits, want, rtol=_tol(dtype), atol=_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_logits_backward_is_the_definition_bit_for_bit(rng, dtype, monkeypatch):
    x, codebook = _problem(rng, np.float64)
    _, cache = code_logits_forward(x.astype(dtype), codebook.astype(dtype), fast=False)
    dl = rng.standard_normal((N, K)).astype(dtype)
    monkeypatch.setattr(gumbel_fast, "BLOCK_ELEMENTS", 2 * K + 3)  # several uneven blocks
    dd2 = gumbel_fast.distance_gradient_blocked(dl, cache.dist, cache.passes, block=2 * K + 3)
    want = np.where(cache.passes, -dl / (2 * cache.dist), 0.0)
    np.testing.assert_array_equal(dd2, want)
    assert np.all(dd2[~cache.passes] == 0) and (~cache.passes).any()
    for fast, slow in zip(code_logits_backward(dl, cache), code_logits_backward(dl, cache, fast=False)):
        np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.05, 1.0, 7.0])
def test_blocked_sampling_and_softmax_are_the_definition_bit_for_bit(rng, dtype, tau):
    logits = -np.abs(rng.standard_normal((N, K)) * 3).astype(dtype)
    noise = gumbel_noise((N, K), rng, like=logits)
    for block in (1, 2 * K + 3, 10**6):
        got = gumbel_fast.gumbel_max_sample_blocked(logits, noise, temperature=tau, block=block)
        np.testing.assert_array_equal(got, gumbel_max_sample(logits, noise, temperature=tau, fast=False))
        for g in (noise, None):
            y = gumbel_fast.gumbel_softmax_forward_blocked(logits, temperature=tau, noise=g, block=block)
            want, cache = gumbel_softmax_forward(logits, temperature=tau, noise=g, fast=False)
            np.testing.assert_array_equal(y, want)
            dy = rng.standard_normal((N, K)).astype(dtype)
            dl = gumbel_fast.gumbel_softmax_backward_blocked(dy, cache.softmax.p, tau, block=block)
            np.testing.assert_array_equal(dl, gumbel_softmax_backward(dy, cache, fast=False))
    assert gumbel_max_sample(logits, noise, temperature=tau).dtype == np.int64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("tau", [0.05, 1.0, 7.0])
def test_sampling_without_logits_is_the_two_steps(rng, monkeypatch, dtype, metric, tau):
    """sample_codes_blocked: every row's code is that of the blocked logits and the blocked
    sample, bit for bit (the same blocks, products and steps), on any number of workers; and the
    definition's (the two public steps with fast=False) on this random problem."""
    x, codebook = _problem(rng, dtype)
    if metric == "dot":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    noise = gumbel_noise((N, K), rng, like=x)
    definition = sample_codes(x, codebook, noise, temperature=tau, metric=metric, fast=False)
    logits_def, _ = code_logits_forward(x, codebook, metric=metric, fast=False)
    np.testing.assert_array_equal(definition, gumbel_max_sample(logits_def, noise, temperature=tau, fast=False))
    for block in (1, 2 * K + 3, 10**6):  # one row per block, uneven blocks, one block
        if metric == "euclidean":
            logits, _ = gumbel_fast.code_logits_forward_blocked(x, codebook, clamp=1e-8, block=block)
        else:
            logits = logits_def
        chain = gumbel_fast.gumbel_max_sample_blocked(logits, noise, temperature=tau, block=block)
        for W in (1, 2, 3):
            monkeypatch.setattr(threads, "workers", lambda W=W: W)
            got = gumbel_fast.sample_codes_blocked(x, codebook, noise, temperature=tau, metric=metric, clamp=1e-8,
                                                   block=block)  # fmt: skip
            assert got.dtype == np.int64 and got.shape == (N,)
            np.testing.assert_array_equal(got, chain)
            np.testing.assert_array_equal(got, definition)
    np.testing.assert_array_equal(sample_codes(x, codebook, noise, temperature=tau, metric=metric), definition)


def test_sampling_without_logits_forms_no_n_by_k_array(rng):
    """The fast sample's memory is its blocks: under a quarter of one (N, K) float64 array (the
    two-step definition allocates several)."""
    import tracemalloc

    n, k, d = 32768, 256, 8  # blocks of at most 2^20 entries: an eighth of (N, K)
    x, codebook = rng.standard_normal((n, d)), rng.standard_normal((k, d))
    noise = gumbel_noise((n, k), rng, like=x)
    for fast, most in ((True, n * k * 8 // 4), (False, None)):
        tracemalloc.start()
        try:
            sample_codes(x, codebook, noise, temperature=1.0, fast=fast)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if most is not None:
            assert peak < most, peak
        else:
            assert peak > n * k * 8  # the control: the definition's (N, K) logits are seen


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_sampling_at_a_tiny_temperature_takes_the_nearest_code_in_float32(rng, monkeypatch, metric):
    """tau = 1e-40 overflows l / tau in float32: each row's largest logit is subtracted first, so
    the nearest code stays at 0 and the others go to -inf, on both paths and any workers."""
    x, codebook = _problem(rng, np.float32)
    noise = gumbel_noise((N, K), rng, like=x)
    logits, _ = code_logits_forward(x, codebook, metric=metric, fast=False)
    nearest = np.argmax(logits, axis=1)
    for W in (1, 2):
        monkeypatch.setattr(threads, "workers", lambda W=W: W)
        for fast in (True, False):
            with np.errstate(over="ignore"):
                got = sample_codes(x, codebook, noise, temperature=1e-40, metric=metric, fast=fast)
            np.testing.assert_array_equal(got, nearest)


def test_sampling_refuses_a_temperature_of_zero_on_both_paths(rng):
    x, codebook = _problem(rng, np.float64)
    noise = gumbel_noise((N, K), rng, like=x)
    for fast in (True, False):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            sample_codes(x, codebook, noise, temperature=0.0, fast=fast)


def test_blocked_sampling_breaks_ties_to_the_lowest_index():
    logits = np.zeros((5, K))
    logits[:, [2, 6]] = 1.0  # two maxima per row, no noise
    got = gumbel_fast.gumbel_max_sample_blocked(logits, np.zeros_like(logits), temperature=1.0, block=K)
    np.testing.assert_array_equal(got, np.full(5, 2))


def test_the_fast_paths_apply_to_numpy_arrays_of_one_float_dtype_only(bk):
    a, b = bk.asarray(np.ones((2, 3))), bk.asarray(np.ones((3, 3)))
    assert gumbel_fast.applies(True, a, b) is (bk.name == "numpy")
    assert not gumbel_fast.applies(False, a, b)
    assert not gumbel_fast.applies(True, np.ones(2, np.float32), np.ones(2, np.float64))
    assert not gumbel_fast.applies(True, np.ones(2, np.int64))
    logits, cache = code_logits_forward(a, b)  # strict runs the definition: strict arrays out
    assert type(logits) is type(a) and type(cache.dist) is type(a)


# ------------------------------------------------------------------ LFQ's entropy penalty, block by block


def _definition(z, C, d, value, tau, gamma):
    scores, sc = code_scores_forward(z, value=value, fast=False)
    pen, pc = entropy_penalty_forward(scores.reshape(-1, C, 2**d), inv_temperature=tau, diversity_gamma=gamma)
    return pen, (sc, pc)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C, d, block", [(1, 4, 1), (3, 3, 8 * 3 * 2), (2, 5, 10**6)])  # a token, 2 tokens, all
def test_blocked_entropy_penalty_matches_the_definition(rng, dtype, C, d, block):
    n, value, tau, gamma = 17, 0.7, 9.0, 0.6
    z = (rng.standard_normal((n * C, d)) * 0.8).astype(dtype)
    codebook = sign_codebook(d, value, like=z)
    out, cache = entropy_fast.lfq_entropy_forward_blocked(
        z, codebook, num_codebooks=C, inv_temperature=tau, diversity_gamma=gamma, eps=1e-5, block=block
    )
    want, (sc, pc) = _definition(z, C, d, value, tau, gamma)
    p = pc.softmax.p
    assert (p < 1e-5).any() and (p >= 1e-5).any()  # the clamp is active on both sides of eps
    for a, b in zip(out, want):
        assert a.dtype == dtype and abs(float(a) - float(b)) <= 10 * _tol(dtype) * (1 + abs(float(b)))
    dloss = 1.3
    dz = entropy_fast.lfq_entropy_backward_blocked(dloss, cache)
    dz_want = code_scores_backward(entropy_penalty_backward(dloss, pc).reshape(n * C, 2**d), sc)
    assert dz.dtype == dtype and rel_error(dz, dz_want) < 10 * _tol(dtype)
    # memory: nothing of size (n C, K) is kept
    assert max(a.size for a in cache if isinstance(a, np.ndarray)) <= max(z.size, C * 2**d)


OPTIONS = {
    "plain": dict(),
    "three-codebooks-spherical-commit": dict(num_codebooks=3, spherical=True, codebook_scale=0.5,
                                             commitment_loss_weight=0.3),
    "softplus-clamp": dict(softplus_offset=5.0, soft_clamp=1.5, diversity_gamma=0.4),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lfq_step_with_the_blocked_penalty_matches_the_definition(rng, name, dtype):
    o = LFQOptions(**{"num_codebooks": 2, "codebook_dim": 4, "inv_temperature": 30.0, **OPTIONS[name]})
    width = o.num_codebooks * o.codebook_dim
    x = rng.standard_normal((N, width)).astype(dtype)
    g = rng.standard_normal((N, width)).astype(dtype)
    rows = np.array([0, 3, 4, 8, 20, 28])  # a subset of the tokens enters the penalty
    res = []
    for fast in (True, False):
        out, cache = lfq_forward(x, LFQParams(), o._replace(fast=fast), entropy_rows=rows)
        res.append((out, lfq_backward(g, 0.9, cache)[0], cache))
    (o1, dx1, c1), (o2, dx2, c2) = res
    assert isinstance(c1.entropy[1], entropy_fast.BlockedEntropyCache)  # numpy chose the blocked path
    assert not isinstance(c2.entropy[1], entropy_fast.BlockedEntropyCache)
    np.testing.assert_array_equal(o1.indices, o2.indices)
    for a, b in zip(o1[2:], o2[2:]):
        assert abs(float(a) - float(b)) <= 10 * _tol(dtype) * (1 + abs(float(b)))
    assert dx1.dtype == dtype and rel_error(dx1, dx2) < 10 * _tol(dtype)


def test_blocked_penalty_gradient_passes_finite_differences_and_a_broken_one_fails(rng, monkeypatch):
    o = LFQOptions(num_codebooks=2, codebook_dim=3, inv_temperature=2.0, diversity_gamma=0.7)
    x = rng.standard_normal((N, 6))
    zero_g = np.zeros_like(x)
    fwd = lambda x: np.asarray(lfq_forward(x, LFQParams(), o)[0].aux_loss)  # noqa: E731
    vjp = lambda g, x: (lfq_backward(zero_g, g, lfq_forward(x, LFQParams(), o)[1])[0],)  # noqa: E731
    guard = lambda x: lfq_forward(x, LFQParams(), o)[0].indices  # noqa: E731
    assert check_vjp(fwd, vjp, [x], dout=np.array(0.83), guard=guard).passed
    original = entropy_fast.lfq_entropy_backward_blocked
    monkeypatch.setattr(
        "vqref.core.lfq.lfq_entropy_backward_blocked", lambda g, c: original(g, c._replace(diversity_gamma=0.0))
    )
    assert not check_vjp(fwd, vjp, [x], dout=np.array(0.83), guard=guard, raise_on_failure=False).passed


# ------------------------------------------------------------------ FSQ's projections


@pytest.fixture
def small_affine_blocks(monkeypatch):
    """Blocks of the fast projections shrunk to their minimum of 64 rows."""
    monkeypatch.setattr(linear_fast, "BLOCK_ELEMENTS", 1)
    return linear_fast.affine_rows(1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("din, dout", [(4, 37), (37, 4), (1, 1)])
@pytest.mark.parametrize("rows", [0, 1, 64, 200])  # no rows, one, one whole block, blocks ending mid-way
@pytest.mark.parametrize("bias", [True, False])
def test_blocked_affine_pair_matches_the_linear_definition(rng, monkeypatch, small_affine_blocks, dtype, din, dout,
                                                           rows, bias):  # fmt: skip
    x = rng.standard_normal((rows, din)).astype(dtype)
    W = rng.standard_normal((din, dout)).astype(dtype)
    b = rng.standard_normal(dout).astype(dtype) if bias else None
    dy = rng.standard_normal((rows, dout)).astype(dtype)
    y_want, cache_want = linear_forward(x, W, b)
    want = linear_backward(dy, cache_want)
    results = []
    for W_threads in (1, 2, 3):
        monkeypatch.setattr(threads, "workers", lambda W_threads=W_threads: W_threads)
        y, cache = linear_fast.affine_forward_blocked(x, W, b)
        assert y.dtype == dtype and y.shape == (rows, dout)
        assert not np.shares_memory(cache.x, x) and not np.shares_memory(cache.W, W)  # copies, as the definition
        np.testing.assert_array_equal(cache.x, x)
        np.testing.assert_array_equal(cache.W, W)
        np.testing.assert_allclose(y, y_want, rtol=_tol(dtype), atol=_tol(dtype))
        got = linear_fast.affine_backward_blocked(dy, cache)
        for a, w in zip(got, want):
            assert a.dtype == dtype and a.shape == w.shape
            np.testing.assert_allclose(
                a, w, rtol=10 * _tol(dtype), atol=10 * _tol(dtype) * (np.abs(w).max(initial=0) + 1)
            )
        results.append((y, *got))
    for other in results[1:]:  # the partial sums are added in block order: the same numbers on any workers
        for a, w in zip(other, results[0]):
            np.testing.assert_array_equal(a, w)


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_a_projected_module_step_is_the_same_on_one_and_two_workers(rng, monkeypatch, small_affine_blocks, kind):
    """FSQ's and LFQ's projections on worker threads (blocks of 64 rows here): the module's
    output, dx and parameter gradients are the same numbers on one worker and on two."""
    from vqref import LFQ

    x = rng.standard_normal((300, 37)).astype(np.float32)
    g = rng.standard_normal((300, 37)).astype(np.float32)
    results = []
    for W in (1, 2):
        monkeypatch.setattr(threads, "workers", lambda W=W: W)
        m = FSQ(levels=[7, 5, 4], dim=37, seed=0) if kind == "fsq" else LFQ(dim=37, codebook_size=16, seed=0)
        out = m(x)
        dx = m.backward(g) if kind == "fsq" else m.backward(g, 1.0)
        results.append([out[0], out[1], dx, *(m.grads[k] for k in sorted(m.grads))])
    assert len(results[0]) >= 5  # the projections' W and b gradients are among them
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_residual_stacks_projections_fast_match_the_definition(rng, monkeypatch, small_affine_blocks, kind):
    """ResidualFSQ's and ResidualLFQ's projections: the blocked path (2 workers, 64-row blocks) and
    the definition (``fast=False``) give the same codes, output, dx and parameter gradients."""
    from vqref import ResidualFSQ, ResidualLFQ
    from vqref.core.lfq import residual_lfq_backward, residual_lfq_forward
    from vqref.core.residual_fsq import residual_fsq_backward, residual_fsq_forward

    monkeypatch.setattr(threads, "workers", lambda: 2)
    x, g = rng.standard_normal((200, 37)), rng.standard_normal((200, 37))
    runs = []
    for fast in (True, False):
        if kind == "fsq":
            m = ResidualFSQ(levels=[7, 5, 4], num_quantizers=3, dim=37, dtype="float64", seed=0)
            out, cache = residual_fsq_forward(x, m.levels, **m._constants(np.float64), fast=fast)
            dx, grads = residual_fsq_backward(g, cache, fast=fast)
        else:
            m = ResidualLFQ(dim=37, codebook_size=16, num_quantizers=3, dtype="float64", seed=0)
            params, depth_params, options = m._core(np.float64)
            options = [o._replace(fast=fast) for o in options]
            out, cache = residual_lfq_forward(x, params, depth_params, options)
            dx, grads = residual_lfq_backward(g, 1.0, cache)
        runs.append((out, dx, grads))
    (o1, dx1, g1), (o2, dx2, g2) = runs
    assert sorted(g1) == sorted(g2) and len(g1) == 4  # W and b of both projections
    np.testing.assert_array_equal(o1.indices, o2.indices)
    np.testing.assert_allclose(o1.quantized, o2.quantized, rtol=1e-12, atol=1e-12)
    for a, b in [(dx1, dx2)] + [(g1[k], g2[k]) for k in g1]:
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_blocked_affine_sums_every_block(rng, small_affine_blocks):
    """dW and db collect every block: a gradient nonzero only in the last, partial block still
    reaches them (a loop that dropped a block, or the tail, would give zeros)."""
    x = rng.standard_normal((3 * small_affine_blocks + 5, 3))
    _, cache = linear_fast.affine_forward_blocked(x, rng.standard_normal((3, 2)), None)
    dy = np.zeros((x.shape[0], 2))
    dy[-1] = [1.0, -2.0]
    _, dW, db = linear_fast.affine_backward_blocked(dy, cache)
    np.testing.assert_array_equal(db, [1.0, -2.0])
    np.testing.assert_allclose(dW, np.outer(x[-1], [1.0, -2.0]))


LAYERS = {
    "projected": dict(dim=9, bias=True),
    "projected-no-bias-rotated": dict(dim=9, bias=False, rotation=True),
    "two-codebooks-symmetric": dict(dim=11, bias=True, C=2, preserve_symmetry=True),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fsq_layer_fast_matches_the_definition(rng, name, dtype):
    cfg = LAYERS[name]
    levels, C, dim = (7, 5, 4), cfg.get("C", 1), cfg["dim"]
    width = C * len(levels)
    proj = lambda a, b: Projection(  # noqa: E731
        (rng.standard_normal((a, b)) * 0.5).astype(dtype), rng.standard_normal(b).astype(dtype) if cfg["bias"] else None
    )
    kw = dict(num_codebooks=C, project_in=proj(dim, width), project_out=proj(width, dim),
              preserve_symmetry=cfg.get("preserve_symmetry", False))  # fmt: skip
    if cfg.get("rotation"):
        kw["rotation"] = np.linalg.qr(rng.standard_normal((3, 3)))[0].astype(dtype)
    x = rng.standard_normal((N, dim)).astype(dtype)
    g = rng.standard_normal((N, dim)).astype(dtype)
    out, cache = fsq_layer_forward(x, levels, **kw)
    want, cache_want = fsq_layer_forward(x, levels, fast=False, **kw)
    np.testing.assert_array_equal(out.indices, want.indices)
    np.testing.assert_allclose(out.quantized, want.quantized, rtol=_tol(dtype), atol=_tol(dtype))
    dx, grads = fsq_layer_backward(g, cache)
    dx_want, grads_want = fsq_layer_backward(g, cache_want, fast=False)
    assert dx.dtype == dtype and sorted(grads) == sorted(grads_want)
    for a, w in [(dx, dx_want)] + [(grads[k], grads_want[k]) for k in grads]:
        np.testing.assert_allclose(a, w, rtol=10 * _tol(dtype), atol=10 * _tol(dtype) * np.abs(w).max())


def test_fsq_backward_leaves_the_upstream_gradient_alone(rng):
    fsq = FSQ(levels=[7, 5, 4], dim=9, seed=0)
    x = rng.standard_normal((N, 9)).astype(np.float32)
    g = rng.standard_normal((N, 9)).astype(np.float32)
    g_before = g.copy()
    fsq(x)
    dx = fsq.backward(g)  # reads g without a copy (float32 into a float32 forward)
    np.testing.assert_array_equal(g, g_before)
    assert dx.dtype == np.float32 and not np.shares_memory(dx, g)
