"""``vqref demo``: the main job.

(Placeholder until the VQ-VAE demo lands: a self-check that quantizes real data.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _selfcheck(args: argparse.Namespace) -> int:
    """Quantize real data (scikit-learn's bundled 8x8 digits) and check a gradient."""
    from sklearn.datasets import load_digits

    from . import VectorQuantize
    from .testing import check_vjp

    t0 = time.perf_counter()
    x = load_digits().data.astype(np.float32) / 16.0  # (1797, 64) in [0, 1]
    rng = np.random.default_rng(args.seed)
    x = x[rng.permutation(len(x))]
    train, test = x[:1500], x[1500:]
    vq = VectorQuantize(dim=64, codebook_size=args.codes, kmeans_init=True, decay=0.9, seed=args.seed)
    for epoch in range(args.epochs):
        for start in range(0, len(train), 250):
            vq(train[start : start + 250])
    vq.eval()
    q, idx, _ = vq(test)
    mse = float(np.mean((q - test) ** 2))
    counts = np.bincount(idx, minlength=args.codes)
    p = counts / counts.sum()
    perplexity = float(np.exp(-np.sum(p * np.log(p + 1e-10))))
    print(f"vqref self-check on scikit-learn digits: {len(train)} train / {len(test)} held-out images, 64 features")
    print(f"  VectorQuantize(codebook_size={args.codes}, kmeans_init=True, EMA decay=0.9), {args.epochs} epochs")
    print(f"  held-out reconstruction MSE {mse:.4f} (data variance {float(test.var()):.4f})")
    print(f"  codes used {int((counts > 0).sum())}/{args.codes}, perplexity {perplexity:.1f}")

    # A gradient check of the layer's commitment gradient, float64, codes held fixed.
    chk = VectorQuantize(dim=64, codebook_size=args.codes, dtype="float64", ema_update=False, seed=0)
    chk.load_state_dict(vq.state_dict())
    xs = test[:4].astype(np.float64)
    codes = chk.eval()(xs)[1]
    res = check_vjp(
        lambda a: chk.eval()(a)[2],
        lambda d, a: (chk.train()(a) and chk.backward(np.zeros_like(a), dloss=d)),
        [xs],
        dout=np.array(1.0),
        guard=lambda a: chk.eval()(a)[1],
    )
    print(f"  commitment-loss gradient vs finite differences: relative error {res.errors[0]:.1e} (codes {codes.tolist()})")
    print(f"  done in {time.perf_counter() - t0:.1f} s")
    return 0




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqref demo", description="quantize real data and report")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--codes", type=_positive_int, default=64, help="codebook size (default 64)")
    parser.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (default 5)")
    args = parser.parse_args(argv)
    return _selfcheck(args)
