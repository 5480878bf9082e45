"""Factorised codes: ``codebook_dim`` with the learnable projections ``project_in`` / ``project_out``.

Values against a numpy oracle written from the definition (project, nearest code, map back);
every gradient -- input, projections, learnable codebooks, per estimator and metric, plain and
residual -- against torch autograd in float64 (a surrogate sits between the two maps, so finite
differences do not apply to dx; the projections' own derivative is checked by finite differences
with the codes held fixed); decoding through ``project_out``; files and defaults.
"""

from __future__ import annotations

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.core.layer import (
    Projection,
    frame,
    layer_in_backward,
    layer_in_forward,
    layer_out_backward,
    layer_out_forward,
)
from vqref.testing import check_vjp
from vqref.testing.torch_reference.layer import layer_grads

D, K, d = 6, 9, 4
N = 11


def host(a):
    return np.asarray(B.to_numpy(a))


def test_shapes_params_and_initialisation(bk):
    m = VectorQuantize(D, K, codebook_dim=d, seed=0, dtype=bk.dtype_name, xp=bk.module)
    assert m.has_projections and m.codebook.shape == (K, d)
    spec = m.state_spec()
    assert spec["project_in.W"] == (D, d) and spec["project_in.b"] == (d,)
    assert spec["project_out.W"] == (d, D) and spec["project_out.b"] == (D,)
    assert sorted(m.params) == ["project_in.W", "project_in.b", "project_out.W", "project_out.b"]
    for name, fan_in in (("project_in.W", D), ("project_in.b", D), ("project_out.W", d), ("project_out.b", d)):
        a = host(m.params[name])
        assert a.dtype == bk.dtype_name and np.all(np.abs(a) <= 1 / np.sqrt(fan_in)), name  # torch's nn.Linear
    again = VectorQuantize(D, K, codebook_dim=d, seed=0, dtype=bk.dtype_name, xp=bk.module)
    for name in m.params:
        np.testing.assert_array_equal(host(m.params[name]), host(again.params[name]))
    # without projections, a seed gives the codebook it always gave
    np.testing.assert_array_equal(host(VectorQuantize(D, K, codebook_dim=D, seed=0).codebook),
                                  host(VectorQuantize(D, K, seed=0).codebook))  # fmt: skip
    assert not VectorQuantize(D, K, codebook_dim=D).has_projections


def test_forward_matches_the_definition(bk, rng):
    m = VectorQuantize(D, K, codebook_dim=d, seed=0, dtype=bk.dtype_name, xp=bk.module)
    m.eval()
    x = rng.standard_normal((2, N, D))
    p = {k: host(v).astype(np.float64) for k, v in m.params.items()}
    cb = host(m.codebook).astype(np.float64)
    q, idx, loss = m(bk.asarray(x))
    z = x.reshape(-1, D) @ p["project_in.W"] + p["project_in.b"]  # (M, d)
    k = ((z[:, None] - cb[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(host(idx).reshape(-1), k)
    expected = cb[k] @ p["project_out.W"] + p["project_out.b"]
    np.testing.assert_allclose(host(q).reshape(-1, D), expected, rtol=bk.rtol * 10, atol=bk.rtol)
    assert float(host(loss)) == pytest.approx(np.mean((z - cb[k]) ** 2), rel=bk.rtol * 10)
    np.testing.assert_allclose(host(m.get_output_from_indices(idx)), host(q), rtol=bk.rtol, atol=bk.rtol)
    np.testing.assert_allclose(host(m.get_codes_from_indices(idx)).reshape(-1, d), cb[k], rtol=bk.rtol)


CONFIGS = {
    "ste": dict(),
    "rotation": dict(rotation_trick=True),
    "cosine": dict(use_cosine_sim=True),
    "learnable": dict(learnable_codebook=True, ema_update=False, commitment_weight=0.4),
    "learnable, split terms": dict(learnable_codebook=True, ema_update=False, codebook_weight=0.7),
    "residual": dict(num_quantizers=3, learnable_codebook=True, ema_update=False),
    "residual, cosine, rotation": dict(num_quantizers=2, use_cosine_sim=True, rotation_trick=True),
    "residual, shared": dict(num_quantizers=3, shared_codebook=True, learnable_codebook=True, ema_update=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_torch_autograd(bk64, rng, name):
    kw = CONFIGS[name]
    m = VectorQuantize(D, K, codebook_dim=d, seed=2, dtype="float64", xp=bk64.module, **kw)
    state = {k: host(v).copy() for k, v in m.state_dict().items()}
    x, dq = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    Q = m.num_quantizers
    dloss = np.linspace(0.5, 1.5, Q) if m.is_stack else 1.3
    q, idx, loss = m(bk64.asarray(x))
    dx = m.backward(bk64.asarray(dq), bk64.asarray(dloss) if m.is_stack else dloss)
    if m.is_stack:
        books = [state["codebook"]] if m.shared_codebook else [state[f"{level}.codebook"] for level in range(Q)]
    else:
        books = [state["codebook"]]
    proj = {"W_in": state["project_in.W"], "b_in": state["project_in.b"], "W_out": state["project_out.W"],
            "b_out": state["project_out.b"]}  # fmt: skip
    opts = {k: v for k, v in kw.items() if k in ("use_cosine_sim", "rotation_trick", "learnable_codebook",
                                                 "commitment_weight", "codebook_weight")}  # fmt: skip
    ref_q, ref_losses, ref_dx, ref_dcb, ref_dproj = layer_grads(
        x, books, host(idx).reshape(N, -1), dq, dloss, projections=proj, **opts
    )
    np.testing.assert_allclose(host(q), ref_q, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.atleast_1d(host(loss)), ref_losses, rtol=1e-10)
    np.testing.assert_allclose(host(dx), ref_dx, rtol=1e-10, atol=1e-12)
    names = {"W_in": "project_in.W", "b_in": "project_in.b", "W_out": "project_out.W", "b_out": "project_out.b"}
    for k, v in ref_dproj.items():
        np.testing.assert_allclose(host(m.grads[names[k]]), v, rtol=1e-10, atol=1e-12, err_msg=k)
    if m.codebook_is_learnable:
        mine = [host(m.grads[p + "codebook"]) for p in m.codebook_prefixes()]
        for a, b in zip(mine, ref_dcb):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def _layer(x, W_in, b_in, W_out, b_out, outputs_from):
    """The projections around a fixed inner map, for finite differences (codes held fixed)."""
    fr = frame((x.shape[0],), None, heads=1, separate=False, passthrough=False, like=x)
    streams, cin = layer_in_forward(x, Projection(W_in, b_in), fr)
    inner = outputs_from(streams[0])
    out, cout = layer_out_forward([inner], x, Projection(W_out, b_out), fr)
    return out, (cin, cout)


def test_the_projections_backward_matches_finite_differences(bk64, rng):
    A = bk64.asarray(rng.standard_normal((d, d)))  # a fixed linear inner map stands in for the quantization
    args = [bk64.asarray(a) for a in (rng.standard_normal((N, D)), rng.standard_normal((D, d)), rng.standard_normal(d),
                                      rng.standard_normal((d, D)), rng.standard_normal(D))]  # fmt: skip

    def f(*a):
        return _layer(*a, lambda z: z @ A)[0]

    def vjp(dout, *a, scale=1.0):
        _, (cin, cout) = _layer(*a, lambda z: z @ A)
        douts, dWo, dbo, _ = layer_out_backward(dout, cout)
        dz = douts[0] @ A.mT
        dx, dWi, dbi = layer_in_backward([dz], cin)
        return dx, scale * dWi, dbi, dWo, dbo

    check_vjp(f, vjp, args, seed=4, rtol=1e-7)
    wrong = check_vjp(f, lambda g, *a: vjp(g, *a, scale=-1.0), args, seed=4, rtol=1e-7, raise_on_failure=False)
    assert not wrong.passed  # negative control: the checker sees a wrong sign


def test_residual_projections_apply_once_around_the_stack(rng):
    rq = ResidualVQ(dim=D, num_quantizers=3, codebook_size=K, codebook_dim=d, seed=0, dtype="float64")
    rq.eval()
    x = rng.standard_normal((N, D))
    q, idx, _ = rq(x)
    p = {k: host(v) for k, v in rq.params.items()}
    codes = host(rq.get_codes_from_indices(idx))  # (Q, N, d)
    np.testing.assert_allclose(q, codes.sum(0) @ p["project_out.W"] + p["project_out.b"], rtol=1e-12)
    # a prefix of the depths decodes to the coarser reconstruction, through project_out too
    coarse = host(rq.get_output_from_indices(idx[:, :1]))
    np.testing.assert_allclose(coarse, codes[0] @ p["project_out.W"] + p["project_out.b"], rtol=1e-12)
    assert rq.layers[0].dim == d and rq.layers[1].codebook.shape == (K, d)


def test_files_keep_the_projections_and_older_files_load(tmp_path, rng):
    m = VectorQuantize(D, K, codebook_dim=d, seed=0)
    m(rng.standard_normal((N, D)))
    path = str(tmp_path / "m.npz")
    m.save(path)
    back = VectorQuantize.from_file(path)
    assert back.config() == m.config()
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(host(back.state_dict()[k]), host(v))
    # a file written before the options existed has no such keys: it loads without projections
    from vqref.quantizers.options import CONFIG_DEFAULTS

    old = {k: v for k, v in VectorQuantize(D, K, seed=0).config().items() if k not in CONFIG_DEFAULTS}
    checked = VectorQuantize.check_config({**CONFIG_DEFAULTS, **old})
    assert checked["codebook_dim"] is None and checked["heads"] == 1


def test_project_in_and_out_learn(rng):
    m = VectorQuantize(D, K, codebook_dim=d, seed=0, dtype="float64", ema_update=False)
    x = rng.standard_normal((64, D))
    losses = []
    for _ in range(30):
        q, _, loss = m(x)
        dq = 2 * (q - x) / x.size  # the reconstruction loss mse(q, x)
        m.backward(dq, 1.0)
        losses.append(float(np.mean((q - x) ** 2)))
        for name in list(m.params):
            m.params[name] = m.params[name] - 0.5 * m.grads[name]
    assert losses[-1] < 0.8 * losses[0]
