"""Quantize dropout (SoundStream; EnCodec's multiple; DAC's per-sample mode) and coarser decoding.

The oracle of the per-batch mode is a shallower stack: a step that stops after depth l* must be
the step of a ``ResidualVQ`` with l* + 1 depths built from the same seed (spawned generators
make its depths and their generators the same), and the depths after l* must not change at all.
The per-sample mode's gradients are checked against torch autograd (every depth on the rows that
reach it, DAC's loss normalisation), the draws against their distribution.
"""

from __future__ import annotations

import numpy as np
import pytest

from vqref import ResidualVQ
from vqref import backend as B
from vqref.core.rows import depth_rows, dropout_last_depths
from vqref.testing.torch_reference.layer import layer_grads

D, K, Q = 5, 7, 4
SHAPE = (6, 3, D)  # S = 6 samples of 3 tokens


def host(a):
    return np.asarray(B.to_numpy(a))


def snapshot(m):
    return {k: host(v).copy() for k, v in m.state_dict().items()}


def make(bk=None, seed=0, **kw):
    lib = {} if bk is None else dict(dtype=bk.dtype_name, xp=bk.module)
    return ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=seed, quantize_dropout=True, **lib, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(kmeans_init=True, kmeans_iters=2), dict(codebook_dim=3),
                                dict(learnable_codebook=True, ema_update=False, orthogonal_reg_weight=0.2),
                                dict(use_cosine_sim=True, rotation_trick=True, threshold_ema_dead_code=1.0)],
                         ids=["ema", "kmeans", "projection", "learnable", "cosine"])  # fmt: skip
def test_a_dropped_step_is_the_step_of_the_shallower_stack(bk, rng, kw):
    seen = set()
    for seed in range(4):
        m = make(bk, seed=seed, **kw)
        before = snapshot(m)
        x, dq = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
        q, idx, losses = m(bk.asarray(x))
        idx, losses = host(idx), host(losses)
        last = int((idx >= 0).all(axis=(0, 1)).sum()) - 1  # l*: depths 0..l* ran
        seen.add(last)
        assert np.all(idx[..., last + 1 :] == -1) and np.all(idx[..., : last + 1] >= 0)
        np.testing.assert_array_equal(losses[last + 1 :], 0.0)
        dloss = np.linspace(0.5, 2.0, Q)
        dx = host(m.backward(bk.asarray(dq), bk.asarray(dloss)))
        # the oracle: the first l* + 1 depths alone, from the same seed (the same spawned generators) and state
        shallow = ResidualVQ(dim=D, num_quantizers=last + 1, codebook_size=K, seed=seed, dtype=bk.dtype_name,
                             xp=bk.module, **kw)  # fmt: skip
        shallow.load_state_dict({k: v for k, v in before.items() if not k[0].isdigit() or int(k[0]) <= last})
        q2, idx2, losses2 = shallow(bk.asarray(x))
        tol = dict(rtol=bk.rtol * 10, atol=bk.rtol)
        np.testing.assert_allclose(host(q), host(q2), **tol)
        np.testing.assert_array_equal(idx[..., : last + 1], host(idx2))
        np.testing.assert_allclose(losses[: last + 1], host(losses2), **tol)
        np.testing.assert_allclose(dx, host(shallow.backward(bk.asarray(dq), bk.asarray(dloss[: last + 1]))), **tol)
        after = snapshot(m)
        for key, value in snapshot(shallow).items():
            np.testing.assert_allclose(after[key], value, **tol, err_msg=key)
        for key in shallow.grads:
            np.testing.assert_allclose(host(m.grads[key]), host(shallow.grads[key]), **tol, err_msg=key)
        # the depths after l* did not change, and got no gradient
        for key in after:
            if key[0].isdigit() and int(key[0]) > last:
                np.testing.assert_array_equal(after[key], before[key], err_msg=key)
                if key.endswith(".codebook") and key in m.grads:
                    np.testing.assert_array_equal(host(m.grads[key]), 0.0)
        assert all(m.stats["used_codes"][level] == 0 for level in range(last + 1, Q))
    assert min(seen) < Q - 1  # some step dropped depths


def test_the_draws_are_uniform_from_the_cutoff_and_round_to_multiples():
    rng = np.random.default_rng(0)
    draws = dropout_last_depths(rng, 6000, 6, cutoff=2, multiple_of=1, per_sample=True)
    counts = np.bincount(draws, minlength=6)
    assert counts[:2].sum() == 0 and np.all(np.abs(counts[2:] / 6000 - 0.25) < 0.03)
    rounded = dropout_last_depths(rng, 6000, 7, cutoff=0, multiple_of=3, per_sample=True)
    assert set(np.unique(rounded)) == {2, 5, 6}  # l* + 1 in {3, 6}, or all 7 depths
    one = dropout_last_depths(rng, 50, 6, cutoff=0, multiple_of=1, per_sample=False)
    assert len(set(one)) == 1  # one draw for the whole batch
    # a row reaches depth l when its sample's l* >= l
    rows = depth_rows(np.array([0, 2, 1, 2]), 3)
    assert rows[0] is None and list(rows[1]) == [1, 2, 3] and list(rows[2]) == [1, 3]


@pytest.mark.parametrize("kw", [dict(), dict(codebook_dim=3, use_cosine_sim=True),
                                dict(learnable_codebook=True, ema_update=False, rotation_trick=True)],
                         ids=["ema", "projection-cosine", "learnable-rotation"])  # fmt: skip
def test_per_sample_dropout_matches_torch_autograd(rng, kw):
    m = make(seed=1, dtype="float64", quantize_dropout_per_sample=True, **kw)
    state = snapshot(m)
    x, dq = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    dloss = np.array([0.5, 1.0, 1.5, 2.0])
    q, idx, losses = m(x)
    dx = m.backward(dq, dloss)
    per_sample = (idx >= 0).sum(-1)  # (S, T): depths each token used
    assert np.all(per_sample == per_sample[:, :1]) and len(np.unique(per_sample)) > 1  # per sample, and varied
    proj = None
    if m.has_projections:
        proj = {"W_in": state["project_in.W"], "b_in": state["project_in.b"], "W_out": state["project_out.W"],
                "b_out": state["project_out.b"]}  # fmt: skip
    opts = {k: kw[k] for k in ("use_cosine_sim", "rotation_trick", "learnable_codebook") if k in kw}
    ref_q, ref_losses, ref_dx, ref_dcb, ref_dproj = layer_grads(
        x.reshape(-1, D), [state[f"{level}.codebook"] for level in range(Q)], idx.reshape(-1, Q),
        dq.reshape(-1, D), dloss, projections=proj, **opts,
    )  # fmt: skip
    np.testing.assert_allclose(q.reshape(-1, D), ref_q, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(dx.reshape(-1, D), ref_dx, rtol=1e-10, atol=1e-12)
    if m.learnable_codebook:
        for level in range(Q):
            np.testing.assert_allclose(m.grads[f"{level}.codebook"], ref_dcb[level], rtol=1e-10, atol=1e-12)
    # the normalisation: depth l's commitment sums over the rows that reach it and divides by all rows
    rows = idx.reshape(-1, Q) >= 0
    r = x.reshape(-1, D) if not m.has_projections else None
    if r is not None and not m.use_cosine_sim and not m.learnable_codebook:
        residual = r.copy()
        for level in range(Q):
            code = np.where(
                rows[:, level : level + 1], state[f"{level}.codebook"][np.maximum(idx.reshape(-1, Q)[:, level], 0)], 0
            )
            err = ((residual - code) ** 2)[rows[:, level]].sum() / r.size
            assert losses[level] == pytest.approx(err, rel=1e-12)
            residual = residual - code


def test_the_per_sample_loss_normalisation_is_the_checked_one(rng, monkeypatch):
    # negative control: the mean over the rows that reach a depth (not DAC's) fails the reference
    import vqref.core.residual as residual

    m = make(seed=1, dtype="float64", quantize_dropout_per_sample=True)
    state = snapshot(m)
    x = rng.standard_normal(SHAPE)
    original = residual.quantize_forward
    monkeypatch.setattr(residual, "quantize_forward",
                        lambda r, c, **kw: original(r, c, **{**kw, "commitment_weight": 1.0}))  # fmt: skip
    _, idx, losses = m(x)
    _, ref_losses, *_ = layer_grads(x.reshape(-1, D), [state[f"{level}.codebook"] for level in range(Q)],
                                    idx.reshape(-1, Q), np.zeros((18, D)))  # fmt: skip
    assert not np.allclose(losses, ref_losses, rtol=1e-6)


def test_eval_runs_every_depth_and_fewer_depths_decode_coarser(rng):
    m = make(seed=2, dtype="float64")
    x = rng.standard_normal(SHAPE)
    m(x)
    m.eval()
    q, idx, _ = m(x)
    assert np.all(idx >= 0)
    codes = m.get_codes_from_indices(idx)  # (Q, S, T, D)
    for n in range(1, Q + 1):
        np.testing.assert_allclose(m.get_output_from_indices(idx[..., :n]), codes[:n].sum(0), rtol=1e-12)
    errors = [np.mean((x - m.get_output_from_indices(idx[..., :n])) ** 2) for n in range(1, Q + 1)]
    assert errors[-1] < errors[0]  # more depths reconstruct better here
    # a training forward's output is the decoding of its own indices, dropped depths included
    m = make(seed=2, dtype="float64", ema_update=False)  # (the codebook a decoding reads is the forward's)
    q, idx, _ = m(x)
    assert np.any(idx < 0)
    np.testing.assert_allclose(m.get_output_from_indices(idx), q, rtol=1e-12, atol=1e-14)


def test_dropout_draws_from_its_own_generator(rng):
    plain = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=5)
    dropped = make(seed=5)
    for level in range(Q):  # the same initial codebooks and codebook generators
        np.testing.assert_array_equal(plain.layers[level].codebook, dropped.layers[level].codebook)
        assert plain.layers[level].generator.bit_generator.state == dropped.layers[level].generator.bit_generator.state
    x = rng.standard_normal(SHAPE)
    a, b = make(seed=5), make(seed=5)
    np.testing.assert_array_equal(a(x)[1], b(x)[1])  # reproducible per seed


@pytest.mark.parametrize("kw, name", [
    (dict(quantize_dropout_cutoff_index=4), "quantize_dropout_cutoff_index"),
    (dict(quantize_dropout_cutoff_index=-1), "quantize_dropout_cutoff_index"),
    (dict(quantize_dropout_multiple_of=0), "quantize_dropout_multiple_of"),
    (dict(quantize_dropout=False, quantize_dropout_per_sample=True), "quantize_dropout_per_sample"),
])  # fmt: skip
def test_bad_options_are_refused_by_name(kw, name):
    kw = {"quantize_dropout": True, **kw}
    with pytest.raises(ValueError, match=name):
        ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, **kw)
