"""Per-depth codebook sizes: ``ResidualVQ(codebook_size=(K_0, ..., K_{Q-1}))``."""

from __future__ import annotations

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.testing.torch_reference.layer import layer_grads

D = 5
SIZES = (9, 3, 6)
N = 40


def host(a):
    return np.asarray(B.to_numpy(a))


def make(bk, **kw):
    return ResidualVQ(dim=D, codebook_size=SIZES, seed=0, dtype=bk.dtype_name, xp=bk.module, **kw)


def test_each_depth_has_its_size(bk, rng):
    rq = make(bk, threshold_ema_dead_code=1.0, orthogonal_reg_weight=0.1, orthogonal_reg_max_codes=4)
    assert rq.num_quantizers == 3 and rq.codebook_sizes == SIZES
    assert [layer.codebook_size for layer in rq.layers] == list(SIZES)
    assert [tuple(layer.codebook.shape) for layer in rq.layers] == [(k, D) for k in SIZES]
    for layer, k in zip(rq.layers, SIZES):  # torch's kaiming bound per depth
        assert np.all(np.abs(host(layer.codebook)) <= np.sqrt(6 / (k * D)))
    x = bk.asarray(rng.standard_normal((2, N // 2, D)))
    for _ in range(2):
        _, idx, losses = rq(x)
        idx = host(idx).reshape(-1, 3)
        assert all(idx[:, level].max() < k for level, k in enumerate(SIZES))
        assert host(losses).shape == (3,)
        rq.backward(bk.asarray(rng.standard_normal((2, N // 2, D))), 1.0)
    assert all(used <= k for used, k in zip(rq.stats["used_codes"], SIZES))
    assert all(0 < u <= 1 for u in rq.stats["usage"])
    rq.eval()
    q, idx, _ = rq(x)
    np.testing.assert_allclose(host(rq.get_output_from_indices(idx)), host(q), rtol=bk.rtol, atol=bk.rtol)


def test_kmeans_initialises_each_depth_with_its_size(rng):
    rq = ResidualVQ(dim=D, codebook_size=SIZES, seed=0, kmeans_init=True, dtype="float64")
    rq(rng.standard_normal((N, D)))
    assert all(layer.initted for layer in rq.layers)
    assert [layer.cluster_size.sum() for layer in rq.layers] == pytest.approx([N] * 3)  # the k-means counts


def test_gradients_of_codebooks_of_different_sizes_match_torch(rng):
    rq = ResidualVQ(dim=D, codebook_size=SIZES, seed=1, dtype="float64", learnable_codebook=True, ema_update=False)
    books = [np.array(layer.codebook) for layer in rq.layers]
    x, dq = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    q, idx, losses = rq(x)
    dx = rq.backward(dq, np.array([0.4, 1.0, 1.7]))
    ref_q, ref_losses, ref_dx, ref_dcb, _ = layer_grads(x, books, idx, dq, np.array([0.4, 1.0, 1.7]),
                                                         learnable_codebook=True)  # fmt: skip
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    for level, k in enumerate(SIZES):
        assert rq.grads[f"{level}.codebook"].shape == (k, D)
        np.testing.assert_allclose(rq.grads[f"{level}.codebook"], ref_dcb[level], rtol=1e-10, atol=1e-12)


def test_sizes_round_trip_through_files_and_decoding_checks_each_depth(tmp_path, rng):
    rq = ResidualVQ(dim=D, codebook_size=list(SIZES), seed=0)
    rq(rng.standard_normal((N, D)))
    path = str(tmp_path / "rq.npz")
    rq.save(path)
    back = ResidualVQ.from_file(path)
    assert back.codebook_sizes == SIZES and back.config() == rq.config()
    bad = np.zeros((4, 3), dtype=np.int64)
    bad[:, 1] = SIZES[1]  # beyond depth 1's codes
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        rq.get_output_from_indices(bad)


@pytest.mark.parametrize("kw, message", [
    (dict(num_quantizers=2), "codebook_size has 3 sizes but num_quantizers=2"),
    (dict(shared_codebook=True), "shared_codebook=True needs one codebook_size"),
    (dict(codebook_size=(4, 0, 2)), r"codebook_size\[1\] must be >= 1"),
])  # fmt: skip
def test_bad_sizes_are_refused(kw, message):
    kw = {"codebook_size": SIZES, **kw}
    with pytest.raises(ValueError, match=message):
        ResidualVQ(dim=D, **kw)


def test_one_size_per_depth_needs_a_stack():
    with pytest.raises(ValueError, match="codebook_size as one size per depth needs a residual stack"):
        VectorQuantize(D, (4, 5))
    assert VectorQuantize(D, (4, 5), num_quantizers=2).codebook_sizes == (4, 5)
    with pytest.raises(TypeError, match="needs num_quantizers"):
        ResidualVQ(dim=D, codebook_size=4)
