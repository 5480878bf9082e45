"""Graders of the exercises on soft assignments: LFQ's entropy penalty, straight-through Gumbel-softmax.

Symbols: n rows, K codes, D features; tau a temperature (or inverse temperature); p = softmax rows.

=====  ============================  ==========================================================
ex13   LFQ entropy penalty           H_sample - gamma H_batch of softmax(tau s) (torch autograd)
ex14   straight-through Gumbel       onehot + soft - sg[soft], then times C (torch, .detach())
=====  ============================  ==========================================================

Both oracles are written the way vector-quantize-pytorch writes the forward (its ``entropy`` with
the logarithm clamped at 1e-5, its ``gumbel_sample`` with ``straight_through=True``).
"""

from __future__ import annotations

import numpy as np

from .engine import Case, Exercise, Mistake, Output, segment_sum, torch_module

__all__ = ["SOFT_EXERCISES"]

ENTROPY_EPS = 1e-5  # vector-quantize-pytorch's clamp inside the entropy's logarithm


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_vjp(dp: np.ndarray, p: np.ndarray, *, project: bool = True) -> np.ndarray:
    """``p * (dp - <p, dp>)`` row by row (without the ``<p, dp>`` term when ``project`` is False)."""
    return p * (dp - np.sum(p * dp, axis=-1, keepdims=True)) if project else p * dp


# ---------------------------------------------------------------- ex13 LFQ entropy penalty


def _entropy_cases(rng):
    cases = []
    for n, K in ((11, 8), (9, 16), (13, 4)):
        inputs = {
            "dloss": float(rng.uniform(0.3, 2.0)),
            "scores": 2.0 * rng.standard_normal((n, K)),
            "inv_temperature": float(rng.uniform(0.5, 3.0)),
            "diversity_gamma": float(rng.uniform(0.5, 1.5)),
        }
        cases.append(Case(f"n={n}, K={K}", inputs, {"n": n, "K": K}))
    return cases


def _entropy_expected(a):
    torch = torch_module()
    s = torch.tensor(a["scores"], requires_grad=True)
    p = (s * a["inv_temperature"]).softmax(dim=-1)
    entropy = lambda q: -(q * q.clamp(min=ENTROPY_EPS).log()).sum(dim=-1)  # noqa: E731
    loss = entropy(p).mean() - a["diversity_gamma"] * entropy(p.mean(dim=0))
    (a["dloss"] * loss).backward()
    return (s.grad.numpy(),)


def _entropy(a, *, gamma_sign=1.0, gamma=True, tau=True, project=True, sample_mean=True, batch_mean=True):
    """dscores written out; the keyword arguments make the known mistakes."""
    s, t, g = a["scores"], a["inv_temperature"], a["diversity_gamma"] if gamma else 1.0
    n = s.shape[0]
    p = _softmax(t * s)  # (n, K)
    pbar = p.mean(axis=0)  # (K,)
    dlog = lambda q: -np.log(np.maximum(q, ENTROPY_EPS)) - (q >= ENTROPY_EPS)  # noqa: E731  d/dq of -q log max(q, eps)
    dp = a["dloss"] / (n if sample_mean else 1) * dlog(p)  # (n, K) the per-sample term
    dp = dp + (-gamma_sign * g * a["dloss"]) * dlog(pbar) / (n if batch_mean else 1)  # (n, K) the batch term
    return ((t if tau else 1.0) * _softmax_vjp(dp, p, project=project),)


ENTROPY = Exercise(
    key="ex13",
    function="entropy_penalty_backward",
    stem="ex13_lfq_entropy",
    title="LFQ entropy penalty backward",
    oracle="torch autograd of the clamped-entropy penalty (float64)",
    outputs=(Output("dscores", ("n", "K")),),
    cases=_entropy_cases,
    expected=_entropy_expected,
    mistakes=(
        Mistake(
            "the batch entropy has the wrong sign: the penalty *subtracts* gamma H_batch (a batch that uses many "
            "codes is rewarded)",
            lambda a: _entropy(a, gamma_sign=-1.0),
        ),
        Mistake("the diversity weight gamma is missing from the batch term", lambda a: _entropy(a, gamma=False)),
        Mistake(
            "the softmax's inverse temperature is missing: p = softmax(tau s), so ds = tau p * (dp - <p, dp>)",
            lambda a: _entropy(a, tau=False),
        ),
        Mistake(
            "the softmax backward lacks the - <p, dp> term: ds = tau p * (dp - <p, dp>), one <p, dp> per row "
            "(a row of ds sums to zero)",
            lambda a: _entropy(a, project=False),
        ),
        Mistake(
            "H_sample is the *mean* of the n rows' entropies: each row's entropy gets dloss / n",
            lambda a: _entropy(a, sample_mean=False),
        ),
        Mistake(
            "pbar is the mean of the n rows, so each row receives 1/n of dL/dpbar",
            lambda a: _entropy(a, batch_mean=False),
        ),
    ),
    suspects="the two entropy terms and their weights, the derivative of -p log max(p, eps), the softmax backward",
)


# ---------------------------------------------------------------- ex14 straight-through Gumbel-softmax


def _gumbel_cases(rng):
    cases = []
    for N, K, D in ((11, 7, 5), (9, 4, 6), (13, 5, 3)):
        logits = 2.0 * rng.standard_normal((N, K))
        tau = float(rng.uniform(0.5, 2.0))
        noise = -np.log(-np.log(rng.uniform(1e-12, 1.0, size=(N, K))))  # Gumbel(0, 1)
        inputs = {
            "dout": rng.standard_normal((N, D)),
            "logits": logits,
            "codebook": rng.standard_normal((K, D)),
            "indices": np.argmax(logits / tau + noise, axis=1).astype(np.int64),  # a Gumbel-max sample
            "temperature": tau,
        }
        cases.append(Case(f"N={N}, K={K}, D={D}", inputs, {"N": N, "K": K, "D": D}))
    return cases


def _gumbel_expected(a):
    torch = torch_module()
    logits = torch.tensor(a["logits"], requires_grad=True)
    C = torch.tensor(a["codebook"], requires_grad=True)
    K = a["logits"].shape[1]
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(a["indices"]), K).to(torch.float64)
    soft = (logits / a["temperature"]).softmax(dim=-1)
    z = one_hot + soft - soft.detach()  # value: the one-hot; gradient: the soft sample's
    (z @ C * torch.tensor(a["dout"])).sum().backward()
    return logits.grad.numpy(), C.grad.numpy()


def _gumbel(a, *, soft_codebook=False, tau=True, project=True, zero_logits=False):
    """(dlogits, dcodebook) written out; the keyword arguments make the known mistakes."""
    g, C, k, t = a["dout"], a["codebook"], a["indices"], a["temperature"]
    soft = _softmax(a["logits"] / t)  # (N, K)
    dz = g @ C.T  # (N, K) the gradient of z = the one-hot's, handed to the soft sample
    dlogits = _softmax_vjp(dz, soft, project=project) / (t if tau else 1.0)
    dC = soft.T @ g if soft_codebook else segment_sum(g, k, C.shape[0])  # (K, D)
    return (np.zeros_like(dlogits) if zero_logits else dlogits), dC


GUMBEL = Exercise(
    key="ex14",
    function="straight_through_gumbel_backward",
    stem="ex14_gumbel_softmax",
    title="straight-through Gumbel-softmax backward",
    oracle="torch autograd of one_hot + soft - soft.detach() (float64)",
    outputs=(Output("dlogits", ("N", "K")), Output("dcodebook", ("K", "D"))),
    cases=_gumbel_cases,
    expected=_gumbel_expected,
    mistakes=(
        Mistake(
            "dcodebook used the soft weights: the value of z is the one-hot, so z^T dout sends each row's gradient "
            "to its sampled code only (a segment sum)",
            lambda a: _gumbel(a, soft_codebook=True),
        ),
        Mistake(
            "the logits got no gradient: that is the true derivative of the sampled one-hot; the estimator hands "
            "dz = dout C^T to the soft sample softmax(logits / tau) instead",
            lambda a: _gumbel(a, zero_logits=True),
        ),
        Mistake(
            "the 1/tau is missing: soft = softmax(logits / tau), so dlogits = soft * (dz - <soft, dz>) / tau",
            lambda a: _gumbel(a, tau=False),
        ),
        Mistake(
            "the softmax backward lacks the - <soft, dz> term (one per row; a row of dlogits sums to zero)",
            lambda a: _gumbel(a, project=False),
        ),
        Mistake(
            "codes sampled by several rows received one row's gradient: `dC[k] += dout` applies the update once "
            "per distinct index; use a segment sum (np.add.at or one_hot(k).T @ dout)",
            lambda a: (_gumbel(a)[0], _overwrite(a["dout"], a["indices"], a["codebook"].shape[0])),
        ),
    ),
    suspects="which of one-hot and soft sample each gradient uses, 1/tau, the softmax backward",
)


def _overwrite(g: np.ndarray, k: np.ndarray, K: int) -> np.ndarray:
    out = np.zeros((K, g.shape[1]))
    out[k] += g
    return out


SOFT_EXERCISES = (ENTROPY, GUMBEL)
