"""The fast path of the Gumbel noise: the same numbers as :func:`vqref.ops.gumbel.gumbel_noise`,
drawn and transformed block by block in a reused buffer.

Symbols: N rows, K codes (the noise has one entry per row and code).

The definition draws all ``N K`` uniforms at once in float64 and applies
``g = -log(max(-log(max(u, eps)), eps))`` with one new ``(N, K)`` float64 array per operation:
seven arrays of ``8 N K`` bytes, each paid for twice (the operation writes it, the next reads it),
and with large arrays every fresh allocation also costs the operating system's page faults.
For N = 65536 and K = 1024 that is 512 MiB per intermediate.

:func:`gumbel_noise_blocked` computes every entry with the same float64 operations in the same
order, so the result is bit for bit the definition's:

* ``Generator.random(out=buffer)`` fills a block of the buffer with the next draws of the
  stream; consecutive blocks continue the stream where the last stopped, so the blocks together
  are the draws of one ``random(size=N K)`` call;
* each operation writes into the buffer it reads (``out=``), so the block stays in cache;
* the last negation writes into the output in its dtype, which rounds the float64 value once,
  as the definition's final cast does.

The noise is drawn on the host for every array library (one seed, the same codes on every
backend); only the result moves to the device.

With several workers (:func:`vqref.threads.workers`, numpy's BLAS threads) and a PCG64 or
PCG64DXSM generator (``numpy.random.default_rng``'s), the blocks are split between worker
threads: each draws its range of the stream from a copy of the generator advanced to the range's
first draw (``bit_generator.advance``: one 64-bit output per float64 draw, so the copy continues
exactly where the sequential draws would be), and the caller's generator is advanced past all
N K draws at the end, its buffered 32-bit value (untouched by float64 draws) kept.  The same
numbers, bit for bit, and the same final state, on two cores.  Other bit generators draw in
order on one thread.

The other functions here are numpy fast paths of the (N, K) steps of :mod:`vqref.ops.gumbel`,
each chosen in one line by its public function (``fast=True``, numpy arrays).  Every one runs
the definition's operations in the definition's order, block of rows by block of rows, with
``out=`` into a block that stays in cache, so that a chain of elementwise steps streams its
input and its result through memory once instead of once per step:

* :func:`code_logits_forward_blocked`: the distance expansion of each block written straight
  into the distances, then clamp, square root and negation in place (the definition allocates
  seven (N, K) arrays);
* :func:`gumbel_max_sample_blocked`: the perturbed logits of a block and their argmax, without
  the (N, K) array of perturbed logits;
* :func:`sample_codes_blocked`: both of the above in one pass, for a sample whose logits nothing
  else needs: each block's logits are made, perturbed and reduced to their argmax in one (b, K)
  buffer, and no (N, K) array but the noise exists;
* :func:`gumbel_softmax_forward_blocked` and :func:`gumbel_softmax_backward_blocked`: the
  softmax of the perturbed logits and its vector-Jacobian product;
* :func:`distance_gradient_blocked`: the gradient of the squared distances from that of the
  logits (``-dl / (2 dist)`` where the clamp passes).

Elementwise steps and row reductions give the definition's numbers bit for bit; the one matrix
product per block may round differently from one product over all rows (the library's choice of
kernel), so the tests pin the logits to float rounding and everything else exactly.  The blocks
run on worker threads (:func:`vqref.threads.for_blocks`; the logits' products with numpy's BLAS
held to one thread), which changes no number: each block's rows are computed by the same calls.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .. import backend as B
from .. import threads
from ..backend import Array

__all__ = [
    "BLOCK_ELEMENTS",
    "applies",
    "gumbel_noise_blocked",
    "code_logits_forward_blocked",
    "gumbel_max_sample_blocked",
    "sample_codes_blocked",
    "gumbel_softmax_forward_blocked",
    "gumbel_softmax_backward_blocked",
    "distance_gradient_blocked",
]

BLOCK_ELEMENTS = 1 << 16  # entries per block: 512 KiB of float64, about an L2 cache
_PRODUCT_WORK = 1 << 27  # multiply-adds per matrix product in the blocked logits


def gumbel_noise_blocked(shape: tuple, rng: Any, *, like: Array, eps: float, block: int = BLOCK_ELEMENTS) -> Array:
    """Standard Gumbel noise of :func:`vqref.ops.gumbel.gumbel_noise`, block by block.

    Parameters
    ----------
    shape : (N, K)
    rng : numpy Generator (advanced by N * K draws) or a seed
    like : an array whose namespace, device and float dtype the noise takes
    eps : the clamp of both logarithms (the definition's 1e-20)
    block : entries per block (tests use small blocks to cross block boundaries)

    Returns
    -------
    g : (N, K), like's dtype; equal, bit for bit, to the definition's
    """
    gen = B.as_generator(rng)
    xp = B.get_namespace(like)
    host_dtype = np.float32 if like.dtype == xp.float32 else np.float64
    total = B.numel(tuple(shape))
    out = np.empty(total, dtype=host_dtype)  # (N K,) the result, flat
    size = max(1, min(total, int(block)))  # entries per block
    split = isinstance(gen.bit_generator, _ADVANCEABLE) and total > size and threads.workers() > 1  # one line
    workers = threading.local()  # per worker: its copy of the generator, its buffer, where it stands

    def rows(start: int, stop: int) -> None:  # the entries start:stop
        if getattr(workers, "buffer", None) is None:
            workers.buffer = np.empty(size, dtype=np.float64)  # (block,) reused
            workers.gen, workers.at = gen, 0
            if split:
                workers.gen, workers.at = B.clone_generator(gen), None
        if workers.at != start:  # a copy jumps to its range's first draw (only split copies do)
            workers.gen.bit_generator.advance(start)
        u = workers.buffer[: stop - start]  # (b,) a view: every step below writes into it
        workers.gen.random(out=u)  # u ~ U[0, 1), draws start:stop of the stream
        workers.at = stop
        np.maximum(u, eps, out=u)
        np.log(u, out=u)  # log max(u, eps) < 0
        np.negative(u, out=u)
        np.maximum(u, eps, out=u)
        np.log(u, out=u)
        np.negative(u, out=out[start:stop], casting="same_kind")  # g, rounded once to the output dtype

    if split:
        threads.for_blocks(total, size, rows)
        _advance(gen, total)
    else:
        for start in range(0, total, size):
            rows(start, min(total, start + size))
    g = out.reshape(tuple(shape))  # (N, K)
    return B.from_numpy(g, xp, device=B.get_device(like), dtype=like.dtype)


# bit generators whose float64 draws take one 64-bit output each, with an exact advance()
_ADVANCEABLE = (np.random.PCG64, np.random.PCG64DXSM)


def _advance(gen: np.random.Generator, draws: int) -> None:
    """Put ``gen`` where ``draws`` float64 draws would leave it (its buffered 32-bit value kept)."""
    state = gen.bit_generator.state
    ahead = B.clone_generator(gen)
    ahead.bit_generator.advance(draws)
    new = ahead.bit_generator.state
    new["has_uint32"], new["uinteger"] = state["has_uint32"], state["uinteger"]
    gen.bit_generator.state = new


def applies(fast: bool, *arrays: Array) -> bool:
    """Whether the numpy fast paths below apply: ``fast``, and numpy arrays of one float dtype."""
    xp = B.get_namespace(*arrays)
    same = len({a.dtype for a in arrays}) == 1
    return fast and B.is_numpy(xp) and same and xp.isdtype(arrays[0].dtype, "real floating")


def _rows(K: int, block: int) -> int:
    """Rows per block of an (N, K) array: about ``block`` entries."""
    return max(1, int(block) // max(1, int(K)))


def code_logits_forward_blocked(
    x: np.ndarray, codebook: np.ndarray, *, clamp: float, block: int = BLOCK_ELEMENTS
) -> tuple[np.ndarray, tuple]:
    """Euclidean logits ``-sqrt(max(||x - c||^2, clamp))`` of :func:`vqref.ops.gumbel.code_logits_forward`.

    Parameters
    ----------
    x : (N, D) numpy float
    codebook : (K, D), x's dtype
    clamp : the clamp of the squared distance (1e-8)
    block : about this many entries per block

    Returns
    -------
    logits : (N, K)
    parts : ``(xc, cc, dist, passes)``: the centred inputs (N, D) and codes (K, D) of the
        distance's cache, ``dist = sqrt(max(d^2, clamp))`` (N, K) and ``passes = d^2 >= clamp``
        (N, K) bool, the fields of the definition's cache
    """
    N, K = x.shape[0], codebook.shape[0]
    m = np.mean(codebook, axis=0)  # (D,) the common centre, as the definition
    xc = x - m  # (N, D)
    cc = codebook - m  # (K, D)
    x2 = np.sum(xc * xc, axis=1, keepdims=True)  # (N, 1)
    c2 = np.sum(cc * cc, axis=1)  # (K,)
    ccT = cc.T  # (D, K)
    dist = np.empty((N, K), dtype=x.dtype)
    logits = np.empty((N, K), dtype=x.dtype)
    passes = np.empty((N, K), dtype=bool)
    rows = _logit_rows(K, x.shape[1], block)

    def block_rows(start: int, stop: int) -> None:  # the blocks on worker threads (threads.for_blocks)
        d = dist[start:stop]  # (b, K) a view: written in place
        np.matmul(xc[start:stop], ccT, out=d)  # xc . cc
        d *= -2
        d += x2[start:stop]  # x2 - 2 xc . cc
        d += c2  # (b, K) the expansion
        np.maximum(d, 0, out=d)  # the definition's clamp of the value at 0
        np.greater_equal(d, clamp, out=passes[start:stop])
        np.maximum(d, clamp, out=d)
        np.sqrt(d, out=d)  # (b, K) sqrt(max(d^2, clamp))
        np.negative(d, out=logits[start:stop])

    threads.for_blocks(N, rows, block_rows, blas=True)
    return logits, (xc, cc, dist, passes)


def gumbel_max_sample_blocked(
    logits: np.ndarray, noise: np.ndarray, *, temperature: float, block: int = BLOCK_ELEMENTS
) -> np.ndarray:
    """``argmax_k ((l_ik - max_k l_ik) / tau + g_ik)`` of :func:`vqref.ops.gumbel.gumbel_max_sample`.

    Returns
    -------
    indices : (N,) int64 (ties to the lowest index)
    """
    N, K = logits.shape
    out = np.empty(N, dtype=np.int64)

    def block_rows(start: int, stop: int) -> None:
        s = logits[start:stop] - np.max(logits[start:stop], axis=-1, keepdims=True)  # (b, K)
        s /= temperature
        s += noise[start:stop]
        np.argmax(s, axis=-1, out=out[start:stop])

    threads.for_blocks(N, _rows(K, block), block_rows)
    return out


def _logit_rows(K: int, D: int, block: int) -> int:
    """Rows per block of the blocked logits: about ``block`` entries, and 2^27 multiply-adds per
    matrix product (a product pays a fixed cost per call), at most 16 ``block`` entries."""
    return min(max(_rows(K, block), _PRODUCT_WORK // (K * D + 1)), _rows(K, 16 * block))


def sample_codes_blocked(
    x: np.ndarray,
    codebook: np.ndarray,
    noise: np.ndarray,
    *,
    temperature: float,
    metric: str,
    clamp: float,
    block: int = BLOCK_ELEMENTS,
) -> np.ndarray:
    """:func:`vqref.ops.gumbel.sample_codes`: the logits of :func:`code_logits_forward_blocked` and
    the argmax of :func:`gumbel_max_sample_blocked`, block by block in one buffer.

    Every row gets the numbers of those two functions bit for bit: the same centring, the same
    matrix product per block of rows (the same blocks), the same elementwise steps in order.

    Parameters
    ----------
    x : (N, D) numpy float
    codebook : (K, D), x's dtype
    noise : (N, K), x's dtype
    temperature : tau > 0
    metric : ``"euclidean"`` (``l = -sqrt(max(d^2, clamp))``) or ``"dot"`` (``l = x . c``)
    clamp : the clamp of the squared distance (1e-8)

    Returns
    -------
    indices : (N,) int64
    """
    N, K = x.shape[0], codebook.shape[0]
    euclidean = metric == "euclidean"
    if euclidean:
        m = np.mean(codebook, axis=0)  # (D,) the common centre, as the definition
        cc = codebook - m  # (K, D)
        c2 = np.sum(cc * cc, axis=1)  # (K,)
        ccT = cc.T  # (D, K)
    else:
        ccT = codebook.T  # (D, K)
    out = np.empty(N, dtype=np.int64)

    def block_rows(start: int, stop: int) -> None:
        s = np.empty((stop - start, K), dtype=x.dtype)  # (b, K) the block's logits, then perturbed
        if euclidean:
            xc = x[start:stop] - m  # (b, D)
            np.matmul(xc, ccT, out=s)  # xc . cc
            s *= -2
            s += np.sum(xc * xc, axis=1, keepdims=True)  # x2 - 2 xc . cc
            s += c2
            np.maximum(s, clamp, out=s)  # max(max(d^2, 0), clamp) in one step: clamp > 0
            np.sqrt(s, out=s)
            np.negative(s, out=s)  # (b, K) the logits
        else:
            np.matmul(x[start:stop], ccT, out=s)  # (b, K) the logits
        s -= np.max(s, axis=-1, keepdims=True)
        s /= temperature
        s += noise[start:stop]
        np.argmax(s, axis=-1, out=out[start:stop])

    threads.for_blocks(N, _logit_rows(K, x.shape[1], block), block_rows, blas=True)
    return out


def gumbel_softmax_forward_blocked(
    logits: np.ndarray, *, temperature: float, noise: Any = None, block: int = BLOCK_ELEMENTS
) -> np.ndarray:
    """``y = softmax((l - max l) / tau + g)`` of :func:`vqref.ops.gumbel.gumbel_softmax_forward`.

    Returns
    -------
    y : (N, K), rows summing to 1
    """
    N, K = logits.shape
    y = np.empty_like(logits)

    def block_rows(start: int, stop: int) -> None:
        s = logits[start:stop] - np.max(logits[start:stop], axis=-1, keepdims=True)  # (b, K) the perturbed logits
        s /= temperature
        if noise is not None:
            s += noise[start:stop]
        s -= np.max(s, axis=-1, keepdims=True)  # the softmax's shift
        e = np.exp(s, out=y[start:stop])  # (b, K)
        e /= np.sum(e, axis=-1, keepdims=True)

    threads.for_blocks(N, _rows(K, block), block_rows)
    return y


def gumbel_softmax_backward_blocked(
    dy: np.ndarray, p: np.ndarray, temperature: float, *, block: int = BLOCK_ELEMENTS
) -> np.ndarray:
    """``dl = p (dy - <p, dy>) / tau`` of :func:`vqref.ops.gumbel.gumbel_softmax_backward`.

    Returns
    -------
    dlogits : (N, K)
    """
    N, K = p.shape
    dl = np.empty_like(dy)

    def block_rows(start: int, stop: int) -> None:
        pb, d = p[start:stop], dl[start:stop]  # (b, K) each
        np.multiply(pb, dy[start:stop], out=d)
        inner = np.sum(d, axis=-1, keepdims=True)  # (b, 1) <p, dy>
        np.subtract(dy[start:stop], inner, out=d)
        d *= pb
        d /= temperature

    threads.for_blocks(N, _rows(K, block), block_rows)
    return dl


def distance_gradient_blocked(
    dlogits: np.ndarray, dist: np.ndarray, passes: np.ndarray, *, block: int = BLOCK_ELEMENTS
) -> np.ndarray:
    """``dd2 = -dl / (2 dist)`` where ``passes``, else 0, of :func:`vqref.ops.gumbel.code_logits_backward`.

    Returns
    -------
    dd2 : (N, K), the gradient of the squared distances
    """
    N, K = dist.shape
    dd2 = np.empty_like(dlogits)

    def block_rows(start: int, stop: int) -> None:
        d = dd2[start:stop]  # (b, K)
        np.multiply(dist[start:stop], 2, out=d)
        np.divide(dlogits[start:stop], d, out=d)
        np.negative(d, out=d)  # -dl / (2 dist)
        np.copyto(d, 0, where=np.logical_not(passes[start:stop]))  # 0 where the clamp stops the gradient

    threads.for_blocks(N, _rows(K, block), block_rows)
    return dd2
