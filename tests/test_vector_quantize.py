"""The VectorQuantize module: outputs, EMA training, eval mode, gradients, state, validation."""

import numpy as np
import pytest
from conftest import separated_problem

from vqref import VectorQuantize
from vqref import backend as B
from vqref.testing import check_vjp, rel_error
from vqref.testing.torch_reference import vq as tref

D, K = 6, 9


def make(bk, **kw):
    kw.setdefault("seed", 0)
    return VectorQuantize(D, K, dtype=bk.dtype_name, xp=bk.module, **kw)


def snapshot(vq):
    return {k: B.to_numpy(v).copy() for k, v in vq.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_shapes_dtypes_and_rows_are_codes(bk, rng):
    vq = make(bk)
    x = bk.asarray(rng.standard_normal((2, 3, 5, D)))
    before = B.to_numpy(vq.codebook).copy()
    q, idx, loss = vq(x)
    assert q.shape == (2, 3, 5, D) and q.dtype == bk.dtype
    assert idx.shape == (2, 3, 5) and idx.dtype == bk.xp.int64
    assert loss.shape == () and loss.dtype == bk.dtype
    # quantized rows are rows of the codebook from *before* this step's EMA update
    np.testing.assert_array_equal(bk.np(q).reshape(-1, D), before[bk.np(idx).reshape(-1)])
    assert not np.array_equal(B.to_numpy(vq.codebook), before)  # the EMA step happened
    xh = bk.np(x).astype(np.float64).reshape(-1, D)
    expected = np.mean((xh - before[bk.np(idx).reshape(-1)]) ** 2)
    assert float(bk.np(loss)) == pytest.approx(expected, rel=1e-5)


def test_float64_input_with_float32_state_keeps_float64(rng):
    vq = VectorQuantize(D, K, seed=0)
    q, _, loss = vq(rng.standard_normal((4, D)))
    assert q.dtype == np.float64 and loss.dtype == np.float64
    assert vq.codebook.dtype == np.float32


def test_initialisation_is_uniform_in_the_kaiming_bound():
    vq = VectorQuantize(dim=32, codebook_size=64, seed=1, dtype="float64")
    bound = np.sqrt(6 / (64 * 32))
    cb = vq.codebook
    assert np.all(np.abs(cb) <= bound) and np.abs(cb).max() > 0.9 * bound
    np.testing.assert_array_equal(vq.cluster_size, np.ones(64))
    np.testing.assert_array_equal(vq.embed_avg, cb)
    again = VectorQuantize(dim=32, codebook_size=64, seed=1, dtype="float64")
    np.testing.assert_array_equal(again.codebook, cb)


def test_ema_training_matches_an_independent_reference(bk, rng):
    vq = make(bk, decay=0.7, eps=1e-4)
    cb = B.to_numpy(vq.codebook).astype(np.float64)
    cs, ea = np.ones(K), cb.copy()
    for step in range(3):
        x = rng.standard_normal((40, D)) * 0.05
        _, idx, _ = vq(bk.asarray(x))
        idx = bk.np(idx)
        ref_idx = ((x[:, None] - cb[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(idx, ref_idx)
        onehot = np.eye(K)[idx]
        cs = 0.7 * cs + 0.3 * onehot.sum(0)
        ea = 0.7 * ea + 0.3 * onehot.T @ x
        smoothed = (cs + 1e-4) / (cs.sum() + K * 1e-4) * cs.sum()
        cb = ea / smoothed[:, None]
        np.testing.assert_allclose(B.to_numpy(vq.codebook), cb, rtol=bk.rtol * 10, atol=1e-6)
        np.testing.assert_allclose(B.to_numpy(vq.cluster_size), cs, rtol=bk.rtol * 10)


def test_eval_mode_changes_nothing(bk, rng):
    vq = make(bk)
    vq(bk.asarray(rng.standard_normal((8, D))))
    before = snapshot(vq)
    vq.eval()
    q1, i1, l1 = vq(bk.asarray(rng.standard_normal((8, D))))
    assert_same_state(before, snapshot(vq))
    # eval output is the decode of its indices
    np.testing.assert_array_equal(bk.np(q1), bk.np(vq.get_output_from_indices(i1)))
    vq.train()
    vq(bk.asarray(rng.standard_normal((8, D))))
    assert not np.array_equal(snapshot(vq)["codebook"], before["codebook"])


def test_frozen_codebook_when_nothing_learns(bk, rng):
    vq = make(bk, ema_update=False)
    before = snapshot(vq)
    vq(bk.asarray(rng.standard_normal((8, D))))
    assert_same_state(before, snapshot(vq))
    assert dict(vq.params) == {}


def _problem(bk, rng, n=7):
    x, C, truth = separated_problem(rng, n, K, D)
    return bk.asarray(x), bk.asarray(C), truth


def _with_codebook(bk, C, **kw):
    vq = make(bk, **kw)
    vq.load_state_dict({"codebook": C, "cluster_size": np.ones(K), "embed_avg": C, "initted": True})
    return vq


@pytest.mark.parametrize(
    "kw, fd_wrt",
    [
        (dict(ema_update=False), [0]),
        (dict(ema_update=False, commitment_weight=0.3), [0]),
        (dict(ema_update=False, learnable_codebook=True, commitment_weight=0.6), [0, 1]),
        (dict(ema_update=False, learnable_codebook=True, commitment_weight=0.25, codebook_weight=1.0), []),
    ],
    ids=["frozen", "beta0.3", "learnable-vqp", "learnable-split"],
)
def test_module_gradients_finite_differences_and_torch(bk64, rng, kw, fd_wrt):
    x, C, truth = _problem(bk64, rng)
    g = rng.standard_normal((7, D))
    dloss = 1.3

    # Finite differences see the derivative of the loss *value*.  That equals vqref's gradient
    # only where no stop-gradient intervenes: for x (q = C[k] does not depend on x when the codes
    # are fixed), and for C with vector-quantize-pytorch's single un-detached term.  The split
    # form sg[x]/sg[q] and the straight-through output are checked against torch autograd.
    def loss_value(x, C):
        return dloss * _with_codebook(bk64, C, **kw)(x)[2]

    def loss_grads(dout, x, C):
        vq = _with_codebook(bk64, C, **kw)
        vq(x)
        dx = vq.backward(bk64.xp.zeros_like(x), dloss=dout * dloss)
        return tuple((dx, vq.grads.get("codebook"))[i] for i in fd_wrt)

    guard = lambda x, C: _with_codebook(bk64, C, **kw).eval()(x)[1]  # noqa: E731
    if fd_wrt:
        check_vjp(loss_value, loss_grads, [x, C], wrt=fd_wrt, dout=bk64.asarray(np.array(1.0)), guard=guard, rtol=1e-7)

    vq = _with_codebook(bk64, C, **kw)
    vq(x)
    dx = vq.backward(bk64.asarray(g), dloss=dloss)
    dC = vq.grads.get("codebook")
    _, tloss, tdx, tdC = tref.vector_quantize_grads(
        x,
        C,
        truth,
        g,
        dloss,
        commitment_weight=kw.get("commitment_weight", 1.0),
        codebook_weight=kw.get("codebook_weight"),
        learnable_codebook=kw.get("learnable_codebook", False),
    )
    assert rel_error(dx, tdx) < 1e-12
    if kw.get("learnable_codebook"):
        assert rel_error(dC, tdC) < 1e-12
    else:
        assert dC is None and np.all(tdC == 0)


def test_negative_control_wrong_commitment_gradient_fails(bk64, rng):
    x, C, truth = _problem(bk64, rng)
    kw = dict(ema_update=False, commitment_weight=0.5)

    def loss(x):
        return _with_codebook(bk64, C, **kw)(x)[2]

    def wrong(dout, x):
        vq = _with_codebook(bk64, C, **kw)
        vq(x)
        return (2 * vq.backward(bk64.xp.zeros_like(x), dloss=dout),)  # factor 2 too many

    res = check_vjp(loss, wrong, [x], dout=bk64.asarray(np.array(1.0)), raise_on_failure=False)
    assert not res.passed


def test_float32_gradients_match_float64(rng):
    x, C, _ = separated_problem(rng, 30, K, D)
    g = rng.standard_normal((30, D))
    out = {}
    for dt in ("float64", "float32"):
        vq = VectorQuantize(D, K, seed=0, dtype=dt, ema_update=False, learnable_codebook=True)
        vq.load_state_dict({"codebook": C, "cluster_size": np.ones(K), "embed_avg": C, "initted": True})
        vq(x.astype(dt))
        out[dt] = (vq.backward(g.astype(dt)), vq.grads["codebook"])
        assert out[dt][0].dtype == dt and out[dt][1].dtype == dt
    assert rel_error(out["float32"][0], out["float64"][0]) < 1e-6
    assert rel_error(out["float32"][1], out["float64"][1]) < 1e-6


def test_unused_codes_get_zero_gradient_and_sum_identity(rng):
    x, C, truth = separated_problem(rng, 12, K, D)
    beta = 0.4
    vq = VectorQuantize(
        D, K, dtype="float64", ema_update=False, learnable_codebook=True, commitment_weight=beta, codebook_weight=1.0
    )
    vq.load_state_dict({"codebook": C, "cluster_size": np.ones(K), "embed_avg": C, "initted": True})
    g = rng.standard_normal((12, D))
    vq(x)
    dx = vq.backward(g)
    dC = vq.grads["codebook"]
    unused = np.setdiff1d(np.arange(K), truth)
    assert len(unused) and np.all(dC[unused] == 0)
    # docs/math.md §1.4: sum_k dL/dc_k = -(w/beta) sum_i (dL/dx_i - g_i), here codebook_weight w = 1
    np.testing.assert_allclose(dC.sum(0), -(dx - g).sum(0) / beta, rtol=1e-10, atol=1e-12)


def test_gradient_step_through_params(bk, rng):
    vq = make(bk, ema_update=False, learnable_codebook=True)
    x = bk.asarray(rng.standard_normal((20, D)))
    _, _, l0 = vq(x)
    vq.backward(bk.xp.zeros_like(x))
    for k in vq.params:
        vq.params[k] -= 0.5 * vq.grads[k]
    _, _, l1 = vq(x)
    assert float(bk.np(l1)) < float(bk.np(l0))


def test_backward_errors(bk, rng):
    vq = make(bk)
    with pytest.raises(RuntimeError, match="backward.*forward"):
        vq.backward(bk.asarray(np.zeros((3, D))))
    x = bk.asarray(rng.standard_normal((3, D)))
    vq(x)
    with pytest.raises(ValueError, match=r"dquantized must have shape \(3, 6\)"):
        vq.backward(bk.asarray(np.zeros((4, D))))
    with pytest.raises(ValueError, match="dloss must have shape"):
        vq.backward(bk.asarray(np.zeros((3, D))), dloss=bk.asarray(np.ones(2)))
    vq.backward(bk.asarray(np.zeros((3, D))))  # the failed calls above did not consume the cache
    with pytest.raises(RuntimeError, match="backward"):
        vq.backward(bk.asarray(np.zeros((3, D))))  # twice


@pytest.mark.parametrize(
    "bad, err, msg",
    [
        (np.zeros((4, D + 1)), ValueError, r"x must have shape \(\.\.\., 6\)"),
        (np.zeros((4, D), dtype=np.int64), TypeError, "floating-point"),
        (np.full((4, D), np.nan), ValueError, "NaN or infinite"),
        (np.full((4, D), np.inf), ValueError, "NaN or infinite"),
        (np.zeros((0, D)), ValueError, "empty"),
    ],
    ids=["last-dim", "int", "nan", "inf", "empty"],
)
def test_bad_input_is_rejected_and_state_untouched(bk, rng, bad, err, msg):
    vq = make(bk, kmeans_init=False)
    vq(bk.asarray(rng.standard_normal((5, D))))
    before, rng_state = snapshot(vq), vq.generator.bit_generator.state
    with pytest.raises(err, match=msg):
        vq(bk.asarray(bad, dtype=None))
    assert_same_state(before, snapshot(vq))
    assert vq.generator.bit_generator.state == rng_state


def test_mixed_backends_raise(rng):
    import array_api_strict as xs

    vq = VectorQuantize(D, K, seed=0)
    with pytest.raises(TypeError, match="array_api_strict array but this module holds numpy"):
        vq(xs.asarray(rng.standard_normal((3, D))))
    with pytest.raises(TypeError, match="must be an array"):
        vq([[0.0] * D])


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(codebook_size=0), "codebook_size must be >= 1"),
        (dict(codebook_size=2.5), "codebook_size must be an integer"),
        (dict(decay=1.5), "decay must be <= 1"),
        (dict(commitment_weight=-1.0), "commitment_weight must be >= 0"),
        (dict(learnable_codebook=True), "needs ema_update=False"),
        (dict(codebook_weight=1.0), "codebook_weight only applies"),
        (dict(commitment=0.5, commitment_weight=0.25), "disagree"),
        (dict(n_embed=5), "disagree"),
        (dict(dtype="int32"), "dtype must be float32 or float64"),
        (dict(kmeans_iters=0), "kmeans_iters must be >= 1"),
    ],
)
def test_bad_configuration(kw, msg):
    args = dict(codebook_size=K)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=msg):
        VectorQuantize(D, **args)


def test_aliases():
    vq = VectorQuantize(dim=D, n_embed=11, commitment=0.25)
    assert vq.codebook_size == 11 and vq.commitment_weight == 0.25


def test_state_dict_and_save_load_roundtrip(bk, rng, tmp_path):
    vq = make(bk, decay=0.9)
    for _ in range(3):
        vq(bk.asarray(rng.standard_normal((16, D))))
    x = bk.asarray(rng.standard_normal((10, D)))
    vq.eval()
    q0, i0, l0 = vq(x)
    other = make(bk, decay=0.9, seed=123).eval()
    other.load_state_dict(vq.state_dict())
    q1, i1, l1 = other(x)
    np.testing.assert_array_equal(bk.np(q0), bk.np(q1))
    path = tmp_path / "vq.npz"
    vq.save(str(path))
    third = make(bk, decay=0.9, seed=5).eval()
    third.load(str(path))
    np.testing.assert_array_equal(bk.np(third(x)[0]), bk.np(q0))
    fourth = VectorQuantize.from_file(str(path), xp=bk.module).eval()
    np.testing.assert_array_equal(bk.np(fourth(x)[1]), bk.np(i0))
    # a different configuration is refused, with the state untouched
    wrong = make(bk, decay=0.5)
    before = snapshot(wrong)
    with pytest.raises(ValueError, match="different configuration.*decay"):
        wrong.load(str(path))
    assert_same_state(before, snapshot(wrong))


def test_load_rejects_bad_files_and_shapes(tmp_path):
    vq = VectorQuantize(D, K, seed=0)
    before = snapshot(vq)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable vqref"):
        vq.load(str(junk))
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(ValueError, match="no 'config'"):
        vq.load(str(foreign))
    with pytest.raises(ValueError, match="codebook.*shape"):
        vq.load_state_dict(
            {
                "codebook": np.zeros((K + 1, D)),
                "cluster_size": np.ones(K),
                "embed_avg": np.zeros((K, D)),
                "initted": True,
            }
        )
    with pytest.raises(KeyError, match="missing"):
        vq.load_state_dict({"codebook": np.zeros((K, D))})
    assert_same_state(before, snapshot(vq))


def test_same_seed_bit_identical(rng):
    x = rng.standard_normal((50, D)).astype(np.float32)
    outs = []
    for _ in range(2):
        vq = VectorQuantize(D, K, seed=42)
        for _ in range(3):
            q, i, l = vq(x)
        outs.append((q, i, l, vq.codebook))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_numpy_and_strict_agree(rng):
    import array_api_strict as xs

    x = rng.standard_normal((64, D))
    res = []
    for mod in (np, xs):
        vq = VectorQuantize(D, K, seed=3, dtype="float64", xp=mod)
        for _ in range(3):
            q, i, l = vq(B.from_numpy(x, B.namespace_from_module(mod)))
        res.append((B.to_numpy(q), B.to_numpy(i), B.to_numpy(vq.codebook)))
    for a, b in zip(*res):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
