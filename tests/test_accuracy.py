"""float32 accuracy of the code assignment, and long EMA training runs that stay finite.

Assignment accuracy.  The float32 module is run on hard data and its codes are compared with a
float64 reference computed by *direct differences* ``sum_j (x_ij - c_kj)^2`` on the very same
float32 numbers (upcast), so only the arithmetic of the float32 search is measured, not the
rounding of the inputs.

Near-tie criterion (Euclidean).  The search computes, per row, ``c2_k - 2 xc . cc_k`` with
``xc = x - m``, ``cc = c - m`` and ``m`` the float32 mean of the codebook.  With the unit
roundoff ``u = 2^-24`` and the standard dot-product bound ``|fl(a . b) - a . b| <= D u |a| |b|``,
the centring (each point moved by at most ``u`` times its centred length), the squared norms
and the subtraction together change a row's score for code k by at most

    err_ik = (3 D + 6) u (||xc_i|| + ||cc_k||)^2

(a first-order worst case; constants rounded up).  Row i is a *near-tie* when some other code j
is within the combined error of the reference winner k*:
``d_ij - d_ik* <= err_ij + err_ik*`` (float64 distances).  Outside near-ties the float32 winner
provably equals the float64 winner, so the agreement there must be 100%; the test asserts it,
and a naive uncentred float32 expansion is the negative control that breaks it.

Cosine.  Inputs and codes are l2-normalised in float32 and the largest dot product wins; a
similarity of unit vectors is off by at most ``err = (2 D + 8) u`` (normalisation and dot
product), and near-ties are defined the same way on the float64 cosine similarities.

The measured rates are printed (``pytest -s``), attached as junit properties
(``record_property``), and quoted in docs/reliability.md.

Long runs.  10,000 EMA steps (VectorQuantize; ResidualVQ in the nightly profile, fewer in CI) on
small data whose codebook partly dies: decay 0.999 with dead-code restarts, decay 0 and eps 0
without, shared and per-depth residual codebooks.  Every state entry stays finite and the total
EMA count stays the batch size.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B

U32 = 2.0**-24
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


# ------------------------------------------------------------------ the reference and the criterion


def reference_euclidean(x32: np.ndarray, c32: np.ndarray, chosen: np.ndarray | None = None):
    """float64 winners by direct differences, and the near-tie mask of the module docstring.

    With ``chosen`` (the float32 codes), also assert the stronger, row-by-row statement: where
    float32 and float64 disagree, the float32 code is within the error bound of the best one.
    """
    x = x32.astype(np.float64)  # (N, D)
    c = c32.astype(np.float64)  # (K, D)
    D = x.shape[1]
    diff = x[:, None, :] - c[None, :, :]  # (N, K, D)
    d = np.einsum("nkd,nkd->nk", diff, diff)  # (N, K) direct squared distances
    ref = np.argmin(d, axis=1)  # (N,), ties to the lowest index like the library
    m = c32.mean(axis=0, dtype=np.float32).astype(np.float64)  # the centre the search uses
    xn = np.linalg.norm(x - m, axis=1)  # (N,)
    cn = np.linalg.norm(c - m, axis=1)  # (K,)
    err = (3 * D + 6) * U32 * (xn[:, None] + cn[None, :]) ** 2  # (N, K)
    rows = np.arange(x.shape[0])
    gap = d - d[rows, ref][:, None]  # (N, K) >= 0
    close = gap <= err + err[rows, ref][:, None]  # (N, K)
    close[rows, ref] = False
    if chosen is not None:
        slack = gap[rows, chosen] - (err[rows, chosen] + err[rows, ref])  # (N,)
        assert np.all(slack <= 0), f"{int((slack > 0).sum())} rows chose a code worse than the bound allows"
    return ref, close.any(axis=1)


def reference_cosine(x32: np.ndarray, c32: np.ndarray):
    x = x32.astype(np.float64)
    c = c32.astype(np.float64)
    D = x.shape[1]
    xh = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    ch = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-6)
    s = xh @ ch.T  # (N, K) cosine similarities
    ref = np.argmax(s, axis=1)
    rows = np.arange(x.shape[0])
    gap = s[rows, ref][:, None] - s  # (N, K) >= 0
    close = gap <= 2 * (2 * D + 8) * U32
    close[rows, ref] = False
    return ref, close.any(axis=1)


def rates(got: np.ndarray, ref: np.ndarray, tie: np.ndarray) -> dict:
    agree = got == ref
    clear = ~tie
    return {
        "rows": int(got.size),
        "agreement": float(agree.mean()),
        "near_tie_fraction": float(tie.mean()),
        "agreement_outside_near_ties": float(agree[clear].mean()) if clear.any() else float("nan"),
        "disagreements_outside_near_ties": int((~agree & clear).sum()),
    }


def _report(record_property, name: str, r: dict) -> None:
    record_property(name, r)
    print(
        f"\n[accuracy] {name}: agreement {100 * r['agreement']:.3f}% of {r['rows']} rows, "
        f"near-ties {100 * r['near_tie_fraction']:.2f}%, outside near-ties "
        f"{100 * r['agreement_outside_near_ties']:.3f}% ({r['disagreements_outside_near_ties']} wrong)"
    )


def _vq32(codebook: np.ndarray, **kw) -> VectorQuantize:
    """A float32 numpy module holding ``codebook`` (rounded to float32), in eval mode."""
    K, D = codebook.shape
    vq = VectorQuantize(D, K, seed=0, dtype="float32", **kw)
    vq.load_state_dict({"codebook": codebook, "cluster_size": np.ones(K), "embed_avg": codebook, "initted": True})
    return vq.eval()


# ------------------------------------------------------------------ hard data


def offset_problem(rng, offset: float, N=3000, K=64, D=8, spread=1e-2, noise=1e-2):
    codes = offset + spread * rng.standard_normal((K, D))
    x = codes[rng.integers(0, K, N)] + noise * rng.standard_normal((N, D))
    return x.astype(np.float32), codes.astype(np.float32)


def near_duplicate_problem(rng, sep: float, N=3000, K=64, D=8, noise=1e-2):
    base = rng.standard_normal((K // 2, D))
    codes = np.concatenate([base, base + sep * rng.standard_normal((K // 2, D))])
    x = codes[rng.integers(0, K, N)] + noise * rng.standard_normal((N, D))
    return x.astype(np.float32), codes.astype(np.float32)


EUCLIDEAN_CASES = {
    "offset-1e2": lambda rng: offset_problem(rng, 1e2),
    "offset-1e3": lambda rng: offset_problem(rng, 1e3),
    "offset-1e4": lambda rng: offset_problem(rng, 1e4, spread=1e-1, noise=1e-1),
    "near-duplicates-1e-2": lambda rng: near_duplicate_problem(rng, 1e-2),
    "near-duplicates-1e-3": lambda rng: near_duplicate_problem(rng, 1e-3),
}


@pytest.mark.parametrize("case", sorted(EUCLIDEAN_CASES))
def test_float32_euclidean_assignment_matches_float64_outside_near_ties(case, record_property):
    rng = np.random.default_rng(12345)
    x32, c32 = EUCLIDEAN_CASES[case](rng)
    _, idx, _ = _vq32(c32)(x32)
    ref, tie = reference_euclidean(x32, c32, chosen=np.asarray(idx))
    r = rates(np.asarray(idx), ref, tie)
    _report(record_property, f"euclidean/{case}", r)
    assert r["near_tie_fraction"] < 1.0, "every row is a near-tie: the check would be vacuous"
    assert r["disagreements_outside_near_ties"] == 0, r


def test_negative_control_uncentred_expansion_fails_the_criterion(record_property):
    """The plain float32 expansion ||x||^2 - 2 x.c + ||c||^2 (no centring) on offset data breaks
    the 100% requirement: the criterion above can tell a sound search from an unsound one."""
    rng = np.random.default_rng(12345)
    x32, c32 = offset_problem(rng, 1e3)
    naive = np.argmin((x32 * x32).sum(1, keepdims=True) - 2 * (x32 @ c32.T) + (c32 * c32).sum(1)[None, :], axis=1)
    ref, tie = reference_euclidean(x32, c32)
    r = rates(naive, ref, tie)
    _report(record_property, "euclidean/offset-1e3/naive-uncentred (control)", r)
    assert r["disagreements_outside_near_ties"] > 0


@pytest.mark.parametrize("sep", [1e-2, 1e-3, 1e-4])
def test_float32_cosine_assignment_matches_float64_outside_near_ties(sep, record_property):
    rng = np.random.default_rng(777)
    D, K, N = 8, 48, 3000
    base = rng.standard_normal((K // 2, D))
    codes = np.concatenate([base, base + sep * rng.standard_normal((K // 2, D))]).astype(np.float32)
    # inputs of very different lengths: only their direction matters
    x = codes[rng.integers(0, K, N)] + 0.02 * rng.standard_normal((N, D))
    x32 = (x * 10.0 ** rng.uniform(-3, 3, (N, 1))).astype(np.float32)
    _, idx, _ = _vq32(codes, use_cosine_sim=True)(x32)
    ref, tie = reference_cosine(x32, codes)
    r = rates(np.asarray(idx), ref, tie)
    _report(record_property, f"cosine/near-duplicate-directions-{sep:g}", r)
    assert r["near_tie_fraction"] < 1.0
    assert r["disagreements_outside_near_ties"] == 0, r


def _deep_residual_problem(rng, shared: bool, N=2000, D=6, K=32, Q=4, offset=1e2):
    """Codebooks whose scale shrinks 10x per depth (the residuals do too); depth 0 sits at an
    offset.  A shared codebook holds every scale at once, which is the hard case for deep depths."""
    books = [offset * (l == 0) + 10.0 ** (-l) * rng.standard_normal((K, D)) for l in range(Q)]
    if shared:
        per = K // Q
        one = np.concatenate([b[:per] for b in books])  # (K, D) all scales in one codebook
        books = [one] * Q
    ks = rng.integers(0, books[0].shape[0], (N, Q))
    x = sum(books[l][ks[:, l]] for l in range(Q)) + 1e-5 * rng.standard_normal((N, D))
    return x, [b.astype(np.float32) for b in books]


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_float32_deep_residual_assignments(shared, record_property):
    """Each depth of a float32 ResidualVQ picks the float64 winner for the residual it actually
    holds, outside near-ties; the end-to-end code tuples are compared with a float64 run too."""
    rng = np.random.default_rng(4242)
    x, books = _deep_residual_problem(rng, shared)
    Q, (K, D) = len(books), books[0].shape
    results = {}
    for dtype in ("float32", "float64"):
        rq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0, dtype=dtype, shared_codebook=shared)
        state = {}
        for prefix, b in zip([""] if shared else [f"{l}." for l in range(Q)], books):
            state.update(
                {
                    prefix + "codebook": b,
                    prefix + "cluster_size": np.ones(K),
                    prefix + "embed_avg": b,
                    prefix + "initted": True,
                }
            )
        rq.load_state_dict(state)
        rq.eval()
        _, idx, _ = rq(x.astype(dtype))
        results[dtype] = (np.asarray(idx), [np.asarray(r) for r in rq.last_residuals])
    idx32, res32 = results["float32"]
    for level in range(Q):
        ref, tie = reference_euclidean(res32[level], books[level], chosen=idx32[:, level])
        r = rates(idx32[:, level], ref, tie)
        _report(record_property, f"residual/{'shared' if shared else 'per-depth'}/depth-{level}", r)
        assert r["disagreements_outside_near_ties"] == 0, (level, r)
    whole = (idx32 == results["float64"][0]).all(axis=1)
    record_property(f"residual/{'shared' if shared else 'per-depth'}/tuple-agreement-vs-float64", float(whole.mean()))
    print(
        f"[accuracy] residual/{'shared' if shared else 'per-depth'}: whole code tuples equal to the float64 run: {100 * whole.mean():.2f}%"
    )
    if not shared:
        # a regression floor (measured: 100%); the per-depth assertions above are the exact ones.
        # A shared codebook holds codes of every scale, and the expansion's error, which grows with
        # the codes' norms, then swamps the gaps between small codes at deep depths: many rows are
        # near-ties there (measured in docs/reliability.md) and no floor is claimed.
        assert whole.mean() >= 0.99


def test_cosine_normalisation_of_representable_huge_rows():
    from vqref.ops.l2norm import l2norm_forward

    x = np.array([[1e20, -1e20, 0.0], [3e19, 4e19, 0.0]], dtype=np.float32)
    with np.errstate(over="ignore"):
        y, _ = l2norm_forward(x)
    np.testing.assert_allclose(y, [[2**-0.5, -(2**-0.5), 0.0], [0.6, 0.8, 0.0]], rtol=1e-6)


# ------------------------------------------------------------------ long runs

LONG = 10_000
SHORT = 10_000 if PROFILE == "nightly" else 2_500


def _clustered_stream(seed: int, N: int, D: int, centres: int = 3):
    """Batches from a few tight clusters, so most of a larger codebook is never used (it dies)."""
    gen = np.random.default_rng(seed)
    mus = 3.0 * gen.standard_normal((centres, D))

    def next_batch():
        return (mus[gen.integers(0, centres, N)] + 0.1 * gen.standard_normal((N, D))).astype(np.float32)

    return next_batch


LONG_CONFIGS = {
    "vq/decay-0.999/restarts": (LONG, dict(decay=0.999, threshold_ema_dead_code=3.0)),
    "vq/decay-0/eps-0/no-restarts": (LONG, dict(decay=0.0, eps=0.0)),
    "vq/decay-0.8/cosine/no-restarts": (SHORT, dict(decay=0.8, use_cosine_sim=True)),
    "rvq/decay-0.999/restarts": (SHORT, dict(num_quantizers=3, decay=0.999, threshold_ema_dead_code=3.0)),
    "rvq-shared/decay-0.999": (SHORT, dict(num_quantizers=3, shared_codebook=True, decay=0.999)),
    "rvq-shared/decay-0/eps-0/restarts": (
        SHORT,
        dict(num_quantizers=2, shared_codebook=True, decay=0.0, eps=0.0, threshold_ema_dead_code=0.5),
    ),
}


@pytest.mark.parametrize("name", sorted(LONG_CONFIGS))
def test_long_ema_training_stays_finite_while_codes_die(name, record_property):
    steps, kw = LONG_CONFIGS[name]
    kw = dict(kw)
    N, D, K = 32, 3, 16
    if "num_quantizers" in kw:
        module = ResidualVQ(dim=D, codebook_size=K, seed=3, **kw)
        lays = module.layers
    else:
        module = VectorQuantize(D, K, seed=3, **kw)
        lays = [module]
    stream = _clustered_stream(5, N, D)
    threshold = kw.get("threshold_ema_dead_code", 0.0)
    min_count, dead_seen = np.inf, 0
    for step in range(1, steps + 1):
        q, idx, loss = module(stream())
        if step % 500 == 0 or step == steps:
            for name_, v in module.state_dict().items():
                assert np.all(np.isfinite(B.to_numpy(v))), (step, name_)
            assert np.all(np.isfinite(q)) and np.all(np.isfinite(loss)), step
            counts = np.concatenate([np.asarray(l.cluster_size) for l in lays])
            min_count = min(min_count, float(counts.min()))
            # dead codes: restarted at this very step (count reset to exactly the threshold), or,
            # without restarts, an EMA count that decayed below a tenth of its initial 1
            dead = counts == np.float32(threshold) if threshold > 0 else counts < 0.1
            dead_seen = max(dead_seen, int(dead.sum()))
    assert dead_seen > 0, "no code died: the run does not exercise dead codes"
    if threshold == 0:
        # the EMA conserves the count: every accumulation (one per depth with a shared codebook)
        # maps the total T to d T + (1 - d) N, from T = K (initial counts of 1)
        d = kw.get("decay", 0.8)
        accumulations = steps * (kw["num_quantizers"] if kw.get("shared_codebook") else 1)
        expected = N + d**accumulations * (K - N)
        for l in lays:
            total = float(np.sum(np.asarray(l.cluster_size, dtype=np.float64)))
            np.testing.assert_allclose(total, expected, rtol=1e-3)
    module.eval()
    x = stream()
    q, idx, loss = module(x)
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(loss))
    err = float(np.mean((x - q) ** 2))
    if threshold > 0 and not kw.get("use_cosine_sim"):
        # restarts keep every cluster covered: the error is of the order of the clusters'
        # variance (0.01; measured 0.001-0.024), while one cluster left to another's code would
        # cost several units (the cluster centres are ~7 apart)
        assert err < 0.1, err
    record_property(f"long/{name}/steps", steps)
    record_property(f"long/{name}/min_count", min_count)
    record_property(f"long/{name}/most_dead_codes", dead_seen)
    record_property(f"long/{name}/eval_mse", err)
    print(
        f"[long] {name}: {steps} steps, up to {dead_seen} dead codes, smallest EMA count {min_count:.3g}, eval mse {err:.3g}"
    )
