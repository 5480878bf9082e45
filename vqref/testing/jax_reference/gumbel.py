"""JAX references for the soft paths of a codebook: logits, Gumbel-softmax, the straight-through
Gumbel-softmax and soft estimators, and the codebook diversity loss.

Symbols: N vectors, D features, K codes, tau the sampling temperature, g (N, K) Gumbel noise (a
constant), T the diversity loss's inverse temperature, P positions; ``sg[.]`` is
``jax.lax.stop_gradient``.

    logits        l_ik = -sqrt(max(||x_i - c_k||^2, 1e-8))     Euclidean (vector-quantize-pytorch's cdist)
                  l_ik = x_i . c_k                              dot (cosine codebooks, unit rows)
    Gumbel-softmax y = softmax(l / tau + g)                     (Jang et al., arXiv 1611.01144, eq. 2)
    hard code      z C, z = onehot(k)                           (k sampled or nearest, held fixed)
    straight-through Gumbel   (z + y - sg[y]) C                 value z C; the gradient reaches the
                                                                logits through y (a surrogate)
    soft code      y C,  y = softmax(l / tau)                   its true derivative
    diversity      L = -(1/P) sum_n H(pbar_n),  pbar_n = mean of softmax(T l_i) over the rows
                   i = n, n + P, n + 2P, ... of position n      (wav2vec 2.0, arXiv 2006.11477, eq. 4)
    grouped        the same with each row's position given (g_i), the mean over the positions that
                   have rows: L = -(1/P') sum_{n : B_n > 0} H(pbar_n)   (rows a mask left out)

The squared distances are direct differences; the clamp is a ``where`` on ``d^2 >= 1e-8`` (the
gradient passes at equality, as torch's ``clamp``).  The positions are strided slices of the
rows (vqref reshapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .entropy import entropy, softmax

__all__ = [
    "code_logits",
    "gumbel_softmax",
    "soft_assignment",
    "straight_through_gumbel",
    "straight_through_gumbel_code",
    "diversity_loss",
    "grouped_diversity_loss",
    "softmax",
    "clamped_entropy",
    "gumbel_noise_host",
    "DISTANCE_CLAMP",
]

sg = jax.lax.stop_gradient
DISTANCE_CLAMP = 1e-8
clamped_entropy = entropy


def code_logits(x, codebook, *, metric: str = "euclidean"):
    """The logits (N, K) of x (N, D) for the codes (K, D): minus the clamped distance, or the dot product."""
    if metric == "dot":
        return x @ codebook.T
    diff = x[:, None, :] - codebook[None, :, :]  # (N, K, D)
    d2 = jnp.sum(diff * diff, axis=-1)  # (N, K)
    return -jnp.sqrt(jnp.where(d2 >= DISTANCE_CLAMP, d2, DISTANCE_CLAMP))


def gumbel_softmax(logits, *, temperature: float, noise=None):
    """``softmax(l / tau + g)`` (``softmax(l / tau)`` without noise); (N, K)."""
    s = logits / temperature
    return softmax(s if noise is None else s + jnp.asarray(noise))


def soft_assignment(y, codebook):
    """``y C``: the soft code, (N, K) x (K, D) -> (N, D)."""
    return y @ codebook


def straight_through_gumbel(z, codebook):
    """``z C`` with the one-hot ``z`` (N, K) a float input: the op whose gradient ``dz`` the
    straight-through estimator hands to y (see :func:`straight_through_gumbel_code`)."""
    return z @ codebook


def straight_through_gumbel_code(y, codebook, indices):
    """``(z + y - sg[y]) C``: the hard codes ``C[k]`` in value, y's gradient in place of z's."""
    z = jax.nn.one_hot(jnp.asarray(indices), codebook.shape[0], dtype=codebook.dtype)  # (N, K)
    return (z + y - sg(y)) @ codebook


def diversity_loss(logits, *, inverse_temperature: float, positions: int = 1):
    """``-(1/P) sum_n H(mean of softmax(T l_i) over the rows of position n)``; 0-d."""
    p = softmax(inverse_temperature * logits)  # (N, K)
    pbar = jnp.stack([jnp.mean(p[n::positions], axis=0) for n in range(positions)])  # (P, K)
    return -jnp.mean(entropy(pbar))


def grouped_diversity_loss(logits, groups, num_groups: int, *, inverse_temperature: float):
    """The diversity loss with the position of each row given: ``groups`` (N,) host ints in [0, P).

    Each position averages its own rows; positions without rows are left out of the mean (and with
    no row at all the loss is 0).  Returns a 0-d array.
    """
    p = softmax(inverse_temperature * logits)  # (N, K)
    groups = np.asarray(groups)
    entropies = [entropy(jnp.mean(p[np.flatnonzero(groups == n)], axis=0)) for n in range(num_groups)
                 if np.any(groups == n)]  # fmt: skip
    return -sum(entropies, jnp.zeros((), dtype=logits.dtype)) / max(len(entropies), 1)


def gumbel_noise_host(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Standard Gumbel noise ``-log(-log u)`` from ``rng.random(shape)`` (float64, host), both
    logarithms clamped at 1e-20 as in vector-quantize-pytorch: to replay a module's draws."""
    u = rng.random(shape)
    return -np.log(np.maximum(-np.log(np.maximum(u, 1e-20)), 1e-20))
