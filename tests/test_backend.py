"""The array backend: namespaces, host/device moves, host RNG, segment sums."""

import array_api_strict
import numpy as np
import pytest

from vqref import backend as B


def test_mixed_libraries_raise_type_error():
    a = np.zeros(3)
    b = array_api_strict.asarray([0.0, 1.0, 2.0])
    with pytest.raises(TypeError, match="different libraries.*array_api_strict.*numpy|different libraries.*numpy"):
        B.get_namespace(a, b)
    with pytest.raises(TypeError, match="at least one array"):
        B.get_namespace([1.0, 2.0])


def test_roundtrip_host_device(bk, rng):
    a = rng.standard_normal((5, 3))
    arr = bk.asarray(a)
    assert arr.dtype == bk.dtype
    back = B.to_numpy(arr)
    np.testing.assert_allclose(back, a.astype(bk.dtype_name), rtol=0, atol=0)


def test_same_seed_same_numbers_on_every_backend(bk):
    g1, g2 = B.as_generator(7), B.as_generator(7)
    a = B.from_numpy(g1.standard_normal(4), bk.xp, dtype=bk.dtype)
    b = g2.standard_normal(4).astype(bk.dtype_name)
    np.testing.assert_array_equal(bk.np(a), b)
    gen = np.random.default_rng(3)
    assert B.as_generator(gen) is gen


@pytest.mark.parametrize("N,K,D", [(97, 13, 5), (1, 4, 3), (40, 1, 2), (0, 3, 2)])
def test_segment_sum_matches_a_loop(bk, rng, N, K, D):
    values = rng.standard_normal((N, D))
    ids = rng.integers(0, K, size=N)
    expected = np.zeros((K, D))
    for i in range(N):  # the definition, one row at a time
        expected[ids[i]] += values[i]
    out = B.segment_sum(bk.asarray(values), bk.asarray(ids), K)
    assert out.shape == (K, D) and out.dtype == bk.dtype
    np.testing.assert_allclose(bk.np(out), expected, rtol=bk.rtol, atol=1e-12 if bk.is64 else 1e-5)
    counts = B.bincount(bk.asarray(ids), K)
    np.testing.assert_array_equal(bk.np(counts), np.bincount(ids, minlength=K))


def test_segment_sum_repeated_ids_all_count(bk):
    # The trap: out[ids] += v keeps one of the repeated ids.  The segment sum adds all of them.
    values = np.ones((6, 2))
    ids = np.array([2, 2, 2, 0, 2, 0])
    out = bk.np(B.segment_sum(bk.asarray(values), bk.asarray(ids), 3))
    np.testing.assert_array_equal(out, [[2, 2], [0, 0], [4, 4]])
    wrong = np.zeros((3, 2))
    wrong[ids] += values  # what the style guide forbids
    assert not np.array_equal(wrong, out)


def test_segment_sum_fallback_path_equals_numpy_fast_path(rng, monkeypatch):
    values = rng.standard_normal((300, 4))
    ids = rng.integers(0, 17, size=300)
    fast = B.segment_sum(values, ids, 17)
    monkeypatch.setattr(B, "_ONEHOT_BLOCK_ELEMENTS", 17 * 7)  # several blocks
    xs = B.namespace_from_module(array_api_strict)
    slow = B.segment_sum(B.from_numpy(values, xs), B.from_numpy(ids, xs), 17)
    np.testing.assert_allclose(B.to_numpy(slow), fast, rtol=1e-12, atol=1e-12)


def test_float_checks(bk):
    assert B.is_float_array(bk.asarray(np.zeros(2)))
    assert not B.is_float_array(bk.asarray(np.zeros(2, dtype=np.int64)))
    assert B.all_finite(bk.asarray(np.zeros(2)))
    assert not B.all_finite(bk.asarray(np.array([0.0, np.nan])))
