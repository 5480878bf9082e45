"""Tests of vqref.nn.conv_vqvae: the convolutional VQ-VAE's hand-written backward and its contract.

* torch autograd (float64) of the same model -- ``F.conv2d`` / ``F.conv_transpose2d`` on the
  model's weights, vector-quantize-pytorch's layer formulas with the codes held fixed -- for
  several quantizers, on numpy and array_api_strict;
* finite differences (float64) of the straight-through surrogate with the stopped copies
  frozen, and a negative control;
* spatial tokens: replacing one token's code changes no pixel outside the region the decoder
  lets it reach, and that region is attained;
* every backend and dtype; training lowers the loss; transactions (a refused or failing call
  leaves the model bit-identical to a twin that never saw it); state_dict round trips.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.nn import Adam
from vqref.nn.conv_vqvae import ConvVQVAE
from vqref.testing import check_vjp, rel_error

torch = pytest.importorskip("torch")
F = torch.nn.functional

# Distinct sizes: N images of H x W pixels with C channels, h hidden channels, d token dim, K codes;
# the token grid is H/4 x W/4 = 2 x 3.
N, H, W, C, HID, D, K = 3, 8, 12, 2, 5, 3, 7

CONFIGS = {
    "ema": (VectorQuantize, dict(decay=0.8, commitment_weight=0.25)),
    "learnable": (
        VectorQuantize,
        dict(ema_update=False, learnable_codebook=True, codebook_weight=1.0, commitment_weight=0.25),
    ),
    "cosine": (VectorQuantize, dict(decay=0.8, use_cosine_sim=True, commitment_weight=0.25)),
    "rotation": (VectorQuantize, dict(decay=0.8, rotation_trick=True, commitment_weight=0.25)),
    "residual": (ResidualVQ, dict(num_quantizers=2, decay=0.8, commitment_weight=0.25)),
}


def _quantizer(name, *, dtype="float64", xp=np, d=D, k=K):
    cls, opts = CONFIGS[name]
    if cls is ResidualVQ:
        return ResidualVQ(dim=d, codebook_size=k, seed=3, dtype=dtype, xp=xp, **opts)
    return VectorQuantize(d, k, seed=3, dtype=dtype, xp=xp, **opts)


def _model(name="ema", *, dtype="float64", xp=np, seed=0, channels=C, hidden=HID, d=D, k=K):
    vq = _quantizer(name, dtype=dtype, xp=xp, d=d, k=k)
    return ConvVQVAE(vq, in_channels=channels, hidden=hidden, rng=seed, dtype=dtype, xp=xp)


def _host(a):
    return np.array(B.to_numpy(a), copy=True)


def _codebooks(model):
    q = model.quantizer
    return [_host(layer.codebook) for layer in (q.layers if q.is_stack else [q])]


# --------------------------------------------------------------------------------------------
# The torch reference
# --------------------------------------------------------------------------------------------


def _torch_net(h, params, layers):
    """A ConvNet in torch (NCHW) on the given weights."""
    for i, layer in enumerate(layers):
        Wt, bt = params[f"{i}.W"], params[f"{i}.b"]
        if layer.transposed:
            h = F.conv_transpose2d(
                h,
                Wt.permute(0, 3, 1, 2),
                bt,
                stride=layer.stride,
                padding=layer.padding,
                output_padding=layer.output_padding,
            )
        else:
            h = F.conv2d(h, Wt.permute(3, 2, 0, 1), bt, stride=layer.stride, padding=layer.padding)
        if i < len(layers) - 1:
            h = F.relu(h)
    return h


def torch_conv_vqvae_grads(model, x, indices, codebooks, dloss, drecon):
    """Autograd of ``dloss * total + <drecon, recon>`` with the codes held at ``indices``.

    Returns (total, recon (N, H, W, C), grads by name).
    """
    from vqref.testing.torch_reference.vq import torch_tensor, vq_layer_torch

    q = model.quantizer
    opts = (q.layers[0] if q.is_stack else q).config()
    layer_opts = {
        k: opts[k]
        for k in ("commitment_weight", "codebook_weight", "learnable_codebook", "use_cosine_sim", "rotation_trick")
    }
    enc = {k: torch_tensor(v, True) for k, v in model.encoder.state_dict().items()}
    dec = {k: torch_tensor(v, True) for k, v in model.decoder.state_dict().items()}
    cbs = [torch_tensor(c, True) for c in codebooks]
    xt = torch_tensor(np.ascontiguousarray(np.transpose(_host(x), (0, 3, 1, 2))))  # NCHW
    z = _torch_net(xt, enc, model.encoder.layers)  # (N, d, H', W')
    n, d, hg, wg = z.shape
    tokens = z.permute(0, 2, 3, 1).reshape(n * hg * wg, d)  # row-major over the grid, as vqref
    idx = _host(indices).reshape(n * hg * wg, -1)
    out_total, loss_total, r = 0, 0, tokens
    for level in range(idx.shape[1]):
        k = torch.as_tensor(idx[:, level], dtype=torch.long)
        out, loss, _ = vq_layer_torch(r, cbs[level], k, **layer_opts)
        out_total, loss_total = out_total + out, loss_total + loss
        r = r - out.detach()
    zq = out_total.reshape(n, hg, wg, d).permute(0, 3, 1, 2)
    recon = _torch_net(zq, dec, model.decoder.layers)  # (N, C, H, W)
    total = F.mse_loss(recon, xt) + loss_total
    drecon_t = torch_tensor(np.ascontiguousarray(np.transpose(drecon, (0, 3, 1, 2))))
    (dloss * total + (recon * drecon_t).sum()).backward()
    grads = {f"encoder.{k}": v.grad.numpy() for k, v in enc.items()}
    grads.update({f"decoder.{k}": v.grad.numpy() for k, v in dec.items()})
    prefixes = [""] if len(cbs) == 1 else [f"{i}." for i in range(len(cbs))]
    for prefix, c in zip(prefixes, cbs):
        grads[f"quantizer.{prefix}codebook"] = c.grad.numpy() if c.grad is not None else None
    return float(total.detach()), recon.detach().numpy().transpose(0, 2, 3, 1), grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_whole_model_gradients_match_torch(bk64, rng, name):
    model = _model(name, xp=bk64.module)
    x = bk64.asarray(rng.random((N, H, W, C)))
    model.forward(x)  # a warm-up step, so the EMA codebooks have moved towards the data
    model.backward()
    codebooks = _codebooks(model)
    recon, indices, losses = model.forward(x)
    assert tuple(indices.shape) == ((N, 2, 3, 2) if name == "residual" else (N, 2, 3))
    dloss = 0.5 + rng.random()
    drecon = rng.standard_normal((N, H, W, C))
    dx = model.backward(dloss, bk64.asarray(drecon))
    assert tuple(dx.shape) == (N, H, W, C) and dx.dtype == x.dtype
    total, ref_recon, ref = torch_conv_vqvae_grads(model, x, indices, codebooks, dloss, drecon)
    assert abs(float(bk64.np(losses.total)) - total) <= 1e-12 * abs(total)
    assert rel_error(bk64.np(recon), ref_recon) < 1e-12
    grads = model.grads
    assert sorted(grads) == sorted(model.params)
    learnable = [k for k in grads if k.startswith("quantizer.")]
    assert bool(learnable) == (name == "learnable")
    for k, g in ref.items():
        if k.startswith("quantizer.") and k not in learnable:
            continue  # an EMA codebook has no gradient
        assert rel_error(bk64.np(grads[k]), g) < 1e-10, k


# --------------------------------------------------------------------------------------------
# Finite differences of the surrogate
# --------------------------------------------------------------------------------------------


def _surrogate_problem(rng):
    """A tiny learnable-codebook model (83 numbers) and its objective with sg frozen."""
    n, hh, ww, c, d, k = 2, 4, 8, 1, 2, 3
    vq = VectorQuantize(
        d,
        k,
        ema_update=False,
        learnable_codebook=True,
        codebook_weight=0.6,
        commitment_weight=0.3,
        seed=1,
        dtype="float64",
    )
    model = ConvVQVAE(vq, in_channels=c, hidden=1, rng=2, dtype="float64")
    for net in (model.encoder, model.decoder):  # non-zero biases: no layer starts exactly at a ReLU kink
        for layer in net.layers:
            layer.params["b"] = 0.1 + 0.2 * rng.random(layer.out_channels)
    x = rng.random((n, hh, ww, c))
    names = list(model.params)
    base = [model.params[key] for key in names]
    _, indices, _ = model.reconstruct(x)
    z0 = model.encoder.apply(x)[0].reshape(-1, d)  # (N T, d) frozen sg[z]
    k0 = indices.reshape(-1)
    q0 = vq.codebook[k0]  # frozen sg[q]

    def set_params(arrs):
        for key, a in zip(names, arrs):
            model.params[key] = a

    def mse(a, b):
        return np.mean((a - b) ** 2)

    def surrogate(*arrs):
        set_params(arrs)
        z = model.encoder.apply(x)[0]  # (N, H', W', d)
        zq = z + (q0 - z0).reshape(z.shape)  # value q0, derivative 1 with respect to z
        recon = model.decoder.apply(zq)[0]
        q = model.params["quantizer.codebook"][k0]
        return mse(recon, x) + 0.6 * mse(z0, q) + 0.3 * mse(z.reshape(-1, d), q0)

    def codes(*arrs):
        set_params(arrs)
        return model.reconstruct(x)[1]

    def vjp(dout, *arrs):
        set_params(arrs)
        model.train().forward(x)
        model.backward(dout)
        return [model.grads[key] for key in names]

    return names, base, surrogate, codes, vjp


def test_surrogate_gradient_finite_differences(rng):
    names, base, surrogate, codes, vjp = _surrogate_problem(rng)
    res = check_vjp(surrogate, vjp, base, seed=4, guard=codes, rtol=1e-7)
    assert len(res.errors) == len(names) == 13  # 6 encoder, 6 decoder arrays and the codebook
    assert max(res.errors) < 1e-7

    def broken(dout, *arrs):  # the encoder's first layer receives nothing
        return [g * 0.0 if n == "encoder.0.W" else g for n, g in zip(names, vjp(dout, *arrs))]

    bad = check_vjp(surrogate, broken, base, seed=4, guard=codes, raise_on_failure=False)
    assert bad.passed is False and dict(zip(names, bad.errors))["encoder.0.W"] > 0.5


# --------------------------------------------------------------------------------------------
# Spatial tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ema", "residual"])
def test_a_token_swap_changes_exactly_its_region(rng, name):
    model = _model(name, channels=3, hidden=6, k=9)
    for layer in model.decoder.layers:  # positive biases keep the ReLUs open: the region is attained
        layer.params["b"] = np.full(layer.out_channels, 2.0)
    x = rng.random((1, 16, 20, 3))
    recon, indices, _ = model.reconstruct(x)
    np.testing.assert_allclose(model.decode_indices(indices), recon, rtol=1e-12, atol=1e-14)
    for u, v in ((0, 0), (2, 3), (3, 4), (1, 2)):
        swapped = _host(indices)
        swapped[0, u, v] = (swapped[0, u, v] + 1 + rng.integers(0, K - 1)) % K  # another code (every depth)
        diff = np.abs(model.decode_indices(swapped) - recon).max(axis=(0, 3))  # (16, 20)
        rows, cols = model.token_region(u, v, 16, 20)
        assert (rows.start, rows.stop) == (max(4 * u - 3, 0), min(4 * u + 7, 16))
        assert (cols.start, cols.stop) == (max(4 * v - 3, 0), min(4 * v + 7, 20))
        outside = diff.copy()
        outside[rows, cols] = 0.0
        assert not np.any(outside)  # exactly: no pixel outside the region depends on the token
        changed_r, changed_c = np.nonzero(diff)
        assert (changed_r.min(), changed_r.max() + 1) == (rows.start, rows.stop)
        assert (changed_c.min(), changed_c.max() + 1) == (cols.start, cols.stop)
    with pytest.raises(ValueError, match="outside the 4 x 5 grid"):
        model.token_region(4, 0, 16, 20)


# --------------------------------------------------------------------------------------------
# Backends, training, modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ema", "learnable", "residual"])
def test_every_backend_agrees_with_float64(bk, rng, name):
    x = rng.random((N, H, W, C))
    ref = _model(name)
    model = _model(name, dtype=bk.dtype_name, xp=bk.module)
    recon_ref, idx_ref, losses_ref = ref.forward(x)
    recon, idx, losses = model.forward(bk.asarray(x))
    np.testing.assert_array_equal(bk.np(idx), idx_ref)
    dx_ref, dx = ref.backward(0.8), model.backward(0.8)
    for a in (recon, losses.total, dx, *model.params.values(), *model.grads.values()):
        assert a.dtype == bk.dtype and B.library_name(a) == bk.name
    assert rel_error(bk.np(recon), recon_ref) < bk.rtol
    assert rel_error(bk.np(dx), dx_ref) < 10 * bk.rtol
    for key, g in model.grads.items():
        assert rel_error(bk.np(g), ref.grads[key]) < 10 * bk.rtol, key
    recon_eval, idx_eval, _ = model.reconstruct(bk.asarray(x))
    decoded = model.decode_indices(idx_eval)
    assert decoded.dtype == bk.dtype and B.library_name(decoded) == bk.name
    assert rel_error(bk.np(decoded), bk.np(recon_eval)) < bk.rtol


@pytest.mark.parametrize("name", ["ema", "learnable"])
def test_training_lowers_the_loss(bk, name):
    gen = np.random.default_rng(7)
    # images made of 4x4 blocks of a few colours: a token per block can describe them exactly
    palette = gen.random((6, 3))
    blocks = palette[gen.integers(0, 6, size=(48, 2, 2))]  # (48, 2, 2, 3)
    data = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2) + 0.02 * gen.standard_normal((48, 8, 8, 3))
    model = _model(name, dtype=bk.dtype_name, xp=bk.module, channels=3, hidden=8, d=4, k=8)
    opt = Adam(model.params, lr=1e-2)
    x = bk.asarray(data)
    before = float(bk.np(model.reconstruct(x)[2].reconstruction))
    for _ in range(25):
        model.forward(bk.asarray(data[gen.permutation(48)[:16]]))
        model.backward()
        opt.step(model.grads)
    after = float(bk.np(model.reconstruct(x)[2].reconstruction))
    assert math.isfinite(after) and after < 0.3 * before


def test_eval_forward_changes_nothing_and_refuses_the_backward(rng):
    model = _model("ema")
    x = rng.random((N, H, W, C))
    model.forward(x)
    before = model.state_dict()
    model.reconstruct(x)
    assert model.training
    for key, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[key])
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.backward()


def test_params_names_and_the_optimizer_writes_back(rng):
    model = _model("learnable")
    names = sorted(model.params)
    assert names == sorted(
        [f"{part}.{i}.{p}" for part in ("encoder", "decoder") for i in range(3) for p in "Wb"] + ["quantizer.codebook"]
    )
    assert model.params["encoder.0.W"].shape == (4, 4, C, HID) and model.params["decoder.2.W"].shape == (HID, 4, 4, C)
    old = {k: _host(v) for k, v in model.params.items()}
    model.forward(rng.random((N, H, W, C)))
    model.backward()
    Adam(model.params, lr=0.1).step(model.grads)
    for k in names:
        assert not np.array_equal(old[k], model.params[k]), k


def test_state_dict_round_trip(rng):
    a, b = _model("residual", seed=0), _model("residual", seed=5)
    x = rng.random((N, H, W, C))
    a.forward(x)
    b.load_state_dict(a.state_dict())
    ra, ia, _ = a.reconstruct(x)
    rb, ib, _ = b.reconstruct(x)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ra, rb)


# --------------------------------------------------------------------------------------------
# Transactions: refused or failing calls change nothing
# --------------------------------------------------------------------------------------------


def _bits(a) -> tuple:
    h = _host(a)
    return h.dtype.str, h.shape, h.tobytes()


def _fingerprint(model, opt) -> dict:
    fp = {("param", k): _bits(v) for k, v in model.params.items()}
    fp.update({("grad", k): _bits(v) for k, v in model.grads.items()})
    fp.update({("quantizer", k): _bits(v) for k, v in model.quantizer.state_dict().items()})
    fp["rngs"] = repr([g.bit_generator.state for g in model.quantizer.state.rngs])
    for key, st in opt.state.items():
        fp.update({("opt", key, n): _bits(v) if B.is_array(v) else v for n, v in st.items()})
    return fp


def _data(seed, shape=(N, H, W, C)):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _setup(name="ema"):
    """A float32 model and its Adam after one step, with a second forward pending its backward."""
    model = _model(name, dtype="float32")
    opt = Adam(model.params, lr=1e-2)
    model.forward(_data(1))
    model.backward()
    opt.step(model.grads)
    model.forward(_data(2))  # pending
    return model, opt


def _next(model, opt) -> list:
    """What the model does next: the pending backward, a step, another forward and backward."""
    out = [_host(model.backward(0.7))] + [_host(g) for g in model.grads.values()]
    opt.step(model.grads)
    recon, indices, losses = model.forward(_data(3))
    out += [_host(recon), _host(indices), _host(losses.total), _host(model.backward())]
    return out + [_host(v) for v in model.params.values()]


def _assert_refused_and_unchanged(call, model, opt, twin, twin_opt, exc=(ValueError, TypeError, KeyError)):
    with pytest.raises(exc):
        call()
    assert _fingerprint(model, opt) == _fingerprint(twin, twin_opt)
    mine, theirs = _next(model, opt), _next(twin, twin_opt)
    assert len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs))


def _strict(a):
    import array_api_strict

    return B.from_numpy(a, B.namespace_from_module(array_api_strict))


@pytest.mark.parametrize(
    "bad",
    ["nan", "inf", "channels-first", "height-not-multiple-of-4", "int", "list", "other-library", "empty-batch"],
)
def test_refused_forward_changes_nothing(bad):
    """The empty batch passes the model's checks and the encoder, and is refused by the quantizer."""
    model, opt = _setup()
    twin, twin_opt = _setup()
    x = {
        "nan": np.where(_data(4) > 0.5, np.nan, _data(4)).astype(np.float32),
        "inf": np.full((N, H, W, C), np.inf, np.float32),
        "channels-first": _data(4, (N, C, H, W)),
        "height-not-multiple-of-4": _data(4, (N, H + 2, W, C)),
        "int": np.ones((N, H, W, C), np.int64),
        "list": _data(4).tolist(),
        "other-library": _strict(_data(4)),
        "empty-batch": np.zeros((0, H, W, C), np.float32),
    }[bad]
    _assert_refused_and_unchanged(lambda: model.forward(x), model, opt, twin, twin_opt)


@pytest.mark.parametrize("bad", ["drecon-shape", "drecon-nan", "dloss-nan", "dloss-vector", "dloss-text"])
def test_refused_backward_keeps_the_pending_backward(bad):
    model, opt = _setup()
    twin, twin_opt = _setup()
    kwargs = {
        "drecon-shape": dict(drecon=np.ones((N, H, W + 4, C), np.float32)),
        "drecon-nan": dict(drecon=np.full((N, H, W, C), np.nan, np.float32)),
        "dloss-nan": dict(dloss=math.nan),
        "dloss-vector": dict(dloss=np.ones(2, np.float32)),
        "dloss-text": dict(dloss="1"),
    }[bad]
    _assert_refused_and_unchanged(lambda: model.backward(**kwargs), model, opt, twin, twin_opt)


def test_decode_indices_between_forward_and_backward_changes_nothing():
    model, opt = _setup()
    twin, twin_opt = _setup()
    assert model.decode_indices(np.zeros((5, 3, 2), dtype=np.int64)).shape == (5, 12, 8, C)
    with pytest.raises(ValueError):
        model.decode_indices(np.zeros((5, 6), dtype=np.int64))  # not a token map
    with pytest.raises(ValueError):
        model.decode_indices(np.full((1, 2, 2), K, dtype=np.int64))  # no such code
    mine, theirs = _next(model, opt), _next(twin, twin_opt)
    assert all(np.array_equal(a, b) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("bad", ["decoder-nan", "decoder-shape", "quantizer-shape", "unknown", "missing"])
def test_load_state_dict_is_all_or_nothing(bad):
    model, opt = _setup("learnable")
    twin, twin_opt = _setup("learnable")
    state = _model("learnable", dtype="float32", seed=9).state_dict()
    if bad == "decoder-nan":
        state["decoder.2.b"] = np.full(C, np.nan, np.float32)
    elif bad == "decoder-shape":
        state["decoder.1.W"] = state["decoder.1.W"][:, :2]
    elif bad == "quantizer-shape":
        state["quantizer.codebook"] = state["quantizer.codebook"][:2]
    elif bad == "unknown":
        state["middle.0.W"] = np.zeros(1)
    else:
        del state["encoder.1.b"]
    _assert_refused_and_unchanged(lambda: model.load_state_dict(state), model, opt, twin, twin_opt)


def test_constructor_refusals():
    with pytest.raises(ValueError, match="hidden"):
        ConvVQVAE(VectorQuantize(D, K), hidden=0, rng=0)
    with pytest.raises(ValueError, match="in_channels"):
        ConvVQVAE(VectorQuantize(D, K), in_channels=2.5, rng=0)
