"""GPU benchmark: vqref on cupy vs vqref on numpy vs vector-quantize-pytorch on CUDA.

Run on a machine with a GPU, cupy and (optionally) torch with CUDA and vector-quantize-pytorch
(``bash benchmarks/gpu_check.sh`` runs the cupy tests and then this; the CPU benchmarks are
``python -m benchmarks.bench``):

    python benchmarks/gpu.py [--reps 7] [--json out.json]

Expected output: one line per workload with the median time of each implementation (seconds)
and the ratios numpy/cupy and vqp-cuda/cupy.  Peers that are not installed are reported as
"n/a".  Every time is a median over ``--reps`` repetitions after two warm-ups, with the device
synchronised before the clock stops.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqref import ResidualVQ, VectorQuantize  # noqa: E402
from vqref import backend as B  # noqa: E402


def _median_time(fn, sync, reps):
    for _ in range(2):
        fn()
        sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _vqref_step(xp_module, x_host, g_host, kw, *, residual=False, train=True):
    xp = B.namespace_from_module(xp_module)
    x = B.from_numpy(x_host, xp)
    g = B.from_numpy(g_host, xp)
    D = x_host.shape[-1]
    if residual:
        vq = ResidualVQ(dim=D, num_quantizers=8, codebook_size=kw["K"], seed=0, xp=xp_module)
    else:
        opts = {k: v for k, v in kw.items() if k != "K"}
        vq = VectorQuantize(D, kw["K"], seed=0, xp=xp_module, **opts)
    if not train:
        vq.eval()

    def step():
        out = vq(x)
        if train:
            vq.backward(g)
        return out

    return step


def _vqp_step(x_host, g_host, kw, *, residual=False, train=True):
    import torch
    from vector_quantize_pytorch import ResidualVQ as TR
    from vector_quantize_pytorch import VectorQuantize as TV

    dev = "cuda"
    D = x_host.shape[-1]
    opts = {k: v for k, v in kw.items() if k != "K"}
    rotation = opts.pop("rotation_trick", False)
    if residual:
        m = TR(dim=D, num_quantizers=8, codebook_size=kw["K"], rotation_trick=False).to(dev)
    else:
        m = TV(dim=D, codebook_size=kw["K"], rotation_trick=rotation, **opts).to(dev)
    if not train:
        m.eval()
    x = torch.tensor(x_host, device=dev)[None]
    g = torch.tensor(g_host, device=dev)[None]

    def step():
        if train:
            xx = x.clone().requires_grad_()
            q, _, loss = m(xx)
            ((q * g).sum() + loss.sum()).backward()
        else:
            with torch.no_grad():
                m(x)

    return step, torch.cuda.synchronize


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import cupy

    rng = np.random.default_rng(0)
    rows = []
    workloads = [
        ("VQ train step N=65536 D=256 K=1024", dict(K=1024), 65536, 256, False, True),
        ("  + cosine", dict(K=1024, use_cosine_sim=True), 65536, 256, False, True),
        ("  + rotation trick", dict(K=1024, rotation_trick=True), 65536, 256, False, True),
        ("  + learnable codebook", dict(K=1024, ema_update=False, learnable_codebook=True), 65536, 256, False, True),
        ("ResidualVQ 8 depths train step", dict(K=1024), 65536, 256, True, True),
        ("VQ eval forward N=262144 D=256 K=4096", dict(K=4096), 262144, 256, False, False),
    ]
    for name, kw, N, D, residual, train in workloads:
        x = rng.standard_normal((N, D)).astype(np.float32)
        g = rng.standard_normal((N, D)).astype(np.float32)
        sync_cp = cupy.cuda.Device().synchronize
        t_cp = _median_time(_vqref_step(cupy, x, g, kw, residual=residual, train=train), sync_cp, args.reps)
        t_np = _median_time(
            _vqref_step(np, x, g, kw, residual=residual, train=train), lambda: None, max(3, args.reps // 2)
        )
        try:
            step, sync = _vqp_step(x, g, kw, residual=residual, train=train)
            t_vqp = _median_time(step, sync, args.reps)
        except Exception as e:  # peer not installed / failed
            print(f"  (vector-quantize-pytorch on CUDA unavailable: {type(e).__name__}: {e})")
            t_vqp = None
        rows.append(dict(workload=name, cupy=t_cp, numpy=t_np, vqp_cuda=t_vqp))
        r2 = "n/a" if t_vqp is None else f"{t_vqp / t_cp:6.2f}"
        print(
            f"{name:<42} cupy {t_cp * 1e3:8.1f} ms   numpy {t_np * 1e3:9.1f} ms   vqp-cuda "
            f"{'n/a' if t_vqp is None else f'{t_vqp * 1e3:8.1f} ms'}   numpy/cupy {t_np / t_cp:7.1f}   vqp/cupy {r2}",
            flush=True,
        )
    info = dict(
        python=platform.python_version(),
        numpy=np.__version__,
        cupy=cupy.__version__,
        gpu=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
    )
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    print(json.dumps(info))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=info, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
