"""``vqref.metrics.code_usage`` (perplexity, usage, used codes) and the ``stats`` every forward of
a vector quantizer commits.

The oracle is a histogram counted by hand (``collections.Counter``), never the function under
test.  Symbols: n indices, K codes.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref.metrics import code_usage


def oracle(indices, K: int) -> dict:
    counts = Counter(np.asarray(indices).reshape(-1).tolist())
    n = sum(counts.values())
    h = -sum(c / n * math.log(c / n) for c in counts.values())
    return {"perplexity": math.exp(h), "usage": len(counts) / K, "used_codes": len(counts)}


def assert_usage(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert type(got["perplexity"]) is float and type(got["usage"]) is float and type(got["used_codes"]) is int
    assert got["used_codes"] == want["used_codes"]
    assert math.isclose(got["usage"], want["usage"], rel_tol=1e-15)
    assert math.isclose(got["perplexity"], want["perplexity"], rel_tol=1e-12)


def test_a_hand_counted_histogram(bk):
    idx = np.array([[3, 3, 1], [0, 3, 1]])  # counts {3: 3, 1: 2, 0: 1} of 6, K = 7
    got = code_usage(bk.asarray(idx, dtype=bk.xp.int64), 7)
    p = np.array([3, 2, 1]) / 6
    assert math.isclose(got["perplexity"], float(np.exp(-(p * np.log(p)).sum())), rel_tol=1e-12)
    assert got["used_codes"] == 3 and math.isclose(got["usage"], 3 / 7)
    assert_usage(got, oracle(idx, 7))


def test_random_batches_against_the_oracle(rng):
    for K in (1, 2, 5, 300):
        idx = rng.integers(0, K, size=rng.integers(1, 500))
        assert_usage(code_usage(idx, K), oracle(idx, K))


def test_one_code_all_codes_and_an_empty_batch():
    assert code_usage(np.full(9, 4), 11) == {"perplexity": 1.0, "usage": 1 / 11, "used_codes": 1}
    every = code_usage(np.tile(np.arange(6), 3), 6)  # every code equally often: perplexity K
    assert math.isclose(every["perplexity"], 6.0, rel_tol=1e-12) and every["usage"] == 1.0
    assert code_usage(np.zeros((0,), np.int64), 5) == {"perplexity": 0.0, "usage": 0.0, "used_codes": 0}
    assert code_usage(np.zeros((3, 0), np.int64), 5)["used_codes"] == 0


def test_a_huge_codebook_costs_nothing_more():
    # FSQ/LFQ-size codebooks: only the codes that occur are counted (no histogram of K entries)
    K = 2**60
    idx = np.array([2**59, 7, 2**59, K - 1], dtype=np.int64)
    assert_usage(code_usage(idx, K), oracle(idx, K))
    assert code_usage(idx, K)["usage"] == 3 / K


# ------------------------------------------------------------------ the stats of a forward


def test_every_forward_commits_its_usage_stats(bk, rng):
    vq = VectorQuantize(5, 7, seed=0, xp=bk.name, dtype=bk.dtype_name)
    assert vq.stats == {}
    x = bk.asarray(rng.standard_normal((4, 6, 5)))
    _, idx, _ = vq(x)
    want = oracle(bk.np(idx), 7)
    assert_usage({k: vq.stats[k] for k in want}, want)
    assert vq.stats["dead_fraction"] == 0.0  # threshold 0
    vq.eval()
    before = {k: bk.np(v).copy() for k, v in vq.state_dict().items()}
    _, idx, _ = vq(x[:1, ...])
    assert_usage({k: vq.stats[k] for k in want}, oracle(bk.np(idx), 7))  # eval commits the stats ...
    for k, v in vq.state_dict().items():  # ... and nothing else
        np.testing.assert_array_equal(bk.np(v), before[k])


def test_a_stack_reports_a_tuple_per_depth(rng):
    rq = ResidualVQ(dim=5, num_quantizers=3, codebook_size=7, seed=0)
    _, idx, _ = rq(rng.standard_normal((40, 5)).astype(np.float32))
    for key in ("perplexity", "usage", "used_codes", "dead_fraction"):
        assert isinstance(rq.stats[key], tuple) and len(rq.stats[key]) == 3
    for level in range(3):
        want = oracle(idx[:, level], 7)
        assert_usage({k: rq.stats[k][level] for k in want}, want)
    one = ResidualVQ(dim=5, num_quantizers=1, codebook_size=7, seed=0)  # a ResidualVQ keeps the depth axis
    one(rng.standard_normal((9, 5)).astype(np.float32))
    assert isinstance(one.stats["usage"], tuple) and len(one.stats["usage"]) == 1


@pytest.mark.parametrize("shared", [False, True])
def test_dead_fraction_is_the_fraction_of_codes_this_step_restarts(rng, shared):
    # EMA counts chosen so that this step's counts N + (1 - decay)(n - N) straddle the threshold
    K, D, decay, threshold = 6, 3, 0.5, 1.0
    rq = ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, seed=0, decay=decay, shared_codebook=shared,
                    threshold_ema_dead_code=threshold, dtype="float64")  # fmt: skip
    counts = np.array([0.1, 5.0, 1.5, 0.2, 3.3, 2.1])  # no step lands exactly on the threshold
    codebooks = {p: rng.standard_normal((K, D)) * 3 for p in ([""] if shared else ["0.", "1."])}
    state = {}
    for p, cb in codebooks.items():
        state.update({p + "codebook": cb, p + "cluster_size": counts, p + "embed_avg": cb * counts[:, None],
                      p + "initted": True})  # fmt: skip
    rq.load_state_dict(state)
    x = rng.standard_normal((8, D)) * 3
    _, idx, _ = rq(x)
    expected = []
    running = counts.copy()
    for level in range(2):
        n = np.bincount(idx[:, level], minlength=K)
        base = running if shared else counts
        new = base + (1 - decay) * (n - base)
        if shared:
            running = new
        expected.append(float(np.mean(new < threshold)))
    if shared:
        expected = [expected[-1]] * 2
    assert rq.stats["dead_fraction"] == tuple(expected)
    # the restarted codes are exactly those: their count is reset to the threshold
    for level, p in enumerate([""] if shared else ["0.", "1."]):
        restarted = np.mean(rq.state_dict()[p + "cluster_size"] == threshold)
        assert restarted == expected[level] and restarted > 0
    rq.eval()
    rq(x)
    assert rq.stats["dead_fraction"] == (0.0, 0.0)  # the committed counts: none below the threshold now
