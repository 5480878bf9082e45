"""JAX references for the maps around a vector quantizer: kept rows, projections, heads.

Symbols: N rows, n rows kept by a mask, D = dim, d = codebook_dim, H heads, E = H d, K codes;
``sg[.]`` is ``jax.lax.stop_gradient``.

vector-quantize-pytorch's ``VectorQuantize`` quantizes inside three maps (vqref.core.layer)::

    x_s = x[rows]                    (n, D)    the rows a mask keeps
    z   = x_s W_in + b_in            (n, E)    project_in, when E != D
    pieces: z cut into H pieces of d entries per row
        separate codebooks: stream h = z[:, h d : (h + 1) d]       H streams (n, d)
        one codebook:       every piece a row, (n H, d)            one stream
    o   = the streams quantized, merged back into (n, E)
    y   = o W_out + b_out            (n, D)    project_out
    out = y scattered into (N, D)    zeros (or the input itself) for the absent rows

The pieces of one shared codebook are listed here in the grid's order, row by row and head by
head; vqref lists them sample by sample, head by head (vector-quantize-pytorch's order, which its
k-means and restarts sample from).  Everything a gradient depends on is a sum over rows, so the
order is no part of the math; :func:`layer_in` and :func:`layer_out` take it as an option, to
check vqref's reordering, and :func:`quantizer_layer` does without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from .vq import vq_layer

__all__ = ["layer_in", "layer_out", "quantizer_layer"]


def _affine(x, W, b):
    y = x @ W
    return y if b is None else y + b


def layer_in(x, W_in=None, b_in=None, *, rows=None, heads: int = 1, separate: bool = False, order=None):
    """The streams a quantizer sees, a tuple: H arrays (n, d) with ``separate``, else one (n H, d).

    ``rows`` (n,) host ints of the kept rows (None: all); ``order`` (n H,) host ints, the pieces
    of a shared codebook's stream as rows of the (n H, d) grid (None: the grid's order).
    """
    xs = x if rows is None else jnp.take(x, jnp.asarray(rows), axis=0)  # (n, D)
    z = xs if W_in is None else _affine(xs, W_in, b_in)  # (n, E)
    n, E = z.shape
    d = E // heads
    if separate:
        return tuple(z[:, h * d : (h + 1) * d] for h in range(heads))
    pieces = jnp.reshape(z, (n * heads, d))  # piece (j, h) is row j H + h
    return (pieces if order is None else jnp.take(pieces, jnp.asarray(order), axis=0),)


def layer_out(outputs: Sequence, x, W_out=None, b_out=None, *, rows=None, heads: int = 1, separate: bool = False,
              order=None, passthrough: bool = False):  # fmt: skip
    """``(N, D)``: the streams' outputs merged, projected out and scattered back (the inverse layout
    of :func:`layer_in`); absent rows get zeros, or ``x`` itself with ``passthrough``."""
    if separate:
        merged = jnp.concatenate(list(outputs), axis=1)  # (n, E)
    else:
        o = outputs[0]  # (n H, d)
        if order is not None:  # stream row t goes back to grid row order[t]
            o = jnp.zeros_like(o).at[jnp.asarray(order)].set(o)
        merged = jnp.reshape(o, (o.shape[0] // heads, o.shape[1] * heads))  # (n, E)
    y = merged if W_out is None else _affine(merged, W_out, b_out)  # (n, D)
    if rows is None:
        return y
    kept = jnp.asarray(rows)
    out = jnp.zeros((x.shape[0], y.shape[1]), dtype=y.dtype).at[kept].set(y)  # (N, D)
    if passthrough:
        absent = np.ones((x.shape[0], 1))
        absent[np.asarray(rows)] = 0.0
        out = out + absent * x
    return out


def quantizer_layer(
    x,
    codebook,
    indices,
    *,
    project_in: Sequence | None = None,
    project_out: Sequence | None = None,
    rows=None,
    heads: int = 1,
    separate: bool = False,
    passthrough: bool = False,
    **options,
):
    """``(out (N, D), loss ())`` of ``VectorQuantize`` with heads, projections and kept rows, codes fixed.

    Parameters
    ----------
    x : (N, D)
    codebook : (K, d), or (H, K, d) with ``separate`` (a codebook per head)
    indices : (n, H) int, the code of each kept row's pieces (the module's indices at the kept rows)
    project_in, project_out : ``(W, b)`` (or ``(W,)``), or None
    rows, heads, separate, passthrough : as :func:`layer_in` / :func:`layer_out`
    options : :func:`vqref.testing.jax_reference.vq.vq_layer`'s, for every stream.  With the
        diversity loss, ``diversity_positions`` P: a kept row r is at position ``r mod P``

    Notes
    -----
    With a codebook per head the loss is the mean of the heads' losses; one codebook quantizes
    all n H pieces at once, its mean squared errors already a mean over the pieces.
    """
    pin = tuple(project_in or (None, None)) + (None,)
    pout = tuple(project_out or (None, None)) + (None,)
    streams = layer_in(x, pin[0], pin[1], rows=rows, heads=heads, separate=separate)
    idx = np.asarray(indices).reshape(-1, heads)  # (n, H)
    kept = np.arange(x.shape[0]) if rows is None else np.asarray(rows)
    groups = None
    if options.get("codebook_diversity_loss_weight", 0) > 0:
        groups = kept % options.get("diversity_positions", 1)  # (n,) each kept row's position
    if separate:
        results = [
            vq_layer(z, codebook[h], idx[:, h], diversity_groups=groups, **options) for h, z in enumerate(streams)
        ]
        outputs, loss = [o for o, _ in results], sum(loss for _, loss in results) / heads
    else:
        groups = None if groups is None else np.repeat(groups, heads)  # (n H,) piece (j, h) at row j's position
        o, loss = vq_layer(streams[0], codebook, idx.reshape(-1), diversity_groups=groups, **options)
        outputs = [o]
    out = layer_out(outputs, x, pout[0], pout[1], rows=rows, heads=heads, separate=separate, passthrough=passthrough)
    return out, loss
