"""Measuring: the round-robin race, its summaries, the matmul floor, and the machine's description.

Used by :mod:`benchmarks.bench`; nothing here knows about a particular benchmark.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["blas_threads", "fit", "floor", "machine", "peer_torch", "race", "ratio", "summary", "target", "version"]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def race(contestants: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
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


def summary(ts: list[float]) -> dict:
    """Median, min, max and every run of one contestant's times (seconds)."""
    return dict(median=statistics.median(ts), min=min(ts), max=max(ts), runs=[round(t, 6) for t in ts])


def ratio(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num/den (both measured in the same round): median and spread."""
    r = [a / b for a, b in zip(num, den)]
    return dict(median=statistics.median(r), min=min(r), max=max(r))


def target(text: str, value: float | None, ok: bool | None, shown: str) -> dict:
    """One line of the targets table; ``ok`` is None when the target could not be measured."""
    return dict(target=text, value=value, met=ok, shown=shown)


def floor(x: np.ndarray, C: np.ndarray) -> Callable[[], Any]:
    """The floor contestant: ``x @ C.T`` into a preallocated ``(N, K)`` result."""
    S = np.empty((x.shape[0], C.shape[0]), dtype=x.dtype)  # allocated (and touched) once
    S.fill(0)
    return lambda: np.matmul(x, C.T, out=S)


def fit(sizes: list[float], times: list[float]) -> dict:
    """Log-log slope end to end, and the affine least-squares fit ``t = a + b s`` (R^2)."""
    slope = math.log(times[-1] / times[0]) / math.log(sizes[-1] / sizes[0])
    s, t = np.asarray(sizes, float), np.asarray(times, float)
    A = np.stack([np.ones_like(s), s], axis=1)
    coef, *_ = np.linalg.lstsq(A, t, rcond=None)
    pred = A @ coef
    r2 = 1 - float(np.sum((t - pred) ** 2)) / max(float(np.sum((t - t.mean()) ** 2)), 1e-300)
    return dict(loglog_slope=slope, affine_intercept=float(coef[0]), affine_slope=float(coef[1]), r2=r2)


# --------------------------------------------------------------------------------------------
# The peers and the machine
# --------------------------------------------------------------------------------------------


def peer_torch():
    """torch, when torch and vector-quantize-pytorch both import; else None (the peer is reported as n/a)."""
    try:
        import torch
        import vector_quantize_pytorch  # noqa: F401
    except Exception:
        return None
    return torch


def blas_threads() -> int:
    """numpy's BLAS threads as threadpoolctl reports them; ``os.cpu_count()`` without it."""
    try:
        from threadpoolctl import threadpool_info

        n = [
            p["num_threads"]
            for p in threadpool_info()
            if p.get("user_api") == "blas" and "numpy" in p.get("filepath", "")
        ]
        if n:
            return int(n[0])
    except Exception:
        pass
    return os.cpu_count() or 1


def version(module: str) -> str:
    """The installed version of a distribution (or module), or ``"not installed"``."""
    try:
        from importlib.metadata import version as installed_version

        return installed_version(module)
    except Exception:
        try:
            return str(__import__(module).__version__)
        except Exception:
            return "not installed"


def machine(threads: int) -> dict:
    """CPU model, cores, platform, the BLAS libraries threadpoolctl sees, and library versions."""
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
                dict(
                    api=p.get("user_api"),
                    impl=p.get("internal_api"),
                    version=p.get("version"),
                    threads=p.get("num_threads"),
                    arch=p.get("architecture"),
                    library=Path(p.get("filepath", "")).name,
                )
            )
    except Exception:
        try:
            cfg = np.show_config(mode="dicts")
            blas.append(
                dict(
                    api="blas",
                    impl=str(cfg["Build Dependencies"]["blas"].get("name")),
                    version=str(cfg["Build Dependencies"]["blas"].get("version")),
                )
            )
        except Exception:
            pass
    torch = peer_torch()
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        threads=threads,
        torch_threads=torch.get_num_threads() if torch is not None else None,
        platform=platform.platform(),
        python=platform.python_version(),
        blas=blas,
        versions={
            m: version(m)
            for m in (
                "vqref",
                "numpy",
                "array-api-compat",
                "torch",
                "vector-quantize-pytorch",
                "scikit-learn",
                "faiss-cpu",
            )
        },
    )
