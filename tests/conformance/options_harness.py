"""The conformance harness extended to the structural options (projections, heads, masks, dropout).

:func:`compare_step` of conftest.py compares outputs, indices, losses, dx, codebook gradients and
the codebook state.  With projections the state has entries it does not know (``project_in``,
``project_out``) and the codebooks see ``project_in(x)`` rather than x.  :func:`compare` runs it
on the codebooks (the near-tie check on the rows the codebooks see) and compares the
projections' gradients and state itself.
"""

from __future__ import annotations

import numpy as np
import torch

from vqref import backend as B
from vqref.interop import export_state_dict

from .conftest import (
    Step,
    _batch_without_empty_clusters,
    assert_close,
    capture_assignment_codebooks,
    compare_step,
    grad_key,
    is_shared,
    near_tie_rows,
    resync,
    vqp_draws_like_vqref,
    vqp_is_residual,
)


class _NotTraining:
    """``r`` as compare_step sees it, with its state comparison left to :func:`compare`."""

    def __init__(self, r):
        self._r = r

    def __getattr__(self, name):
        return False if name == "training" else getattr(self._r, name)


def codebook_space(t, x: np.ndarray) -> np.ndarray:
    """The rows the codebooks see (``project_in`` applied, in float64), for the near-tie check."""
    if not t.has_projections:
        return x
    W, b = (p.detach().numpy().astype(np.float64) for p in (t.project_in.weight, t.project_in.bias))
    return x.astype(np.float64) @ W.T + b


def vqp_grads(t) -> dict:
    """vqp's parameter gradients in vqref's names and layouts (``project_in.W`` is the transpose of
    ``project_in.weight``; a codebook's head axis of 1 dropped), consumed (set to None).  A
    parameter no term reached (``grad`` None: a depth a dropout skipped) has the gradient 0, as in vqref."""
    grads = {}
    shared = vqp_is_residual(t) and t.shared_codebook
    for name, p in t.named_parameters():
        g = torch.zeros_like(p).numpy() if p.grad is None else p.grad.numpy().copy()
        if name.startswith("project_"):
            layer, kind = name.split(".")
            grads[f"{layer}.{'W' if kind == 'weight' else 'b'}"] = g.T if kind == "weight" else g
        else:
            grads[grad_key(name, shared)] = g[0]
        p.grad = None
    return grads


def compare(ref, vqp, x: np.ndarray, r, t, *, cosine: bool = False, codebook_grads: bool = True):
    """:func:`compare_step` for a module with projections; x are the input rows ``(N, D)``."""
    ref.grads_all, vqp.grads_all = dict(ref.grads), dict(vqp.grads)
    ref.grads, vqp.grads = dict(ref.grads), dict(vqp.grads)
    names = sorted(k for k in vqp.grads if k.startswith("project_"))
    assert names == sorted(k for k in ref.grads if k.startswith("project_")), "projection gradients"
    for name in names:
        assert_close(ref.grads.pop(name), vqp.grads.pop(name), rtol=1e-4, atol_rel=1e-4, what=f"grad {name}")
    z = codebook_space(t, x)
    report = compare_step(ref, vqp, z, _NotTraining(r), t, cosine=cosine, codebook_grads=codebook_grads)
    if not r.training:
        return report
    first = near_tie_rows(z, vqp.codebooks, ref.indices, vqp.indices, cosine)
    Q = ref.indices.shape[1]
    touched = [np.union1d(ref.indices[first <= l, l], vqp.indices[first <= l, l]) for l in range(Q)]
    mine = export_state_dict(r)
    theirs = {k: v.numpy() for k, v in t.state_dict().items()}
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        if value.dtype == bool:
            assert bool(mine[key]) == bool(value), key
            continue
        if key.startswith("project_"):
            assert_close(mine[key], value, rtol=1e-5, atol_rel=2e-6, what=f"state {key}")
            continue
        level = int(key.split(".")[1]) if key.startswith("layers.") else 0
        codes = np.concatenate(touched) if is_shared(r) else touched[level]
        keep = np.setdiff1d(np.arange(value.shape[1]), codes[codes >= 0])
        assert_close(mine[key][:, keep], value[:, keep], rtol=1e-5, atol_rel=2e-6, what=f"state {key}")
    return report


def option_step(t, r, x: np.ndarray, g: np.ndarray | None, *, mask=None, rows: int | None = None,
                vqp_kwargs: dict | None = None):  # fmt: skip
    """One training step in each library (a backward when ``g`` is given), with an optional mask.

    ``rows``: the rows each codebook draws from (k-means, restarts; default the present tokens);
    ``vqp_kwargs``: more arguments of vqp's forward.

    Returns
    -------
    ref, vqp : Steps of the present tokens (indices ``(n, Q)`` or ``(n, H)``)
    full_ref, full_vqp : (quantized (N, D), indices (N, Q or H), dx (N, D) or None) of every token
    """
    D = x.shape[-1]
    N = int(np.prod(x.shape[:-1]))
    kept = np.ones(N, dtype=bool) if mask is None else mask.reshape(-1)
    n = int(kept.sum()) if rows is None else rows
    xt = torch.from_numpy(x.copy())
    if g is not None:
        xt.requires_grad_()
    kw = dict(vqp_kwargs or {})
    if mask is not None:
        kw["mask"] = torch.from_numpy(mask)
    codebooks, empty = [], []
    with vqp_draws_like_vqref(t, r, n), capture_assignment_codebooks(t, codebooks, empty):
        qt, it, lt = t(xt, **kw)
    layers = list(t.layers) if vqp_is_residual(t) else [t]
    for layer in layers[len(codebooks) :]:  # depths a dropout skipped: no assignment (their indices are -1)
        codebooks.append(layer._codebook.embed.detach()[0].numpy().astype(np.float64))
    grads, dxt = {}, None
    if g is not None:
        ((qt * torch.from_numpy(g)).sum() + lt.sum()).backward()
        grads, dxt = vqp_grads(t), xt.grad.numpy().reshape(N, D)
    q, i, loss = r(x) if mask is None else r(x, mask=mask)
    dx = None
    if g is not None:
        Q = r.num_quantizers if r.is_stack else 1
        dx = B.to_numpy(r.backward(g, np.ones(Q, np.float32)) if r.is_stack else r.backward(g, 1.0)).reshape(N, D)
    it = it.numpy().reshape(N, -1)
    full_t = (qt.detach().numpy().reshape(N, D), it, dxt)
    full_r = (B.to_numpy(q).reshape(N, D), B.to_numpy(i).reshape(N, -1), dx)
    pick = lambda a: None if a is None else a[kept]  # noqa: E731
    vqp = Step(pick(full_t[0]), pick(full_t[1]), np.atleast_1d(lt.detach().numpy()), pick(dxt), grads, codebooks, empty)
    ref = Step(pick(full_r[0]), pick(full_r[1]), np.atleast_1d(B.to_numpy(loss)), pick(dx),
               {k: B.to_numpy(v) for k, v in r.grads.items()} if g is not None else {})  # fmt: skip
    return ref, vqp, full_r, full_t


def run_option_steps(t, r, draw, *, steps: int = 3, mask=None, lr: float | None = None, cosine: bool = False,
                     codebook_grads: bool = True, vqp_kwargs=None):  # fmt: skip
    """``steps`` training steps in both libraries, compared after each (``draw() -> x``; ``mask(x)``
    gives a mask or None; ``vqp_kwargs(r) -> dict`` more arguments of vqp's forward)."""
    rng = np.random.default_rng(7)
    reports = []
    for _ in range(steps):
        x = draw()
        layers = list(r.layers) if r.is_stack else [r]
        if mask is None and vqp_kwargs is None and not all(layer.initted for layer in layers):
            x = _batch_without_empty_clusters(t, r, x, draw)  # the documented k-means difference, avoided
        m = None if mask is None else mask(x)
        n = int(np.prod(x.shape[:-1])) if m is None else int(m.sum())
        g = (rng.standard_normal(x.shape) * (2.0 / (n * x.shape[-1]))).astype(np.float32)
        kw = None if vqp_kwargs is None else vqp_kwargs(r)
        ref, vqp, _, _ = option_step(t, r, x, g, mask=m, vqp_kwargs=kw)
        kept = np.ones(int(np.prod(x.shape[:-1])), dtype=bool) if m is None else m.reshape(-1)
        report = compare(ref, vqp, x.reshape(-1, x.shape[-1])[kept], r, t, cosine=cosine,
                         codebook_grads=codebook_grads)  # fmt: skip
        reports.append(report)
        if lr is not None:
            sgd(r, t, ref, vqp, lr)
        if report.mismatched_rows:
            resync(r, t)
    return reports


def sgd(r, t, ref, vqp, lr: float) -> None:
    """One plain gradient step on every learnable array (projections too), each library with its own."""
    shared = vqp_is_residual(t) and t.shared_codebook
    with torch.no_grad():
        for name, p in t.named_parameters():
            if name.startswith("project_"):
                layer, kind = name.split(".")
                g = vqp.grads_all[f"{layer}.{'W' if kind == 'weight' else 'b'}"]
                p -= lr * torch.from_numpy(g.T if kind == "weight" else g)
            else:
                p -= lr * torch.from_numpy(vqp.grads_all[grad_key(name, shared)])[None]
    for key in list(r.params):
        r.params[key] = r.params[key] - lr * ref.grads_all[key]
