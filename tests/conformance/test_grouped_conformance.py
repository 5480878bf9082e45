"""GroupedResidualVQ: vqref against vector-quantize-pytorch, step by step.

Each group's residual stack draws its k-means and dead-code rows from its own generator; the
harness hands vqp's groups the same rows (group by group).  vqp draws one quantize-dropout seed
for all groups (``get_maybe_sync_seed``); the test makes it the seed that gives the depth vqref
draws.  Compared: the output, indices ``(G, ..., Q)``, losses ``(G, Q)``, dx, the gradients of
projections and codebooks, and every group's state.  Indices are compared exactly (these batches
have no near ties).
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch
import vector_quantize_pytorch.residual_vq as vqp_residual
from vector_quantize_pytorch import GroupedResidualVQ as TorchGRVQ

from vqref import backend as B
from vqref.interop import export_state_dict

from .conftest import assert_close, batch, make_pair, vqp_draws_like_vqref
from .test_dropout_conformance import vqp_seed_for

D, G, K, Q = 24, 3, 32, 3
SHAPE = (4, 64, D)

CONFIGS = {
    "ema": lambda: TorchGRVQ(dim=D, groups=G, num_quantizers=Q, codebook_size=K, rotation_trick=False),
    "kmeans, dead codes, projection": lambda: TorchGRVQ(
        dim=D, groups=G, num_quantizers=Q, codebook_size=K, codebook_dim=5, kmeans_init=True, kmeans_iters=3,
        threshold_ema_dead_code=2, rotation_trick=False,
    ),
    "dropout, rotation": lambda: TorchGRVQ(dim=D, groups=2, num_quantizers=4, codebook_size=K, quantize_dropout=True,
                                           rotation_trick=True),
    "learnable, sizes": lambda: TorchGRVQ(dim=D, groups=2, codebook_size=(K, 16, 8), learnable_codebook=True,
                                          ema_update=False, rotation_trick=False),
}  # fmt: skip


def _vqp_name(name: str) -> str:
    """vqp parameter name -> vqref gradient key (``rvqs.1.layers.2._codebook.embed`` -> ``1.2.codebook``)."""
    parts = name.split(".")
    if parts[2].startswith("project_"):
        return f"{parts[1]}.{parts[2]}.{'W' if parts[3] == 'weight' else 'b'}"
    return f"{parts[1]}.{parts[3]}.codebook"


def step(t, r, x, g):
    groups = len(t.rvqs)
    rows = int(np.prod(x.shape[:-1]))
    with contextlib.ExitStack() as stack:
        for gi, rvq in enumerate(t.rvqs):
            view = types.SimpleNamespace(layers=list(r.layers[gi]), is_stack=True, shared_codebook=r.shared_codebook)
            stack.enter_context(vqp_draws_like_vqref(rvq, view, rows))
        if r.quantize_dropout:
            seed = vqp_seed_for(r, x.shape[0])
            stack.enter_context(_patched(vqp_residual, "get_maybe_sync_seed", lambda device, max_size=10_000: seed))
        xt = torch.from_numpy(x.copy()).requires_grad_()
        qt, it, lt = t(xt)
    ((qt * torch.from_numpy(g)).sum() + lt.sum()).backward()
    grads = {}
    for name, p in t.named_parameters():
        value = torch.zeros_like(p) if p.grad is None else p.grad
        value = value.numpy()
        grads[_vqp_name(name)] = value.T if name.endswith("weight") else (value[0] if value.ndim == 3 else value)
        p.grad = None
    q, idx, losses = r(x)
    dx = r.backward(g, np.ones((groups, r.num_quantizers), np.float32))
    np.testing.assert_array_equal(B.to_numpy(idx), it.numpy(), err_msg="indices")
    assert_close(B.to_numpy(q), qt.detach().numpy(), rtol=1e-5, atol_rel=1e-5, what="quantized")
    assert_close(B.to_numpy(losses), lt.detach().numpy(), rtol=2e-5, atol_rel=1e-6, what="losses")
    assert_close(B.to_numpy(dx), xt.grad.numpy(), rtol=1e-4, atol_rel=1e-4, what="dx")
    assert sorted(r.grads) == sorted(grads)
    for key, value in grads.items():
        assert_close(B.to_numpy(r.grads[key]), value, rtol=1e-4, atol_rel=1e-4, what=f"grad {key}")
    mine, theirs = export_state_dict(r), {k: v.numpy() for k, v in t.state_dict().items()}
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        if value.dtype == bool:
            assert bool(mine[key]) == bool(value), key
        else:
            assert_close(mine[key], value, rtol=1e-5, atol_rel=2e-6, what=f"state {key}")
    return B.to_numpy(idx)


@contextlib.contextmanager
def _patched(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_steps_agree(name):
    t, r = make_pair(CONFIGS[name], seed=0)
    assert r.groups == len(t.rvqs) and r.layers[0][0].codebook.shape[-1] == t.rvqs[0].codebook_dim
    rng = np.random.default_rng(1)
    dropped = []
    for _ in range(3):
        x = batch(rng, SHAPE, centres=6 if "kmeans" in name else 0)
        g = (rng.standard_normal(SHAPE) * (2.0 / x.size)).astype(np.float32)
        idx = step(t, r, x, g)
        dropped.append(bool((idx < 0).any()))
        if r.codebook_is_learnable:  # a gradient step on every learnable array, each library with its own
            with torch.no_grad():
                for pname, p in t.named_parameters():
                    p -= 0.5 * torch.as_tensor(r.grads[_vqp_name(pname)].T if pname.endswith("weight") else
                                               r.grads[_vqp_name(pname)]).reshape(p.shape)  # fmt: skip
            for key in list(r.params):
                r.params[key] = r.params[key] - 0.5 * r.grads[key]
    if "dropout" in name:
        assert any(dropped)


def test_decoding_agrees():
    t, r = make_pair(CONFIGS["kmeans, dead codes, projection"], seed=0)
    x = batch(np.random.default_rng(2), SHAPE)
    t.train(), r.train()
    step(t, r, x, np.zeros(SHAPE, np.float32))  # k-means
    t.eval(), r.eval()
    qt, it, _ = t(torch.from_numpy(x))
    q, idx, _ = r(x)
    np.testing.assert_array_equal(B.to_numpy(idx), it.numpy())
    np.testing.assert_allclose(B.to_numpy(r.get_output_from_indices(idx)), t.get_output_from_indices(it).detach().numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(B.to_numpy(r.get_codes_from_indices(idx)), t.get_codes_from_indices(it).detach().numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
