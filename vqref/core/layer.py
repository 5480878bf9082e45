"""The maps around the quantization: kept rows, projections into the codebook space, heads.

Symbols: N rows (tokens), n rows kept by a mask, D = dim, d = codebook_dim, H heads, E = H d (the
projected width), G streams (H with a codebook per head, else 1), P the diversity loss's positions.

vector-quantize-pytorch's ``VectorQuantize`` and ``ResidualVQ`` quantize inside up to three maps,
which vqref writes as forward/backward pairs around the residual core
(:func:`vqref.core.residual.residual_forward`):

    x_s = x[rows]                       (n, D)     the rows a mask keeps            core.rows
    z   = x_s W_in + b_in               (n, E)     project_in, when E != D          ops.linear
    z_g = split(z)                      G streams  heads
    o_g = quantize(z_g)                 each stream is a residual stack (Q = 1: plain VQ)
    o   = merge(o_g)                    (n, E)
    y   = o W_out + b_out               (n, D)     project_out
    out = scatter(y, rows)              (N, D)     0 for an absent row (or the row of x itself)

**Factorised codes** (``codebook_dim = d < D``; ViT-VQGAN, arXiv 2110.04627, §3.2; DAC,
arXiv 2306.06546): the codes live in a low dimension.  The lookup happens on ``z``, which with
``use_cosine_sim`` is l2-normalised inside the quantization (ViT-VQGAN's l2-normalised codes),
and the output is mapped back by ``project_out``.  Both maps are learnable: their gradients are
true derivatives (``dW = x^T dy``, ``db = sum dy``, ``dx = dy W^T``), and the estimator's surrogate
sits between them.  Decoding indices goes through ``project_out`` too.

**Heads** (multi-head / product quantization): ``z`` is cut into H pieces of d entries.  With
``separate_codebook_per_head`` each piece has its own codebook (G = H streams of n rows: product
quantization, K^H codes with H K stored); otherwise one codebook quantizes all n H pieces (one
stream).  That stream lists the pieces in vector-quantize-pytorch's order, sample by sample and
within a sample head by head, ``(b, h, t)`` for a row ``(b, t)`` -- the order its k-means and
dead-code restarts draw rows from.

The pieces are gathers, scatters and affine maps: every backward here is exact.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from .. import backend as B
from ..backend import Array
from ..ops.linear import linear_backward, linear_forward
from .rows import put_rows, sample_of_rows, scatter_rows, take_rows

__all__ = ["Projection", "Frame", "frame", "stream_row_ids", "LayerInCache", "LayerOutCache", "layer_in_forward",
           "layer_in_backward", "layer_out_forward", "layer_out_backward", "head_order"]  # fmt: skip


class Projection(NamedTuple):
    W: Array  # (Din, Dout), input-major as vqref.ops.linear
    b: Array  # (Dout,) or None


class Frame(NamedTuple):
    """The host decisions of one forward: which rows, in what order, how many heads."""

    num_rows: int  # N
    rows: Any  # (n,) host int64, the rows a mask keeps, or None (all N)
    heads: int  # H
    separate: bool  # a codebook per head (G = H streams)
    order: Any  # one shared codebook and H > 1: (n H,) host int64, the stream's rows of the (n, H) grid
    passthrough: Any  # (N, 1) float array, 1 for an absent row that returns x, or None


def head_order(lead: tuple, rows: Any, heads: int) -> np.ndarray:
    """The rows of the ``(n, H)`` grid of pieces in vector-quantize-pytorch's order ``(b, h, t)``.

    Piece ``(j, h)`` (kept row j, head h) is row ``j H + h`` of ``z`` reshaped to ``(n H, d)``; the
    stream lists the pieces sample by sample, then head by head, then in row order.

    Returns
    -------
    order : (n H,) host int64, ``stream[t] = pieces[order[t]]``
    """
    kept = np.arange(int(np.prod(lead)), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    n = kept.shape[0]
    sample = sample_of_rows(lead, kept)  # (n,)
    j = np.repeat(np.arange(n, dtype=np.int64), heads)  # (n H,) the kept row of each piece
    h = np.tile(np.arange(heads, dtype=np.int64), n)  # (n H,) its head
    return (j * heads + h)[np.lexsort((j, h, sample[j]))]  # sorted by sample, then head, then row


def frame(lead: tuple, mask: Any, *, heads: int, separate: bool, passthrough: bool, like: Array) -> Frame:
    """The :class:`Frame` of an input with leading shape ``lead`` and an optional mask (host step).

    ``passthrough``: absent rows return the input itself (vector-quantize-pytorch's
    ``return_zeros_for_masked_padding=False``) instead of zeros.
    """
    from .rows import kept_rows

    N = int(np.prod(lead))
    rows = None if mask is None else kept_rows(mask)
    order = head_order(lead, rows, heads) if heads > 1 and not separate else None
    absent = None
    if passthrough and rows is not None:
        host = np.ones((N, 1))
        host[rows] = 0.0
        absent = B.from_numpy(host, B.get_namespace(like), device=B.get_device(like), dtype=like.dtype)
    return Frame(N, rows, int(heads), bool(separate), order, absent)


def stream_row_ids(lead: tuple, fr: Frame) -> tuple[int, list]:
    """Each stream's rows numbered as in the stream of the whole (unmasked) batch.

    Random draws per row (Gumbel noise) are made for the whole batch's stream and these rows kept,
    so that a row's draw does not depend on which other rows a mask removed.

    Returns
    -------
    total : the rows of the whole batch's stream (N, or N H for a shared codebook's heads)
    ids : per stream, host int64 (rows,) or None (every row, in order)
    """
    G = fr.heads if fr.separate else 1
    if fr.order is None:
        return fr.num_rows, [fr.rows] * G
    H = fr.heads
    full = head_order(lead, None, H)  # (N H,) the whole batch's pieces in stream order
    position = np.empty_like(full)
    position[full] = np.arange(full.shape[0], dtype=np.int64)  # piece id -> place in that stream
    kept = np.arange(fr.num_rows, dtype=np.int64) if fr.rows is None else np.asarray(fr.rows)
    pieces = kept[fr.order // H] * H + fr.order % H  # (n H,) whole-batch piece ids of this stream's rows
    return full.shape[0], [position[pieces]]


class LayerInCache(NamedTuple):
    rows: Any  # LookupCache of the kept rows, or None
    project_in: Any  # LinearCache, or None
    order: Any  # LookupCache of the shared-codebook heads' order, or None
    frame: Frame


def layer_in_forward(x: Array, project_in: Projection | None, fr: Frame) -> tuple[list, LayerInCache]:
    """The streams the codebooks quantize: kept rows, ``project_in``, heads.

    Parameters
    ----------
    x : (N, D)
    project_in : Projection(W (D, E), b (E,) or None), or None (E = D)
    fr : Frame

    Returns
    -------
    streams : G arrays: (n, d) per head with separate codebooks, else one (n H, d)
    cache : LayerInCache
    """
    xp = B.get_namespace(x)
    xs, rows = take_rows(x, fr.rows)  # (n, D)
    z, lin = (xs, None) if project_in is None else linear_forward(xs, project_in.W, project_in.b)  # (n, E)
    n, E = z.shape
    H = fr.heads
    d = E // H
    if fr.separate:
        return [z[:, h * d : (h + 1) * d] for h in range(H)], LayerInCache(rows, lin, None, fr)  # H x (n, d)
    pieces = xp.reshape(z, (n * H, d))  # (n H, d), piece (j, h) at row j H + h
    stream, order = take_rows(pieces, fr.order)  # (n H, d) in the codebook's order
    return [stream], LayerInCache(rows, lin, order, fr)


def layer_in_backward(dstreams: Sequence[Array], cache: LayerInCache) -> tuple[Array, Any, Any]:
    """Gradients of :func:`layer_in_forward`: for x and for ``project_in``'s W and b.

    Returns
    -------
    dx : (N, D) (zeros for the absent rows);  dW : (D, E) or None;  db : (E,) or None
    """
    xp = B.get_namespace(dstreams[0])
    fr = cache.frame
    if fr.separate:
        dz = xp.concat(list(dstreams), axis=1)  # (n, E)
    else:
        dpieces = put_rows(dstreams[0], cache.order)  # (n H, d) back to the grid's order
        dz = xp.reshape(dpieces, (dpieces.shape[0] // fr.heads, dpieces.shape[1] * fr.heads))  # (n, E)
    dW = db = None
    if cache.project_in is not None:
        dxs, dW, db = linear_backward(dz, cache.project_in)  # (n, D), (D, E), (E,)
    else:
        dxs = dz
    return put_rows(dxs, cache.rows), dW, db


class LayerOutCache(NamedTuple):
    order: Any  # LookupCache of the heads' order, or None
    project_out: Any  # LinearCache, or None
    rows: Any  # LookupCache of the scatter's gather (its adjoint), or None
    frame: Frame


def layer_out_forward(outputs: Sequence[Array], x: Array, project_out: Projection | None, fr: Frame):
    """The layer's output from the streams' outputs: merge the heads, ``project_out``, scatter.

    Parameters
    ----------
    outputs : G arrays, the streams' quantized outputs (shaped as :func:`layer_in_forward`'s streams)
    x : (N, D) the input (only read for absent rows that return it)
    project_out : Projection(W (E, D), b (D,) or None), or None
    fr : Frame

    Returns
    -------
    out : (N, D), zeros (or x) for the absent rows
    cache : LayerOutCache
    """
    xp = B.get_namespace(outputs[0])
    order = None
    if fr.separate:
        merged = xp.concat(list(outputs), axis=1)  # (n, E)
    else:
        o = outputs[0]
        if fr.order is not None:  # back from the codebook's order to the (n, H) grid
            o, order = scatter_rows(o, fr.order, o.shape[0])  # (n H, d)
        merged = xp.reshape(o, (o.shape[0] // fr.heads, o.shape[1] * fr.heads))  # (n, E)
    y, lin = (merged, None) if project_out is None else linear_forward(merged, project_out.W, project_out.b)
    out, rows = scatter_rows(y, fr.rows, fr.num_rows)  # (N, D)
    if fr.passthrough is not None:
        out = out + fr.passthrough * x  # the absent rows return x
    return out, LayerOutCache(order, lin, rows, fr)


def layer_out_backward(dout: Array, cache: LayerOutCache) -> tuple[list, Any, Any, Any]:
    """Gradients of :func:`layer_out_forward`.

    Returns
    -------
    doutputs : G arrays, the streams' upstream gradients
    dW, db : ``project_out``'s gradients, or None
    dx_passthrough : (N, D), the gradient reaching x directly (absent rows that return x), or None
    """
    xp = B.get_namespace(dout)
    fr = cache.frame
    dy = dout if cache.rows is None else xp.take(dout, cache.rows.indices, axis=0)  # (n, D) the adjoint of the scatter
    dW = db = None
    if cache.project_out is not None:
        dmerged, dW, db = linear_backward(dy, cache.project_out)  # (n, E), (E, D), (D,)
    else:
        dmerged = dy
    n, E = dmerged.shape
    d = E // fr.heads
    if fr.separate:
        doutputs = [dmerged[:, h * d : (h + 1) * d] for h in range(fr.heads)]
    else:
        dpieces = xp.reshape(dmerged, (n * fr.heads, d))  # (n H, d)
        doutputs = [dpieces if cache.order is None else xp.take(dpieces, cache.order.indices, axis=0)]
    dx_pass = None if fr.passthrough is None else fr.passthrough * dout
    return doutputs, dW, db, dx_pass
