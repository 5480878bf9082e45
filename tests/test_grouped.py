"""GroupedResidualVQ: G residual stacks side by side, one state, one transaction.

The oracle is G independent ``ResidualVQ`` modules on the slices, built from the seeds the
grouped module spawns for its groups: every output, index, loss, gradient and state entry must be
theirs, step after step (k-means, restarts and all).  Then the module-level promises: one
transaction for all groups, files, copies, backends, decoding, refusals.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from vqref import GroupedResidualVQ, ResidualVQ
from vqref import backend as B

D, G, K, Q = 6, 3, 5, 2
SHAPE = (4, 7, D)
W = D // G


def host(a):
    return np.asarray(B.to_numpy(a))


def snapshot(m):
    return {k: host(v).copy() for k, v in m.state_dict().items()}


OPTIONS = {
    "ema": dict(),
    "kmeans, dead codes": dict(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.5),
    "projection, learnable": dict(codebook_dim=3, learnable_codebook=True, ema_update=False, rotation_trick=True),
    "shared, cosine, sizes": dict(shared_codebook=True, use_cosine_sim=True),
    "sizes, beam": dict(codebook_size=(5, 3), beam_size=2),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_groups_are_independent_stacks_on_the_slices(bk, rng, name):
    kw = {"codebook_size": K, "num_quantizers": Q, **OPTIONS[name]}
    lib = dict(dtype=bk.dtype_name, xp=bk.module)
    grouped = GroupedResidualVQ(dim=D, groups=G, seed=7, **kw, **lib)
    stacks = [ResidualVQ(dim=W, seed=s, **kw, **lib) for s in np.random.default_rng(7).spawn(G)]
    tol = dict(rtol=bk.rtol * 10, atol=bk.rtol)
    for _ in range(3):
        x, dq = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
        dl = rng.uniform(0.5, 1.5, (G, Q))
        q, idx, losses = grouped(bk.asarray(x))
        dx = host(grouped.backward(bk.asarray(dq), bk.asarray(dl)))
        assert idx.shape == (G,) + SHAPE[:-1] + (Q,) and losses.shape == (G, Q)
        for g, s in enumerate(stacks):
            cols = slice(g * W, (g + 1) * W)
            q2, idx2, losses2 = s(bk.asarray(x[..., cols]))
            dx2 = host(s.backward(bk.asarray(dq[..., cols]), bk.asarray(dl[g])))
            np.testing.assert_allclose(host(q)[..., cols], host(q2), **tol)
            np.testing.assert_array_equal(host(idx)[g], host(idx2))
            np.testing.assert_allclose(host(losses)[g], host(losses2), **tol)
            np.testing.assert_allclose(dx[..., cols], dx2, **tol)
            for key, value in snapshot(s).items():
                np.testing.assert_allclose(snapshot(grouped)[f"{g}.{key}"], value, **tol, err_msg=key)
            for key in s.grads:
                np.testing.assert_allclose(host(grouped.grads[f"{g}.{key}"]), host(s.grads[key]), **tol)
            assert grouped.stats["used_codes"][g] == s.stats["used_codes"]


def test_one_dropout_depth_for_every_group(rng):
    m = GroupedResidualVQ(dim=D, groups=G, num_quantizers=4, codebook_size=K, quantize_dropout=True, seed=0)
    depths = set()
    for _ in range(6):
        _, idx, losses = m(rng.standard_normal(SHAPE))
        ran = (idx >= 0).all(axis=(1, 2))  # (G, Q) which depths each group ran
        assert np.all(ran == ran[:1])  # the same for every group
        depths.add(int(ran[0].sum()))
        np.testing.assert_array_equal(losses[~ran], 0.0)
    assert len(depths) > 1


def test_a_failing_group_rolls_back_every_group(rng, monkeypatch):
    from vqref.quantizers import vq_step

    m = GroupedResidualVQ(dim=D, groups=G, num_quantizers=Q, codebook_size=K, seed=0, kmeans_init=True,
                          threshold_ema_dead_code=1.0)  # fmt: skip
    before, gens = snapshot(m), [layer.generator.bit_generator.state for layers in m.layers for layer in layers]
    calls = []
    original = vq_step.residual_forward

    def fail_in_the_last_group(*args, **kw):
        calls.append(1)
        if len(calls) == G:
            raise RuntimeError("injected")
        return original(*args, **kw)

    monkeypatch.setattr(vq_step, "residual_forward", fail_in_the_last_group)
    with pytest.raises(RuntimeError, match="injected"):
        m(rng.standard_normal(SHAPE))
    after = snapshot(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert [layer.generator.bit_generator.state for layers in m.layers for layer in layers] == gens
    assert not any(layer.initted for layers in m.layers for layer in layers) and m.stats == {}


def test_files_copies_and_libraries(tmp_path, rng):
    import array_api_strict as xs

    m = GroupedResidualVQ(dim=D, groups=G, num_quantizers=Q, codebook_size=(K, 4), codebook_dim=2, seed=0)
    x = rng.standard_normal(SHAPE)
    m(x)
    path = str(tmp_path / "g.npz")
    m.save(path)
    back = GroupedResidualVQ.from_file(path, seed=1)
    assert back.config() == m.config()
    assert all(np.array_equal(snapshot(back)[k], v) for k, v in snapshot(m).items())
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert all(np.array_equal(snapshot(other)[k], v) for k, v in snapshot(m).items())
    m.eval()
    q, idx, _ = m(x)
    m.to(xs)
    q2, idx2, _ = m(xs.asarray(x))
    np.testing.assert_array_equal(host(idx2), idx)
    np.testing.assert_allclose(host(q2), q, rtol=1e-6)


def test_decoding_and_fewer_depths(rng):
    m = GroupedResidualVQ(dim=D, groups=G, num_quantizers=3, codebook_size=K, codebook_dim=4, seed=0, dtype="float64")
    m.eval()
    x = rng.standard_normal(SHAPE)
    q, idx, _ = m(x)
    np.testing.assert_allclose(m.get_output_from_indices(idx), q, rtol=1e-12, atol=1e-15)
    codes = m.get_codes_from_indices(idx[..., :1])  # (G, Q, ..., d): depth 0, then zero codes
    assert codes.shape == (G, 3) + SHAPE[:-1] + (4,) and np.all(codes[:, 1:] == 0)
    coarse = m.get_output_from_indices(idx[..., :1])
    for g in range(G):
        W_out, b_out = m.state_array(f"{g}.project_out.W"), m.state_array(f"{g}.project_out.b")
        np.testing.assert_allclose(coarse[..., g * W : (g + 1) * W], codes[g, 0] @ W_out + b_out, rtol=1e-12)


@pytest.mark.parametrize("kw, error, message", [
    (dict(dim=7, groups=3), ValueError, "divisible by groups"),
    (dict(dim=6, groups=0), ValueError, "groups must be >= 1"),
    (dict(dim=6, groups=2, heads=2), TypeError, "no heads"),
])  # fmt: skip
def test_bad_options(kw, error, message):
    with pytest.raises(error, match=message):
        GroupedResidualVQ(num_quantizers=Q, codebook_size=K, **kw)


def test_upstream_gradients_are_checked(rng):
    m = GroupedResidualVQ(dim=D, groups=G, num_quantizers=Q, codebook_size=K, seed=0)
    m(rng.standard_normal(SHAPE))
    with pytest.raises(ValueError, match=r"dlosses must have shape \(3, 2\) or \(\)"):
        m.backward(rng.standard_normal(SHAPE), np.ones(Q))
    with pytest.raises(ValueError, match="dquantized"):
        m.backward(rng.standard_normal((4, 7, D + 1)))
    m.backward(rng.standard_normal(SHAPE))  # the cache survived the refused calls


def test_a_masked_step_is_each_groups_masked_step(rng):
    kw = dict(num_quantizers=Q, codebook_size=K, threshold_ema_dead_code=1.0, dtype="float64")
    grouped = GroupedResidualVQ(dim=D, groups=G, seed=3, **kw)
    stacks = [ResidualVQ(dim=W, seed=s, **kw) for s in np.random.default_rng(3).spawn(G)]
    x, mask = rng.standard_normal(SHAPE), rng.random(SHAPE[:-1]) < 0.6
    q, idx, losses = grouped(x, mask=mask)
    for g, s in enumerate(stacks):
        q2, idx2, losses2 = s(x[..., g * W : (g + 1) * W], mask=mask)
        np.testing.assert_allclose(q[..., g * W : (g + 1) * W], q2, rtol=1e-12)
        np.testing.assert_array_equal(idx[g], idx2)
        np.testing.assert_allclose(losses[g], losses2, rtol=1e-12)
    assert np.all(idx[:, ~mask] == -1)
