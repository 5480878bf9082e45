"""The threaded nearest-code search (vqref.ops.distance_fast) pinned to its definition.

``nearest_code_threaded`` splits the rows between worker threads that each run the product and
the argmin of their blocks with numpy's BLAS on one thread.  These tests hold it to the
definition (``nearest_code_portable``) and to the single-threaded fast path on random data, at
the clamp of the distances, on ties, at every worker count and block size, and check the one-line
choice in ``nearest_code``, the BLAS limit inside the workers, its release when a worker fails,
and the fallback without threadpoolctl.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
from conftest import separated_problem
from threadpoolctl import threadpool_info, threadpool_limits

from vqref import VectorQuantize, threads
from vqref.ops import distance, distance_fast
from vqref.ops.distance import nearest_code, nearest_code_inplace, nearest_code_portable
from vqref.ops.distance_fast import nearest_code_threaded, use_threads


def _numpy_blas_threads():
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas" and "numpy" in p["filepath"]]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("chunk", [None, 1, 37, 300])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threaded_equals_the_definition(rng, clear_rows, dtype, metric, chunk, workers):
    N, K, D = 777, 45, 11
    x = (rng.standard_normal((N, D)) + 3.0).astype(dtype)  # an offset: the centring matters
    C = (rng.standard_normal((K, D)) + 3.0).astype(dtype)
    i_thr, s_thr = nearest_code_threaded(x, C, metric=metric, chunk_size=chunk, return_score=True, workers=workers)
    i_def, s_def = nearest_code_portable(x, C, metric=metric, chunk_size=chunk, return_score=True)
    i_inp = nearest_code_inplace(x, C, metric=metric, chunk_size=chunk)
    assert i_thr.dtype == np.int64 and i_thr.shape == (N,) and s_thr.dtype == np.dtype(dtype)
    clear = clear_rows(x, C, metric)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(i_thr[clear], i_def[clear])
    np.testing.assert_array_equal(i_thr[clear], i_inp[clear])
    rtol = 1e-12 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(s_thr[clear], s_def[clear], rtol=rtol, atol=rtol)
    # every row is written, including the last block of each worker's range
    ref = nearest_code_threaded(x, C, metric=metric, chunk_size=chunk, return_score=True, workers=workers)
    np.testing.assert_array_equal(ref[0], i_thr)  # and the same on every run
    np.testing.assert_array_equal(ref[1], s_thr)


def test_every_row_of_every_worker_is_assigned(rng):
    """Rows that are codes: every index is known, whatever the split (catches a skipped block)."""
    K, D = 13, 5
    C = rng.standard_normal((K, D)) * 10
    truth = rng.integers(0, K, size=101)
    x = C[truth]
    for workers in (1, 2, 3, 7):
        for chunk in (1, 4, 10, 51, 200):
            for metric in ("euclidean", "dot"):
                Cm = C / np.linalg.norm(C, axis=1, keepdims=True) if metric == "dot" else C
                xm = Cm[truth]
                idx = nearest_code_threaded(xm if metric == "dot" else x, Cm, metric=metric, chunk_size=chunk,
                                            workers=workers)  # fmt: skip
                np.testing.assert_array_equal(idx, truth, err_msg=f"{workers} workers, {chunk} rows, {metric}")


def test_threaded_edge_cases(rng):
    C = rng.standard_normal((4, 3))
    for metric in ("euclidean", "dot"):
        idx, score = nearest_code_threaded(np.zeros((0, 3)), C, metric=metric, return_score=True, workers=2)
        assert idx.shape == (0,) and score.shape == (0,) and idx.dtype == np.int64
        x = rng.standard_normal((2, 3))  # more workers than rows
        np.testing.assert_array_equal(nearest_code_threaded(x, C, metric=metric, workers=5),
                                      nearest_code_portable(x, C, metric=metric))  # fmt: skip
        np.testing.assert_array_equal(nearest_code_threaded(x, C[:1], metric=metric, workers=2), 0)
    # ties go to the lowest index, in every worker's range
    C2 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x2 = np.tile(np.array([[2.0, 0.0], [0.0, 3.0], [0.5, 0.5]]), (4, 1))
    for metric in ("euclidean", "dot"):
        np.testing.assert_array_equal(
            nearest_code_threaded(x2, C2, metric=metric, chunk_size=2, workers=3), [0, 1, 0] * 4
        )


def test_the_choice_in_nearest_code(rng, monkeypatch):
    """Threaded with W > 1 and two full blocks of rows; the single-threaded path otherwise."""
    calls = []
    for name in ("nearest_code_threaded", "nearest_code_inplace"):
        real = getattr(distance, name)
        monkeypatch.setattr(
            distance, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    C = rng.standard_normal((5, 3))
    rows = threads.block_rows(5)
    for W, N, chunk, expect in [
        (2, 2 * rows, None, "nearest_code_threaded"),
        (2, 2 * rows - 1, None, "nearest_code_inplace"),  # the boundary
        (2, 20, 10, "nearest_code_threaded"),
        (2, 19, 10, "nearest_code_inplace"),
        (1, 2 * rows, None, "nearest_code_inplace"),  # one BLAS thread
        (3, 40, 10, "nearest_code_threaded"),
    ]:
        monkeypatch.setattr(distance_fast, "search_workers", lambda W=W: W)
        assert use_threads(N, 5, chunk) == (expect == "nearest_code_threaded")
        calls.clear()
        x = rng.standard_normal((N, 3))
        idx = nearest_code(x, C, chunk_size=chunk)
        assert calls == [expect], (W, N, chunk)
        np.testing.assert_array_equal(idx, nearest_code_portable(x, C))
    # float32 data with float64 codes, or another library: the definition, never a fast path
    calls.clear()
    nearest_code(rng.standard_normal((2 * rows, 3)).astype(np.float32), C)
    assert calls == []


def test_workers_run_with_one_blas_thread_and_restore_it(rng, monkeypatch):
    seen = []

    def argmin(*a, **k):
        seen.append(_numpy_blas_threads())
        return np.argmin(*a, **k)

    monkeypatch.setattr(distance_fast, "np", types.SimpleNamespace(**{**vars(np), "argmin": argmin}))
    x, C = rng.standard_normal((90, 4)), rng.standard_normal((6, 4))
    with threadpool_limits(2, user_api="blas"):
        before = _numpy_blas_threads()
        assert threads.blas_threads(threads.controller()) == 2  # W follows the BLAS
        idx = nearest_code_threaded(x, C, chunk_size=30)  # 2 workers, blocks of 30 rows: 4 blocks
        assert _numpy_blas_threads() == before
    assert len(seen) == 4 and all(n and all(t == 1 for t in n) for n in seen)
    assert not threads._BLAS_LOCK.locked()
    np.testing.assert_array_equal(idx, nearest_code_portable(x, C))


def test_a_failing_worker_releases_the_limit_and_the_lock(rng, monkeypatch):
    def matmul(*a, **k):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(distance_fast, "np", types.SimpleNamespace(**{**vars(np), "matmul": matmul}))
    x, C = rng.standard_normal((40, 3)), rng.standard_normal((4, 3))
    with threadpool_limits(2, user_api="blas"):
        with pytest.raises(RuntimeError, match="worker failed"):
            nearest_code_threaded(x, C, chunk_size=10, workers=2)
        assert _numpy_blas_threads() and all(n == 2 for n in _numpy_blas_threads())
    assert not threads._BLAS_LOCK.locked()


def test_without_threadpoolctl_one_worker(rng, monkeypatch):
    monkeypatch.setattr(threads, "ThreadpoolController", None)
    monkeypatch.setattr(threads, "_CONTROLLER", [])
    assert threads.controller() is None and threads.blas_threads(None) == 1
    assert distance_fast.search_workers() == 1
    assert not use_threads(10**6, 1024)
    x, C = rng.standard_normal((50, 3)), rng.standard_normal((4, 3))
    np.testing.assert_array_equal(nearest_code_threaded(x, C, chunk_size=5), nearest_code_portable(x, C))


def test_overlapping_calls_from_two_threads(rng):
    """Two threads searching at once: the BLAS lock serialises them, each gets its own result."""
    from concurrent.futures import ThreadPoolExecutor

    C = rng.standard_normal((16, 8))
    xs = [rng.standard_normal((500, 8)) for _ in range(4)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda x: nearest_code_threaded(x, C, chunk_size=50, workers=2), xs))
    for x, idx in zip(xs, got):
        np.testing.assert_array_equal(idx, nearest_code_portable(x, C))
    assert not threads._BLAS_LOCK.locked()


@pytest.mark.parametrize("kw", [dict(), dict(use_cosine_sim=True), dict(num_quantizers=2)], ids=["ste", "cos", "rvq"])
def test_a_training_step_is_the_same_on_worker_threads(rng, monkeypatch, kw):
    """A module's step with the search on two workers (what a machine with a 2-thread BLAS runs;
    the test suite runs one BLAS thread) equals the step on one: outputs, losses, state, gradient."""
    x, C, _ = separated_problem(rng, 600, 8, 6, margin=0.5)

    def step(W):
        monkeypatch.setattr(distance_fast, "search_workers", lambda: W)
        calls = []
        real = distance_fast.nearest_code_threaded
        monkeypatch.setattr(distance, "nearest_code_threaded", lambda *a, **k: calls.append(1) or real(*a, **k))
        vq = VectorQuantize(dim=6, codebook_size=8, seed=0, dtype="float64", chunk_size=64, **kw)
        vq.load_state_dict({**vq.state_dict(), **{k: v for k, v in _codebooks(vq, C).items()}})
        out = vq(x)
        dx = vq.backward(rng_up.standard_normal(x.shape))
        return calls, out, dx, vq.state_dict()

    rng_up = np.random.default_rng(1)
    calls1, out1, dx1, st1 = step(1)
    rng_up = np.random.default_rng(1)
    calls2, out2, dx2, st2 = step(2)
    assert calls1 == [] and calls2  # the two paths ran
    for a, b in zip(out1, out2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out1[1], out2[1])  # the same codes
    np.testing.assert_allclose(dx1, dx2, rtol=1e-12, atol=1e-12)
    for k in st1:
        np.testing.assert_allclose(np.asarray(st1[k]), np.asarray(st2[k]), rtol=1e-12, atol=1e-12)


def _codebooks(vq, C):
    """State entries that set every codebook of ``vq`` to C (and mark them initialised)."""
    return {k: (C if k.endswith("codebook") else v) for k, v in vq.state_dict().items() if k.endswith("codebook")}


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_the_codes_gathered_by_the_search_are_the_lookup(rng, workers, metric, monkeypatch):
    """``return_codes``: ``codebook[indices]`` bit for bit, on the threaded path (gathered by
    each worker), the single-threaded one and the definition, with and without the scores."""
    import array_api_strict

    from vqref import backend as B

    x = rng.standard_normal((203, 6)).astype(np.float32)
    C = rng.standard_normal((9, 6)).astype(np.float32)
    for chunk in (None, 1, 16, 500):
        idx, codes = nearest_code_threaded(x, C, metric=metric, chunk_size=chunk, return_codes=True, workers=workers)
        assert codes.dtype == C.dtype and codes.shape == x.shape
        np.testing.assert_array_equal(codes, C[idx])
        i2, s2, c2 = nearest_code_threaded(x, C, metric=metric, chunk_size=chunk, return_score=True,
                                           return_codes=True, workers=workers)  # fmt: skip
        np.testing.assert_array_equal(i2, idx)
        np.testing.assert_array_equal(c2, C[idx])
        np.testing.assert_array_equal(s2, nearest_code_threaded(x, C, metric=metric, chunk_size=chunk,
                                                                return_score=True, workers=workers)[1])  # fmt: skip
    # the public function on each of its paths
    for W in (1, 2):
        monkeypatch.setattr(distance_fast, "search_workers", lambda W=W: W)
        idx, codes = nearest_code(x, C, metric=metric, chunk_size=16, return_codes=True)
        np.testing.assert_array_equal(codes, C[idx])
        idx, score, codes = nearest_code(x, C, metric=metric, chunk_size=16, return_score=True, return_codes=True)
        np.testing.assert_array_equal(codes, C[idx])
        np.testing.assert_array_equal(idx, nearest_code(x, C, metric=metric, chunk_size=16))
    XS = B.namespace_from_module(array_api_strict)
    idx, codes = nearest_code(B.from_numpy(x, XS), B.from_numpy(C, XS), metric=metric, return_codes=True)
    np.testing.assert_array_equal(B.to_numpy(codes), C[B.to_numpy(idx)])
    # empty input
    idx, codes = nearest_code_threaded(x[:0], C, metric=metric, return_codes=True, workers=workers)
    assert idx.shape == (0,) and codes.shape == (0, 6)


# ------------------------------------------------------------------ blocked elementwise passes on workers


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
@pytest.mark.parametrize("N, step", [(0, 4), (1, 4), (10, 3), (12, 3), (12, 4), (100, 7), (5, 100)])
def test_for_blocks_visits_every_block_once(N, step, num_workers):
    seen = []
    threads.for_blocks(N, step, lambda i, j: seen.append((i, j)), num_workers=num_workers)
    expect = [(s, min(s + step, N)) for s in range(0, N, step)]
    assert sorted(seen) == expect


def test_for_blocks_raises_a_worker_s_error_after_all_stopped():
    done = []

    def fn(i, j):
        if i == 0:
            raise RuntimeError("block failed")
        done.append(i)

    with pytest.raises(RuntimeError, match="block failed"):
        threads.for_blocks(40, 10, fn, num_workers=2)
    assert sorted(done) == [20, 30]  # the other worker's range was finished; the failing one stopped


def test_workers_run_in_the_caller_s_numpy_errstate(rng, monkeypatch):
    """numpy's errstate is a context variable: the workers of for_blocks, the threaded search and
    the fused k-means get the caller's (silent under over="ignore", raising under over="raise")."""
    big = np.full((40, 3), 3e38, dtype=np.float32)

    def overflow(i, j):
        big[i:j] * np.float32(10)  # overflows float32

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning from a worker would fail here
        with np.errstate(over="ignore"):
            threads.for_blocks(40, 10, overflow, num_workers=2)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        threads.for_blocks(40, 10, overflow, num_workers=2)
    assert threads.run_workers(lambda w: np.geterr()["over"], 3) == ["warn"] * 3  # outside: the default
    with np.errstate(over="raise"):
        assert threads.run_workers(lambda w: np.geterr()["over"], 3) == ["raise"] * 3
        x = rng.standard_normal((64, 4))
        assert nearest_code_threaded(x, x[:5], chunk_size=16, workers=2).shape == (64,)


def _on_workers(monkeypatch, W):
    monkeypatch.setattr(threads, "workers", lambda: W)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_elementwise_passes_on_workers_are_bit_for_bit_the_plain_ones(rng, monkeypatch, dtype):
    """B.difference, B.quotient, B.add_into and the blocked fast paths that run their blocks on
    worker threads give the plain expression's numbers, bit for bit, on 1 and 3 workers, with
    blocks shrunk to a few rows (so that every worker gets several)."""
    from vqref import backend as B
    from vqref.ops import l2norm as l2
    from vqref.ops import losses

    N, D = 103, 7
    a, b, c = (rng.standard_normal((N, D)).astype(dtype) for _ in range(3))
    s = (np.abs(rng.standard_normal((N, 1))) + 0.5).astype(dtype)
    monkeypatch.setattr(B, "_PASS_ELEMENTS", 3 * D)  # 3 rows per block
    monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", 4 * D)
    monkeypatch.setattr(l2, "_BLOCK_ELEMENTS", 5 * D)
    _on_workers(monkeypatch, 1)
    y, cache = l2.l2norm_forward_fast(a)  # one worker: the blocked loop in order
    dx = l2.l2norm_backward_fast(c, cache)
    np.testing.assert_allclose(y, l2.l2norm_forward(a, fast=False)[0], rtol=1e-6)
    for W in (1, 3):
        _on_workers(monkeypatch, W)
        np.testing.assert_array_equal(B.difference(a, b), a - b)
        for src in (a, a[::-1], np.asfortranarray(a)):
            dup = B.copied(src)
            np.testing.assert_array_equal(dup, src)
            assert not np.shares_memory(dup, src) and dup.flags.c_contiguous
        np.testing.assert_array_equal(B.quotient(a, s), a / s)
        total = a.copy()
        assert B.add_into(total, b) is total
        np.testing.assert_array_equal(total, a + b)
        f = np.asarray(0.37, dtype=dtype)
        np.testing.assert_array_equal(losses.scaled_difference_blocked(f, a, b), f * (a - b))
        np.testing.assert_array_equal(losses.scaled_difference_blocked(f, a, b, base=c), c + f * (a - b))
        buf = c.copy()
        assert losses.scaled_difference_blocked(f, a, b, base=buf, out=buf) is buf
        np.testing.assert_array_equal(buf, c + f * (a - b))
        np.testing.assert_array_equal(l2.l2norm_forward_fast(a)[0], y)
        np.testing.assert_array_equal(l2.l2norm_backward_fast(c, cache), dx)
        inplace = c.copy()
        assert l2.l2norm_backward_fast(inplace, cache, in_place=True) is inplace
        np.testing.assert_array_equal(inplace, dx)
    # other shapes and libraries: the plain expressions
    np.testing.assert_array_equal(B.difference(a[:, 0], b[:, 0]), a[:, 0] - b[:, 0])
    np.testing.assert_array_equal(B.difference(a, b[:1]), a - b[:1])
    np.testing.assert_array_equal(B.quotient(a, s[:1]), a / s[:1])


@pytest.mark.parametrize("bit_generator", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
@pytest.mark.parametrize("W", [1, 2, 3])
def test_gumbel_noise_on_workers_is_the_definition_s_stream(monkeypatch, bit_generator, W):
    """The noise drawn by workers from advanced copies equals the definition's draws, bit for bit,
    and leaves the generator where the definition leaves it (its next 32- and 64-bit draws too)."""
    from vqref.ops import gumbel
    from vqref.ops import gumbel_fast as gf

    _on_workers(monkeypatch, W)
    like = np.zeros((1,), dtype=np.float32)
    for shape, block in (((37, 11), 50), ((8, 8), 64), ((3, 5), 7), ((64, 16), 1 << 16)):
        gen = np.random.Generator(getattr(np.random, bit_generator)(7))
        gen.integers(0, 9, size=3, dtype=np.int32)  # a buffered 32-bit value, which float64 draws keep
        ref = B_clone(gen)
        fast = gf.gumbel_noise_blocked(shape, gen, like=like, eps=gumbel.NOISE_EPS, block=block)
        slow = gumbel.gumbel_noise(shape, ref, like=like, fast=False)
        np.testing.assert_array_equal(fast, slow)
        assert _same(gen.bit_generator.state, ref.bit_generator.state)
        assert gen.integers(0, 2**31, dtype=np.int32) == ref.integers(0, 2**31, dtype=np.int32)
        assert gen.random() == ref.random()


def B_clone(gen):
    from vqref import backend as B

    return B.clone_generator(gen)


def _same(a, b):
    """Equal generator states (dicts of ints, strings and arrays)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(np.array_equal(a, b))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gumbel_blocks_on_workers_are_bit_for_bit_the_loop(rng, monkeypatch, dtype):
    """The Gumbel fast paths with their blocks on 3 workers (the logits' products with the BLAS
    held to one thread) give the numbers of the same blocks in order, bit for bit."""
    from vqref.ops import gumbel_fast as gf

    N, K, D = 97, 13, 5
    x = rng.standard_normal((N, D)).astype(dtype)
    C = rng.standard_normal((K, D)).astype(dtype)
    g = rng.gumbel(size=(N, K)).astype(dtype)
    dy = rng.standard_normal((N, K)).astype(dtype)
    blk = 3 * K  # 3 rows per block: 33 blocks

    def run():
        logits, (xc, cc, dist, passes) = gf.code_logits_forward_blocked(x, C, clamp=1e-8, block=blk)
        idx = gf.gumbel_max_sample_blocked(logits, g, temperature=0.7, block=blk)
        y = gf.gumbel_softmax_forward_blocked(logits, temperature=0.7, noise=g, block=blk)
        dl = gf.gumbel_softmax_backward_blocked(dy, y, 0.7, block=blk)
        dd2 = gf.distance_gradient_blocked(dl, dist, passes, block=blk)
        return logits, dist, passes, idx, y, dl, dd2

    monkeypatch.setattr(gf, "_PRODUCT_WORK", 1)  # the logits' products on blocks of a few rows too
    _on_workers(monkeypatch, 1)
    one = run()
    _on_workers(monkeypatch, 3)
    three = run()
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)
    assert not threads._BLAS_LOCK.locked()
