"""Tests of vqref.nn.vqvae: the whole VQ-VAE's hand-written backward.

* torch autograd (float64) on the same weights, codes and upstream gradients, for every
  quantizer configuration the demo trains (and a few more), and over random shapes;
* finite differences (float64) of the straight-through surrogate with the codes held fixed:
  ``sg[q - z]`` and the stop-gradient sides of the losses frozen at their values, so the
  surrogate gradient the model computes is an ordinary derivative that differences can check;
* float32 against the float64 analytic result; training reduces the loss; degenerate inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.nn import Adam
from vqref.nn.vqvae import VQVAE
from vqref.testing import check_vjp, rel_error

# Distinct sizes: N images, P pixels, H hidden, T tokens, d token dim, K codes.
N, P, H, T, D, K = 7, 10, 9, 3, 4, 5

# name -> (quantizer class, options); the demo's eight and two extra cases.
CONFIGS = {
    "ema": (VectorQuantize, dict(decay=0.8, commitment_weight=0.25)),
    "learnable": (
        VectorQuantize,
        dict(ema_update=False, learnable_codebook=True, codebook_weight=1.0, commitment_weight=0.25),
    ),
    "learnable-one-term": (VectorQuantize, dict(ema_update=False, learnable_codebook=True, commitment_weight=0.7)),
    "kmeans": (VectorQuantize, dict(decay=0.8, kmeans_init=True, commitment_weight=0.25)),
    "cosine": (VectorQuantize, dict(decay=0.8, use_cosine_sim=True, commitment_weight=0.25)),
    "orthogonal": (
        VectorQuantize,
        dict(
            ema_update=False,
            learnable_codebook=True,
            codebook_weight=1.0,
            commitment_weight=0.25,
            orthogonal_reg_weight=0.8,
        ),
    ),
    "orthogonal-ema": (VectorQuantize, dict(decay=0.8, orthogonal_reg_weight=0.8)),
    "rotation": (VectorQuantize, dict(decay=0.8, rotation_trick=True, commitment_weight=0.25)),
    "residual": (ResidualVQ, dict(num_quantizers=2, decay=0.8, commitment_weight=0.25)),
    "residual-shared": (ResidualVQ, dict(num_quantizers=3, decay=0.8, commitment_weight=0.25, shared_codebook=True)),
    "residual-learnable-rotation": (
        ResidualVQ,
        dict(num_quantizers=2, ema_update=False, learnable_codebook=True, rotation_trick=True, commitment_weight=0.5),
    ),
}


def _quantizer(name: str, d: int, k: int, *, dtype: str = "float64", xp=np, seed=3):
    cls, opts = CONFIGS[name]
    if cls is ResidualVQ:
        return ResidualVQ(dim=d, codebook_size=k, seed=seed, dtype=dtype, xp=xp, **opts)
    return VectorQuantize(d, k, seed=seed, dtype=dtype, xp=xp, **opts)


def _model(name: str, bk, *, n_tokens=T, d=D, k=K, hidden=H, in_dim=P, seed=0):
    vq = _quantizer(name, d, k, dtype=bk.dtype_name, xp=bk.module)
    return VQVAE(vq, in_dim=in_dim, hidden=hidden, num_tokens=n_tokens, rng=seed, dtype=bk.dtype_name, xp=bk.module)


class _Numpy64:
    """The ``bk`` interface for plain numpy float64, for tests that need no backend sweep."""

    name, dtype_name, module, xp, dtype, rtol = "numpy", "float64", np, np, np.float64, 1e-10

    @staticmethod
    def asarray(a):
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def np(a):
        return np.asarray(a)


_NUMPY64 = _Numpy64()


def _codebooks(model) -> list[np.ndarray]:
    q = model.quantizer
    layers = q.layers if q.is_stack else [q]
    return [np.array(B.to_numpy(layer.codebook), dtype=np.float64) for layer in layers]


# --------------------------------------------------------------------------------------------
# The torch reference: the same model written with autograd
# --------------------------------------------------------------------------------------------


def _torch_vqvae_grads(model, x, indices, codebooks, dloss, drecon, orth_codebooks=None):
    """Autograd gradients of ``dloss * total + <drecon, recon>`` for the model's weights.

    The encoder and decoder are torch MLPs built from the model's weights; the quantizer is
    ``vq_layer_torch`` per depth (residual: ``r_{l+1} = r_l - sg[out_l]``, the per-depth
    routing) with the codes held at ``indices``.  The orthogonal regulariser, when on, is
    evaluated on ``orth_codebooks`` (default ``codebooks``): the codebooks the quantizer holds
    after its forward; its gradient adds to the codebook's.  Returns (total, recon, grads by name).
    """
    import torch
    import torch.nn.functional as F

    from vqref.testing.torch_reference.vq import torch_tensor, vq_layer_torch

    q = model.quantizer
    residual = q.is_stack
    opts = q.layers[0].config() if residual else q.config()
    layer_opts = dict(
        commitment_weight=opts["commitment_weight"],
        codebook_weight=opts["codebook_weight"],
        learnable_codebook=opts["learnable_codebook"],
        use_cosine_sim=opts["use_cosine_sim"],
        rotation_trick=opts["rotation_trick"],
    )
    w = opts["orthogonal_reg_weight"]
    enc = {k: torch_tensor(v, True) for k, v in model.encoder.state_dict().items()}
    dec = {k: torch_tensor(v, True) for k, v in model.decoder.state_dict().items()}
    cbs = [torch_tensor(c, True) for c in codebooks]
    ocbs = [torch_tensor(c, True) for c in (codebooks if orth_codebooks is None else orth_codebooks)]

    def orthogonal(c):
        """``sum((C^ C^T)^2) / K^2 - 1/K`` (arXiv 2112.00384 eq. 2, vector-quantize-pytorch's form)."""
        cn = F.normalize(c, dim=-1, eps=1e-6)
        n = cn.shape[0]
        return ((cn @ cn.t()) ** 2).sum() / n**2 - 1.0 / n

    def mlp(h, p):
        L = len(p) // 2
        for i in range(L):
            h = h @ p[f"{i}.W"] + p[f"{i}.b"]
            if i < L - 1:
                h = torch.relu(h)
        return h

    n = x.shape[0]
    xt = torch_tensor(x)
    tokens = mlp(xt, enc).reshape(n * model.num_tokens, model.token_dim)  # (N T, d)
    idx = np.array(B.to_numpy(indices))  # a writable copy: the quantizer hands out read-only outputs
    idx = idx.reshape(n * model.num_tokens, -1)  # (N T, Q), Q = 1 for one quantizer
    out_total, loss_total, r = 0, 0, tokens
    for level in range(idx.shape[1]):
        ct = cbs[0] if len(cbs) == 1 else cbs[level]
        k = torch.as_tensor(idx[:, level], dtype=torch.long)
        out, loss, _ = vq_layer_torch(r, ct, k, **layer_opts)
        if w > 0:
            loss = loss + w * orthogonal(ocbs[0] if len(ocbs) == 1 else ocbs[level])
        out_total, loss_total = out_total + out, loss_total + loss
        r = r - out.detach()
    recon = mlp(out_total.reshape(n, -1), dec)
    total = F.mse_loss(recon, xt) + loss_total
    (dloss * total + (recon * torch_tensor(drecon)).sum()).backward()
    grads = {f"encoder.{k}": v.grad.numpy() for k, v in enc.items()}
    grads.update({f"decoder.{k}": v.grad.numpy() for k, v in dec.items()})
    prefixes = [""] if len(cbs) == 1 else [f"{i}." for i in range(len(cbs))]
    for prefix, c, o in zip(prefixes, cbs, ocbs):
        g = np.zeros(tuple(c.shape))
        for t in (c, o):
            if t.grad is not None:
                g = g + t.grad.numpy()
        grads[f"quantizer.{prefix}codebook"] = g
    return float(total.detach()), recon.detach().numpy(), grads


def _check_against_torch(model, bk, x_h, gen):
    model.train()
    x = bk.asarray(x_h)
    model.forward(x)  # warm-up step: k-means init, one EMA step, so the codebooks are data-like
    model.backward()
    codebooks = _codebooks(model)  # the codebooks the next forward quantizes with
    recon, indices, losses = model.forward(x)
    dloss = 0.5 + gen.random()
    drecon_h = gen.standard_normal(tuple(recon.shape))
    dx = model.backward(dloss, bk.asarray(drecon_h))
    assert tuple(dx.shape) == tuple(x.shape) and dx.dtype == x.dtype
    # The orthogonal regulariser is evaluated on the codebooks after this step's EMA update
    # (those the quantizer now holds); a shared residual codebook's update waits for the last
    # depth, so its regulariser sees the codebook the forward quantized with.
    q = model.quantizer
    held = codebooks if q.is_stack and q.shared_codebook else _codebooks(model)
    ref_total, ref_recon, ref_grads = _torch_vqvae_grads(model, x_h, indices, codebooks, dloss, drecon_h, held)
    assert abs(float(bk.np(losses.total)) - ref_total) <= 1e-10 * abs(ref_total)
    assert rel_error(bk.np(recon), ref_recon) < 1e-12
    grads = model.grads
    learnable = [k for k in grads if k.startswith("quantizer.")]
    # Norm-wise relative errors, with the largest gradient as a floor: an array whose true
    # gradient is zero up to rounding (e.g. one token on one code) cannot be compared relatively.
    scale = max(np.linalg.norm(g) for g in ref_grads.values())
    for name, g in ref_grads.items():
        if name.startswith("quantizer.") and name not in learnable:
            continue  # an EMA codebook has no gradient (and none is computed)
        err = np.linalg.norm(bk.np(grads[name]) - g) / max(np.linalg.norm(g), 1e-6 * scale, 1e-300)
        assert err < 1e-9, (name, err)
    return grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_whole_model_gradients_match_torch(bk64, rng, name):
    model = _model(name, bk64)
    grads = _check_against_torch(model, bk64, rng.random((N, P)), rng)
    # The codebook gradient is there exactly when the codebook is learnable.
    q = model.quantizer
    layers = q.layers if q.is_stack else [q]
    assert any(k.startswith("quantizer.") for k in grads) == layers[0].codebook_is_learnable
    assert sorted(model.params) == sorted(grads)


def test_negative_control_orthogonal_regulariser_on_the_codebook_before_the_update(rng):
    # The reference above would notice a quantizer that evaluated its regulariser on the
    # codebook it quantized with instead of the one it holds after the EMA step.
    model = _model("orthogonal-ema", _NUMPY64)
    x = rng.random((N, P))
    model.train()
    model.forward(x)
    model.backward()
    codebooks = _codebooks(model)
    recon, indices, _ = model.forward(x)
    drecon = rng.standard_normal(tuple(recon.shape))
    model.backward(0.7, drecon)
    assert np.abs(_codebooks(model)[0] - codebooks[0]).max() > 1e-3  # the EMA step moved the codes
    _, _, stale = _torch_vqvae_grads(model, x, indices, codebooks, 0.7, drecon)
    assert rel_error(model.grads["quantizer.codebook"], stale["quantizer.codebook"]) > 1e-3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 6),
    n_tokens=st.integers(1, 4),
    d=st.integers(2, 5),
    k=st.integers(1, 7),
    hidden=st.integers(1, 8),
    name=st.sampled_from(sorted(CONFIGS)),
    seed=st.integers(0, 2**16),
)
def test_gradients_match_torch_any_shape(n, n_tokens, d, k, hidden, name, seed):
    bk = _NUMPY64
    gen = np.random.default_rng(seed)
    model = _model(name, bk, n_tokens=n_tokens, d=d, k=k, hidden=hidden, in_dim=6, seed=seed)
    x_h = gen.random((n, 6))
    if "rotation" in name:
        # The torch rotation reference divides by the token norms (it has no guards): skip the
        # draws where a dead ReLU layer makes a token exactly zero.  vqref's own behaviour there
        # is covered by test_all_zero_images_give_finite_gradients.
        tokens = np.reshape(model.encoder.forward(x_h), (-1, d))
        assume(np.linalg.norm(tokens, axis=1).min() > 1e-6)
    _check_against_torch(model, bk, x_h, gen)


# --------------------------------------------------------------------------------------------
# Finite differences of the straight-through surrogate, codes held fixed
# --------------------------------------------------------------------------------------------


def _surrogate_problem(bk64, rng):
    """A learnable-codebook model (VQ-VAE paper loss) and its frozen surrogate objective.

    Smaller than the other tests' model (about 130 parameters), as every parameter costs four
    forward passes (two differences, two guards).
    """
    N, P, H, T, D, K = 5, 6, 4, 2, 3, 4
    vq = VectorQuantize(
        D,
        K,
        ema_update=False,
        learnable_codebook=True,
        codebook_weight=0.6,
        commitment_weight=0.3,
        seed=1,
        dtype="float64",
        xp=bk64.module,
    )
    model = VQVAE(vq, in_dim=P, hidden=H, num_tokens=T, rng=2, dtype="float64", xp=bk64.module)
    x = bk64.asarray(rng.random((N, P)))
    xp = bk64.xp
    names = list(model.params)  # encoder.*, decoder.*, quantizer.codebook
    base = [model.params[k] for k in names]

    # The frozen values of the stop-gradient terms, at the base point.
    _, indices, _ = model.reconstruct(x)
    z0 = xp.reshape(model.encoder.forward(x), (N * T, D))  # (N T, d)
    k0 = xp.reshape(indices, (-1,))  # (N T,)
    q0 = xp.take(vq.codebook, k0, axis=0)  # (N T, d)

    def set_params(arrs):
        for k, a in zip(names, arrs):
            model.params[k] = a

    def surrogate(*arrs):
        """mse(dec(z + sg[q - z]), x) + w_cb mse(sg[z], C[k]) + beta mse(z, sg[q]), sg frozen."""
        set_params(arrs)
        z = xp.reshape(model.encoder.forward(x), (N * T, D))
        q = xp.take(model.params["quantizer.codebook"], k0, axis=0)  # the live codebook
        zq = z + (q0 - z0)  # value q0; derivative 1 with respect to z
        recon = model.decoder.forward(xp.reshape(zq, (N, T * D)))
        mse = lambda a, b: xp.sum((a - b) ** 2) / (a.shape[0] * a.shape[1])  # noqa: E731
        return mse(recon, x) + 0.6 * mse(z0, q) + 0.3 * mse(z, q0)

    def codes(*arrs):
        set_params(arrs)
        return model.reconstruct(x)[1]

    def vjp(dout, *arrs):
        set_params(arrs)
        model.train().forward(x)
        model.backward(dout)
        grads = model.grads
        return [grads[k] for k in names]

    return model, base, names, surrogate, codes, vjp, x


def test_surrogate_gradient_finite_differences(bk64, rng):
    model, base, names, surrogate, codes, vjp, _ = _surrogate_problem(bk64, rng)
    res = check_vjp(surrogate, vjp, base, seed=4, guard=codes, rtol=1e-7)
    assert len(res.errors) == len(names) == 9  # 4 encoder, 4 decoder arrays and the codebook
    assert max(res.errors) < 1e-7

    def vjp_broken_chain(dout, *arrs):  # the decoder's input gradient never reaches the encoder
        grads = vjp(dout, *arrs)
        return [g * 0.0 if n.startswith("encoder.") else g for n, g in zip(names, grads)]

    bad = check_vjp(surrogate, vjp_broken_chain, base, seed=4, guard=codes, raise_on_failure=False)
    assert bad.passed is False


def test_surrogate_negative_control_dropped_quantizer_loss(bk64, rng):
    """Backpropagating the reconstruction loss alone (the quantizer's dloss = 0) must fail."""
    model, base, names, surrogate, codes, vjp, x = _surrogate_problem(bk64, rng)

    def vjp_without_vq_loss(dout, *arrs):
        vjp(dout, *arrs)  # sets the parameters
        recon, _, _ = model.train().forward(x)
        # d mse(recon, x) / d recon, passed as an extra direction; the total loss gets 0
        model.backward(0.0, dout * 2.0 * (recon - x) / (x.shape[0] * x.shape[1]))
        return [model.grads[k] for k in names]

    res = check_vjp(surrogate, vjp_without_vq_loss, base, seed=4, guard=codes, raise_on_failure=False)
    assert res.passed is False
    by_name = dict(zip(names, res.errors))
    assert max(v for k, v in by_name.items() if k.startswith("decoder.")) < 1e-7  # decoder is still right
    assert by_name["quantizer.codebook"] > 0.5 and by_name["encoder.0.W"] > 1e-4


# --------------------------------------------------------------------------------------------
# Dtypes and backends
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ema", "learnable", "cosine", "rotation", "residual-shared"])
def test_all_backends_agree_with_float64(bk, rng, name):
    x_h = rng.random((N, P))
    ref = VQVAE(_quantizer(name, D, K), in_dim=P, hidden=H, num_tokens=T, rng=0, dtype="float64")
    model = VQVAE(
        _quantizer(name, D, K, dtype=bk.dtype_name, xp=bk.module),
        in_dim=P,
        hidden=H,
        num_tokens=T,
        rng=0,
        dtype=bk.dtype_name,
        xp=bk.module,
    )
    out_ref = ref.forward(x_h)
    out = model.forward(bk.asarray(x_h))
    np.testing.assert_array_equal(bk.np(out[1]), out_ref[1])  # same codes
    dx_ref = ref.backward(0.8)
    dx = model.backward(0.8)
    for a in (out[0], out[2].total, dx, *model.params.values(), *model.grads.values()):
        assert a.dtype == bk.dtype and B.library_name(a) == bk.name
    assert rel_error(bk.np(out[0]), out_ref[0]) < bk.rtol
    assert abs(float(bk.np(out[2].total)) - float(out_ref[2].total)) <= bk.rtol * float(out_ref[2].total)
    assert rel_error(bk.np(dx), dx_ref) < 10 * bk.rtol
    ref_grads = ref.grads
    for k, g in model.grads.items():
        assert rel_error(bk.np(g), ref_grads[k]) < 10 * bk.rtol, k


# --------------------------------------------------------------------------------------------
# Training, modes, conveniences, degenerate inputs
# --------------------------------------------------------------------------------------------


def _prototype_data(gen, n, p=16, classes=6):
    protos = gen.random((classes, p)) > 0.5
    labels = gen.integers(0, classes, size=n)
    return np.clip(protos[labels] + 0.1 * gen.standard_normal((n, p)), 0, 1)


@pytest.mark.parametrize("name", ["ema", "learnable", "rotation", "residual"])
def test_training_reduces_the_loss(bk, name):
    gen = np.random.default_rng(7)
    data = _prototype_data(gen, 96)
    vq = _quantizer(name, 3, 8, dtype=bk.dtype_name, xp=bk.module)
    model = VQVAE(vq, in_dim=16, hidden=24, num_tokens=2, rng=1, dtype=bk.dtype_name, xp=bk.module)
    opt = Adam(model.params, lr=1e-2)
    x = bk.asarray(data)
    before = float(bk.np(model.reconstruct(x)[2].reconstruction))
    for step in range(60):
        batch = bk.asarray(data[gen.permutation(96)[:32]])
        model.forward(batch)
        model.backward()
        opt.step(model.grads)
    after = float(bk.np(model.reconstruct(x)[2].reconstruction))
    assert np.isfinite(after) and after < 0.5 * before


def test_eval_forward_changes_nothing(rng):
    model = _model("kmeans", _NUMPY64)
    x = rng.random((N, P))
    model.forward(x)  # k-means init and one EMA step
    before = model.state_dict()
    recon, indices, losses = model.reconstruct(x)
    after = model.state_dict()
    assert model.training and sorted(before) == sorted(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    # The evaluation forward overwrote the layers' caches, so the pending backward must refuse.
    with pytest.raises(RuntimeError):
        model.backward()


def test_decode_indices_equals_eval_reconstruction(rng):
    for name in ("ema", "cosine", "residual"):
        model = _model(name, _NUMPY64)
        x = rng.random((N, P))
        model.forward(x)
        recon, indices, _ = model.reconstruct(x)
        assert tuple(indices.shape) == ((N, T, 2) if name == "residual" else (N, T))
        np.testing.assert_allclose(model.decode_indices(indices), recon, rtol=1e-12, atol=1e-14)


def test_params_names_and_optimizer_writes_back(rng):
    model = _model("residual-learnable-rotation", _NUMPY64)
    names = sorted(model.params)
    assert names == sorted(
        [f"encoder.{i}.{p}" for i in (0, 1) for p in "Wb"]
        + [f"decoder.{i}.{p}" for i in (0, 1) for p in "Wb"]
        + ["quantizer.0.codebook", "quantizer.1.codebook"]
    )
    opt = Adam(model.params, lr=0.1)
    old = {k: np.array(v, copy=True) for k, v in model.params.items()}
    model.forward(rng.random((N, P)))
    model.backward()
    opt.step(model.grads)
    for k in names:  # every array moved, inside the layer that owns it
        assert not np.array_equal(old[k], model.params[k]), k
    # the quantizer hands out copies and commits what is assigned back: equal values, not the same array
    np.testing.assert_array_equal(model.quantizer.layers[1].codebook, model.params["quantizer.1.codebook"])
    assert model.quantizer.layers[1].codebook is not model.params["quantizer.1.codebook"]
    np.testing.assert_array_equal(model.encoder.layers[0].params["W"], model.params["encoder.0.W"])


def test_state_dict_round_trip(rng):
    a, b = _model("residual", _NUMPY64, seed=0), _model("residual", _NUMPY64, seed=5)
    x = rng.random((N, P))
    a.forward(x)
    b.load_state_dict(a.state_dict())
    ra, ia, _ = a.reconstruct(x)
    rb, ib, _ = b.reconstruct(x)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ra, rb)
    with pytest.raises(KeyError):
        b.load_state_dict({"nonsense.W": np.zeros(1)})


def test_errors(rng):
    model = _model("ema", _NUMPY64)
    with pytest.raises(RuntimeError):
        model.backward()
    with pytest.raises(ValueError):
        model.forward(rng.random((N, P + 1)))
    with pytest.raises(ValueError):
        VQVAE(VectorQuantize(D, K, seed=0), num_tokens=0, rng=0)
    model.forward(rng.random((N, P)))
    model.backward()
    with pytest.raises(RuntimeError):  # one backward per forward
        model.backward()


@pytest.mark.parametrize("name", ["ema", "cosine", "rotation", "residual-shared", "orthogonal"])
def test_all_zero_images_give_finite_gradients(bk, name):
    """Zero images with zero biases make every token exactly zero: no NaN anywhere."""
    model = _model(name, bk)
    x = bk.asarray(np.zeros((N, P)))
    model.forward(x)
    model.backward()
    recon, indices, losses = model.forward(x)
    dx = model.backward(1.0, bk.asarray(np.ones((N, P))))
    assert B.all_finite(recon) and B.all_finite(dx) and np.isfinite(float(bk.np(losses.total)))
    for k, g in model.grads.items():
        assert B.all_finite(g), k


# --------------------------------------------------------------------------------------------
# FSQ and LFQ behind the adapter (QuantizerAdapter): the VQ interface for quantizers without a
# codebook.  The reference is staged torch autograd: the encoder, the quantizer and the decoder
# are each differentiated by their float64 torch references, chained through numpy arrays.
# --------------------------------------------------------------------------------------------

from vqref import FSQ, LFQ, ResidualFSQ, ResidualLFQ  # noqa: E402
from vqref.nn.vqvae import QuantizerAdapter, adapt_quantizer  # noqa: E402

# name -> a factory (d, dtype, xp) -> quantizer with dim d; sizes distinct from N, P, H, T, D
NO_CODEBOOK = {
    "fsq": lambda d, **kw: FSQ([5, 3], dim=d, seed=11, **kw),  # projections d -> 2 -> d
    "fsq-no-projection": lambda d, **kw: FSQ([5, 3, 4, 6][:d], seed=11, **kw),  # dim = len(levels)
    "lfq": lambda d, **kw: LFQ(dim=d, codebook_size=8, seed=11, **kw),  # projections d -> 3 -> d
    "lfq-no-projection": lambda d, **kw: LFQ(dim=d, codebook_size=2**d, seed=11, **kw),
}


def _no_codebook_model(name: str, bk, *, seed: int = 0):
    q = NO_CODEBOOK[name](D, dtype=bk.dtype_name, xp=bk.module)
    return VQVAE(q, in_dim=P, hidden=H, num_tokens=T, rng=seed, dtype=bk.dtype_name, xp=bk.module)


def _staged_reference(model, x, dloss, drecon):
    """The whole model's loss gradients, stage by stage with the torch references (float64)."""
    from vqref.testing.torch_reference.fsq import fsq_layer_grads
    from vqref.testing.torch_reference.lfq import lfq_grads
    from vqref.testing.torch_reference.nn import mlp_vjp

    q = model.quantizer
    enc, dec = model.encoder.state_dict(), model.decoder.state_dict()
    state = {k: np.asarray(v, dtype=np.float64) for k, v in q.state_dict().items()}
    proj = {
        "W_in": state.get("project_in.W"),
        "b_in": state.get("project_in.b"),
        "W_out": state.get("project_out.W"),
        "b_out": state.get("project_out.b"),
    }
    n, T_, d = x.shape[0], model.num_tokens, model.token_dim
    z, _, _ = mlp_vjp(x, enc, np.zeros((n, T_ * d)))  # (N, T d) the tokens
    rows = z.reshape(n * T_, d)

    def quantize(g):  # (zq, dz, dprojections, aux) for the upstream gradient g of zq
        if isinstance(q, FSQ):
            zq, dz, grads = fsq_layer_grads(rows, q.levels, g, **proj)
            return zq, dz, grads, 0.0
        out = lfq_grads(rows, C=1, d=q.codebook_dim, g=g, daux=dloss, **proj)
        grads = {f"project_{k[3:].lower()}.{k[1]}": v for k, v in out.items() if k.startswith("d") and k != "dx"}
        return out["quantized"], out["dx"], grads, out["aux"]

    zq, _, _, aux = quantize(np.zeros((n * T_, d)))
    recon, _, _ = mlp_vjp(zq.reshape(n, T_ * d), dec, np.zeros((n, P)))
    drec = dloss * 2.0 * (recon - x) / recon.size + drecon  # mse backward plus the extra direction
    _, dzq, dec_grads = mlp_vjp(zq.reshape(n, T_ * d), dec, drec)
    _, dz, q_grads, _ = quantize(dzq.reshape(n * T_, d))
    _, dx, enc_grads = mlp_vjp(x, enc, dz.reshape(n, T_ * d))
    total = float(np.mean((recon - x) ** 2)) + aux
    grads = {f"encoder.{k}": v for k, v in enc_grads.items()}
    grads.update({f"decoder.{k}": v for k, v in dec_grads.items()})
    grads.update({f"quantizer.{k}": v for k, v in q_grads.items()})
    return total, recon, dx, grads


def _check_no_codebook_model(model, x, gen):
    dloss = 0.5 + gen.random()
    recon, indices, losses = model.forward(x)
    drecon = gen.standard_normal(tuple(recon.shape))
    dx = model.backward(dloss, drecon)
    ref_total, ref_recon, ref_dx, ref_grads = _staged_reference(model, x, dloss, drecon)
    assert abs(float(losses.total) - ref_total) <= 1e-10 * abs(ref_total)
    assert rel_error(recon, ref_recon) < 1e-12
    errors = {"dx": rel_error(dx, ref_dx)}
    errors.update({k: rel_error(model.grads[k], g) for k, g in ref_grads.items()})
    assert sorted(model.grads) == sorted(ref_grads) == sorted(model.params)
    return errors


@pytest.mark.parametrize("name", list(NO_CODEBOOK))
def test_fsq_and_lfq_models_match_staged_torch(rng, name):
    model = _no_codebook_model(name, _NUMPY64)
    errors = _check_no_codebook_model(model, rng.random((N, P)), rng)
    assert max(errors.values()) < 1e-9, errors
    has_projections = "no-projection" not in name
    assert any(k.startswith("quantizer.project_in") for k in model.grads) == has_projections


def test_negative_control_lfq_adapter_that_drops_the_aux_gradient(rng, monkeypatch):
    """An adapter that backpropagates the reconstruction only (LFQ's dloss = 0) must fail the check."""
    model = _no_codebook_model("lfq", _NUMPY64)
    monkeypatch.setattr(QuantizerAdapter, "backward", lambda self, dzq, dloss=1.0: self.quantizer.backward(dzq, 0.0))
    errors = _check_no_codebook_model(model, rng.random((N, P)), rng)
    assert errors["quantizer.project_in.W"] > 1e-3 and errors["dx"] > 1e-4
    assert max(v for k, v in errors.items() if k.startswith("decoder.")) < 1e-9  # the decoder is still right


@pytest.mark.parametrize("name", ["fsq", "lfq"])
def test_no_codebook_losses_on_every_backend(bk, rng, name):
    """FSQ's loss is a 0-d zero of the tokens' dtype and library; LFQ's is its aux loss; the
    float32 and array_api_strict models agree with the float64 numpy model."""
    x_h = rng.random((N, P))
    ref, model = _no_codebook_model(name, _NUMPY64), _no_codebook_model(name, bk)
    out_ref, out = ref.forward(x_h), model.forward(bk.asarray(x_h))
    np.testing.assert_array_equal(bk.np(out[1]), out_ref[1])  # same codes
    loss = out[2].quantizer
    assert tuple(loss.shape) == () and loss.dtype == bk.dtype and B.library_name(loss) == bk.name
    if name == "fsq":
        assert float(bk.np(loss)) == 0.0 and float(bk.np(out[2].total)) == float(bk.np(out[2].reconstruction))
    else:
        assert float(bk.np(loss)) != 0.0  # the entropy penalty
    dx_ref, dx = ref.backward(0.8), model.backward(0.8)
    for a in (out[0], out[2].total, dx, *model.grads.values()):
        assert a.dtype == bk.dtype and B.library_name(a) == bk.name
    assert rel_error(bk.np(out[0]), out_ref[0]) < 10 * bk.rtol
    assert rel_error(bk.np(dx), dx_ref) < 100 * bk.rtol
    for k, g in model.grads.items():
        assert rel_error(bk.np(g), ref.grads[k]) < 100 * bk.rtol, k


@pytest.mark.parametrize(
    "quantizer, loss_shape",
    [
        (lambda: FSQ([5, 3], dim=D, seed=1, dtype="float64"), ()),
        (lambda: LFQ(dim=D, codebook_size=8, seed=1, dtype="float64"), ()),
        (lambda: ResidualFSQ(levels=[5, 3], num_quantizers=3, dim=D, seed=1, dtype="float64"), ()),
        (lambda: ResidualLFQ(dim=D, codebook_size=8, num_quantizers=2, seed=1, dtype="float64"), (2,)),
    ],
    ids=["fsq", "lfq", "residual-fsq", "residual-lfq"],
)
def test_adapter_decodes_indices_and_trains(rng, quantizer, loss_shape):
    """decode_indices repeats the evaluation forward; a few Adam steps on prototypes lower the
    reconstruction error (and move the quantizer's projections)."""
    model = VQVAE(quantizer(), in_dim=16, hidden=24, num_tokens=2, rng=1, dtype="float64")
    data = _prototype_data(np.random.default_rng(7), 96)
    recon, indices, losses = model.reconstruct(data)
    assert tuple(losses.per_depth.shape) == loss_shape and tuple(losses.quantizer.shape) == ()
    np.testing.assert_allclose(model.decode_indices(indices), recon, rtol=1e-12, atol=1e-14)
    before = {k: np.array(v, copy=True) for k, v in model.params.items()}
    opt = Adam(model.params, lr=1e-2)
    for _ in range(60):
        model.forward(data[rng.permutation(96)[:32]])
        model.backward()
        opt.step(model.grads)
    after = float(model.reconstruct(data)[2].reconstruction)
    assert np.isfinite(after) and after < 0.7 * float(losses.reconstruction)
    assert all(not np.array_equal(before[k], model.params[k]) for k in before if k.startswith("quantizer."))


def test_adapter_leaves_vector_quantizers_alone_and_refuses_others():
    vq, rvq = VectorQuantize(D, K, seed=0), ResidualVQ(dim=D, codebook_size=K, num_quantizers=2, seed=0)
    assert adapt_quantizer(vq) is vq and adapt_quantizer(rvq) is rvq
    fsq = FSQ([5, 3], dim=D, seed=0)
    wrapped = adapt_quantizer(fsq)
    assert isinstance(wrapped, QuantizerAdapter) and adapt_quantizer(wrapped) is wrapped
    assert wrapped.dim == D and wrapped.codebook_size == 15 and wrapped.params is not None
    with pytest.raises(AttributeError):
        wrapped._state  # noqa: B018 - the wrapped quantizer's private members stay private
    with pytest.raises(TypeError, match="VectorQuantize and ResidualVQ need no adapter"):
        QuantizerAdapter(vq)


def test_state_dict_round_trip_with_projections(rng):
    a, b = _no_codebook_model("fsq", _NUMPY64, seed=0), _no_codebook_model("lfq", _NUMPY64, seed=0)
    c = VQVAE(FSQ([5, 3], dim=D, seed=99, dtype="float64"), in_dim=P, hidden=H, num_tokens=T, rng=5, dtype="float64")
    x = rng.random((N, P))
    c.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.reconstruct(x)[0], c.reconstruct(x)[0])
    with pytest.raises(KeyError):  # LFQ's entries do not fit an FSQ model
        c.load_state_dict(b.state_dict() | {"quantizer.bogus": np.zeros(1)})


def test_per_call_temperature_reaches_the_quantizer(rng):
    """``forward(x, sample_codebook_temp=tau)`` samples as a quantizer built with tau does (same
    seed, same noise); the default temperature samples other codes (the check can fail)."""
    opts = dict(stochastic_sample_codes=True, straight_through=True, ema_update=False, learnable_codebook=True)

    def model(tau):
        vq = VectorQuantize(D, 40, seed=3, dtype="float64", sample_codebook_temp=tau, **opts)
        return VQVAE(vq, in_dim=P, hidden=H, num_tokens=T, rng=0, dtype="float64")

    x = 3.0 * rng.random((60, P))
    per_call = model(1.0).forward(x, sample_codebook_temp=0.05)
    built = model(0.05).forward(x)
    default = model(1.0).forward(x)
    np.testing.assert_array_equal(per_call[1], built[1])
    np.testing.assert_array_equal(per_call[0], built[0])
    assert not np.array_equal(per_call[1], default[1])


def test_per_call_temperature_is_refused_for_fsq_and_changes_nothing(rng):
    model = _no_codebook_model("fsq", _NUMPY64)
    x = rng.random((N, P))
    recon, _, _ = model.forward(x)
    state = model.state_dict()
    with pytest.raises(TypeError, match="samples nothing"):
        model.forward(x, sample_codebook_temp=0.5)
    after = model.state_dict()
    assert all(np.array_equal(state[k], after[k]) for k in state)
    model.backward()  # the earlier forward's pending backward is still there
