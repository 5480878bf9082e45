"""Graders of the exercises on directions: l2 normalisation, cosine similarity, orthogonal
regulariser, rotation trick.

Symbols: N vectors, D features, K codes; ``y = x / ||x||`` a unit row; ``P_y v = v - y (y . v)``
the projection that removes y's direction.

=====  ============================  ==========================================================
ex06   l2norm backward               dx = P_y dy / ||x||, and dy / eps below eps (finite diff.)
ex07   cosine-similarity backward    S = l2(x) l2(C)^T, both sides (finite differences)
ex08   orthogonal regulariser        L = sum G^2 / K^2 - 1/K, G = C^ C^T (finite differences)
ex09   rotation trick                lambda R^T g in O(D) (torch autograd with .detach())
=====  ============================  ==========================================================
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from ... import backend as B
from .engine import Case, Exercise, Mistake, Output, fd_vjp, torch_module

__all__ = ["GEOMETRY_EXERCISES"]


def _unit(x: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Rows divided by ``max(||x||, eps)``, and that divisor (N, 1)."""
    n = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    return x / n, n


def _project(v: np.ndarray, y: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``(v - y (y . v)) / n`` row by row: the l2norm backward for rows longer than eps."""
    return (v - y * np.sum(y * v, axis=-1, keepdims=True)) / n


# ---------------------------------------------------------------- ex06 l2norm backward


def _l2norm_cases(rng):
    cases = []
    for N, D, kind in ((7, 5, "unit-ish"), (11, 3, "spread"), (6, 4, "below eps")):
        x = rng.standard_normal((N, D))
        if kind == "spread":
            x *= 10.0 ** rng.uniform(-1, 1, size=(N, 1))  # norms from 0.1 to 10
        if kind == "below eps":
            # every row shorter than eps = 1e-6 (by at least 1e-7, far more than the difference step),
            # long enough that a wrongly applied projection shows
            x *= rng.uniform(0.2e-6, 0.9e-6, size=(N, 1)) / np.linalg.norm(x, axis=1, keepdims=True)
            x[2] = 0.0
        inputs = {"dy": rng.standard_normal((N, D)), "x": x, "eps": 1e-6}
        cases.append(Case(f"N={N}, D={D}, rows {kind}", inputs, {"N": N, "D": D}))
    return cases


def _l2norm_expected(a):
    eps, x = a["eps"], a["x"]
    forward = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    # the step must stay inside one branch: far below the rows' norms, or below eps minus them
    h = 1e-3 * eps if np.max(np.linalg.norm(x, axis=-1)) < eps else 1e-6
    return tuple(fd_vjp(forward, [x], a["dy"], wrt=[0], h=h))


def _l2norm_mistake(kind: str):
    def answer(a):
        y, n = _unit(a["x"], a["eps"])
        dy = a["dy"]
        if kind == "no projection":
            return (dy / n,)
        if kind == "no division":
            return (dy - y * np.sum(y * dy, axis=-1, keepdims=True),)
        if kind == "wrong axis":
            return ((dy - y * np.sum(y * dy, axis=0)) / n,)
        return (_project(dy, y, n),)  # "projected below eps": the projection applied on every row

    return answer


L2NORM = Exercise(
    key="ex06",
    function="l2norm_backward",
    stem="ex06_l2norm_backward",
    title="l2 normalisation backward",
    oracle="finite differences of x / max(||x||, eps) (float64)",
    outputs=(Output("dx", ("N", "D")),),
    cases=_l2norm_cases,
    expected=_l2norm_expected,
    mistakes=(
        Mistake(
            "the projection is missing: y = x/||x|| cannot change length, so dx = (dy - y (y . dy)) / ||x|| removes "
            "the part of dy along y",
            _l2norm_mistake("no projection"),
        ),
        Mistake("the division by ||x|| is missing: dx = (dy - y (y . dy)) / ||x||", _l2norm_mistake("no division")),
        Mistake(
            "y . dy must be one number per row (a sum over the last axis, keepdims), not a sum over the rows",
            _l2norm_mistake("wrong axis"),
        ),
        Mistake(
            "rows shorter than eps: there the forward is the linear map x / eps, so dx = dy / eps, without the "
            "projection (which belongs to the branch ||x|| >= eps)",
            _l2norm_mistake("projected below eps"),
        ),
    ),
    suspects="the projection, the divisor max(||x||, eps), the branch for rows shorter than eps",
    nonfinite="a row shorter than eps divided by its own norm? the forward divides by max(||x||, eps)",
)


# ---------------------------------------------------------------- ex07 cosine-similarity backward


def _cosine_cases(rng):
    cases = []
    for N, K, D in ((11, 7, 5), (6, 9, 4), (8, 5, 3)):
        inputs = {
            "dsim": rng.standard_normal((N, K)),
            "x": rng.standard_normal((N, D)) * rng.uniform(0.5, 3.0, size=(N, 1)),
            "codebook": rng.standard_normal((K, D)) * rng.uniform(0.5, 3.0, size=(K, 1)),
        }
        cases.append(Case(f"N={N}, K={K}, D={D}", inputs, {"N": N, "K": K, "D": D}))
    return cases


def _cosine_expected(a):
    def sim(x, C):
        return _unit(x)[0] @ _unit(C)[0].T  # (N, K)

    return tuple(fd_vjp(sim, [a["x"], a["codebook"]], a["dsim"], wrt=[0, 1]))


def _cosine_mistake(kind: str):
    def answer(a):
        dS, x, C = a["dsim"], a["x"], a["codebook"]
        xh, nx = _unit(x)
        ch, nc = _unit(C)
        if kind == "no l2 backward":
            return dS @ ch, dS.T @ xh
        if kind == "raw partners":
            return _project(dS @ C, xh, nx), _project(dS.T @ x, ch, nc)
        return (dS @ ch) / nx, (dS.T @ xh) / nc  # "no projection"

    return answer


COSINE = Exercise(
    key="ex07",
    function="cosine_similarity_backward",
    stem="ex07_cosine_similarity_backward",
    title="cosine-similarity lookup backward",
    oracle="finite differences of l2(x) l2(C)^T (float64)",
    outputs=(Output("dx", ("N", "D")), Output("dcodebook", ("K", "D"))),
    cases=_cosine_cases,
    expected=_cosine_expected,
    mistakes=(
        Mistake(
            "these are the gradients of the normalised rows x^ and c^; chain each through the l2norm backward "
            "(dx = (dx^ - x^ (x^ . dx^)) / ||x||, likewise for the codes)",
            _cosine_mistake("no l2 backward"),
        ),
        Mistake(
            "the partner in each product must be the normalised one: dx^ = dS C^ and dc^ = dS^T x^, not the raw C and x",
            _cosine_mistake("raw partners"),
        ),
        Mistake(
            "you divided by the norms but left out the projection: dx = (dx^ - x^ (x^ . dx^)) / ||x||",
            _cosine_mistake("no projection"),
        ),
    ),
    suspects="dx^ = dS C^ (N, D), dc^ = dS^T x^ (K, D), then each through the l2norm backward",
)


# ---------------------------------------------------------------- ex08 orthogonal regulariser


def _orthogonal_cases(rng):
    cases = []
    for K, D in ((7, 5), (4, 6), (9, 3)):
        C = rng.standard_normal((K, D)) * rng.uniform(0.5, 2.0, size=(K, 1))
        inputs = {"dloss": float(rng.uniform(0.3, 2.5)), "codebook": C}
        cases.append(Case(f"K={K}, D={D}", inputs, {"K": K, "D": D}))
    return cases


def _orthogonal_loss(C: np.ndarray) -> np.ndarray:
    ch = _unit(C)[0]
    K = C.shape[0]
    return np.sum((ch @ ch.T) ** 2) / K**2 - 1.0 / K


def _orthogonal_expected(a):
    return tuple(fd_vjp(_orthogonal_loss, [a["codebook"]], a["dloss"], wrt=[0]))


def _orthogonal_mistake(factor: float, *, power: int = 2, dloss: bool = True, chain: str = "l2"):
    def answer(a):
        C = a["codebook"]
        K = C.shape[0]
        ch, n = _unit(C)
        p = factor * (a["dloss"] if dloss else 1.0) * (ch @ ch.T) @ ch / K**power  # (K, D) dL/dC^
        if chain == "l2":
            return (_project(p, ch, n),)
        if chain == "project only":
            return (p - ch * np.sum(ch * p, axis=-1, keepdims=True),)
        return (p,)

    return answer


ORTHOGONAL = Exercise(
    key="ex08",
    function="orthogonal_loss_backward",
    stem="ex08_orthogonal_loss_backward",
    title="orthogonal regulariser gradient",
    oracle="finite differences of sum(G^2)/K^2 - 1/K (float64)",
    outputs=(Output("dcodebook", ("K", "D")),),
    cases=_orthogonal_cases,
    expected=_orthogonal_expected,
    mistakes=(
        Mistake(
            "half the gradient: G = C^ C^T holds C^ twice, so dL/dC^ = 4 G C^ / K^2 (2 from the square, 2 from the "
            "two factors of the product)",
            _orthogonal_mistake(2.0),
        ),
        Mistake(
            "dL/dC^ = 4 G C^ / K^2 is the gradient of the normalised codes; chain it through the l2norm backward "
            "(project out each code's direction, divide by ||c_k||)",
            _orthogonal_mistake(4.0, chain="none"),
        ),
        Mistake(
            "the l2norm backward also divides by ||c_k||: dc_k = (p_k - c^_k (c^_k . p_k)) / ||c_k||",
            _orthogonal_mistake(4.0, chain="project only"),
        ),
        Mistake("the loss divides by K^2 (the number of pairs), not K", _orthogonal_mistake(4.0, power=1)),
        Mistake("the upstream gradient dloss is missing (chain rule)", _orthogonal_mistake(4.0, dloss=False)),
        Mistake("the sign is flipped: the loss grows with the squared similarities", _orthogonal_mistake(-4.0)),
    ),
    suspects="the factor 4/K^2, the l2norm backward of the codes, dloss",
)


# ---------------------------------------------------------------- ex09 rotation trick


def _rotation_cases(rng):
    cases = []
    for N, D in ((7, 5), (9, 3), (6, 8)):
        e = rng.standard_normal((N, D)) * rng.uniform(0.3, 3.0, size=(N, 1))
        q = rng.standard_normal((N, D)) * rng.uniform(0.3, 3.0, size=(N, 1))
        flip = np.sum(_unit(e)[0] * _unit(q)[0], axis=1) < -0.5  # keep angles below 120 degrees
        q[flip] *= -1
        inputs = {"g": rng.standard_normal((N, D)), "e": e, "q": q}
        cases.append(Case(f"N={N}, D={D}", inputs, {"N": N, "D": D}))
    return cases


def _rotation_expected(a):
    from ..torch_reference.rotation import rotation_trick_reference

    torch_module()  # a clear message when torch is missing

    return (rotation_trick_reference(a["e"], a["q"], a["g"]).de,)


def _rotation_mistake(kind: str):
    def answer(a):
        g, e, q = a["g"], a["e"], a["q"]
        eh, ne = _unit(e)
        qh, nq = _unit(q)
        r = _unit(eh + qh)[0]
        rg = np.sum(r * g, axis=1, keepdims=True)
        rt_g = g - 2 * r * rg + 2 * eh * np.sum(qh * g, axis=1, keepdims=True)  # R^T g
        r_g = g - 2 * r * rg + 2 * qh * np.sum(eh * g, axis=1, keepdims=True)  # R g
        lam = nq / ne
        return ({"R": lam * r_g, "no lambda": rt_g, "1/lambda": rt_g / lam, "STE": g}[kind],)

    return answer


def _rotation_memory(fn, xp, dtype_name: str) -> str | None:
    """Fail a backward that builds a D x D matrix: its peak memory must be O(N D)."""
    if B.library_name(xp.asarray([0.0])) not in ("numpy", "array_api_strict"):
        return None  # device memory is not traced
    N, D = 3, 2000
    rng = np.random.default_rng(7)
    args = [B.from_numpy(rng.standard_normal((N, D)), xp, dtype=getattr(xp, dtype_name)) for _ in range(3)]
    limit = 64 * N * D * np.dtype(dtype_name).itemsize  # many (N, D) temporaries; a (D, D) matrix is 10x more
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        fn(*args)
        peak = tracemalloc.get_traced_memory()[1] - base
    except Exception as err:
        return f"the O(D) check (N={N}, D={D}) made {fn.__name__}() raise {type(err).__name__}: {err}"
    finally:
        if started:
            tracemalloc.stop()
    if peak > limit:
        return (
            f"the values are right, but for N={N}, D={D} your backward allocated {peak / 1e6:.1f} MB (O(N D) is "
            f"under {limit / 1e6:.1f} MB): a D x D rotation matrix costs O(D^2). Apply R^T with row dot products "
            "instead: R^T g = g - 2 r (r . g) + 2 e^ (q^ . g)"
        )
    return None


ROTATION = Exercise(
    key="ex09",
    function="rotation_trick_backward",
    stem="ex09_rotation_trick",
    title="rotation trick lambda R^T g in O(D)",
    oracle="torch autograd of the rotation trick with .detach() (float64), and an O(N D) memory check",
    outputs=(Output("de", ("N", "D")),),
    cases=_rotation_cases,
    expected=_rotation_expected,
    mistakes=(
        Mistake(
            "you applied R; the backward of v -> lambda R v is lambda R^T g (swap the roles of e^ and q^ in the "
            "last term: + 2 e^ (q^ . g))",
            _rotation_mistake("R"),
        ),
        Mistake("the scale lambda = ||q|| / ||e|| is missing: de = lambda R^T g", _rotation_mistake("no lambda")),
        Mistake(
            "lambda is inverted: lambda = ||q|| / ||e||, the factor that maps ||e|| to ||q||",
            _rotation_mistake("1/lambda"),
        ),
        Mistake(
            "that is the straight-through estimator (de = g); the rotation trick rotates g: de = lambda R^T g",
            _rotation_mistake("STE"),
        ),
    ),
    suspects="R^T versus R, lambda, r = (e^ + q^) / ||e^ + q^||",
    extra_check=_rotation_memory,
)

GEOMETRY_EXERCISES = (L2NORM, COSINE, ORTHOGONAL, ROTATION)
