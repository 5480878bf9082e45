"""The codebook techniques of docs/techniques.md at the module level, through ``VectorQuantize`` flags.

k-means initialisation (SoundStream, arXiv 2107.03312), the cosine-similarity codebook
(ViT-VQGAN, arXiv 2110.04627), the orthogonal regulariser (arXiv 2112.00384), dead-code
restarts and the rotation trick (arXiv 2410.06424).  Each op has its own unit tests; these check
that the module wires them as docs/techniques.md describes, alone and combined:

* gradients: the module's ``dx`` and ``grads["codebook"]`` against torch autograd in float64,
  with the codes held at the indices the module returned and the codebook it held before the
  forward -- except the orthogonal regulariser's term, which is evaluated on the codebook the
  module holds after the forward (after this step's EMA update and restarts); float32 against
  the float64 analytic result;
* state transitions (k-means seeding, EMA, restarts) against independent numpy oracles;
* properties (unit outputs, scale invariance, orthogonality, the rotation's norm identity);
* configuration errors and determinism.

Symbols: N vectors, D = dim, K = codebook_size.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import separated_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqref import VectorQuantize
from vqref import backend as B
from vqref.core.kmeans import sample_initial_means
from vqref.core.quantize import quantize_backward, quantize_forward
from vqref.ops.orthogonal import orthogonal_loss_backward, orthogonal_loss_forward
from vqref.testing import check_vjp, rel_error

D, K = 5, 7  # K > D: the orthogonal regulariser cannot reach zero
LEAD = (3, 8)  # a batch of N = 24 vectors with two leading axes
N = 24
WARM = 31  # size of the batch that initialises / updates the state before a gradient check

fixture_settings = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Every flag alone, with EMA on and off where that is allowed, and the combinations the snippets
# of tests/test_seed_examples.py use (cosine + orthogonal + rotation + k-means in one module).
# use_cosine_sim excludes learnable_codebook, and learnable_codebook needs ema_update=False.
ALL_COSINE = dict(
    use_cosine_sim=True,
    orthogonal_reg_weight=0.7,
    rotation_trick=True,
    kmeans_init=True,
    threshold_ema_dead_code=1.0,
    commitment_weight=0.25,
)
CONFIGS = {
    "kmeans": dict(kmeans_init=True, kmeans_iters=4),
    "kmeans-noema": dict(kmeans_init=True, ema_update=False),
    "cosine": dict(use_cosine_sim=True),
    "cosine-noema": dict(use_cosine_sim=True, ema_update=False),
    "orth": dict(orthogonal_reg_weight=0.7),
    "orth-noema": dict(orthogonal_reg_weight=0.7, ema_update=False),
    "orth-learnable": dict(orthogonal_reg_weight=0.7, ema_update=False, learnable_codebook=True, commitment_weight=0.4),
    "dead": dict(threshold_ema_dead_code=1.0),
    "dead-noema": dict(threshold_ema_dead_code=1.0, ema_update=False),
    "rotation": dict(rotation_trick=True),
    "rotation-noema": dict(rotation_trick=True, ema_update=False),
    "rotation-learnable": dict(rotation_trick=True, ema_update=False, learnable_codebook=True),
    "all-cosine": ALL_COSINE,
    "all-cosine-noema": dict(ALL_COSINE, ema_update=False),
    "all-euclid-learnable": dict(
        orthogonal_reg_weight=0.7,
        rotation_trick=True,
        kmeans_init=True,
        threshold_ema_dead_code=1.0,
        ema_update=False,
        learnable_codebook=True,
        commitment_weight=0.25,
    ),
    "all-euclid-split": dict(
        orthogonal_reg_weight=0.7,
        rotation_trick=True,
        ema_update=False,
        learnable_codebook=True,
        commitment_weight=0.25,
        codebook_weight=1.0,
    ),
}


# ------------------------------------------------------------------------------------------
# helpers and float64 numpy oracles
# ------------------------------------------------------------------------------------------


def make(bk, **kw):
    kw.setdefault("seed", 0)
    return VectorQuantize(D, K, dtype=bk.dtype_name, xp=bk.module, **kw)


def host(a) -> np.ndarray:
    """A host float64 copy of any array (the exact values of a float32 array)."""
    return np.array(B.to_numpy(a), dtype=np.float64, copy=True)


def seen(bk, a) -> np.ndarray:
    """The values a backend actually holds for host data ``a`` (float32 rounding included)."""
    return host(bk.asarray(a))


def snapshot(vq) -> dict:
    return {k: B.to_numpy(v).copy() for k, v in vq.state_dict().items()}


def finite(*arrays) -> bool:
    return all(np.all(np.isfinite(host(a))) for a in arrays)


def tol(bk) -> float:
    return 1e-10 if bk.is64 else 2e-5


def unit(a):
    """Rows divided by ``max(||a||, 1e-6)``, the clamp convention of vqref and torch."""
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6)


def laplace(cs, eps):
    total = cs.sum()
    return (cs + eps) / (total + cs.shape[0] * eps) * total


def ema_oracle(cs, ea, x, idx, *, decay, eps, normalize):
    """One EMA step (VQ-VAE appendix A.1) by one-hot products: new (cluster_size, embed_avg, codebook)."""
    onehot = np.eye(cs.shape[0])[idx]  # (N, K)
    cs = decay * cs + (1 - decay) * onehot.sum(0)  # (K,)
    ea = decay * ea + (1 - decay) * onehot.T @ x  # (K, D)
    cb = ea / laplace(cs, eps)[:, None]  # (K, D)
    return cs, ea, unit(cb) if normalize else cb


def orth_oracle(C, ids=None):
    """``sum((C^ C^T)^2) / n^2 - 1/n`` on the codes ``ids`` (all by default)."""
    Ch = unit(C if ids is None else C[ids])
    n = Ch.shape[0]
    return float(((Ch @ Ch.T) ** 2).sum() / n**2 - 1.0 / n)


def lloyd_oracle(x, means, iters, cosine):
    """Plain Lloyd iterations with direct differences; counts from the last assignment."""
    means = unit(means) if cosine else means.copy()
    for _ in range(iters):
        if cosine:
            labels = np.argmax(x @ means.T, axis=1)
        else:
            labels = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(labels, minlength=means.shape[0]).astype(np.float64)
        for k in np.flatnonzero(counts):
            m = x[labels == k].mean(0)
            means[k] = unit(m) if cosine else m
    return means, counts


def blobs(rng, sizes, scale=3.0, spread=0.05):
    """Well separated clusters of the given sizes, shuffled: k-means converges in a few steps."""
    centres = scale * rng.standard_normal((len(sizes), D))
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    return centres[labels] + spread * rng.standard_normal((labels.size, D))


def option_names(kw):
    """The options :func:`quantize_forward` and the torch reference share."""
    return dict(
        commitment_weight=kw.get("commitment_weight", 1.0),
        codebook_weight=kw.get("codebook_weight"),
        learnable_codebook=kw.get("learnable_codebook", False),
        use_cosine_sim=kw.get("use_cosine_sim", False),
        rotation_trick=kw.get("rotation_trick", False),
        orthogonal_reg_weight=kw.get("orthogonal_reg_weight", 0.0),
    )


def run_module(bk, rng, kw, *, seed=0):
    """Warm the state up (k-means, one EMA step, restarts), then one forward + backward.

    Returns the host codebook used by the measured forward, the host inputs and everything the
    module returned.  The codebook the orthogonal regulariser saw is ``host(vq.codebook)``
    afterwards.
    """
    vq = make(bk, seed=seed, **kw)
    vq(bk.asarray(rng.standard_normal((WARM, D))))
    C = host(vq.codebook)  # the codebook the next forward quantizes with
    x = bk.asarray(rng.standard_normal(LEAD + (D,)) * rng.uniform(0.3, 3.0, size=LEAD + (1,)))
    g = bk.asarray(rng.standard_normal(LEAD + (D,)))
    q, idx, loss = vq(x)
    dx = vq.backward(g, dloss=1.3)
    return vq, C, x, g, (q, idx, loss, dx, vq.grads.get("codebook"))


def reference_grads(xh, C, C_after, k, gh, dloss, opts):
    """float64 analytic and torch results for one module step, the regulariser on ``C_after``.

    The quantization terms use the codebook the batch was quantized with (C); the orthogonal
    term the codebook the module holds after the forward (C_after), where vqref and
    vector-quantize-pytorch evaluate it.  Returns ``(loss64, dx64, dC64), (tloss, tdx, tdC)``;
    dC64 is None when no term reaches the codebook.
    """
    from vqref.testing.torch_reference import vq as tref
    from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

    w = opts["orthogonal_reg_weight"]
    quant = dict(opts, orthogonal_reg_weight=0.0)
    out64, cache64 = quantize_forward(xh, C, indices=k, **quant)
    dx64, dC64 = quantize_backward(gh, dloss, cache64)
    loss64 = float(out64.loss)
    _, tloss, tdx, tdC = tref.vector_quantize_grads(xh, C, k, gh, dloss, **quant)
    if w > 0:
        orth64, orth_cache = orthogonal_loss_forward(C_after)
        dorth64 = orthogonal_loss_backward(w * dloss, orth_cache)
        loss64 += w * float(orth64)
        dC64 = dorth64 if dC64 is None else dC64 + dorth64
        torth, tdorth = orthogonal_loss_reference(C_after, dloss=w * dloss)
        tloss, tdC = tloss + w * torth, tdC + tdorth
    return (loss64, dx64, dC64), (tloss, tdx, tdC)


# ------------------------------------------------------------------------------------------
# every flag and combination: shapes, torch autograd, float32 against float64
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_torch_and_float64(bk, rng, name):
    pytest.importorskip("torch")

    kw = CONFIGS[name]
    vq, C, x, g, (q, idx, loss, dx, dC) = run_module(bk, rng, kw)
    C_after = host(vq.codebook)  # where the orthogonal regulariser is evaluated
    opts = option_names(kw)

    assert q.shape == LEAD + (D,) and q.dtype == bk.dtype
    assert idx.shape == LEAD and idx.dtype == bk.xp.int64
    assert loss.shape == () and loss.dtype == bk.dtype
    assert dx.shape == LEAD + (D,) and dx.dtype == bk.dtype
    learnable = kw.get("learnable_codebook", False) or kw.get("orthogonal_reg_weight", 0) > 0
    assert vq.codebook_is_learnable == learnable
    assert ("codebook" in vq.grads) == learnable
    if learnable:
        assert dC.shape == (K, D) and dC.dtype == bk.dtype

    xh, gh = host(x).reshape(-1, D), host(g).reshape(-1, D)
    k = B.to_numpy(idx).reshape(-1)
    # the output rows are the (normalised) codes from before this step's update
    codes = unit(C) if opts["use_cosine_sim"] else C
    np.testing.assert_allclose(host(q).reshape(-1, D), codes[k], rtol=tol(bk), atol=tol(bk))

    # float64 analytic result at the same inputs, codes held at the module's indices, and torch
    # autograd with the stop-gradients written as .detach()
    (loss64, dx64, dC64), (tloss, tdx, tdC) = reference_grads(xh, C, C_after, k, gh, 1.3, opts)
    assert rel_error(dx64, tdx) < 1e-10
    assert loss64 == pytest.approx(tloss, rel=1e-12)
    if learnable:
        assert rel_error(dC64, tdC) < 1e-10
    else:
        assert dC64 is None and not np.any(tdC)

    assert rel_error(dx, dx64.reshape(LEAD + (D,))) < tol(bk)
    assert float(host(loss)) == pytest.approx(tloss, rel=tol(bk))
    if learnable:
        assert rel_error(dC, dC64) < tol(bk)
    if bk.is64:  # the module itself against torch
        assert rel_error(dx, tdx.reshape(LEAD + (D,))) < 1e-10
        if learnable:
            assert rel_error(dC, tdC) < 1e-10
    assert finite(vq.codebook, vq.cluster_size, vq.embed_avg)


@pytest.mark.parametrize(
    "name, flip",
    [
        ("rotation", dict(rotation_trick=False)),
        ("cosine", dict(use_cosine_sim=False)),
        ("orth-learnable", dict(orthogonal_reg_weight=0.0)),
        ("all-euclid-split", dict(codebook_weight=None)),
        ("all-cosine", dict(orthogonal_reg_weight=0.35)),
        ("orth", "before"),  # the regulariser on the codebook from before the EMA step
        ("all-cosine", "before"),
    ],
)
def test_negative_control_torch_check_has_teeth(rng, name, flip):
    """The comparison above would notice a module that ignored (or mis-weighted) a flag, or
    evaluated the orthogonal regulariser on the codebook it quantized with."""
    pytest.importorskip("torch")
    from conftest import _make

    bk = _make("numpy", "float64")
    kw = CONFIGS[name]
    vq, C, x, g, (_, idx, loss, dx, dC) = run_module(bk, rng, kw)
    C_after = host(vq.codebook)
    if flip == "before":
        wrong, C_after = option_names(kw), C
    else:
        wrong = dict(option_names(kw), **flip)
    _, (tloss, tdx, tdC) = reference_grads(
        host(x).reshape(-1, D), C, C_after, B.to_numpy(idx).reshape(-1), host(g).reshape(-1, D), 1.3, wrong
    )
    err = max(rel_error(dx, tdx.reshape(LEAD + (D,))), 0.0 if dC is None else rel_error(dC, tdC))
    assert err > 1e-3


@pytest.mark.parametrize(
    "kw, wrt",
    [
        (
            dict(
                ema_update=False,
                learnable_codebook=True,
                orthogonal_reg_weight=0.7,
                rotation_trick=True,
                commitment_weight=0.4,
            ),
            [0, 1],
        ),
        (dict(ema_update=False, use_cosine_sim=True, orthogonal_reg_weight=0.7, rotation_trick=True), [0]),
    ],
    ids=["euclid-learnable-orth-rotation", "cosine-orth-rotation"],
)
def test_loss_gradient_finite_differences(bk64, rng, kw, wrt):
    """The gradient of the loss *value* (dquantized = 0) is a true derivative: finite differences.

    Only where no stop-gradient intervenes: for x always, and for the codebook with the single
    un-detached term (a cosine codebook's loss sees C through sg[q], so it is not checked here).
    """
    x, C, _ = separated_problem(rng, 11, K, D)

    def fresh(C):
        vq = make(bk64, **kw)
        vq.load_state_dict({"codebook": C, "cluster_size": np.ones(K), "embed_avg": C, "initted": True})
        return vq

    def loss_value(x, C):
        return fresh(C)(x)[2]

    def loss_grads(dout, x, C):
        vq = fresh(C)
        vq(x)
        dx = vq.backward(bk64.xp.zeros_like(x), dloss=dout)
        return tuple((dx, vq.grads.get("codebook"))[i] for i in wrt)

    guard = lambda x, C: fresh(C).eval()(x)[1]  # noqa: E731
    inputs = [bk64.asarray(x), bk64.asarray(C)]
    dout = bk64.asarray(np.array(1.7))
    check_vjp(loss_value, loss_grads, inputs, wrt=wrt, dout=dout, guard=guard, rtol=1e-7)

    # negative control: a backward that forgets the orthogonal term (and halves the commitment
    # term) must fail the same checker
    def wrong(dout, x, C):
        vq = make(bk64, **dict(kw, orthogonal_reg_weight=0.0))
        vq.load_state_dict({"codebook": C, "cluster_size": np.ones(K), "embed_avg": C, "initted": True})
        vq(x)
        dx = 0.5 * vq.backward(bk64.xp.zeros_like(x), dloss=dout)
        return tuple((dx, vq.grads.get("codebook"))[i] for i in wrt)

    res = check_vjp(loss_value, wrong, inputs, wrt=wrt, dout=dout, rtol=1e-7, raise_on_failure=False)
    assert res.passed is False


# ------------------------------------------------------------------------------------------
# k-means initialisation
# ------------------------------------------------------------------------------------------

SIZES = [3, 6, 4, 8, 5, 7, 9]  # 42 rows in K = 7 clusters of distinct sizes


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_kmeans_init_seeds_the_ema_state_consistently(bk, rng, cosine):
    """The first training batch initialises the codebook; N_k = n_k, m_k = mu_k n_k, c_k = m_k / N~_k."""
    eps, iters = 1e-5, 6
    gen = np.random.default_rng(17)
    vq = VectorQuantize(
        D,
        K,
        kmeans_init=True,
        kmeans_iters=iters,
        ema_update=False,
        use_cosine_sim=cosine,
        eps=eps,
        seed=gen,
        dtype=bk.dtype_name,
        xp=bk.module,
    )
    # A copy of the module's generator as it stands now draws the same initial rows as the
    # module will (the documented contract of sample_initial_means); from them, an independent
    # numpy Lloyd gives the expected means and counts.
    twin = np.random.default_rng()
    twin.bit_generator.state = gen.bit_generator.state
    assert not vq.initted

    x = seen(bk, blobs(rng, SIZES) * (rng.uniform(0.5, 2.0, size=(sum(SIZES), 1)) if cosine else 1.0))
    data = unit(x) if cosine else x
    init = sample_initial_means(data, K, rng=twin)
    means, counts = lloyd_oracle(data, init, iters, cosine)

    q, idx, loss = vq(bk.asarray(x))
    assert vq.initted
    cs, ea, cb = host(vq.cluster_size), host(vq.embed_avg), host(vq.codebook)
    np.testing.assert_array_equal(cs, counts)
    np.testing.assert_allclose(ea, means * counts[:, None], rtol=tol(bk), atol=10 * tol(bk))
    expected = means * (counts / laplace(counts, eps))[:, None]
    expected = np.where((counts == 0)[:, None], means, unit(expected) if cosine else expected)
    np.testing.assert_allclose(cb, expected, rtol=tol(bk), atol=tol(bk))
    # up to the Laplace smoothing the codes are the centroids
    np.testing.assert_allclose(cb, means, rtol=1e-4, atol=1e-4)

    # The module's centroids m_k / N_k are a k-means fixed point: every one is the mean of the
    # rows nearest to it (checked without the oracle's initial means).
    mu = ea / np.maximum(cs, 1)[:, None]
    labels = np.argmax(data @ unit(mu).T, 1) if cosine else np.argmin(((data[:, None] - mu[None]) ** 2).sum(-1), 1)
    np.testing.assert_array_equal(np.bincount(labels, minlength=K), cs)
    for k in np.flatnonzero(cs):
        m = data[labels == k].mean(0)
        np.testing.assert_allclose(unit(m) if cosine else m, mu[k], rtol=1e-4, atol=1e-5)

    # the first batch is quantized with the k-means codebook itself
    np.testing.assert_allclose(
        host(q).reshape(-1, D), (unit(cb) if cosine else cb)[B.to_numpy(idx)], rtol=tol(bk), atol=tol(bk)
    )


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_one_ema_step_on_the_first_batch_leaves_the_codes_at_the_centroids(bk, rng, cosine):
    x = bk.asarray(blobs(rng, SIZES))
    seeded = make(bk, kmeans_init=True, ema_update=False, use_cosine_sim=cosine, seed=5)
    stepped = make(bk, kmeans_init=True, use_cosine_sim=cosine, seed=5)  # EMA on: seeding, then one step
    _, i0, _ = seeded(x)
    _, i1, _ = stepped(x)
    np.testing.assert_array_equal(B.to_numpy(i0), B.to_numpy(i1))
    assert np.all(host(seeded.cluster_size) > 0)  # no empty cluster on this data
    np.testing.assert_allclose(host(stepped.codebook), host(seeded.codebook), rtol=tol(bk), atol=tol(bk))
    np.testing.assert_allclose(host(stepped.cluster_size), host(seeded.cluster_size), rtol=tol(bk))
    if not cosine:
        # (cosine: m_k = mu^_k n_k is seeded with the unit centroid, while the batch sum of unit
        # rows is shorter; only the re-normalised code c_k is the same after the step)
        np.testing.assert_allclose(host(stepped.embed_avg), host(seeded.embed_avg), rtol=tol(bk), atol=10 * tol(bk))


PTS = np.array([[1.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0], [0, 0, 3.0, 0, 0]])
DUPLICATES = PTS[[0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2]]  # 12 rows, 3 distinct: >= 4 of 7 clusters empty


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_empty_kmeans_cluster_keeps_its_centroid(bk, rng, cosine):
    """An empty cluster's code is its centroid (a sampled row), with a zero count, never NaN.

    vector-quantize-pytorch makes it ``0 / N~_k``, the zero vector: a deliberate difference.
    With ema_update=False the seeded state is what the module keeps.
    """
    vq = make(bk, kmeans_init=True, ema_update=False, use_cosine_sim=cosine)
    x = bk.asarray(DUPLICATES)
    q, idx, loss = vq(x)
    dx = vq.backward(bk.asarray(rng.standard_normal(DUPLICATES.shape)))
    cs, ea, cb = host(vq.cluster_size), host(vq.embed_avg), host(vq.codebook)
    assert finite(q, loss, dx, cs, ea, cb)
    empty = cs == 0
    assert empty.sum() >= K - 3 and cs.sum() == len(DUPLICATES)
    assert not np.any(ea[empty])
    targets = unit(PTS) if cosine else PTS
    for row in cb[empty]:
        assert np.linalg.norm(row) > 0.5  # not the zero vector
        assert np.min(np.linalg.norm(targets - row, axis=1)) < tol(bk)  # a centroid: one of the rows


def test_empty_kmeans_cluster_survives_the_first_ema_step(rng):
    # Cosine codes are re-normalised, so an empty cluster's code ties with its twin and the
    # lower index takes every row: the count stays exactly 0 through the EMA step.
    vq = VectorQuantize(D, K, kmeans_init=True, use_cosine_sim=True, seed=0, dtype="float64")
    vq(DUPLICATES)
    cs, cb = host(vq.cluster_size), host(vq.codebook)
    empty = cs == 0
    assert empty.any()
    assert np.all(np.linalg.norm(cb[empty], axis=1) > 0.5)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(ema_update=False), dict(use_cosine_sim=True), ALL_COSINE, CONFIGS["all-euclid-learnable"]],
    ids=["euclid", "euclid-noema", "cosine", "all-cosine", "all-euclid-learnable"],
)
def test_more_codes_than_rows_gives_no_nan(bk, rng, kw):
    vq = make(bk, **dict(kw, kmeans_init=True))
    x = rng.standard_normal((4, D))  # N = 4 < K = 7: initial means drawn with replacement
    q, idx, loss = vq(bk.asarray(x))
    dx = vq.backward(bk.asarray(rng.standard_normal((4, D))))
    assert vq.initted
    assert finite(q, loss, dx, vq.codebook, vq.cluster_size, vq.embed_avg, *vq.grads.values())
    if kw.get("ema_update", True) and not kw.get("threshold_ema_dead_code"):
        # after seeding (counts sum to N) and one EMA step on the same rows, the counts still sum to N
        assert host(vq.cluster_size).sum() == pytest.approx(4.0, rel=1e-6)
    q, idx, loss = vq(bk.asarray(rng.standard_normal((9, D))))
    assert finite(q, loss, vq.codebook, vq.cluster_size, vq.embed_avg)


def test_eval_mode_forward_does_not_run_kmeans(bk, rng):
    """vqref initialises only in training; vector-quantize-pytorch also on a first eval call."""
    vq = make(bk, kmeans_init=True).eval()
    before = snapshot(vq)
    x = bk.asarray(rng.standard_normal((WARM, D)))
    q, idx, loss = vq(x)
    assert not vq.initted
    for k, v in snapshot(vq).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert not np.any(host(q))  # the placeholder codebook is zero until k-means has run
    vq.train()
    vq(x)
    assert vq.initted and np.any(host(vq.codebook))


# ------------------------------------------------------------------------------------------
# cosine-similarity codebook
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotation", [False, True], ids=["ste", "rotation"])
def test_cosine_outputs_and_codes_stay_unit(bk, rng, rotation):
    vq = make(bk, use_cosine_sim=True, rotation_trick=rotation, threshold_ema_dead_code=1.0, kmeans_init=True)
    for step in range(4):
        x = rng.standard_normal((N, D)) * rng.uniform(0.1, 10.0, size=(N, 1))
        q, idx, _ = vq(bk.asarray(x))
        np.testing.assert_allclose(np.linalg.norm(host(q), axis=1), 1.0, rtol=tol(bk))
        # the EMA re-normalises the codes, and restarted codes are normalised batch rows
        np.testing.assert_allclose(np.linalg.norm(host(vq.codebook), axis=1), 1.0, rtol=tol(bk))


def test_cosine_lookup_normalises_codes_that_left_the_sphere(bk, rng):
    """cosine + orthogonal regulariser without EMA: SGD on the codes (gradient rows orthogonal to
    them) only lengthens them, and the forward still quantizes by angle with unit outputs.

    (vector-quantize-pytorch uses the stored codes as they are: its outputs then have the codes'
    lengths and its argmax favours long codes.)
    """
    vq = make(bk, use_cosine_sim=True, orthogonal_reg_weight=1.0, ema_update=False)
    x = bk.asarray(rng.standard_normal((N, D)))
    norms = np.linalg.norm(host(vq.codebook), axis=1)
    for _ in range(5):
        vq(x)
        vq.backward(bk.asarray(rng.standard_normal((N, D))))
        vq.params["codebook"] -= 2.0 * vq.grads["codebook"]
        new = np.linalg.norm(host(vq.codebook), axis=1)
        assert np.all(new >= norms * (1 - tol(bk)))
        norms = new
    assert np.max(norms) > 1.01  # the stored codes are no longer unit
    C = host(vq.codebook)
    q, idx, _ = vq(x)
    np.testing.assert_allclose(np.linalg.norm(host(q), axis=1), 1.0, rtol=tol(bk))
    np.testing.assert_array_equal(B.to_numpy(idx), np.argmax(host(x) @ unit(C).T, axis=1))


@fixture_settings
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scales=st.lists(st.floats(-5.0, 5.0), min_size=N, max_size=N),
)
def test_cosine_is_invariant_to_positive_rescaling_of_inputs(bk64, seed, log_scales):
    """x_i -> a_i x_i (a_i > 0): same indices, outputs and loss; dx_i -> dx_i / a_i."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((N, D))
    g = r.standard_normal((N, D))
    a = 10.0 ** np.asarray(log_scales)[:, None]
    outs = []
    for inp in (x, a * x):
        vq = make(bk64, use_cosine_sim=True, rotation_trick=True, seed=seed)
        q, idx, loss = vq(bk64.asarray(inp))
        dx = vq.backward(bk64.asarray(g))
        outs.append((host(q), B.to_numpy(idx), float(host(loss)), host(dx)))
    (q1, i1, l1, dx1), (q2, i2, l2, dx2) = outs
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(q2, q1, rtol=1e-12, atol=1e-14)
    assert l2 == pytest.approx(l1, rel=1e-10)
    np.testing.assert_allclose(dx2 * a, dx1, rtol=1e-8, atol=1e-10 * np.abs(dx1).max())


@pytest.mark.parametrize(
    "kw",
    [
        dict(use_cosine_sim=True),
        dict(use_cosine_sim=True, ema_update=False, commitment_weight=3.0),
        dict(use_cosine_sim=True, rotation_trick=True),
        ALL_COSINE,
    ],
    ids=["ste", "ste-noema", "rotation", "all-cosine"],
)
def test_cosine_input_gradient_rows_are_orthogonal_to_input_rows(bk64, rng, kw):
    """The loss and the output see x only through l2(x): dx_i . x_i = 0 for the whole dx."""
    vq = make(bk64, **kw)
    vq(bk64.asarray(rng.standard_normal((WARM, D))))
    x = rng.standard_normal((N, D)) * rng.uniform(0.1, 10.0, size=(N, 1))
    vq(bk64.asarray(x))
    dx = host(vq.backward(bk64.asarray(rng.standard_normal((N, D))), dloss=2.5))
    size = np.linalg.norm(x, axis=1) * np.linalg.norm(dx, axis=1)
    assert np.all(size > 0)
    assert np.all(np.abs(np.sum(x * dx, axis=1)) <= 1e-12 * size)


@pytest.mark.parametrize("kw", [dict(use_cosine_sim=True), ALL_COSINE], ids=["cosine", "all-cosine"])
def test_cosine_zero_input_rows_give_no_nan(bk, rng, kw):
    vq = make(bk, **kw)
    for step in range(3):  # the first batch (k-means) and later ones carry zero rows
        x = rng.standard_normal((N, D))
        x[[0, 5, 6, 17]] = 0.0
        q, idx, loss = vq(bk.asarray(x))
        dx = vq.backward(bk.asarray(rng.standard_normal((N, D))))
        assert finite(q, loss, dx, vq.codebook, vq.cluster_size, vq.embed_avg, *vq.grads.values())
    q, _, loss = vq.eval()(bk.asarray(np.zeros((3, D))))
    assert finite(q, loss)


# ------------------------------------------------------------------------------------------
# orthogonal regulariser
# ------------------------------------------------------------------------------------------


def ema_step_oracle(vq, x, k, cosine):
    """The codebook after one EMA step of a fresh module (decay 0.8, eps 1e-5) on ``x`` with codes ``k``."""
    _, _, after = ema_oracle(
        host(vq.cluster_size), host(vq.embed_avg), unit(x) if cosine else x, k, decay=0.8, eps=1e-5, normalize=cosine
    )
    return after


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_orthogonal_term_is_added_with_its_weight(bk, rng, cosine):
    # In training the term is evaluated on the codebook after this step's EMA update (the one
    # the module holds afterwards), the commitment on the codebook the batch was quantized with.
    w, beta = 0.7, 0.4
    vq = make(bk, orthogonal_reg_weight=w, commitment_weight=beta, use_cosine_sim=cosine)
    C = host(vq.codebook)
    x = seen(bk, rng.standard_normal((N, D)))
    fresh = make(bk, orthogonal_reg_weight=w, commitment_weight=beta, use_cosine_sim=cosine)
    q, idx, loss = vq(bk.asarray(x))
    k = B.to_numpy(idx)
    xs, codes = (unit(x), unit(C)) if cosine else (x, C)
    commit = np.mean((xs - codes[k]) ** 2)
    after = ema_step_oracle(fresh, x, k, cosine)
    np.testing.assert_allclose(host(vq.codebook), after, rtol=10 * tol(bk), atol=10 * tol(bk))
    orth = orth_oracle(after)
    assert orth >= 1 / D - 1 / K - 1e-12  # the bound for K > D
    assert abs(orth - orth_oracle(C)) > 1e-3  # the evaluation point matters here
    assert float(host(loss)) == pytest.approx(beta * commit + w * orth, rel=tol(bk))
    assert float(host(vq.last_losses["orthogonal"])) == pytest.approx(orth, rel=tol(bk))
    # eval mode: no update, so the term is on the codebook the module holds
    held = host(vq.codebook)
    q_e, idx_e, loss_e = vq.eval()(bk.asarray(x))
    codes_e = unit(held) if cosine else held
    commit_e = np.mean((xs - codes_e[B.to_numpy(idx_e)]) ** 2)
    assert float(host(loss_e)) == pytest.approx(beta * commit_e + w * orth_oracle(held), rel=tol(bk))
    np.testing.assert_array_equal(host(vq.codebook), held)
    # weight 0: no term, and the codebook is not learnable
    plain = make(bk, commitment_weight=beta, use_cosine_sim=cosine)
    _, _, loss0 = plain(bk.asarray(x))
    assert plain.last_losses["orthogonal"] is None and not plain.codebook_is_learnable
    assert float(host(loss0)) == pytest.approx(beta * commit, rel=tol(bk))


def test_orthogonal_gradient_reaches_the_codebook_with_ema_on(bk, rng):
    pytest.importorskip("torch")
    from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

    vq = make(bk, orthogonal_reg_weight=0.7)  # EMA on, learnable_codebook False
    assert vq.codebook_is_learnable and list(vq.params) == ["codebook"]
    fresh = make(bk, orthogonal_reg_weight=0.7)
    C = host(vq.codebook)
    x = seen(bk, rng.standard_normal((N, D)))
    _, idx, _ = vq(bk.asarray(x))
    vq.backward(bk.asarray(rng.standard_normal((N, D))), dloss=1.3)
    dC = host(vq.grads["codebook"])
    # with EMA on, the only codebook gradient is the regulariser's, taken at the codebook after
    # the EMA step: the values params["codebook"] holds when an optimizer steps them
    after = ema_step_oracle(fresh, x, B.to_numpy(idx), False)
    _, ref = orthogonal_loss_reference(after, dloss=0.7 * 1.3)
    assert rel_error(dC, ref) < 10 * tol(bk)
    _, stale = orthogonal_loss_reference(C, dloss=0.7 * 1.3)
    assert rel_error(dC, stale) > 1e-2  # not the gradient at the codebook of the assignment
    held = host(vq.params["codebook"])
    size = np.linalg.norm(held, axis=1) * np.linalg.norm(dC, axis=1)
    assert np.all(np.abs(np.sum(held * dC, axis=1)) <= 10 * tol(bk) * size)  # rows orthogonal to codes


def test_ema_recompute_overwrites_a_gradient_step_on_the_codebook(bk, rng):
    """EMA on: the next training forward sets c = m / N~ from the statistics, erasing the step."""
    kw = dict(orthogonal_reg_weight=0.7, decay=0.8)
    vq, twin = make(bk, **kw), make(bk, **kw)
    x1 = bk.asarray(rng.standard_normal((WARM, D)))
    x2 = seen(bk, rng.standard_normal((N, D)))
    vq(x1)
    twin(x1)
    vq.backward(bk.xp.zeros_like(x1))
    cs, ea = host(vq.cluster_size), host(vq.embed_avg)
    before = host(vq.codebook)
    vq.params["codebook"] -= 0.05 * vq.grads["codebook"]
    stepped = host(vq.codebook)
    assert np.max(np.abs(stepped - before)) > 1e-3  # the step moved the codes

    q2, i2, _ = vq(bk.asarray(x2))
    t2, ti2, _ = twin(bk.asarray(x2))
    k = B.to_numpy(i2)
    np.testing.assert_array_equal(k, B.to_numpy(ti2))  # a small step: the same assignment
    # transient effect: this forward quantized with the stepped codes
    np.testing.assert_array_equal(host(q2), stepped[k])
    assert not np.array_equal(host(q2), host(t2))
    # lasting effect: none.  The codebook is what the EMA alone gives from the pre-step
    # statistics, bit for bit the codebook of the module that took no step.
    _, _, expected = ema_oracle(cs, ea, x2, k, decay=0.8, eps=1e-5, normalize=False)
    np.testing.assert_allclose(host(vq.codebook), expected, rtol=tol(bk), atol=tol(bk))
    np.testing.assert_array_equal(B.to_numpy(vq.codebook), B.to_numpy(twin.codebook))


def test_without_ema_the_orthogonal_step_persists(bk, rng):
    vq = make(bk, orthogonal_reg_weight=1.0, ema_update=False)
    x = bk.asarray(rng.standard_normal((N, D)))
    start = orth_oracle(host(vq.codebook))
    stepped = None  # the codes after the first gradient step
    for step in range(15):
        vq(x)
        if step == 1:  # the forward after a step leaves the stepped codes alone
            np.testing.assert_array_equal(B.to_numpy(vq.codebook), B.to_numpy(stepped))
        vq.backward(bk.xp.zeros_like(x))
        vq.params["codebook"] -= 0.5 * vq.grads["codebook"]
        stepped = vq.xp.asarray(vq.codebook, copy=True)
    end = orth_oracle(host(vq.codebook))
    assert end < start - 0.1 * (start - (1 / D - 1 / K))  # the regulariser did its job


def test_a_gradient_step_on_the_codebook_leaves_the_ema_statistics_alone(rng):
    vq = VectorQuantize(D, K, orthogonal_reg_weight=1.0, ema_update=False, seed=0, dtype="float64")
    ea = host(vq.embed_avg)
    x = rng.standard_normal((N, D))
    vq(x)
    vq.backward(np.zeros_like(x))
    vq.params["codebook"] -= 0.5 * vq.grads["codebook"]
    np.testing.assert_array_equal(host(vq.embed_avg), ea)


@pytest.mark.parametrize(
    "active, max_codes", [(True, None), (False, 3), (True, 3)], ids=["active", "max3", "active-max3"]
)
def test_orthogonal_subsets_use_only_the_chosen_codes(bk64, rng, active, max_codes):
    pytest.importorskip("torch")
    from vqref.testing.torch_reference.orthogonal import orthogonal_loss_reference

    w = 0.7
    kw = dict(
        orthogonal_reg_weight=w, orthogonal_reg_active_codes_only=active, orthogonal_reg_max_codes=max_codes, seed=3
    )
    vq = make(bk64, **kw)
    C = host(vq.codebook)
    after_of = make(bk64, **kw)
    ids = np.concatenate([np.arange(5), rng.integers(0, 5, N - 5)])  # a batch near codes 0..4 only
    x = C[ids] + 1e-3 * rng.standard_normal((N, D))
    _, idx, loss = vq(bk64.asarray(x))
    vq.backward(bk64.asarray(np.zeros((N, D))), dloss=1.3)
    dC = host(vq.grads["codebook"])
    used = np.unique(B.to_numpy(idx))  # the codes of this batch's assignment
    chosen = np.flatnonzero(np.any(dC != 0, axis=1))  # grads are exactly zero elsewhere
    pool = used if active else np.arange(K)
    assert used.size < K and set(chosen) <= set(pool)
    assert chosen.size == (pool.size if max_codes is None else min(max_codes, pool.size))
    # the subset's regulariser on the codebook after the EMA step
    after = ema_step_oracle(after_of, x, B.to_numpy(idx), False)
    ref_loss, ref = orthogonal_loss_reference(after, dloss=w * 1.3, code_ids=chosen)
    assert rel_error(dC, ref) < 1e-10
    commit = np.mean((x - C[B.to_numpy(idx)]) ** 2)
    assert float(host(loss)) == pytest.approx(commit + w * ref_loss, rel=1e-10)

    # deterministic for a seed: a second module draws the same subset
    again = make(bk64, **kw)
    again(bk64.asarray(x))
    again.backward(bk64.asarray(np.zeros((N, D))), dloss=1.3)
    np.testing.assert_array_equal(host(again.grads["codebook"]), dC)
    if max_codes is not None:  # and later steps draw fresh subsets from the module's generator
        subsets = {tuple(chosen)}
        for _ in range(6):
            vq(bk64.asarray(x))
            vq.backward(bk64.asarray(np.zeros((N, D))))
            subsets.add(tuple(np.flatnonzero(np.any(host(vq.grads["codebook"]) != 0, axis=1))))
        assert len(subsets) > 1


# ------------------------------------------------------------------------------------------
# dead-code restarts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "noema"])
@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_dead_codes_restart_from_batch_rows(bk, rng, cosine, ema):
    thr, decay, eps = 1.5, 0.8, 1e-5
    vq = make(bk, threshold_ema_dead_code=thr, use_cosine_sim=cosine, ema_update=ema, decay=decay, eps=eps)
    C, cs0, ea0 = host(vq.codebook), host(vq.cluster_size), host(vq.embed_avg)
    # A batch near codes 0, 1, 2 only, at least 4 rows each: their counts rise to >= 1.6, the
    # other four get no rows and decay from 1 to 0.8 < thr: they are restarted.
    ids = rng.permutation(np.concatenate([np.tile([0, 1, 2], 4), rng.integers(0, 3, N - 12)]))
    x = seen(bk, C[ids] * rng.uniform(0.5, 2.0, size=(N, 1)) + 1e-3 * rng.standard_normal((N, D)))
    _, idx, _ = vq(bk.asarray(x))
    k = B.to_numpy(idx)
    if cosine:  # the rescaled rows keep their direction, hence their code
        np.testing.assert_array_equal(np.unique(k), [0, 1, 2])
    else:
        np.testing.assert_array_equal(k, ids)
    rows = unit(x) if cosine else x  # the vectors the EMA and the restarts see
    cs1, ea1, cb1 = ema_oracle(cs0, ea0, rows, k, decay=decay, eps=eps, normalize=cosine)
    dead = cs1 < thr
    np.testing.assert_array_equal(dead, np.arange(K) >= 3)

    cs, ea, cb = host(vq.cluster_size), host(vq.embed_avg), host(vq.codebook)
    t = tol(bk)
    # live codes: the EMA alone (or untouched without EMA); the counts are tracked either way
    np.testing.assert_allclose(cs[~dead], cs1[~dead], rtol=t)
    np.testing.assert_allclose(ea[~dead], ea1[~dead], rtol=t, atol=t)
    if ema:
        np.testing.assert_allclose(cb[~dead], cb1[~dead], rtol=t, atol=t)
    else:
        np.testing.assert_array_equal(cb[~dead], C[~dead])
    # dead codes: distinct batch rows (normalised for cosine), with N_k = thr and m_k = thr c_k
    targets = unit(rows) if cosine else rows
    dist = np.linalg.norm(cb[dead][:, None, :] - targets[None], axis=-1)  # (dead, N)
    assert np.all(dist.min(axis=1) < 10 * t)
    assert len(set(dist.argmin(axis=1))) == dead.sum()
    np.testing.assert_array_equal(cs[dead], thr)
    np.testing.assert_allclose(ea[dead], thr * cb[dead], rtol=t, atol=t)
    if cosine:
        np.testing.assert_allclose(np.linalg.norm(cb, axis=1), 1.0, rtol=t)


# ------------------------------------------------------------------------------------------
# rotation trick
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True], ids=["euclid", "cosine"])
def test_rotation_forward_equals_straight_through_forward(bk, rng, cosine):
    kw = dict(use_cosine_sim=cosine, kmeans_init=True, threshold_ema_dead_code=1.0, seed=9)
    rot, ste = make(bk, rotation_trick=True, **kw), make(bk, **kw)
    for step in range(3):
        x = bk.asarray(rng.standard_normal((N, D)))
        g = bk.asarray(rng.standard_normal((N, D)))
        for a, b in zip(rot(x), ste(x)):
            np.testing.assert_array_equal(B.to_numpy(a), B.to_numpy(b))
        a, b = snapshot(rot), snapshot(ste)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert rel_error(rot.backward(g), ste.backward(g)) > 1e-2  # only the backward differs


def test_rotation_gradient_is_the_decoder_gradient_rotated(bk, rng):
    """dx_rot - dx_commit = lambda R^T g: norm lambda ||g|| and x . (dx_rot - dx_commit) = q . g."""
    rot, ste = make(bk, rotation_trick=True), make(bk)
    x = bk.asarray(rng.standard_normal((WARM, D)))
    rot(x)
    ste(x)
    x = bk.asarray(rng.standard_normal((N, D)) * rng.uniform(0.2, 5.0, size=(N, 1)))
    g = bk.asarray(rng.standard_normal((N, D)))
    q, _, _ = rot(x)
    ste(x)
    dx_rot = host(rot.backward(g, dloss=1.3))
    dx_ste = host(ste.backward(g, dloss=1.3))
    xh, qh, gh = host(x), host(q), host(g)
    dx_commit = dx_ste - gh  # the STE hands g over unchanged; the rest is the commitment term
    turned = dx_rot - dx_commit
    lam = np.linalg.norm(qh, axis=1) / np.linalg.norm(xh, axis=1)
    np.testing.assert_allclose(np.linalg.norm(turned, axis=1), lam * np.linalg.norm(gh, axis=1), rtol=10 * tol(bk))
    size = np.linalg.norm(qh, axis=1) * np.linalg.norm(gh, axis=1)
    assert np.all(np.abs(np.sum(xh * turned, axis=1) - np.sum(qh * gh, axis=1)) <= 10 * tol(bk) * size)
    assert rel_error(dx_rot, dx_ste) > 1e-2


# ------------------------------------------------------------------------------------------
# configuration errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        (
            dict(use_cosine_sim=True, learnable_codebook=True, ema_update=False),
            ValueError,
            "use_cosine_sim cannot be combined with learnable_codebook",
        ),
        (dict(commitment_weight=-0.1), ValueError, "commitment_weight must be >= 0"),
        (
            dict(learnable_codebook=True, ema_update=False, codebook_weight=-1.0),
            ValueError,
            "codebook_weight must be >= 0",
        ),
        (dict(orthogonal_reg_weight=-0.1), ValueError, "orthogonal_reg_weight must be >= 0"),
        (dict(orthogonal_reg_weight=float("nan")), ValueError, "orthogonal_reg_weight must be finite"),
        (dict(kmeans_iters=0), ValueError, "kmeans_iters must be >= 1"),
        (dict(kmeans_init=True, kmeans_iters=2.5), TypeError, "kmeans_iters must be an integer"),
        (
            dict(orthogonal_reg_weight=0.1, orthogonal_reg_max_codes=0),
            ValueError,
            "orthogonal_reg_max_codes must be >= 1",
        ),
        (dict(threshold_ema_dead_code=-1), ValueError, "threshold_ema_dead_code must be >= 0"),
        (dict(threshold_ema_dead_code=float("inf")), ValueError, "threshold_ema_dead_code must be finite"),
        (dict(dim=1, rotation_trick=True), ValueError, "rotation_trick needs dim > 1"),
    ],
    ids=[
        "cosine-learnable",
        "commitment<0",
        "codebook_weight<0",
        "orth<0",
        "orth-nan",
        "kmeans_iters<1",
        "kmeans_iters-float",
        "max_codes<1",
        "threshold<0",
        "threshold-inf",
        "rotation-dim1",
    ],
)
def test_bad_configuration_raises_a_clear_error(kw, err, msg):
    args = dict(dim=D, codebook_size=K)
    args.update(kw)
    with pytest.raises(err, match=msg):
        VectorQuantize(**args)


def test_rotation_with_dim_two_is_fine(rng):
    vq = VectorQuantize(2, K, rotation_trick=True, seed=0, dtype="float64")
    q, _, _ = vq(rng.standard_normal((N, 2)))
    assert finite(q, vq.backward(rng.standard_normal((N, 2))))


# ------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------

EVERYTHING = [
    dict(ALL_COSINE, orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=4, threshold_ema_dead_code=1.5),
    dict(CONFIGS["all-euclid-learnable"], orthogonal_reg_max_codes=5),
]


def _trajectory(bk, kw, seed, steps=3):
    data = np.random.default_rng(123)
    vq = make(bk, seed=seed, **kw)
    out = []
    for _ in range(steps):
        x = bk.asarray(data.standard_normal((N, D)))
        q, idx, loss = vq(x)
        dx = vq.backward(bk.asarray(data.standard_normal((N, D))))
        for k in vq.params:
            vq.params[k] -= 0.1 * vq.grads[k]
        out += [B.to_numpy(a) for a in (q, idx, loss, dx, *vq.grads.values(), *vq.state_dict().values())]
    return out


@pytest.mark.parametrize("kw", EVERYTHING, ids=["all-cosine", "all-euclid-learnable"])
def test_every_flag_together_is_deterministic_for_a_seed(bk, kw):
    a, b = _trajectory(bk, kw, seed=11), _trajectory(bk, kw, seed=11)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    c = _trajectory(bk, kw, seed=12)
    assert any(not np.array_equal(u, v) for u, v in zip(a, c))  # the seed matters


@pytest.mark.parametrize("kw", EVERYTHING, ids=["all-cosine", "all-euclid-learnable"])
def test_every_flag_together_numpy_and_strict_agree(kw):
    from conftest import _make

    a = _trajectory(_make("numpy", "float64"), kw, seed=4)
    b = _trajectory(_make("array_api_strict", "float64"), kw, seed=4)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-13)
