"""Soft assignments to a codebook: logits, Gumbel sampling, the Gumbel-softmax estimators and the
codebook diversity loss.

Symbols: N vectors, D features, K codes; tau the sampling temperature (``sample_codebook_temp``);
T the diversity loss's inverse temperature (``codebook_diversity_temperature``); P positions
and B = N / P rows per position (the diversity loss's groups).

Everything here starts from the **logits** of a vector for each code,

    l_ik = -||x_i - c_k||              Euclidean codebooks (the distance itself, not its square)
    l_ik =  x^_i . c^_k                cosine codebooks (unit rows)

which are vector-quantize-pytorch's: its distance is ``sqrt(max(||x||^2 + ||c||^2 - 2 x.c, 1e-8))``
(docs/math.md §9 explains the choice).  The nearest code is ``argmax_k l_ik``.  From the logits:

* Gumbel-max sampling (Gumbel 1954; Maddison et al., arXiv 1411.0030): with ``g_ik = -log(-log u_ik)``
  and ``u_ik ~ U(0, 1)`` independent, ``k_i = argmax_k (l_ik / tau + g_ik)`` is a sample of the
  categorical distribution ``softmax(l_i / tau)``.  The noise is drawn on the host from a numpy
  Generator (:func:`gumbel_noise`) and moved to the device, so a seed gives the same codes on
  every backend.
* the Gumbel-softmax sample (Jang et al., arXiv 1611.01144, eq. 2; Maddison et al.,
  arXiv 1611.00712): ``y_i = softmax(l_i / tau + g_i)``, the relaxation (at temperature 1) of the
  one-hot sample ``z_i = onehot(k_i)``, whose argmax it shares.  Without noise it is the
  distribution itself, ``softmax(l_i / tau)``.
* the straight-through Gumbel-softmax estimator (Jang et al., section 2.2): the output is the
  hard code ``z_i C = c_{k_i}``; the backward differentiates ``z C`` exactly and then uses
  ``dy/dl`` in place of the (zero almost everywhere) ``dz/dl``.  A surrogate gradient.
* the soft assignment ``y C``, whose backward is the true derivative.
* the codebook diversity loss (the diversity term of wav2vec 2.0, arXiv 2006.11477, eq. 4, in
  vector-quantize-pytorch's form): ``p_i = softmax(T l_i)``, the batch mean ``pbar_n`` of the
  rows at position n, and ``L = -(1/P) sum_n H(pbar_n)``: minimising it spreads the batch over
  the codebook.

Each differentiable step is a ``*_forward`` / ``*_backward`` pair; the backwards are derived in
their docstrings and checked against finite differences (true derivatives) and torch autograd
(the straight-through surrogate) in ``tests/test_gumbel.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from . import gumbel_fast as blocked
from .distance import DistanceCache, squared_distance_backward, squared_distance_forward
from .entropy import ENTROPY_EPS, EntropyCache, SoftmaxCache, softmax_backward, softmax_forward
from .entropy import entropy_backward as clamped_entropy_backward
from .entropy import entropy_forward as clamped_entropy_forward

__all__ = [
    "DISTANCE_CLAMP",
    "ENTROPY_EPS",
    "NOISE_EPS",
    "LogitsCache",
    "code_logits_forward",
    "code_logits_backward",
    "SoftmaxCache",
    "softmax_forward",
    "softmax_backward",
    "gumbel_noise",
    "perturbed_logits",
    "gumbel_max_sample",
    "sample_codes",
    "GumbelSoftmaxCache",
    "gumbel_softmax_forward",
    "gumbel_softmax_backward",
    "AssignmentCache",
    "soft_assignment_forward",
    "soft_assignment_backward",
    "straight_through_gumbel_forward",
    "straight_through_gumbel_backward",
    "EntropyCache",
    "clamped_entropy_forward",
    "clamped_entropy_backward",
    "DiversityCache",
    "diversity_loss_forward",
    "diversity_loss_backward",
]

DISTANCE_CLAMP = 1e-8  # the squared distance is clamped here before the square root (vqp's cdist)
NOISE_EPS = 1e-20  # both logarithms of the Gumbel noise are clamped here (vqp's gumbel_noise)


# ---------------------------------------------------------------------------- logits


class LogitsCache(NamedTuple):
    metric: str  # "euclidean" | "dot"
    inner: Any  # DistanceCache (euclidean) or (x, codebook) (dot)
    dist: Any  # (N, K) sqrt(max(d^2, clamp)), the divisor of the backward (euclidean), else None
    passes: Any  # (N, K) bool, d^2 >= clamp: the square root's gradient passes (euclidean), else None


def code_logits_forward(
    x: Array, codebook: Array, *, metric: str = "euclidean", fast: bool = True
) -> tuple[Array, LogitsCache]:
    """The logits of every vector for every code (module docstring).

    Parameters
    ----------
    x : (N, D) float (unit rows for ``metric="dot"`` with cosine codebooks)
    codebook : (K, D) float, same dtype
    metric : ``"euclidean"``: ``l = -sqrt(max(||x - c||^2, 1e-8))``; ``"dot"``: ``l = x . c``
    fast : numpy, Euclidean: the same steps block by block (:mod:`vqref.ops.gumbel_fast`)

    Returns
    -------
    logits : (N, K)
    cache : LogitsCache

    Notes
    -----
    The squared distances come from :func:`vqref.ops.distance.squared_distance_forward` (the
    expansion centred on the codebook mean, which keeps float32 accurate for data far from the
    origin); vector-quantize-pytorch expands without centring, which agrees to rounding.  The clamp
    ``1e-8`` keeps the square root's derivative ``1 / (2 sqrt(s))`` bounded by 5000: a vector
    closer than 1e-4 to a code has the logit -1e-4 and no gradient through that code.
    """
    xp = B.get_namespace(x, codebook)
    if metric == "dot":
        return x @ codebook.mT, LogitsCache("dot", (x, codebook), None, None)  # (N, K)
    if metric != "euclidean":
        raise ValueError(f"metric must be 'euclidean' or 'dot', got {metric!r}")
    if blocked.applies(fast, x, codebook):  # the one-line choice
        logits, (xc, cc, dist, passes) = blocked.code_logits_forward_blocked(x, codebook, clamp=DISTANCE_CLAMP)
        return logits, LogitsCache("euclidean", DistanceCache(xc, cc), dist, passes)
    d2, dist_cache = squared_distance_forward(x, codebook)  # (N, K) >= 0
    dist = xp.sqrt(xp.clip(d2, min=DISTANCE_CLAMP))  # (N, K) >= 1e-4
    # torch's clamp lets the gradient through where the input is >= the bound: so does vqref
    return -dist, LogitsCache("euclidean", dist_cache, dist, d2 >= DISTANCE_CLAMP)


def code_logits_backward(
    dlogits: Array, cache: LogitsCache, *, fast: bool = True, codebook: bool = True
) -> tuple[Array, Any]:
    """Gradients of the logits for the vectors and the codes.

    Euclidean: ``l = -sqrt(s)`` with ``s = max(d^2, clamp)``, so ``dl/d(d^2) = -1 / (2 sqrt(s))``
    where ``d^2 >= clamp`` and 0 below; the squared distance's own backward
    (:func:`vqref.ops.distance.squared_distance_backward`) then gives
    ``dx_i = -sum_k w_ik (x_i - c_k)`` and ``dc_k = -sum_i w_ik (c_k - x_i)`` with
    ``w = dlogits / dist``.  Dot: ``dx = dlogits C`` and ``dC = dlogits^T x``.

    Parameters
    ----------
    dlogits : (N, K)
    cache : LogitsCache
    codebook : False: skip the codes' gradient (None), a (K x N)(N x D) product

    Returns
    -------
    dx : (N, D)
    dcodebook : (K, D), or None
    """
    xp = B.get_namespace(dlogits)
    if cache.metric == "dot":
        x, cb = cache.inner
        return dlogits @ cb, (dlogits.mT @ x if codebook else None)  # (N, D), (K, D)
    if blocked.applies(fast, dlogits, cache.dist):  # the one-line choice: the same numbers, block by block
        dd2_blocked = blocked.distance_gradient_blocked(dlogits, cache.dist, cache.passes)  # (N, K)
        return squared_distance_backward(dd2_blocked, cache.inner, codebook=codebook)
    dd2 = xp.where(cache.passes, -dlogits / (2 * cache.dist), 0.0)  # (N, K) gradient of d^2
    dist_cache: DistanceCache = cache.inner
    return squared_distance_backward(dd2, dist_cache, codebook=codebook)


# The softmax over the last axis and its backward are :mod:`vqref.ops.entropy`'s
# (``softmax_forward(z)`` at the default inverse temperature 1 is ``exp(z - max z)`` normalised;
# ``softmax_backward`` is ``p * (dp - <p, dp>)``), imported above.


# ---------------------------------------------------------------------------- Gumbel sampling


def gumbel_noise(shape: tuple, rng: Any, *, like: Array, fast: bool = True) -> Array:
    """Standard Gumbel noise ``g = -log(-log u)``, ``u ~ U[0, 1)``, drawn on the host.

    Both logarithms are clamped at 1e-20 as in vector-quantize-pytorch (``u = 0`` gives
    ``-log(-log 1e-20) = -3.83`` instead of ``-inf``).  The uniforms are float64 draws of ``rng``
    (``Generator.random``), transformed in float64 and then cast, so one seed gives the same noise
    on every backend.

    Parameters
    ----------
    shape : (N, K)
    rng : numpy Generator (advanced by N * K draws) or a seed
    like : an array whose namespace, device and float dtype the noise takes
    fast : the same numbers block by block (:mod:`vqref.ops.gumbel_fast`); False: the definition below

    Returns
    -------
    g : (N, K), like's dtype
    """
    if fast:  # the one-line choice: bit for bit the definition, without its (N, K) float64 temporaries
        return blocked.gumbel_noise_blocked(shape, rng, like=like, eps=NOISE_EPS)
    u = B.as_generator(rng).random(size=tuple(shape))  # (N, K) float64 in [0, 1)
    g = -np.log(np.maximum(-np.log(np.maximum(u, NOISE_EPS)), NOISE_EPS))  # (N, K)
    return B.from_numpy(g, B.get_namespace(like), device=B.get_device(like), dtype=like.dtype)


def perturbed_logits(logits: Array, *, temperature: float, noise: Array = None) -> Array:
    """``s = (l - max_k l) / tau + g``: the logits of ``softmax(l / tau)``, perturbed by Gumbel noise.

    Subtracting each row's largest logit changes neither the argmax nor the softmax, and keeps
    ``l / tau`` from overflowing for tiny temperatures (the entries become ``<= 0``, or ``-inf``).

    Parameters
    ----------
    logits : (N, K)
    temperature : tau > 0
    noise : (N, K) Gumbel noise, or None (no perturbation)

    Returns
    -------
    s : (N, K)
    """
    if not temperature > 0:
        raise ValueError(f"the temperature must be > 0, got {temperature!r}")
    xp = B.get_namespace(logits)
    s = (logits - xp.max(logits, axis=-1, keepdims=True)) / temperature  # (N, K) <= 0
    return s if noise is None else s + noise


def gumbel_max_sample(logits: Array, noise: Array, *, temperature: float, fast: bool = True) -> Array:
    """Codes sampled from ``softmax(l / tau)`` by the Gumbel-max trick: ``argmax_k (l_ik / tau + g_ik)``.

    Why it samples: ``P(argmax_k (a_k + g_k) = j) = exp(a_j) / sum_k exp(a_k)`` for independent
    standard Gumbel ``g_k`` (the maximum of Gumbels is Gumbel-distributed with location
    ``log sum exp a``).  There is no backward: the argmax is piecewise constant.

    Parameters
    ----------
    logits : (N, K)
    noise : (N, K) from :func:`gumbel_noise`
    temperature : tau > 0; tau -> 0 gives the nearest code, tau -> inf a uniform draw
    fast : numpy: the same steps block by block, without the (N, K) perturbed logits

    Returns
    -------
    indices : (N,) int64 (ties to the lowest index)
    """
    xp = B.get_namespace(logits, noise)
    if blocked.applies(fast, logits, noise) and temperature > 0:  # the one-line choice
        return blocked.gumbel_max_sample_blocked(logits, noise, temperature=temperature)
    s = perturbed_logits(logits, temperature=temperature, noise=noise)  # (N, K)
    return xp.astype(xp.argmax(s, axis=-1), xp.int64)


def sample_codes(
    x: Array, codebook: Array, noise: Array, *, temperature: float, metric: str = "euclidean", fast: bool = True
) -> Array:
    """Codes sampled from ``softmax(l / tau)`` for vectors whose logits nothing else needs.

    The definition is the two steps above, :func:`code_logits_forward` and then
    :func:`gumbel_max_sample`; the straight-through estimator and the rotation trick sample this
    way (their backward never reaches the logits).

    Parameters
    ----------
    x : (N, D) float (unit rows for ``metric="dot"``)
    codebook : (K, D), x's dtype
    noise : (N, K) from :func:`gumbel_noise`
    temperature : tau > 0
    metric : ``"euclidean"`` or ``"dot"``, as :func:`code_logits_forward`
    fast : numpy: each block of rows' logits made, perturbed and reduced to their argmax while in
        cache, no (N, K) array (:func:`vqref.ops.gumbel_fast.sample_codes_blocked`)

    Returns
    -------
    indices : (N,) int64 (ties to the lowest index)
    """
    if blocked.applies(fast, x, codebook, noise) and temperature > 0 and metric in ("euclidean", "dot"):  # one line
        return blocked.sample_codes_blocked(x, codebook, noise, temperature=temperature, metric=metric,
                                            clamp=DISTANCE_CLAMP)  # fmt: skip
    logits, _ = code_logits_forward(x, codebook, metric=metric, fast=False)  # (N, K)
    return gumbel_max_sample(logits, noise, temperature=temperature, fast=False)


class GumbelSoftmaxCache(NamedTuple):
    softmax: SoftmaxCache  # of the perturbed logits
    temperature: float  # tau


def gumbel_softmax_forward(
    logits: Array, *, temperature: float, noise: Array = None, fast: bool = True
) -> tuple[Array, GumbelSoftmaxCache]:
    """The Gumbel-softmax sample ``y = softmax(l / tau + g)`` (or ``softmax(l / tau)`` without noise).

    With the noise that drew a Gumbel-max sample, ``argmax_k y_ik`` is that sample: y is its
    relaxation (Jang et al., arXiv 1611.01144, eq. 2, with class log-probabilities ``l / tau``
    and relaxation temperature 1).

    Parameters
    ----------
    logits : (N, K)
    temperature : tau > 0
    noise : (N, K) or None

    Returns
    -------
    y : (N, K), rows summing to 1
    cache : GumbelSoftmaxCache
    """
    if blocked.applies(fast, logits, *([] if noise is None else [noise])) and temperature > 0:  # the one-line choice
        y = blocked.gumbel_softmax_forward_blocked(logits, temperature=temperature, noise=noise)  # (N, K)
        return y, GumbelSoftmaxCache(SoftmaxCache(y, 1.0), float(temperature))
    y, sm = softmax_forward(perturbed_logits(logits, temperature=temperature, noise=noise))  # (N, K)
    return y, GumbelSoftmaxCache(sm, float(temperature))


def gumbel_softmax_backward(dy: Array, cache: GumbelSoftmaxCache, *, fast: bool = True) -> Array:
    """``dl = softmax_backward(dy) / tau``.  The noise is a constant, and the row maximum that
    :func:`perturbed_logits` subtracts has no effect: a row of the softmax backward sums to 0.

    Parameters
    ----------
    dy : (N, K)
    cache : GumbelSoftmaxCache

    Returns
    -------
    dlogits : (N, K)
    """
    if blocked.applies(fast, dy, cache.softmax.p):  # the one-line choice: the same numbers, block by block
        return blocked.gumbel_softmax_backward_blocked(dy, cache.softmax.p, cache.temperature)
    return softmax_backward(dy, cache.softmax) / cache.temperature  # (N, K)


# ---------------------------------------------------------------------------- assignments to codes


class AssignmentCache(NamedTuple):
    weights: Array  # (N, K) the soft assignment y (soft), or (N,) int64 indices (straight-through)
    codebook: Array  # (K, D)


def soft_assignment_forward(y: Array, codebook: Array) -> tuple[Array, AssignmentCache]:
    """The soft code ``out = y C``: each row a convex combination of the codes.

    Parameters
    ----------
    y : (N, K) rows of weights (a softmax)
    codebook : (K, D)

    Returns
    -------
    out : (N, D)
    cache : AssignmentCache(y, codebook)
    """
    return y @ codebook, AssignmentCache(y, codebook)  # (N, D)


def soft_assignment_backward(dout: Array, cache: AssignmentCache, *, codebook: bool = True) -> tuple[Array, Any]:
    """The product rule of ``out = y C``: ``dy = dout C^T`` and ``dC = y^T dout`` (a true derivative).

    ``codebook=False`` skips ``dC`` (None), a (K x N)(N x D) product.

    Returns
    -------
    dy : (N, K)
    dcodebook : (K, D), or None
    """
    y, cb = cache
    return dout @ cb.mT, (y.mT @ dout if codebook else None)  # (N, K), (K, D)


def straight_through_gumbel_forward(codebook: Array, indices: Array) -> tuple[Array, AssignmentCache]:
    """The straight-through Gumbel-softmax output: the hard code ``z C = C[k]``.

    The forward is the lookup with the one-hot ``z_i = onehot(k_i)``; its value is the code row
    itself, bit for bit.  The backward (:func:`straight_through_gumbel_backward`) differentiates
    ``z C`` exactly and returns the gradient of z, which the estimator then hands to the soft
    sample y (``dy := dz``): that substitution is the surrogate.

    Parameters
    ----------
    codebook : (K, D)
    indices : (N,) int64, the sampled (or nearest) codes

    Returns
    -------
    out : (N, D), ``codebook[indices]``
    cache : AssignmentCache(indices, codebook)
    """
    xp = B.get_namespace(codebook, indices)
    return xp.take(codebook, indices, axis=0), AssignmentCache(indices, codebook)  # (N, D)


def straight_through_gumbel_backward(dout: Array, cache: AssignmentCache) -> tuple[Array, Array]:
    """``dz = dout C^T`` (the gradient of the one-hot, used as y's) and ``dC = z^T dout``, the
    scatter-add of each row's gradient into its chosen code (a segment sum, never ``+=``).

    Returns
    -------
    dz : (N, K), to be used as ``dy`` (the surrogate step)
    dcodebook : (K, D), zero rows for codes no row chose
    """
    indices, codebook = cache
    return dout @ codebook.mT, B.segment_sum(dout, indices, codebook.shape[0])  # (N, K), (K, D)


# ---------------------------------------------------------------------------- entropy and diversity


# The clamped entropy ``H(p) = -sum_k p_k log max(p_k, eps)`` and its backward are
# :mod:`vqref.ops.entropy`'s ``entropy_forward``/``entropy_backward``, imported above as
# ``clamped_entropy_forward``/``clamped_entropy_backward``.


class DiversityCache(NamedTuple):
    softmax: SoftmaxCache  # p = softmax(T l)
    entropy: EntropyCache  # of pbar (P, K)
    inverse_temperature: float  # T
    positions: int  # P


def diversity_loss_forward(
    logits: Array, *, inverse_temperature: float = 100.0, positions: int = 1
) -> tuple[Array, DiversityCache]:
    """The codebook diversity loss ``L = -(1/P) sum_n H(pbar_n)`` (module docstring).

    ``p_i = softmax(T l_i)``; the rows are grouped by position: row i belongs to position
    ``i mod P`` (the rows of an input ``(..., P, D)`` flattened in C order), and ``pbar_n`` is
    the mean of the B = N / P rows of position n.  vector-quantize-pytorch averages over the batch
    (and heads) separately at each sequence position; ``positions = 1`` averages over all rows.
    ``L`` lies in ``[-log K, 0]``; it is lowest when every position's batch uses all codes equally.

    Parameters
    ----------
    logits : (N, K)
    inverse_temperature : T >= 0 (vector-quantize-pytorch's ``codebook_diversity_temperature``,
        which multiplies the logits: a larger T makes each row's distribution sharper)
    positions : P, a divisor of N

    Returns
    -------
    loss : 0-d
    cache : DiversityCache
    """
    xp = B.get_namespace(logits)
    N, K = logits.shape
    if positions < 1 or N % positions:
        raise ValueError(f"positions must divide the number of rows {N}, got {positions}")
    T = float(inverse_temperature)
    p, sm = softmax_forward((logits - xp.max(logits, axis=-1, keepdims=True)) * T)  # (N, K)
    pbar = xp.mean(xp.reshape(p, (N // positions, positions, K)), axis=0)  # (P, K)
    h, ent = clamped_entropy_forward(pbar)  # (P,)
    return xp.asarray(-xp.mean(h)), DiversityCache(sm, ent, T, int(positions))  # () a 0-d array everywhere


def diversity_loss_backward(dloss: Array, cache: DiversityCache) -> Array:
    """Gradient of the diversity loss for the logits, step by step in reverse:

        dh    = -dloss / P                                  (P,)   L = -mean_n h_n
        dpbar = clamped_entropy_backward(dh)                (P, K)
        dp_i  = dpbar_{i mod P} / B                         (N, K) the mean's adjoint
        dl    = T softmax_backward(dp)                      (N, K)

    Parameters
    ----------
    dloss : number or 0-d array
    cache : DiversityCache

    Returns
    -------
    dlogits : (N, K)
    """
    xp = B.get_namespace(cache.softmax.p)
    N, K = cache.softmax.p.shape
    P = cache.positions
    dh = xp.zeros((P,), dtype=cache.softmax.p.dtype, device=B.get_device(cache.softmax.p)) - dloss / P  # (P,)
    dpbar = clamped_entropy_backward(dh, cache.entropy)  # (P, K)
    dp = xp.reshape(xp.broadcast_to(dpbar / (N // P), (N // P, P, K)), (N, K))  # (N, K)
    return cache.inverse_temperature * softmax_backward(dp, cache.softmax)
