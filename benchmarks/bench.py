"""The CPU benchmarks (``make bench``): every benchmark in one run, against the libraries people would otherwise use.

Each benchmark builds its inputs once (float32, from a seeded generator) and races its
contestants on them in the same process, round-robin: every round runs each contestant in turn,
so a change in the machine's load hits all of them alike.  The table
gives the median time of each contestant and the median of the per-round ratios, with their
spread.

==================  ===========================================================================
``vq-ste``          VectorQuantize training step (forward, backward, EMA), straight-through
                    estimator, against vector-quantize-pytorch (``rotation_trick=False``) on
                    CPU torch and against one bare (N x D)(D x K) numpy matrix product
                    (every training row also states the step's peak working memory,
                    measured in a subprocess, against ``4 + 2 Q`` (N, D) buffers)
``vq-cosine``       the same with ``use_cosine_sim``
``vq-rotation``     the same with the rotation trick (vector-quantize-pytorch's default
                    rotation); also raced against vqref's own straight-through step
``vq-learnable``    the same with a learnable codebook (no EMA; codebook gradient)
``rvq``             ResidualVQ training step, 8 depths, a codebook per depth, against
                    vector-quantize-pytorch's ``ResidualVQ`` and eight bare matrix products
``rvq-shared``      the same with one codebook shared by the depths (``shared_codebook``)
``eval``            eval-mode forward of a large batch: time against the matrix product, and
                    peak memory (measured in a subprocess) against the input's size
``kmeans``          Lloyd k-means, 10 iterations from the same initial centres, against
                    scikit-learn ``KMeans`` (lloyd, n_init=1) and FAISS ``Kmeans`` (every row,
                    no subsample; reported as n/a when faiss-cpu is not installed)
``scaling``         training-step time over N and over K, with the matrix product beside it
``fsq``             FSQ training step (levels 8,5,5,5, projections in and out) against
                    vector-quantize-pytorch's ``FSQ`` with the same weights; same indices checked
``lfq``             LFQ training step with the entropy penalty against vector-quantize-pytorch's
                    ``LFQ`` with the same weights; same indices and aux loss checked
``gumbel``          VectorQuantize training step with Gumbel sampling (``stochastic_sample_codes``,
                    tau = 1) against vector-quantize-pytorch; handed the same noise, both must
                    sample the same codes
``gumbel-st``       the same with the straight-through Gumbel-softmax estimator
==================  ===========================================================================

Every time is wall-clock (``time.perf_counter``) of a call made right after an untimed call of
the same contestant (the steady state of a training loop; see :func:`benchmarks.harness.race`).  torch
runs with as many threads as numpy's BLAS (threadpoolctl tells; ``os.cpu_count()`` otherwise).
The floor is ``np.matmul(x, C.T, out=S)`` into a preallocated S: the arithmetic every
nearest-code search must do, without the cost of allocating the (N, K) result.

Usage, from the repository's root (the benchmarks are not part of the installed package)::

    python -m benchmarks.bench [--quick] [--only NAME[,NAME...]] [--reps R] [--threads T] [--out DIR]
    python benchmarks/bench.py ...        # the same
    make bench ARGS="..."                 # the same, in the project's virtual environment

writes ``DIR/bench.json`` and ``DIR/bench.md`` (default ``reports/``) and prints the table.
``--quick`` runs tiny sizes (seconds; the test suite uses it).  Its numbers say nothing about
the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

if __package__ in (None, ""):  # run as a script (python benchmarks/bench.py): make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import blas_threads, fit, floor, machine, peer_torch, race, ratio, summary, target  # noqa: E402
from benchmarks.report import markdown  # noqa: E402
from vqref import ResidualVQ, VectorQuantize  # noqa: E402
from vqref.core.kmeans import kmeans, kmeans_inertia  # noqa: E402

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
    fsq=dict(N=65536, D=256, levels=(8, 5, 5, 5)),
    lfq=dict(N=16384, D=256, K=1024),
    gumbel=dict(N=65536, D=256, K=1024),
)
QUICK = dict(
    train=dict(N=2048, D=32, K=64),
    rvq=dict(N=2048, D=32, K=64, Q=3),
    eval=dict(N=8192, D=32, K=256),
    kmeans=dict(N=4096, D=16, K=32, iters=10),
    scaling_n=dict(Ns=(512, 1024, 2048), K=64, D=32),
    scaling_k=dict(N=1024, Ks=(32, 64, 128), D=32),
    fsq=dict(N=2048, D=32, levels=(8, 5, 5, 5)),
    lfq=dict(N=2048, D=32, K=64),
    gumbel=dict(N=2048, D=32, K=64),
)

# Peak memory allowed on top of the input in the eval forward (the target).
_EVAL_MEMORY_BUDGET = 512 * 2**20


# --------------------------------------------------------------------------------------------
# Peers (imported lazily; a missing peer is reported as n/a)
# --------------------------------------------------------------------------------------------


def _vqp_vq_step(x: np.ndarray, g: np.ndarray, C: np.ndarray | None, options: dict) -> Callable[[], Any] | None:
    torch = peer_torch()
    if torch is None:
        return None
    from vector_quantize_pytorch import VectorQuantize as TV

    D = x.shape[1]
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
        q, idx, loss = m(xt)
        torch.autograd.backward([q, loss], [gt, torch.ones_like(loss)])
        return idx

    return step


def _vqp_rvq_step(
    x: np.ndarray, g: np.ndarray, K: int, Q: int, shared_codebook: bool = False
) -> Callable[[], Any] | None:
    torch = peer_torch()
    if torch is None:
        return None
    from vector_quantize_pytorch import ResidualVQ as TR

    m = TR(dim=x.shape[1], num_quantizers=Q, codebook_size=K, rotation_trick=False, shared_codebook=shared_codebook)
    m.train()
    xt = torch.from_numpy(x)[None].requires_grad_()
    gt = torch.from_numpy(g)[None]

    def step():
        xt.grad = None
        q, _, losses = m(xt)
        torch.autograd.backward([q, losses.sum()], [gt, None])

    return step


def _vqref_vq(D: int, K: int, C: np.ndarray | None, options: dict):
    vq = VectorQuantize(D, K, seed=0, **options)
    if C is not None:
        vq.init_codebook(C)  # one pseudo-count per code, as vector-quantize-pytorch starts
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
    "vq-cosine": (
        "VectorQuantize train step, cosine sim",
        dict(use_cosine_sim=True),
        dict(use_cosine_sim=True, rotation_trick=False),
    ),
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
    mem = _vqref_step_memory(N, D, K, 1, ours)
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
    contestants["floor"] = floor(x, C)
    t = race(contestants, reps)
    row = dict(
        name=name,
        workload=f"{title}, N={N} D={D} K={K}",
        times={k: summary(v) for k, v in t.items()},
        ratios={},
        memory=mem,
        targets=[],
    )
    r = ratio(t["vqref"], t["floor"])
    row["ratios"]["vqref/floor"] = r
    row["targets"].append(
        target("<= 2.0x one bare (N x D)(D x K) matmul", r["median"], r["median"] <= 2.0, f"{r['median']:.2f}x")
    )
    if "vqp" in t:
        r = ratio(t["vqp"], t["vqref"])
        row["ratios"]["vqp/vqref"] = r
        row["targets"].append(
            target(">= 5x faster than vector-quantize-pytorch", r["median"], r["median"] >= 5, f"{r['median']:.1f}x")
        )
    else:
        row["targets"].append(target(">= 5x faster than vector-quantize-pytorch", None, None, "n/a (not installed)"))
    if name == "vq-rotation":
        r = ratio(t["vqref"], t["vqref-ste"])
        row["ratios"]["vqref/vqref-ste"] = r
        extra = r["median"] - 1
        row["targets"].append(
            target("rotation trick adds <= 15% over the STE step", extra, extra <= 0.15, f"{100 * extra:+.0f}%")
        )
    row["targets"].append(_vqref_memory_target(mem, N, D, K, 1))
    return row


def _vqref_rvq_step(rq, x: np.ndarray, g: np.ndarray) -> Callable[[], Any]:
    def step():
        rq(x)
        rq.backward(g, 1.0)

    return step


def _floor_times(x: np.ndarray, C: np.ndarray, times: int) -> Callable[[], Any]:
    """``times`` bare matrix products back to back: the floor of a stack of ``times`` depths."""
    one = floor(x, C)

    def run():
        for _ in range(times):
            one()

    return run


def _bench_rvq(sizes: dict, reps: int, rng: np.random.Generator, shared: bool = False) -> dict:
    N, D, K, Q = sizes["N"], sizes["D"], sizes["K"], sizes["Q"]
    mem = _vqref_step_memory(N, D, K, Q, dict(shared_codebook=shared))
    x = rng.standard_normal((N, D), dtype=np.float32)
    g = rng.standard_normal((N, D), dtype=np.float32)
    rq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0, shared_codebook=shared)
    contestants = {"vqref": _vqref_rvq_step(rq, x, g)}
    vqp = _vqp_rvq_step(x, g, K, Q, shared_codebook=shared)
    if vqp is not None:
        contestants["vqp"] = vqp
    contestants["floor"] = _floor_times(x, x[:K], Q)  # one product per depth
    t = race(contestants, max(2, reps // 2))  # the peer takes tens of seconds per step
    kind = "one shared codebook" if shared else "a codebook per depth"
    row = dict(
        name="rvq-shared" if shared else "rvq",
        workload=f"ResidualVQ train step, {Q} depths, {kind}, N={N} D={D} K={K}; floor: {Q} matmuls",
        times={k: summary(v) for k, v in t.items()},
        ratios={},
        memory=mem,
        targets=[],
    )
    r = ratio(t["vqref"], t["floor"])
    row["ratios"]["vqref/floor"] = r
    row["targets"].append(
        target(f"<= 2.0x {Q} bare matmuls (one per depth)", r["median"], r["median"] <= 2.0, f"{r['median']:.2f}x")
    )
    text = ">= 6x faster than vector-quantize-pytorch's ResidualVQ"
    if "vqp" in t:
        r = ratio(t["vqp"], t["vqref"])
        row["ratios"]["vqp/vqref"] = r
        row["targets"].append(target(text, r["median"], r["median"] >= 6, f"{r['median']:.1f}x"))
    else:
        row["targets"].append(target(text, None, None, "n/a (not installed)"))
    row["targets"].append(_vqref_memory_target(mem, N, D, K, Q))
    return row


# The measurement shared by the memory scripts: ``measure(fn)`` calls fn once and prints, as
# JSON, the growth of the peak resident set (VmHWM reset just before) and tracemalloc's peak
# (numpy reports its buffers to it).  What the process held before the call is not counted.
_MEMORY_PRELUDE = r"""
import json, sys, tracemalloc
import numpy as np
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
def measure(fn, **extra):
    try:  # reset the peak-RSS mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    rss_before, hwm_before = status("VmRSS"), status("VmHWM")
    tracemalloc.start()
    fn()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps(dict(traced_peak=traced_peak, rss_before=rss_before, hwm_before=hwm_before,
                          hwm_after=status("VmHWM"), hwm_reset=reset, **extra)))
"""

_MEMORY_SCRIPT = (
    _MEMORY_PRELUDE
    + r"""
from vqref import VectorQuantize
N, D, K = (int(a) for a in sys.argv[1:4])
x = np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)
vq = VectorQuantize(D, K, seed=0).eval()
vq(x[:K])  # first-call costs (imports, BLAS buffers) outside the measurement
measure(lambda: vq(x), input=x.nbytes)
"""
)

# One training step (forward and backward) in its steady state: the step runs once untimed, so
# that the module already holds what a training loop holds between steps (its state, the last
# call's diagnostics); the measured step's growth above that is its working memory.
_STEP_MEMORY_SCRIPT = (
    _MEMORY_PRELUDE
    + r"""
from vqref import ResidualVQ, VectorQuantize
spec = json.loads(sys.argv[1])
N, D, K, Q = spec["N"], spec["D"], spec["K"], spec["Q"]
rng = np.random.default_rng(0)
x = rng.standard_normal((N, D), dtype=np.float32)
g = rng.standard_normal((N, D), dtype=np.float32)
if Q > 1:
    m = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0, **spec["options"])
else:
    C = x[rng.choice(N, K, replace=False)].copy()
    if spec["options"].get("use_cosine_sim"):
        C /= np.linalg.norm(C, axis=1, keepdims=True)
    m = VectorQuantize(D, K, seed=0, **spec["options"])
    m.init_codebook(C)
def step():
    m(x)
    m.backward(g, 1.0)
step()
measure(step, input=x.nbytes)
"""
)


def _run_memory_script(script: str, args: list[str]) -> dict | None:
    """Run a memory script in a fresh interpreter; its measurement with ``peak_extra``, the larger
    of the peak-RSS growth and tracemalloc's peak (None without Linux ``/proc``)."""
    if not Path("/proc/self/status").exists():
        return None
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
            check=True,
        )
        m = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # pragma: no cover - reported, not fatal
        return dict(error=f"{type(e).__name__}: {e}")
    base = m["rss_before"] if m["hwm_reset"] else m["hwm_before"]
    m["rss_peak_extra"] = max(0, m["hwm_after"] - base)
    m["peak_extra"] = max(m["rss_peak_extra"], m["traced_peak"])
    return m


def _eval_memory(N: int, D: int, K: int) -> dict | None:
    """Peak memory of one eval forward above what the process held before it (Linux ``/proc``).

    Measured in a fresh interpreter: the growth of the peak resident set (``VmHWM``, reset just
    before the forward) and tracemalloc's peak (numpy reports its buffers to it), the larger of
    the two.  The input is held before and is not counted in the growth.
    """
    return _run_memory_script(_MEMORY_SCRIPT, [str(N), str(D), str(K)])


def _vqref_step_memory(N: int, D: int, K: int, Q: int, options: dict) -> dict | None:
    """Peak working memory of one training step (forward and backward) in its steady state,
    measured as :func:`_eval_memory` in a fresh interpreter."""
    spec = dict(N=N, D=D, K=K, Q=Q, options=options)
    return _run_memory_script(_STEP_MEMORY_SCRIPT, [json.dumps(spec)])


def _vqref_memory_target(mem: dict | None, N: int, D: int, K: int, Q: int) -> dict:
    """The training step's memory target: at most ``4 + 2 Q`` (N, D) float32 buffers (the input's
    private copy, per depth the code and the residual that the backward reads, the sum of the
    codes or the unit rows of a cosine codebook, the gradient and one term of it) plus four
    (chunk, K) blocks of the nearest-code search and four row blocks (2^20 floats each) of the
    blocked passes; never an (N, K) matrix."""
    from vqref.ops.distance import default_chunk_size

    nd, mib = N * D * 4, 2.0**20
    budget = (4 + 2 * Q) * nd + 4 * default_chunk_size(K, D) * K * 4 + 4 * 2**20 * 4
    text = f"training step peak memory <= {4 + 2 * Q} N x D + 4 chunk x K + 4 blocks of floats ({budget / mib:.0f} MiB)"
    if not mem or "peak_extra" not in mem:
        shown = "n/a (needs Linux /proc)" if not mem else f"n/a ({mem.get('error', '?')})"
        return target(text, None, None, shown)
    extra = mem["peak_extra"]
    shown = f"{extra / mib:.0f} MiB = {extra / nd:.1f} N x D (an N x K float32 matrix: {N * K * 4 / mib:.0f} MiB)"
    return target(text, extra / mib, extra <= budget, shown)


def _bench_eval(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    N, D, K = sizes["N"], sizes["D"], sizes["K"]
    mem = _eval_memory(N, D, K)
    x = rng.standard_normal((N, D), dtype=np.float32)
    vq = VectorQuantize(D, K, seed=0).eval()
    C = np.asarray(vq.codebook)
    t = race({"vqref": lambda: vq(x), "floor": floor(x, C)}, max(2, reps // 2))
    r = ratio(t["vqref"], t["floor"])
    row = dict(
        name="eval",
        workload=f"VectorQuantize eval forward, N={N} D={D} K={K}",
        times={k: summary(v) for k, v in t.items()},
        ratios={"vqref/floor": r},
        memory=mem,
        targets=[target("time <= 1.3x the bare matmul", r["median"], r["median"] <= 1.3, f"{r['median']:.2f}x")],
    )
    mib = 2.0**20
    if mem and "peak_extra" in mem:
        extra = mem["peak_extra"]
        row["targets"].append(
            target(
                "peak memory <= input + 512 MiB (no N x K matrix)",
                extra / mib,
                extra <= _EVAL_MEMORY_BUDGET,
                f"input {mem['input'] / mib:.0f} MiB + {extra / mib:.0f} MiB (an N x K float32 matrix: {N * K * 4 / mib:.0f} MiB)",
            )
        )
    else:
        row["targets"].append(
            target("peak memory <= input + 512 MiB (no N x K matrix)", None, None, "n/a (needs Linux /proc)")
        )
    return row


def _bench_kmeans(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
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

        faiss.omp_set_num_threads(blas_threads())  # as many threads as numpy's BLAS, like torch

        def fs():
            # max_points_per_centroid = N: FAISS trains on all N rows instead of a subsample of
            # 256 K; init_centroids: the same start; then one search for the final objective, as
            # scikit-learn's fit and ours end with an assignment of every row.
            km = faiss.Kmeans(
                D, K, niter=T, verbose=False, seed=0, max_points_per_centroid=N, min_points_per_centroid=1
            )
            km.train(x, init_centroids=init)
            dist, _ = km.index.search(x, 1)
            result["faiss"] = float(dist.sum())

        contestants["faiss"] = fs
    except Exception:
        pass
    contestants["floor"] = floor(x, init)
    t = race(contestants, reps)
    row = dict(
        name="kmeans",
        workload=f"k-means (Lloyd), N={N} D={D} K={K}, {T} iterations",
        times={k: summary(v) for k, v in t.items()},
        ratios={"vqref/floor": ratio(t["vqref"], t["floor"])},
        inertia={k: v for k, v in result.items()},
        targets=[],
    )
    for peer, limit, text in (("sklearn", 1.0, "<= scikit-learn's time"), ("faiss", 1.0, "<= FAISS's time")):
        if peer in t:
            r = ratio(t["vqref"], t[peer])
            row["ratios"][f"vqref/{peer}"] = r
            row["targets"].append(target(text, r["median"], r["median"] <= limit, f"{r['median']:.2f}x"))
            rel = abs(result["vqref"] - result[peer]) / abs(result[peer])
            shown = f"{rel:.1e} (vqref {result['vqref']:.7g}, {peer} {result[peer]:.7g}"
            shown += f", {result['sklearn_iters']} iterations)" if peer == "sklearn" else ")"
            row["targets"].append(target(f"same inertia as {peer} to 1e-4 relative", rel, rel <= 1e-4, shown))
        else:
            row["targets"].append(target(text, None, None, "n/a (not installed)"))
    return row


def _bench_scaling(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    sn, sk = sizes["scaling_n"], sizes["scaling_k"]
    reps = max(2, reps // 2)
    points = []
    for axis, N, K, D in [("N", n, sn["K"], sn["D"]) for n in sn["Ns"]] + [
        ("K", sk["N"], k, sk["D"]) for k in sk["Ks"]
    ]:
        x = rng.standard_normal((N, D), dtype=np.float32)
        g = rng.standard_normal((N, D), dtype=np.float32)
        C = x[rng.choice(N, K, replace=N < K)].copy()
        t = race({"vqref": _vqref_step(_vqref_vq(D, K, C, {}), x, g), "floor": floor(x, C)}, reps)
        points.append(
            dict(
                axis=axis,
                N=N,
                K=K,
                D=D,
                vqref=statistics.median(t["vqref"]),
                floor=statistics.median(t["floor"]),
                ratio=ratio(t["vqref"], t["floor"])["median"],
            )
        )
        del x, g, C
    fits = {}
    for axis in ("N", "K"):
        pts = [p for p in points if p["axis"] == axis]
        fits[axis] = fit([p[axis] for p in pts], [p["vqref"] for p in pts])
    targets = []
    for axis in ("N", "K"):
        f = fits[axis]
        ok = f["loglog_slope"] <= 1.1 and f["r2"] >= 0.98
        targets.append(
            target(
                f"time linear in {axis} (log-log slope <= 1.1, affine fit R^2 >= 0.98)",
                f["loglog_slope"],
                ok,
                f"slope {f['loglog_slope']:.2f}, R^2 {f['r2']:.3f}",
            )
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


# --------------------------------------------------------------------------------------------
# FSQ, LFQ and Gumbel sampling (each against its vector-quantize-pytorch counterpart)
# --------------------------------------------------------------------------------------------


def _to_vqp(module):
    """The vector-quantize-pytorch twin of a vqref module (same weights), or None without torch."""
    if peer_torch() is None:
        return None
    from vqref.interop import to_vector_quantize_pytorch

    return to_vector_quantize_pytorch(module).train()


def _vqp_indices(idx: Any) -> np.ndarray:
    return idx.detach().numpy().reshape(-1)


def _agreement(ours: Any, theirs: np.ndarray | None) -> float | None:
    """Fraction of equal indices (None without the peer)."""
    return None if theirs is None else float(np.mean(np.asarray(ours).reshape(-1) == theirs))


def _peer_row(name: str, workload: str, t: dict, same: float | None, *, what: str = "indices") -> dict:
    """The row of a benchmark raced against vector-quantize-pytorch: >= 3x, and equal work."""
    row = dict(
        name=name,
        workload=workload,
        times={k: summary(v) for k, v in t.items()},
        ratios={"vqref/floor": ratio(t["vqref"], t["floor"])},
        agreement=same,
        targets=[],
    )
    text = ">= 3x faster than vector-quantize-pytorch"
    if "vqp" in t:
        r = ratio(t["vqp"], t["vqref"])
        row["ratios"]["vqp/vqref"] = r
        row["targets"].append(target(text, r["median"], r["median"] >= 3, f"{r['median']:.1f}x"))
        row["targets"].append(
            target(f"same {what} as vector-quantize-pytorch (>= 99.9% of tokens)", same, same >= 0.999,
                   f"{100 * same:.3f}% equal")
        )  # fmt: skip
    else:
        row["targets"].append(target(text, None, None, "n/a (not installed)"))
    return row


def _bench_fsq(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    from vqref import FSQ

    N, D, levels = sizes["N"], sizes["D"], tuple(sizes["levels"])
    x = rng.standard_normal((N, D), dtype=np.float32)
    g = rng.standard_normal((N, D), dtype=np.float32)
    fsq = FSQ(levels=list(levels), dim=D, seed=0)

    def ours():
        fsq(x)
        fsq.backward(g)

    contestants = {"vqref": ours}
    m = _to_vqp(fsq)
    same = None
    if m is not None:
        torch = peer_torch()
        xt = torch.from_numpy(x)[None].requires_grad_()  # (1, N, D)
        gt = torch.from_numpy(g)[None]

        def theirs():
            xt.grad = None
            q, _ = m(xt)
            q.backward(gt)

        with torch.no_grad():
            same = _agreement(fsq(x)[1], _vqp_indices(m(xt)[1]))
        fsq.backward(g)
        contestants["vqp"] = theirs
    contestants["floor"] = floor(x, np.asarray(fsq.params["project_in.W"]).T.copy())
    t = race(contestants, reps)
    work = f"FSQ train step, levels {list(levels)}, projections, N={N} D={D}"
    return _peer_row("fsq", work + " (floor: the (N x D)(D x d) projection)", t, same)


def _bench_lfq(sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    from vqref import LFQ

    N, D, K = sizes["N"], sizes["D"], sizes["K"]
    x = rng.standard_normal((N, D), dtype=np.float32)
    g = rng.standard_normal((N, D), dtype=np.float32)
    lfq = LFQ(dim=D, codebook_size=K, entropy_loss_weight=0.1, seed=0)

    def ours():
        lfq(x)
        lfq.backward(g, 1.0)

    contestants = {"vqref": ours}
    m = _to_vqp(lfq)
    same = None
    if m is not None:
        torch = peer_torch()
        xt = torch.from_numpy(x)[None].requires_grad_()
        gt = torch.from_numpy(g)[None]

        def theirs():
            xt.grad = None
            q, _, aux = m(xt)
            torch.autograd.backward([q, aux], [gt, torch.ones_like(aux)])

        with torch.no_grad():
            q_t, idx_t, aux_t = m(xt)
        _, idx, aux = lfq(x)
        lfq.backward(g, 1.0)
        same = _agreement(idx, _vqp_indices(idx_t))
        if abs(float(aux) - float(aux_t)) > 1e-3 * max(1.0, abs(float(aux_t))):
            same = 0.0  # the entropy penalty differs: not the same work
        contestants["vqp"] = theirs
    contestants["floor"] = floor(x, np.asarray(lfq.params["project_in.W"]).T.copy())
    t = race(contestants, reps)
    work = f"LFQ train step, entropy loss, K={K}, projections, N={N} D={D}"
    return _peer_row("lfq", work + " (floor: the (N x D)(D x d) projection)", t, same, what="indices and aux loss")


def _bench_gumbel(name: str, sizes: dict, reps: int, rng: np.random.Generator) -> dict:
    N, D, K = sizes["N"], sizes["D"], sizes["K"]
    st = name == "gumbel-st"
    options = dict(stochastic_sample_codes=True, sample_codebook_temp=1.0, straight_through=st)
    x = rng.standard_normal((N, D), dtype=np.float32)
    g = rng.standard_normal((N, D), dtype=np.float32)
    C = x[rng.choice(N, K, replace=False)].copy()  # the same initial codebook on both sides
    vq = _vqref_vq(D, K, C, options)
    contestants = {"vqref": _vqref_step(vq, x, g)}
    same = None
    if peer_torch() is not None:
        import vector_quantize_pytorch.vector_quantize_pytorch as vqp_module

        from vqref.ops.gumbel import gumbel_noise

        theirs = _vqp_vq_step(x, g, C, dict(K=K, rotation_trick=False, **options))
        # Equal work: handed the noise vqref's next forward draws (a copy of its generator), vqp
        # samples the same codes from the same codebook.  In the race each draws its own noise.
        gen, torch = vq.generator, peer_torch()
        original = vqp_module.gumbel_noise
        vqp_module.gumbel_noise = lambda t: torch.from_numpy(gumbel_noise((N, K), gen, like=x)).reshape(t.shape)
        try:
            idx_t = theirs()
        finally:
            vqp_module.gumbel_noise = original
        same = _agreement(vq(x)[1], _vqp_indices(idx_t))
        vq.backward(g, 1.0)
        contestants["vqp"] = theirs
    contestants["floor"] = floor(x, C)
    t = race(contestants, reps)
    title = "straight-through Gumbel-softmax" if st else "STE"
    work = f"VectorQuantize train step, Gumbel sampling (tau=1), {title}, N={N} D={D} K={K}"
    return _peer_row(name, work, t, same, what="sampled codes given the same noise")


BENCHMARKS: dict[str, Callable[[dict, int, np.random.Generator], dict]] = {
    "vq-ste": lambda s, r, g: _bench_vq("vq-ste", s["train"], r, g),
    "vq-cosine": lambda s, r, g: _bench_vq("vq-cosine", s["train"], r, g),
    "vq-rotation": lambda s, r, g: _bench_vq("vq-rotation", s["train"], r, g),
    "vq-learnable": lambda s, r, g: _bench_vq("vq-learnable", s["train"], r, g),
    "rvq": lambda s, r, g: _bench_rvq(s["rvq"], r, g),
    "rvq-shared": lambda s, r, g: _bench_rvq(s["rvq"], r, g, shared=True),
    "eval": lambda s, r, g: _bench_eval(s["eval"], r, g),
    "kmeans": lambda s, r, g: _bench_kmeans(s["kmeans"], r, g),
    "scaling": lambda s, r, g: _bench_scaling(s, r, g),
    "fsq": lambda s, r, g: _bench_fsq(s["fsq"], r, g),
    "lfq": lambda s, r, g: _bench_lfq(s["lfq"], r, g),
    "gumbel": lambda s, r, g: _bench_gumbel("gumbel", s["gumbel"], r, g),
    "gumbel-st": lambda s, r, g: _bench_gumbel("gumbel-st", s["gumbel"], r, g),
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench``: run the benchmarks, print the table, write ``bench.json`` and ``bench.md``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the harness, not the targets")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME[,NAME]",
        help="run only these (" + ", ".join(BENCHMARKS) + ")",
    )
    p.add_argument("--reps", type=int, default=5, help="timed rounds per benchmark (default 5)")
    p.add_argument(
        "--threads", type=int, default=None, help="threads for numpy's BLAS and torch (default: numpy's BLAS setting)"
    )
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
            print(
                "benchmarks.bench: threadpoolctl is not installed; --threads only sets torch's threads", file=sys.stderr
            )
    threads = args.threads or blas_threads()
    torch = peer_torch()
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
        command="python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        quick=args.quick,
        reps=args.reps,
        load=[load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")],
        machine=machine(threads),
        rows=rows,
    )
    md = markdown(report)
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
