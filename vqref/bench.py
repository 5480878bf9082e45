"""``vqref bench``: every CPU benchmark in one run, against the libraries people would otherwise use.

Each benchmark builds its inputs once (float32, from a seeded generator) and races its
contestants on them in the same process, round-robin: every round runs each contestant in turn,
so a change in the machine's load hits all of them alike.  The table
gives the median time of each contestant and the median of the per-round ratios, with their
spread.

==================  ===========================================================================
``vq-ste``          VectorQuantize training step (forward, backward, EMA), straight-through
                    estimator, against vector-quantize-pytorch (``rotation_trick=False``) on
                    CPU torch and against one bare (N x D)(D x K) numpy matrix product
``vq-cosine``       the same with ``use_cosine_sim``
``vq-rotation``     the same with the rotation trick (vector-quantize-pytorch's default
                    rotation); also raced against vqref's own straight-through step
``vq-learnable``    the same with a learnable codebook (no EMA; codebook gradient)
``rvq``             ResidualVQ training step, 8 depths
``eval``            eval-mode forward of a large batch: time against the matrix product, and
                    peak memory (measured in a subprocess) against the input's size
``kmeans``          Lloyd k-means, 10 iterations from the same initial centres, against
                    scikit-learn ``KMeans`` (lloyd, n_init=1) and FAISS when installed
``scaling``         training-step time over N and over K, with the matrix product beside it
==================  ===========================================================================

Every time is wall-clock (``time.perf_counter``) of a call made right after an untimed call of
the same contestant (the steady state of a training loop; see :func:`_race`).  torch
runs with as many threads as numpy's BLAS (threadpoolctl tells; ``os.cpu_count()`` otherwise).
The floor is ``np.matmul(x, C.T, out=S)`` into a preallocated S: the arithmetic every
nearest-code search must do, without the cost of allocating the (N, K) result.

Usage::

    vqref bench [--quick] [--only NAME[,NAME...]] [--reps R] [--threads T] [--out DIR]

writes ``DIR/bench.json`` and ``DIR/bench.md`` (default ``reports/``) and prints the table.
``--quick`` runs tiny sizes (seconds; the test suite uses it).  Its numbers say nothing about
the targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["BENCHMARKS", "main"]


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

FULL = dict(
    train=dict(N=65536, D=256, K=1024),
    rvq=dict(N=65536, D=256, K=1024, Q=8),
    eval=dict(N=262144, D=256, K=4096),
    kmeans=dict(N=65536, D=64, K=256, iters=10),
    scaling_n=dict(Ns=(4096, 16384, 65536, 262144), K=1024, D=256),
    scaling_k=dict(N=16384, Ks=(256, 1024, 4096, 8192), D=256),
)
QUICK = dict(
    train=dict(N=2048, D=32, K=64),
    rvq=dict(N=2048, D=32, K=64, Q=3),
    eval=dict(N=8192, D=32, K=256),
    kmeans=dict(N=4096, D=16, K=32, iters=10),
    scaling_n=dict(Ns=(512, 1024, 2048), K=64, D=32),
    scaling_k=dict(N=1024, Ks=(32, 64, 128), D=32),
)

# Peak memory allowed on top of the input in the eval forward (the issue's target).
_EVAL_MEMORY_BUDGET = 512 * 2**20


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _race(contestants: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """``reps`` rounds; in each, every contestant runs twice back to back and the second run is timed.

    The untimed run puts the contestant in its steady state, as in a training loop that calls
    it again and again.  Without it, whoever runs right after another library pays for that
    library's memory habits: after a torch step, the next numpy step measured 0.1-0.3 s slower
    (glibc hands the freed pages back and they must be faulted in again).
    """
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(reps):
        for name, fn in contestants.items():
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _summary(ts: list[float]) -> dict:
    return dict(median=statistics.median(ts), min=min(ts), max=max(ts), runs=[round(t, 6) for t in ts])


def _ratio(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num/den (both measured in the same round): median and spread."""
    r = [a / b for a, b in zip(num, den)]
    return dict(median=statistics.median(r), min=min(r), max=max(r))


def _target(text: str, value: float | None, ok: bool | None, shown: str) -> dict:
    return dict(target=text, value=value, met=ok, shown=shown)


def _floor(x: np.ndarray, C: np.ndarray) -> Callable[[], Any]:
    S = np.empty((x.shape[0], C.shape[0]), dtype=x.dtype)  # allocated (and touched) once
    S.fill(0)
    return lambda: np.matmul(x, C.T, out=S)


# --------------------------------------------------------------------------------------------
# Peers (imported lazily; a missing peer is reported as n/a)
# --------------------------------------------------------------------------------------------


def _torch():
    try:
        import torch
        import vector_quantize_pytorch  # noqa: F401
    except Exception:
        return None
    return torch


def _vqp_vq_step(x: np.ndarray, g: np.ndarray, C: np.ndarray | None, options: dict) -> Callable[[], Any] | None:
    torch = _torch()
    if torch is None:
        return None
    from vector_quantize_pytorch import VectorQuantize as TV

    N, D = x.shape
    m = TV(dim=D, codebook_size=options.pop("K"), **options)
    if C is not None:
        with torch.no_grad():
            cb = m._codebook
            cb.embed.copy_(torch.from_numpy(C)[None])
            if hasattr(cb, "embed_avg"):
                cb.embed_avg.copy_(torch.from_numpy(C)[None])
            if hasattr(cb, "initted"):
                cb.initted.fill_(True)
    m.train()
    xt = torch.from_numpy(x)[None].requires_grad_()  # (1, N, D)
    gt = torch.from_numpy(g)[None]

    def step():
        xt.grad = None
        q, _, loss = m(xt)
        torch.autograd.backward([q, loss], [gt, torch.ones_like(loss)])

    return step


def _vqp_rvq_step(x: np.ndarray, g: np.ndarray, K: int, Q: int) -> Callable[[], Any] | None:
    torch = _torch()
    if torch is None:
        return None
    from vector_quantize_pytorch import ResidualVQ as TR

    m = TR(dim=x.shape[1], num_quantizers=Q, codebook_size=K, rotation_trick=False)
    m.train()
    xt = torch.from_numpy(x)[None].requires_grad_()
    gt = torch.from_numpy(g)[None]

    def step():
        xt.grad = None
        q, _, losses = m(xt)
        torch.autograd.backward([q, losses.sum()], [gt, None])

    return step


def _vqref_vq(D: int, K: int, C: np.ndarray | None, options: dict):
    from . import VectorQuantize

    vq = VectorQuantize(D, K, seed=0, **options)
    if C is not None:
        vq.load_state_dict(
            {"codebook": C, "cluster_size": np.ones(K, np.float32), "embed_avg": C.copy(), "initted": np.asarray(True)}
        )
    return vq


def _vqref_step(vq, x: np.ndarray, g: np.ndarray) -> Callable[[], Any]:
    def step():
        vq(x)
        vq.backward(g, 1.0)

    return step


# --------------------------------------------------------------------------------------------
# The benchmarks
# --------------------------------------------------------------------------------------------

_VQ_ROWS = {
    # name: (title, vqref options, vqp options)
    "vq-ste": ("VectorQuantize train step, STE", {}, dict(rotation_trick=False)),
    "vq-cosine": ("VectorQuantize train step, cosine sim", dict(use_cosine_sim=True), dict(use_cosine_sim=True, rotation_trick=False)),
    "vq-rotation": ("VectorQuantize train step, rotation trick", dict(rotation_trick=True), {}),
    "vq-learnable": (
        "VectorQuantize train step, learnable codebook",
        dict(ema_update=False, learnable_codebook=True),
        dict(ema_update=False, learnable_codebook=True, rotation_trick=False),
    ),
}


def _bench_vq(name: str, sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    title, ours, theirs = _VQ_ROWS[name]
    N, D, K = sizes["N"], sizes["D"], sizes["K"]
    x = rng.standard_normal((N, D), dtype=np.float32)
    g = rng.standard_normal((N, D), dtype=np.float32)
    C = x[rng.choice(N, K, replace=False)].copy()  # the same initial codebook on both sides
    if ours.get("use_cosine_sim"):
        C /= np.linalg.norm(C, axis=1, keepdims=True)
    contestants = {"vqref": _vqref_step(_vqref_vq(D, K, C, ours), x, g)}
    if name == "vq-rotation":
        contestants["vqref-ste"] = _vqref_step(_vqref_vq(D, K, C, {}), x, g)
    vqp = _vqp_vq_step(x, g, C, dict(K=K, **theirs))
    if vqp is not None:
        contestants["vqp"] = vqp
    contestants["floor"] = _floor(x, C)
    t = _race(contestants, reps)
    row = dict(
        name=name,
        workload=f"{title}, N={N} D={D} K={K}",
        times={k: _summary(v) for k, v in t.items()},
        ratios={},
        targets=[],
    )
    if "vqp" in t:
        r = _ratio(t["vqp"], t["vqref"])
        row["ratios"]["vqp/vqref"] = r
        row["targets"].append(_target(">= 5x faster than vector-quantize-pytorch", r["median"], r["median"] >= 5, f"{r['median']:.1f}x"))
    else:
        row["targets"].append(_target(">= 5x faster than vector-quantize-pytorch", None, None, "n/a (not installed)"))
    r = _ratio(t["vqref"], t["floor"])
    row["ratios"]["vqref/floor"] = r
    if name == "vq-ste":
        row["targets"].append(_target("<= 2.5x one bare (N x D)(D x K) matmul", r["median"], r["median"] <= 2.5, f"{r['median']:.2f}x"))
    if name == "vq-rotation":
        r = _ratio(t["vqref"], t["vqref-ste"])
        row["ratios"]["vqref/vqref-ste"] = r
        extra = r["median"] - 1
        row["targets"].append(_target("rotation trick adds <= 15% over the STE step", extra, extra <= 0.15, f"+{100 * extra:.0f}%"))
    return row


def _bench_rvq(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    from . import ResidualVQ

    N, D, K, Q = sizes["N"], sizes["D"], sizes["K"], sizes["Q"]
    x = rng.standard_normal((N, D), dtype=np.float32)
    g = rng.standard_normal((N, D), dtype=np.float32)
    rq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0)

    def ours():
        rq(x)
        rq.backward(g, 1.0)

    contestants = {"vqref": ours}
    vqp = _vqp_rvq_step(x, g, K, Q)
    if vqp is not None:
        contestants["vqp"] = vqp
    contestants["floor"] = _floor(x, x[:K])
    t = _race(contestants, max(2, reps // 2))  # the peer takes tens of seconds per step
    row = dict(
        name="rvq",
        workload=f"ResidualVQ train step, {Q} depths, N={N} D={D} K={K}",
        times={k: _summary(v) for k, v in t.items()},
        ratios={"vqref/floor": _ratio(t["vqref"], t["floor"])},
        targets=[],
    )
    if "vqp" in t:
        r = _ratio(t["vqp"], t["vqref"])
        row["ratios"]["vqp/vqref"] = r
        row["targets"].append(_target(">= 5x faster than vector-quantize-pytorch's ResidualVQ", r["median"], r["median"] >= 5, f"{r['median']:.1f}x"))
    else:
        row["targets"].append(_target(">= 5x faster than vector-quantize-pytorch's ResidualVQ", None, None, "n/a (not installed)"))
    return row


_MEMORY_SCRIPT = r"""
import json, sys, tracemalloc
import numpy as np
from vqref import VectorQuantize
N, D, K = (int(a) for a in sys.argv[1:4])
x = np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)
vq = VectorQuantize(D, K, seed=0).eval()
vq(x[:K])  # first-call costs (imports, BLAS buffers) outside the measurement
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
try:  # reset the peak-RSS mark to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
rss_before, hwm_before = status("VmRSS"), status("VmHWM")
tracemalloc.start()
q, idx, loss = vq(x)
_, traced_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print(json.dumps(dict(input=x.nbytes, traced_peak=traced_peak, rss_before=rss_before, hwm_before=hwm_before,
                      hwm_after=status("VmHWM"), hwm_reset=reset)))
"""


def _eval_memory(N: int, D: int, K: int) -> dict | None:
    """Peak memory of one eval forward above what the process held before it (Linux ``/proc``).

    Measured in a fresh interpreter: the growth of the peak resident set (``VmHWM``, reset just
    before the forward) and tracemalloc's peak (numpy reports its buffers to it), the larger of
    the two.  The input is held before and is not counted in the growth.
    """
    if not Path("/proc/self/status").exists():
        return None
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(N), str(D), str(K)],
            capture_output=True, text=True, env=env, timeout=1800, check=True,
        )
        m = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # pragma: no cover - reported, not fatal
        return dict(error=f"{type(e).__name__}: {e}")
    base = m["rss_before"] if m["hwm_reset"] else m["hwm_before"]
    m["rss_peak_extra"] = max(0, m["hwm_after"] - base)
    m["peak_extra"] = max(m["rss_peak_extra"], m["traced_peak"])
    return m


def _bench_eval(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    from . import VectorQuantize

    N, D, K = sizes["N"], sizes["D"], sizes["K"]
    mem = _eval_memory(N, D, K)
    x = rng.standard_normal((N, D), dtype=np.float32)
    vq = VectorQuantize(D, K, seed=0).eval()
    C = np.asarray(vq.codebook)
    t = _race({"vqref": lambda: vq(x), "floor": _floor(x, C)}, max(2, reps // 2))
    r = _ratio(t["vqref"], t["floor"])
    row = dict(
        name="eval",
        workload=f"VectorQuantize eval forward, N={N} D={D} K={K}",
        times={k: _summary(v) for k, v in t.items()},
        ratios={"vqref/floor": r},
        memory=mem,
        targets=[_target("time <= 2x the bare matmul", r["median"], r["median"] <= 2.0, f"{r['median']:.2f}x")],
    )
    mib = 2.0**20
    if mem and "peak_extra" in mem:
        extra = mem["peak_extra"]
        row["targets"].append(
            _target(
                "peak memory <= input + 512 MiB (no N x K matrix)",
                extra / mib,
                extra <= _EVAL_MEMORY_BUDGET,
                f"input {mem['input'] / mib:.0f} MiB + {extra / mib:.0f} MiB (an N x K float32 matrix: {N * K * 4 / mib:.0f} MiB)",
            )
        )
    else:
        row["targets"].append(_target("peak memory <= input + 512 MiB (no N x K matrix)", None, None, "n/a (needs Linux /proc)"))
    return row


def _bench_kmeans(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    from .core.kmeans import kmeans, kmeans_inertia

    N, D, K, T = sizes["N"], sizes["D"], sizes["K"], sizes["iters"]
    # Unclustered data, so that no implementation converges (and stops) before T iterations.
    x = rng.standard_normal((N, D), dtype=np.float32)
    init = x[rng.choice(N, K, replace=False)].copy()
    result: dict[str, Any] = {}

    def ours():
        res = kmeans(x, K, T, init_means=init)
        result["vqref"] = float(kmeans_inertia(x, res.means))  # the objective of the returned means

    contestants: dict[str, Callable[[], Any]] = {"vqref": ours}
    try:
        from sklearn.cluster import KMeans

        def sk():
            km = KMeans(K, init=init, n_init=1, max_iter=T, tol=0.0, algorithm="lloyd").fit(x)
            result["sklearn"] = float(km.inertia_)
            result["sklearn_iters"] = int(km.n_iter_)

        contestants["sklearn"] = sk
    except Exception:
        pass
    try:
        import faiss

        def fs():
            km = faiss.Kmeans(D, K, niter=T, verbose=False, max_points_per_centroid=N, min_points_per_centroid=1)
            km.train(x, init_centroids=init)
            dist, _ = km.index.search(x, 1)
            result["faiss"] = float(dist.sum())

        contestants["faiss"] = fs
    except Exception:
        pass
    contestants["floor"] = _floor(x, init)
    t = _race(contestants, reps)
    row = dict(
        name="kmeans",
        workload=f"k-means (Lloyd), N={N} D={D} K={K}, {T} iterations",
        times={k: _summary(v) for k, v in t.items()},
        ratios={"vqref/floor": _ratio(t["vqref"], t["floor"])},
        inertia={k: v for k, v in result.items()},
        targets=[],
    )
    for peer, limit, text in (("sklearn", 1.0, "<= scikit-learn's time"), ("faiss", 2.0, "<= 2x FAISS")):
        if peer in t:
            r = _ratio(t["vqref"], t[peer])
            row["ratios"][f"vqref/{peer}"] = r
            row["targets"].append(_target(text, r["median"], r["median"] <= limit, f"{r['median']:.2f}x"))
            rel = abs(result["vqref"] - result[peer]) / abs(result[peer])
            shown = f"{rel:.1e} (vqref {result['vqref']:.7g}, {peer} {result[peer]:.7g}"
            shown += f", {result['sklearn_iters']} iterations)" if peer == "sklearn" else ")"
            row["targets"].append(_target(f"same inertia as {peer} to 1e-4 relative", rel, rel <= 1e-4, shown))
        else:
            row["targets"].append(_target(text, None, None, "n/a (not installed)"))
    return row


def _fit(sizes: list[float], times: list[float]) -> dict:
    """Log-log slope end to end, and the affine least-squares fit ``t = a + b s`` (R^2)."""
    slope = math.log(times[-1] / times[0]) / math.log(sizes[-1] / sizes[0])
    s, t = np.asarray(sizes, float), np.asarray(times, float)
    A = np.stack([np.ones_like(s), s], axis=1)
    coef, *_ = np.linalg.lstsq(A, t, rcond=None)
    pred = A @ coef
    r2 = 1 - float(np.sum((t - pred) ** 2)) / max(float(np.sum((t - t.mean()) ** 2)), 1e-300)
    return dict(loglog_slope=slope, affine_intercept=float(coef[0]), affine_slope=float(coef[1]), r2=r2)


def _bench_scaling(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    sn, sk = sizes["scaling_n"], sizes["scaling_k"]
    reps = max(2, reps // 2)
    points = []
    for axis, N, K, D in [("N", n, sn["K"], sn["D"]) for n in sn["Ns"]] + [("K", sk["N"], k, sk["D"]) for k in sk["Ks"]]:
        x = rng.standard_normal((N, D), dtype=np.float32)
        g = rng.standard_normal((N, D), dtype=np.float32)
        C = x[rng.choice(N, K, replace=N < K)].copy()
        t = _race({"vqref": _vqref_step(_vqref_vq(D, K, C, {}), x, g), "floor": _floor(x, C)}, reps)
        points.append(
            dict(axis=axis, N=N, K=K, D=D, vqref=statistics.median(t["vqref"]), floor=statistics.median(t["floor"]),
                 ratio=_ratio(t["vqref"], t["floor"])["median"])
        )
        del x, g, C
    fits = {}
    for axis in ("N", "K"):
        pts = [p for p in points if p["axis"] == axis]
        fits[axis] = _fit([p[axis] for p in pts], [p["vqref"] for p in pts])
    targets = []
    for axis in ("N", "K"):
        f = fits[axis]
        ok = f["loglog_slope"] <= 1.1 and f["r2"] >= 0.98
        targets.append(
            _target(f"time linear in {axis} (log-log slope <= 1.1, affine fit R^2 >= 0.98)", f["loglog_slope"], ok,
                    f"slope {f['loglog_slope']:.2f}, R^2 {f['r2']:.3f}")
        )
    return dict(
        name="scaling",
        workload=f"train step (STE) over N (K={sn['K']}) and over K (N={sk['N']}), D={sn['D']}",
        points=points,
        fits=fits,
        targets=targets,
        times={},
        ratios={},
    )


BENCHMARKS: dict[str, Callable[[dict, int, np.random.Generator], dict]] = {
    "vq-ste": lambda s, r, g: _bench_vq("vq-ste", s["train"], r, g),
    "vq-cosine": lambda s, r, g: _bench_vq("vq-cosine", s["train"], r, g),
    "vq-rotation": lambda s, r, g: _bench_vq("vq-rotation", s["train"], r, g),
    "vq-learnable": lambda s, r, g: _bench_vq("vq-learnable", s["train"], r, g),
    "rvq": lambda s, r, g: _bench_rvq(s["rvq"], r, g),
    "eval": lambda s, r, g: _bench_eval(s["eval"], r, g),
    "kmeans": lambda s, r, g: _bench_kmeans(s["kmeans"], r, g),
    "scaling": lambda s, r, g: _bench_scaling(s, r, g),
}


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def _blas_threads() -> int:
    try:
        from threadpoolctl import threadpool_info

        n = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas" and "numpy" in p.get("filepath", "")]
        if n:
            return int(n[0])
    except Exception:
        pass
    return os.cpu_count() or 1


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        try:
            return str(__import__(module).__version__)
        except Exception:
            return "not installed"


def _machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    blas = []
    try:
        from threadpoolctl import threadpool_info

        for p in threadpool_info():
            blas.append(
                dict(api=p.get("user_api"), impl=p.get("internal_api"), version=p.get("version"), threads=p.get("num_threads"),
                     arch=p.get("architecture"), library=Path(p.get("filepath", "")).name)
            )
    except Exception:
        try:
            cfg = np.show_config(mode="dicts")
            blas.append(dict(api="blas", impl=str(cfg["Build Dependencies"]["blas"].get("name")), version=str(cfg["Build Dependencies"]["blas"].get("version"))))
        except Exception:
            pass
    torch = _torch()
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        threads=threads,
        torch_threads=torch.get_num_threads() if torch is not None else None,
        platform=platform.platform(),
        python=platform.python_version(),
        blas=blas,
        versions={m: _version(m) for m in ("vqref", "numpy", "array-api-compat", "torch", "vector-quantize-pytorch", "scikit-learn", "faiss-cpu")},
    )


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt_t(s: dict | None) -> str:
    if not s:
        return "n/a"
    m = s["median"]
    if m < 1e-3:
        return f"{m * 1e6:.0f} us"
    return f"{m * 1e3:.1f} ms" if m < 1 else f"{m:.2f} s"


def _fmt_r(r: dict | None) -> str:
    return "n/a" if not r else f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def _tables(report: dict) -> tuple[list[str], list[str]]:
    """The main table and the targets, as markdown lines."""
    main = [
        "| benchmark | workload | vqref | peer | peer time | peer / vqref | floor (matmul) | vqref / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if row["name"] == "scaling":
            continue
        times, ratios = row["times"], row["ratios"]
        peers = [p for p in ("vqp", "sklearn", "faiss", "vqref-ste") if p in times]
        if row["name"] == "kmeans":
            peers = [p for p in ("sklearn", "faiss") if p in times] or ["sklearn"]
        if not peers:
            peers = ["-"]
        for i, p in enumerate(peers):
            if p == "-":
                peer_t, pr = "-", "-"
            elif p in ("sklearn", "faiss"):
                peer_t = _fmt_t(times.get(p))
                r = ratios.get(f"vqref/{p}")
                pr = "n/a" if r is None else f"{1 / r['median']:.2f}x ({1 / r['max']:.2f}-{1 / r['min']:.2f})"
            elif p == "vqref-ste":
                peer_t = _fmt_t(times.get(p))
                pr = _fmt_r({k: 1 / v for k, v in zip(("median", "min", "max"), (ratios["vqref/vqref-ste"]["median"], ratios["vqref/vqref-ste"]["max"], ratios["vqref/vqref-ste"]["min"]))})
            else:
                peer_t = _fmt_t(times.get(p))
                pr = _fmt_r(ratios.get(f"{p}/vqref"))
            first = i == 0
            main.append(
                f"| {row['name'] if first else ''} | {row['workload'] if first else ''} | {_fmt_t(times.get('vqref')) if first else ''} "
                f"| {p} | {peer_t} | {pr} | {_fmt_t(times.get('floor')) if first else ''} | {_fmt_r(ratios.get('vqref/floor')) if first else ''} |"
            )
    tgt = ["| benchmark | target | measured | met |", "|---|---|---|---|"]
    for row in report["rows"]:
        for t in row["targets"]:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            tgt.append(f"| {row['name']} | {t['target']} | {t['shown']} | {met} |")
    return main, tgt


def _scaling_lines(report: dict) -> list[str]:
    rows = [r for r in report["rows"] if r["name"] == "scaling"]
    if not rows:
        return []
    out = ["| axis | N | K | D | vqref | floor (matmul) | vqref / floor | vqref ns per N*K |", "|---|---|---|---|---|---|---|---|"]
    for p in rows[0]["points"]:
        out.append(
            f"| {p['axis']} | {p['N']} | {p['K']} | {p['D']} | {_fmt_t(dict(median=p['vqref']))} | {_fmt_t(dict(median=p['floor']))} "
            f"| {p['ratio']:.2f}x | {p['vqref'] / (p['N'] * p['K']) * 1e9:.2f} |"
        )
    for axis, f in rows[0]["fits"].items():
        out.append("")
        out.append(
            f"Over {axis}: log-log slope {f['loglog_slope']:.2f}; affine fit t = {f['affine_intercept'] * 1e3:.1f} ms + "
            f"{f['affine_slope'] * 1e6:.3f} ms per 1000 {axis}, R^2 = {f['r2']:.4f}."
        )
    return out


def _markdown(report: dict) -> str:
    m = report["machine"]
    main, tgt = _tables(report)
    blas = "; ".join(
        f"{b.get('impl')} {b.get('version')} ({b.get('library')}, {b.get('threads')} threads, {b.get('arch')})" for b in m["blas"] if b.get("api") == "blas"
    )
    lines = [
        f"# vqref bench{' (quick: tiny sizes, not the targets)' if report['quick'] else ''}",
        "",
        f"{report['date']}, float32, {m['threads']} threads (numpy BLAS and torch); {report['reps']} rounds per benchmark "
        "(half for rvq, eval and scaling); in each round every contestant runs twice and the second run is timed. "
        "Times are medians; ratios are medians of per-round ratios (range in brackets).",
        f"Load average (1 min) {report['load'][0]:.1f} at the start, {report['load'][1]:.1f} at the end.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); {m['platform']}; Python {m['python']}.  ",
        f"BLAS: {blas or 'unknown'}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        "## Times",
        "",
        *main,
        "",
        "## Targets",
        "",
        *tgt,
    ]
    sc = _scaling_lines(report)
    if sc:
        lines += ["", "## Scaling (train step, STE)", "", *sc]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``vqref bench``: run the benchmarks, print the table, write ``bench.json`` and ``bench.md``."""
    p = argparse.ArgumentParser(prog="vqref bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the harness, not the targets")
    p.add_argument("--only", action="append", default=None, metavar="NAME[,NAME]", help="run only these (" + ", ".join(BENCHMARKS) + ")")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per benchmark (default 5)")
    p.add_argument("--threads", type=int, default=None, help="threads for numpy's BLAS and torch (default: numpy's BLAS setting)")
    p.add_argument("--out", default="reports", help="directory for bench.json and bench.md (default reports/)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for arg in args.only for n in arg.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.reps < 1:
        p.error("--reps must be >= 1")

    limiter = None
    if args.threads is not None:
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(args.threads)
        except Exception:
            print("vqref bench: threadpoolctl is not installed; --threads only sets torch's threads", file=sys.stderr)
    threads = args.threads or _blas_threads()
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)

    sizes = QUICK if args.quick else FULL
    rng = np.random.default_rng(args.seed)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    try:
        for name in names:
            t0 = time.perf_counter()
            print(f"[{name}] ...", flush=True)
            rows.append(BENCHMARKS[name](sizes, args.reps, rng))
            print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    report = dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="vqref bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        quick=args.quick,
        reps=args.reps,
        load=[load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")],
        machine=_machine(threads),
        rows=rows,
    )
    md = _markdown(report)
    print()
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "bench.md").write_text(md)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
