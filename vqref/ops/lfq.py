"""The steps of lookup-free quantization (LFQ, MAGVIT-v2, arXiv 2310.05737).

Symbols: N rows, d = codebook_dim bits per code, K = 2^d codes, s = codebook_scale, v the size of
each entry of a code (v = s, or s / sqrt(d) for the spherical variant), tau the inverse
temperature.

LFQ has no codebook to look up.  Its codes are the corners of a cube, every sign pattern of d
entries of size s, and the nearest corner of a row is found entry by entry (eq. 3 of the paper):

    q_j   = s if z_j > 0 else -s                                                       (1)
    index = sum_j [z_j > 0] 2^(d-1-j)       bit j of the code is entry j, entry 0 the most
                                            significant bit (vector-quantize-pytorch's order) (2)

Why (1) is the nearest code.  ``||z - c||^2 = sum_j (z_j - c_j)^2`` is a sum of one term per
entry, and each term is smallest with the c_j of z_j's sign; so the search over K = 2^d codes is
d independent sign tests, O(d) per row instead of O(K d).  A row with ``z_j = 0`` is equally far
from both signs; (1) then picks -s, as vector-quantize-pytorch does.

Gradient.  (1) is piecewise constant.  LFQ trains through it with the straight-through
estimator ``z + sg[q - z]``: a *surrogate* gradient, the identity (checked against torch autograd
with ``.detach()``, never against finite differences).

Scores for the entropy penalty (:mod:`vqref.ops.entropy`).  The soft assignment of a row over
all K codes uses ``-||z - c_k||^2``.  Expanded, ``-||z||^2 + 2 z . c_k - ||c_k||^2``: every code
of the cube has the same norm ``d v^2``, and ``||z||^2`` is the same for every code of a row, so
both drop out of a softmax over k and the score is

    score_k = 2 z . c_k,        c_k = v (2 b_k - 1),  b_k the bits of k                   (3)

(vector-quantize-pytorch writes ``distance = -2 z . c``).  Its derivative is linear:
``dz = 2 sum_k dscore_k c_k``.

Factorisation over bits.  Since ``c_k`` is a sign pattern, (3) is a sum of one term per bit,
``score_k = sum_j sigma_kj a_j`` with ``a_j = 2 v z_j`` and ``sigma_kj = +-1``.  The K scores are
therefore built one bit at a time, doubling the table at each step (``[S - a_j, S + a_j]``), in
O(N K) without ever forming the (K, d) codebook; the backward undoes the doubling, summing each
half.  :func:`code_scores_forward` has both: the readable product with the explicit codebook
(``fast=False``, the definition) and the factorised table (the fast path), and the test suite
pins one to the other.  The softmax of (3) factorises too, into d independent two-way softmaxes
``P(bit j = 1) = sigmoid(2 a_j)`` (docs/math.md section 8); the entropy penalty cannot use that,
because its batch mean does not factorise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from .l2norm import L2NormCache, l2norm_backward, l2norm_forward

__all__ = [
    "MAX_CODEBOOK_DIM",
    "SoftClampCache",
    "soft_clamp_forward",
    "soft_clamp_backward",
    "SignSTECache",
    "sign_ste_forward",
    "sign_ste_backward",
    "bits_to_indices",
    "indices_to_bits",
    "sign_codebook",
    "CodeScoresCache",
    "code_scores_forward",
    "code_scores_backward",
    "code_scores_forward_factorised",
    "code_scores_backward_factorised",
    "CosineLinearCache",
    "cosine_linear_forward",
    "cosine_linear_backward",
    "NORMALIZE_EPS",
]

MAX_CODEBOOK_DIM = 62  # indices are int64
NORMALIZE_EPS = 1e-12  # the eps of torch.nn.functional.normalize, which LFQ's l2 normalisations use


def _int_place_values(d: int, xp: Any, device: Any) -> Array:
    """``2^(d-1-j)`` for j = 0 .. d-1, int64 ``(d,)``: the value of each entry's bit."""
    return B.from_numpy(np.left_shift(np.int64(1), np.arange(d - 1, -1, -1, dtype=np.int64)), xp, device=device)


# ---------------------------------------------------------------- soft clamp of the input


class SoftClampCache(NamedTuple):
    t: Array  # (N, D) tanh(z / value)


def soft_clamp_forward(z: Array, *, value: float) -> tuple[Array, SoftClampCache]:
    """``y = value * tanh(z / value)``: z squeezed smoothly into (-value, value).

    Near 0 the map is the identity (slope 1); far out it saturates.  vector-quantize-pytorch's
    ``soft_clamp_input_value``, applied before the quantization.

    Parameters
    ----------
    z : (N, D) float
    value : the bound, > 0

    Returns
    -------
    y : (N, D), z's dtype
    cache : SoftClampCache(t)
    """
    xp = B.get_namespace(z)
    t = xp.tanh(z / value)  # (N, D)
    return t * value, SoftClampCache(t)


def soft_clamp_backward(dy: Array, cache: SoftClampCache) -> Array:
    """``dz = dy * (1 - t^2)``: ``d/dz [v tanh(z / v)] = tanh'(z / v)``, a true derivative."""
    t = cache.t
    return dy * (1 - t * t)  # (N, D)


# ---------------------------------------------------------------- (1) the sign, straight through


class SignSTECache(NamedTuple):
    pass  # the surrogate gradient is the identity: nothing to remember


def sign_ste_forward(z: Array, *, scale: float = 1.0) -> tuple[Array, SignSTECache]:
    """The nearest corner of the cube, equation (1): ``q_j = scale if z_j > 0 else -scale``.

    Parameters
    ----------
    z : (N, d) float
    scale : s > 0, the size of every entry of a code

    Returns
    -------
    q : (N, d), z's dtype, every entry exactly ``+-scale``
    cache : SignSTECache()
    """
    xp = B.get_namespace(z)
    positive = xp.astype(z > 0, z.dtype)  # (N, d) 1 or 0
    return (2 * positive - 1) * scale, SignSTECache()  # (N, d) exactly +-scale


def sign_ste_backward(dq: Array, cache: SignSTECache) -> Array:
    """``dz = dq``: the straight-through estimator (a surrogate; the sign's derivative is 0)."""
    return dq


# ---------------------------------------------------------------- (2) bits and indices


def bits_to_indices(z: Array) -> Array:
    """The index of each row's code, equation (2): ``sum_j [z_j > 0] 2^(d-1-j)``.

    Parameters
    ----------
    z : (..., d) float: the quantizer's input or its codes (only the signs matter)

    Returns
    -------
    indices : (...) int64 in [0, 2^d)
    """
    xp = B.get_namespace(z)
    place = _int_place_values(z.shape[-1], xp, B.get_device(z))  # (d,)
    return xp.sum(xp.astype(z > 0, xp.int64) * place, axis=-1)  # (...)


def indices_to_bits(indices: Array, d: int) -> Array:
    """The bits of each index, the inverse of :func:`bits_to_indices`.

    Parameters
    ----------
    indices : (...) integer in [0, 2^d)
    d : bits per code

    Returns
    -------
    bits : (..., d) bool, entry j is bit ``d-1-j`` of the index
    """
    xp = B.get_namespace(indices)
    place = _int_place_values(d, xp, B.get_device(indices))  # (d,)
    return xp.bitwise_and(xp.astype(indices, xp.int64)[..., None], place) != 0  # (..., d)


def sign_codebook(d: int, value: float, *, like: Array) -> Array:
    """All K = 2^d codes ``c_k = value * (2 b_k - 1)`` in index order, ``(K, d)`` in ``like``'s
    library, device and dtype."""
    xp = B.get_namespace(like)
    k = xp.arange(2**d, dtype=xp.int64, device=B.get_device(like))  # (K,)
    bits = xp.astype(indices_to_bits(k, d), like.dtype)  # (K, d)
    return (2 * bits - 1) * value  # (K, d)


# ---------------------------------------------------------------- (3) scores against every code


class CodeScoresCache(NamedTuple):
    codebook: Any  # (K, d) the explicit codebook (definition), or None (factorised path)
    value: float  # v
    d: int


def code_scores_forward(z: Array, *, value: float, fast: bool = True) -> tuple[Array, CodeScoresCache]:
    """``score_ik = 2 z_i . c_k`` for every code of the cube, equation (3).

    Parameters
    ----------
    z : (N, d) float
    value : v, the size of every entry of a code (s; s / sqrt(d) for spherical codes)
    fast : the factorised table (:func:`code_scores_forward_factorised`, O(N K)); False runs
        the definition, a product with the explicit (K, d) codebook (O(N K d))

    Returns
    -------
    scores : (N, K), z's dtype; column k is code k of :func:`bits_to_indices`
    cache : CodeScoresCache
    """
    if fast:
        return code_scores_forward_factorised(z, value=value)
    codebook = sign_codebook(z.shape[-1], value, like=z)  # (K, d)
    return 2 * (z @ codebook.mT), CodeScoresCache(codebook, float(value), int(z.shape[-1]))  # (N, K)


def code_scores_backward(dscores: Array, cache: CodeScoresCache) -> Array:
    """``dz = 2 dscores C``: the derivative of the linear map (3).

    Parameters
    ----------
    dscores : (N, K) float
    cache : CodeScoresCache

    Returns
    -------
    dz : (N, d)
    """
    if cache.codebook is None:
        return code_scores_backward_factorised(dscores, cache)
    return 2 * (dscores @ cache.codebook)  # (N, d)


def code_scores_forward_factorised(z: Array, *, value: float) -> tuple[Array, CodeScoresCache]:
    """Equation (3) built one bit at a time, without the codebook (the fast path).

    With ``a_j = 2 v z_j`` the scores of the codes of the first j + 1 bits are those of the
    first j bits, each followed by bit j = 0 (``- a_j``) or bit j = 1 (``+ a_j``):

        S_0 = [0]                       (N, 1)
        S_{j+1}[2m + b] = S_j[m] + (2b - 1) a_j     (N, 2^(j+1))

    so ``S_d`` lists the scores in index order (the first bit is the most significant).  The
    tables add up to 2K entries per row: O(N K) time and memory.

    Returns
    -------
    scores : (N, K); cache : CodeScoresCache(None, v, d)
    """
    xp = B.get_namespace(z)
    N, d = z.shape
    a = 2 * value * z  # (N, d)
    table = xp.zeros((N, 1), dtype=z.dtype, device=B.get_device(z))  # (N, 1) S_0
    for j in range(d):
        pair = xp.stack([-a[:, j], a[:, j]], axis=1)  # (N, 2) bit j = 0 or 1
        table = xp.reshape(table[:, :, None] + pair[:, None, :], (N, 2 ** (j + 1)))  # (N, 2^(j+1))
    return table, CodeScoresCache(None, float(value), int(d))


def code_scores_backward_factorised(dscores: Array, cache: CodeScoresCache) -> Array:
    """The backward of :func:`code_scores_forward_factorised`, undoing one bit at a time.

    ``S_{j+1}[2m + b] = S_j[m] + (2b - 1) a_j``: the gradient of ``S_j[m]`` is the sum of its two
    children, and ``a_j`` collects ``+dS`` from every bit-1 entry and ``-dS`` from every bit-0
    entry; finally ``dz = 2 v da``.  O(N K).
    """
    xp = B.get_namespace(dscores)
    N, d = dscores.shape[0], cache.d
    grad = dscores  # (N, 2^d)
    da = [None] * d
    for j in range(d - 1, -1, -1):
        halves = xp.reshape(grad, (N, 2**j, 2))  # (N, 2^j, 2) children of each entry of S_j
        per_bit = xp.sum(halves, axis=1)  # (N, 2) summed over the 2^j parents
        da[j] = per_bit[:, 1] - per_bit[:, 0]  # (N,)
        grad = xp.sum(halves, axis=2)  # (N, 2^j) the gradient of S_j
    return (2 * cache.value) * xp.stack(da, axis=1)  # (N, d)


# ---------------------------------------------------------------- the cosine-similarity projection


class CosineLinearCache(NamedTuple):
    x: L2NormCache  # the rows of x, normalised: x^ (N, Din)
    w: L2NormCache  # the columns of W, normalised (as rows of W^T): W^T^ (Dout, Din)
    scale: float


def cosine_linear_forward(x: Array, W: Array, *, scale: float) -> tuple[Array, CosineLinearCache]:
    """``y = scale * x^ W^``: unit rows of x against unit columns of W (vector-quantize-pytorch's
    ``CosineSimLinear``, its ``cosine_sim_project_in``).

    ``y_ij = scale * cos(x_i, W[:, j])``, so every entry lies in [-scale, scale] whatever the
    size of x or W.

    Parameters
    ----------
    x : (N, Din) float
    W : (Din, Dout) float (input-major, as torch's ``CosineSimLinear.weight`` is stored)
    scale : the factor of the cosines

    Returns
    -------
    y : (N, Dout); cache : CosineLinearCache
    """
    xn, x_cache = l2norm_forward(x, eps=NORMALIZE_EPS)  # (N, Din)
    wn, w_cache = l2norm_forward(W.mT, eps=NORMALIZE_EPS)  # (Dout, Din) unit columns of W, as rows
    return scale * (xn @ wn.mT), CosineLinearCache(x_cache, w_cache, float(scale))  # (N, Dout)


def cosine_linear_backward(dy: Array, cache: CosineLinearCache) -> tuple[Array, Array]:
    """``(dx, dW)``: the product's gradients, each passed back through its l2 normalisation.

    ``y = scale x^ W^``: ``dx^ = scale dy W^^T`` and ``dW^ = scale x^^T dy``; then the
    normalisation's vector-Jacobian product (:func:`vqref.ops.l2norm.l2norm_backward`) for the
    rows of x and for the columns of W.

    Returns
    -------
    dx : (N, Din); dW : (Din, Dout)
    """
    wn = cache.w.y  # (Dout, Din)
    dxn = cache.scale * (dy @ wn)  # (N, Din)
    dwn = cache.scale * (dy.mT @ cache.x.y)  # (Dout, Din) the gradient of W^'s columns, as rows
    return l2norm_backward(dxn, cache.x), l2norm_backward(dwn, cache.w).mT
