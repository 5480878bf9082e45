"""Graders of the VQ-VAE exercises: lookup, losses, straight-through estimator, EMA step.

Symbols: N vectors, D features, K codes; M = N * D; g an upstream gradient; sg[.] stop-gradient.

=====  ============================  ==========================================================
ex01   lookup backward               dC = E^T dq, a segment sum (finite differences)
ex02   commitment loss backward      d/dx of mse(x, sg[q]) (finite differences)
ex03   codebook + commitment losses  where each stop-gradient sends the gradient (torch autograd)
ex04   straight-through estimator    z + sg[C[k] - z] (torch autograd)
ex05   one EMA step                  Laplace-smoothed EMA codebook update (an explicit loop)
=====  ============================  ==========================================================

Each oracle is written here, independently of the solutions and of vqref's ops; each known
mistake is written as the wrong formula a learner would use.
"""

from __future__ import annotations

import numpy as np

from .engine import Case, Exercise, Mistake, Output, fd_vjp, segment_sum, torch_module

__all__ = ["VQ_EXERCISES"]


def _indices(rng: np.random.Generator, N: int, K: int) -> np.ndarray:
    """N codes with repeats (N > K) and exactly one unused code, so both matter to a grader."""
    labels = rng.permutation(K)
    idx = labels[rng.integers(0, K - 1, size=N)]
    idx[: K - 1] = labels[: K - 1]  # every code but the last label is used at least once
    return rng.permutation(idx).astype(np.int64)


def _sizes_label(**sizes: int) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


# ---------------------------------------------------------------- ex01 lookup backward


def _lookup_cases(rng):
    cases = []
    for N, K, D in ((11, 7, 5), (13, 6, 4), (9, 5, 8)):
        inputs = {"dq": rng.standard_normal((N, D)), "indices": _indices(rng, N, K), "num_codes": K}
        cases.append(Case(_sizes_label(N=N, K=K, D=D), inputs, {"N": N, "K": K, "D": D}))
    return cases


def _lookup_expected(a):
    K, D = a["num_codes"], a["dq"].shape[1]
    C = np.random.default_rng(1).standard_normal((K, D))  # any point: the lookup is linear in C
    return tuple(fd_vjp(lambda C: C[a["indices"]], [C], a["dq"], wrt=[0]))


def _lookup_overwrite(a):
    out = np.zeros((a["num_codes"], a["dq"].shape[1]))
    out[a["indices"]] += a["dq"]  # numpy applies the update once per distinct index
    return (out,)


def _lookup_mean(a):
    counts = np.bincount(a["indices"], minlength=a["num_codes"]).astype(np.float64)
    return (segment_sum(a["dq"], a["indices"], a["num_codes"]) / np.maximum(counts, 1)[:, None],)


LOOKUP = Exercise(
    key="ex01",
    function="lookup_backward",
    stem="ex01_lookup_backward",
    title="lookup backward (segment sum)",
    oracle="finite differences of q = C[k] (float64)",
    outputs=(Output("dcodebook", ("K", "D")),),
    cases=_lookup_cases,
    expected=_lookup_expected,
    mistakes=(
        Mistake(
            "codes chosen by several rows received one row's gradient instead of the sum: `dC[k] += dq` "
            "applies the update once per distinct index (numpy keeps one of the repeats). Add every row into "
            "its code: np.add.at(dC, k, dq), or the one-hot product one_hot(k, K).T @ dq",
            _lookup_overwrite,
        ),
        Mistake(
            "you averaged the rows that chose each code; the adjoint of a gather sums them (no division by the count)",
            _lookup_mean,
        ),
        Mistake("the sign is flipped: the lookup is linear with coefficient +1", lambda a: (-_lookup_expected(a)[0],)),
    ),
    suspects="a missing sum over repeated indices, rows scattered to the wrong codes, codes left non-zero "
    "although no row chose them",
)


# ---------------------------------------------------------------- ex02 commitment loss backward


def _loss_cases(rng, with_beta: bool = False):
    cases = []
    for N, D in ((11, 5), (7, 9), (6, 4)):
        inputs = {"dloss": float(rng.uniform(0.3, 2.5)), "x": rng.standard_normal((N, D))}
        inputs["q"] = inputs["x"] + 0.7 * rng.standard_normal((N, D))
        if with_beta:
            inputs["beta"] = float(rng.uniform(0.1, 0.6))
        cases.append(Case(_sizes_label(N=N, D=D), inputs, {"N": N, "D": D}))
    return cases


def _commitment_expected(a):
    mse = lambda x: np.mean((x - a["q"]) ** 2)
    return tuple(fd_vjp(mse, [a["x"]], a["dloss"], wrt=[0]))


def _scaled(factor_fn):
    """A mistake ``dx = factor(a) * (x - q)``."""
    return lambda a: (factor_fn(a) * (a["x"] - a["q"]),)


_M = lambda a: a["x"].size  # noqa: E731  the number of averaged elements

COMMITMENT = Exercise(
    key="ex02",
    function="commitment_loss_backward",
    stem="ex02_commitment_loss_backward",
    title="commitment loss backward",
    oracle="finite differences of mean((x - q)^2) (float64)",
    outputs=(Output("dx", ("N", "D")),),
    cases=_loss_cases,
    expected=_commitment_expected,
    mistakes=(
        Mistake(
            "the sign is flipped: d/dx (x - q)^2 = 2 (x - q), not 2 (q - x)", _scaled(lambda a: -2 * a["dloss"] / _M(a))
        ),
        Mistake("the factor 2 of the square's derivative is missing", _scaled(lambda a: a["dloss"] / _M(a))),
        Mistake(
            "you divided by N; the loss is a mean over all N * D elements, so divide by M = N * D",
            _scaled(lambda a: 2 * a["dloss"] / a["x"].shape[0]),
        ),
        Mistake(
            "you divided by D; the loss is a mean over all N * D elements, so divide by M = N * D",
            _scaled(lambda a: 2 * a["dloss"] / a["x"].shape[1]),
        ),
        Mistake("the 1/M of the mean is missing (M = N * D elements)", _scaled(lambda a: 2 * a["dloss"])),
        Mistake(
            "the upstream gradient dloss is missing: multiply the local derivative by it (chain rule)",
            _scaled(lambda a: 2.0 / _M(a)),
        ),
    ),
    suspects="the factor 2/M, the sign, the upstream dloss",
)


# ---------------------------------------------------------------- ex03 codebook and commitment losses


def _vq_loss_expected(a):
    torch = torch_module()
    F = torch.nn.functional
    x = torch.tensor(a["x"], requires_grad=True)
    q = torch.tensor(a["q"], requires_grad=True)
    loss = F.mse_loss(x.detach(), q) + a["beta"] * F.mse_loss(x, q.detach())
    (a["dloss"] * loss).backward()
    return x.grad.numpy(), q.grad.numpy()


def _vq_loss(wx: str, wq: str, sign_q: float = 1.0):
    """A mistake with ``dx = w_x (2 dloss / M)(x - q)`` and ``dq = sign w_q (2 dloss / M)(q - x)``;
    a weight is "1", "beta" or "1+beta"."""
    weight = {"1": lambda b: 1.0, "beta": lambda b: b, "1+beta": lambda b: 1.0 + b}

    def answer(a):
        f, d = 2 * a["dloss"] / _M(a), a["x"] - a["q"]
        return weight[wx](a["beta"]) * f * d, -sign_q * weight[wq](a["beta"]) * f * d

    return answer


CODEBOOK_LOSS = Exercise(
    key="ex03",
    function="codebook_loss_backward",
    stem="ex03_codebook_loss_backward",
    title="codebook and commitment losses with stop-gradients",
    oracle="torch autograd with .detach() (float64)",
    outputs=(Output("dx", ("N", "D")), Output("dq", ("N", "D"))),
    cases=lambda rng: _loss_cases(rng, with_beta=True),
    expected=_vq_loss_expected,
    mistakes=(
        Mistake(
            "x also received the codebook term's gradient: in mse(sg[x], q) the stop-gradient blocks x, so only "
            "beta * mse(x, sg[q]) reaches x (dx = beta (2/M) dloss (x - q))",
            _vq_loss("1+beta", "1"),
        ),
        Mistake(
            "q also received the commitment term's gradient: in beta * mse(x, sg[q]) the stop-gradient blocks q, so "
            "only mse(sg[x], q) reaches q (dq = (2/M) dloss (q - x))",
            _vq_loss("beta", "1+beta"),
        ),
        Mistake(
            "both gradients went through the stop-gradients (each side got both terms); sg[.] is the identity "
            "forward and has zero Jacobian backward",
            _vq_loss("1+beta", "1+beta"),
        ),
        Mistake(
            "beta sits on the wrong term: it weights the commitment loss mse(x, sg[q]), whose gradient goes to x",
            _vq_loss("1", "beta"),
        ),
        Mistake("beta is missing from dx: the commitment term is beta * mse(x, sg[q])", _vq_loss("1", "1")),
        Mistake("dq has the wrong sign: d/dq (x - q)^2 = 2 (q - x)", _vq_loss("beta", "1", sign_q=-1.0)),
    ),
    suspects="which term reaches which side through the stop-gradients, the factor 2/M, beta, dloss",
)


# ---------------------------------------------------------------- ex04 straight-through estimator


def _ste_cases(rng):
    cases = []
    for N, K, D in ((11, 7, 5), (9, 4, 6), (13, 5, 3)):
        inputs = {
            "dz_q": rng.standard_normal((N, D)),
            "z": rng.standard_normal((N, D)),
            "codebook": rng.standard_normal((K, D)),
            "indices": _indices(rng, N, K),
        }
        cases.append(Case(_sizes_label(N=N, K=K, D=D), inputs, {"N": N, "K": K, "D": D}))
    return cases


def _ste_expected(a):
    torch = torch_module()
    z = torch.tensor(a["z"], requires_grad=True)
    C = torch.tensor(a["codebook"], requires_grad=True)
    q = C[torch.as_tensor(a["indices"])]
    z_q = z + (q - z).detach()
    (z_q * torch.tensor(a["dz_q"])).sum().backward()
    dC = C.grad if C.grad is not None else torch.zeros_like(C)
    return z.grad.numpy(), dC.numpy()


def _ste(dz_sign: float, to_codebook: bool):
    def answer(a):
        g, K = a["dz_q"], a["codebook"].shape[0]
        dC = segment_sum(g, a["indices"], K) if to_codebook else np.zeros((K, g.shape[1]))
        return dz_sign * g, dC

    return answer


STRAIGHT_THROUGH = Exercise(
    key="ex04",
    function="straight_through_backward",
    stem="ex04_straight_through",
    title="straight-through estimator",
    oracle="torch autograd of z + (C[k] - z).detach() (float64)",
    outputs=(Output("dz", ("N", "D")), Output("dcodebook", ("K", "D"))),
    cases=_ste_cases,
    expected=_ste_expected,
    mistakes=(
        Mistake(
            "the codebook received the decoder's gradient through the stop-gradient: in z + sg[C[k] - z] the code "
            "sits inside sg[.], so dcodebook = 0 here (codes learn from the codebook loss or the EMA update)",
            _ste(1.0, True),
        ),
        Mistake(
            "this is the derivative of q = C[k] itself (gradient to the codebook, none to z); the estimator "
            "z + sg[q - z] has Jacobian I with respect to z: dz = dz_q, dcodebook = 0",
            _ste(0.0, True),
        ),
        Mistake(
            "both gradients are zero: that is the true derivative of a piecewise-constant quantizer (zero almost "
            "everywhere), the reason for the estimator; the straight-through estimator copies dz_q to z",
            _ste(0.0, False),
        ),
        Mistake("dz has the wrong sign: z + sg[q - z] has Jacobian +I with respect to z", _ste(-1.0, False)),
    ),
    suspects="what the stop-gradient blocks, what the identity Jacobian passes through",
)


# ---------------------------------------------------------------- ex05 one EMA step with Laplace smoothing


def _ema_cases(rng):
    cases = []
    for K, D, N in ((7, 5, 11), (6, 3, 13), (4, 6, 9)):
        idx = _indices(rng, N, K)
        cluster_size = rng.uniform(0.2, 3.0, size=K)
        cluster_size[np.setdiff1d(np.arange(K), idx)] = 0.01  # the unused code is nearly dead
        inputs = {
            "cluster_size": cluster_size,
            "embed_avg": rng.standard_normal((K, D)) * cluster_size[:, None],
            "x": rng.standard_normal((N, D)),
            "indices": idx,
            "decay": float(rng.uniform(0.6, 0.95)),
            "eps": float(rng.uniform(0.05, 0.5)),  # large, so that the smoothing is visible
        }
        cases.append(Case(_sizes_label(N=N, K=K, D=D), inputs, {"N": N, "K": K, "D": D}))
    return cases


def _ema(a, *, swap=False, smoothing="laplace", distinct=False, stale=False):
    """The EMA step as a loop over the rows; the keyword arguments make the known mistakes."""
    K, D = a["embed_avg"].shape
    x, idx, gamma, eps = a["x"], a["indices"], a["decay"], a["eps"]
    counts, sums = np.zeros(K), np.zeros((K, D))
    if distinct:  # counts[k] += 1 with fancy indexing: each repeated code counted once
        counts[idx] += 1
        sums[idx] += x
    else:
        for i in range(x.shape[0]):
            counts[idx[i]] += 1
            sums[idx[i]] += x[i]
    old, new = (1 - gamma, gamma) if swap else (gamma, 1 - gamma)
    size = old * a["cluster_size"] + new * counts  # (K,)
    avg = old * a["embed_avg"] + new * sums  # (K, D)
    src_size, src_avg = (a["cluster_size"], a["embed_avg"]) if stale else (size, avg)
    n = src_size.sum()
    smoothed = {
        "laplace": (src_size + eps) / (n + K * eps) * n,
        "none": src_size,
        "unscaled": (src_size + eps) / (n + K * eps),
        "no_K": (src_size + eps) / (n + eps) * n,
    }[smoothing]
    return size, avg, src_avg / smoothed[:, None]


EMA_STEP = Exercise(
    key="ex05",
    function="ema_step",
    stem="ex05_ema_step",
    title="one EMA codebook step with Laplace smoothing",
    oracle="an explicit loop over the rows (float64)",
    outputs=(Output("cluster_size", ("K",)), Output("embed_avg", ("K", "D")), Output("codebook", ("K", "D"))),
    cases=_ema_cases,
    expected=_ema,
    mistakes=(
        Mistake(
            "the decay weights the wrong side: gamma multiplies the *old* statistics, N <- gamma N + (1 - gamma) n",
            lambda a: _ema(a, swap=True),
        ),
        Mistake(
            "repeated indices were counted once: `counts[k] += 1` and `sums[k] += x` apply once per distinct "
            "index; add every row (np.add.at, or one-hot sums)",
            lambda a: _ema(a, distinct=True),
        ),
        Mistake(
            "the codebook divides by the raw counts: use the Laplace-smoothed N~_k = (N_k + eps) / (n + K eps) * n",
            lambda a: _ema(a, smoothing="none"),
        ),
        Mistake(
            "the smoothed counts were not scaled back: (N_k + eps) / (n + K eps) sums to 1; multiply by n = sum_k N_k",
            lambda a: _ema(a, smoothing="unscaled"),
        ),
        Mistake(
            "the smoothing's denominator needs K eps (every one of the K codes gets eps): n + K eps",
            lambda a: _ema(a, smoothing="no_K"),
        ),
        Mistake(
            "the codebook was computed from the old statistics; update N and m first, then c_k = m_k / N~_k",
            lambda a: _ema(a, stale=True),
        ),
    ),
    suspects="the batch counts and sums, the decay's two sides, the Laplace smoothing, the order of the steps",
)

VQ_EXERCISES = (LOOKUP, COMMITMENT, CODEBOOK_LOSS, STRAIGHT_THROUGH, EMA_STEP)
