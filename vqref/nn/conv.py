"""Two-dimensional convolution and transposed convolution by im2col, with hand-written backwards.

Symbols: N images; Hi x Wi input pixels with C channels; Ho x Wo output positions with F
channels; a kernel of kh x kw taps; stride s, padding p (the same along both axes); R = N Ho Wo
patches (rows of the patch matrix) and J = kh kw C values per patch.

**Layout.** Images are channels-last, ``(N, H, W, C)`` ("NHWC", the layout of an image array as
scikit-learn, PIL and matplotlib hand it out).  Kernels keep the convention of
:func:`vqref.ops.linear.linear_forward`, input-major with the output features on the last axis:

* :func:`conv2d_forward`: ``W (kh, kw, C, F)``;
* :func:`conv_transpose2d_forward`: ``W (Cin, kh, kw, Cout)``.

torch is channels-first: ``x_torch = x.permute(0, 3, 1, 2)``, ``conv2d``'s weight
``(F, C, kh, kw) = W.permute(3, 2, 0, 1)`` and ``conv_transpose2d``'s weight
``(Cin, Cout, kh, kw) = W.permute(0, 3, 1, 2)``.  With channels last, the channel axis of a patch
is already contiguous, and the encoder's output ``(N, H', W', d)`` is a grid of d-dimensional
tokens without a transpose.

**The convolution** (as in every deep-learning library, a cross-correlation: the kernel is not
flipped), with ``xpad`` the input with p zero rows and columns added on every side::

    y[n, u, v, f] = b[f] + sum_{i, j, c} W[i, j, c, f] xpad[n, u s + i, v s + j, c]        (1)
    Ho = floor((Hi + 2p - kh) / s) + 1,  Wo likewise     (Dumoulin & Visin, arXiv 1603.07285, rel. 6)

**im2col** (Chellapilla, Puri & Simard 2006, "High performance convolutional neural networks for
document processing") turns (1) into one matrix product.  Every patch ``xpad[n, u s + i, v s + j, :]``
over the taps (i, j) becomes one row of ``cols (R, J)``, in the order (i, j, c) in which ``W``
flattens to ``W_mat (J, F)``; then ``y_mat = cols W_mat + b``, an affine map of patches, and its
backward is the affine map's (``dW_mat = cols^T dy_mat``, ``dcols = dy_mat W_mat^T``).

**col2im** is the adjoint (transpose) of the patch gather: ``dx`` collects, for every pixel, the
entries of ``dcols`` that were copies of it.  Where patches overlap (stride < kernel) one pixel
sits in several patches and its gradient is the sum over all of them.  The sum runs tap by tap:
for a fixed tap (i, j) the pixels ``(u s + i, v s + j)`` of different (u, v) are distinct, so one
strided slice of ``dxpad`` receives each value once, and the overlaps are added in separate
statements.  Never a fancy-index ``dx[idx] += v`` with repeated indices, which keeps only one of
the repeats in numpy and is undefined in cupy.

**The transposed convolution** (arXiv 1603.07285, section 4) is the adjoint of (1) with respect to
its input: the decoder's learnable upsampling.  Each input pixel scatters ``x[n, a, b, :] W``, a
``kh x kw x Cout`` block, onto the output at ``(a s - p, b s - p)``; overlapping blocks add.  In
matrix form: ``cols = x_mat W_mat`` (``(N Hi Wi, kh kw Cout)``), then ``y = col2im(cols) + b``, so
the roles of im2col and col2im swap between the forward and the backward.  Its output size is
``Ho = (Hi - 1) s - 2p + kh + output_padding`` (rel. 14; output_padding in ``[0, s)`` picks one of
the s input sizes that a strided convolution maps to the same Hi).

Both forwards and backwards use only the Array API (strided slices, stack, reshape, matmul, and
slice assignment into an array they have just created), so they run unchanged on numpy, cupy and
array_api_strict.  On numpy the patch gather has a fast path, :func:`_im2col_numpy`: one copy of
a ``sliding_window_view`` instead of kh kw strided slice copies (about three times faster for
the 3-channel images of the first layer).  The convolutions choose it in one line
(:func:`_patches`), and ``tests/test_conv.py`` pins it to :func:`im2col`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import backend as B
from ..backend import Array

__all__ = [
    "conv_output_size",
    "conv_transpose_output_size",
    "im2col",
    "col2im",
    "Conv2dCache",
    "conv2d_forward",
    "conv2d_backward",
    "ConvTranspose2dCache",
    "conv_transpose2d_forward",
    "conv_transpose2d_backward",
]


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """``floor((size + 2 padding - kernel) / stride) + 1``: the output positions along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_transpose_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, output_padding: int = 0
) -> int:
    """``(size - 1) stride - 2 padding + kernel + output_padding``: the transposed convolution's output size."""
    return (size - 1) * stride - 2 * padding + kernel + output_padding


def _check_geometry(kernel: tuple, stride: Any, padding: Any) -> tuple[int, int]:
    """``(stride, padding)`` as ints, or a ValueError that names the bad one."""
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if min(kernel) < 1:
        raise ValueError(f"the kernel must have at least one tap along each axis, got {kernel}")
    return int(stride), int(padding)


def _check_images(name: str, x: Array, channels: int, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be a batch of channels-last images (N, H, W, C), got shape {tuple(x.shape)}")
    if x.shape[3] != channels:
        raise ValueError(f"{name} has {x.shape[3]} channels (its last axis) but {what} expects {channels}")


def _check_kernel(W: Array, layout: str) -> tuple:
    if W.ndim != 4:
        raise ValueError(f"the kernel W must have 4 axes {layout}, got shape {tuple(W.shape)}")
    return tuple(W.shape)


def _check_dy(dy: Array, expected: tuple) -> None:
    # A reshape would accept any array of the right size (a transposed grid too): check the shape.
    if tuple(dy.shape) != expected:
        raise ValueError(f"dy must have the shape of the forward's output, {expected}, got {tuple(dy.shape)}")


def _pad(x: Array, p: int) -> Array:
    """``x (N, H, W, C)`` with p rows of zeros above and below and p columns left and right."""
    if p == 0:
        return x
    xp = B.get_namespace(x)
    N, H, W, C = x.shape
    dev = B.get_device(x)
    rows = xp.zeros((N, p, W, C), dtype=x.dtype, device=dev)
    x = xp.concat([rows, x, rows], axis=1)  # (N, H + 2p, W, C)
    cols = xp.zeros((N, H + 2 * p, p, C), dtype=x.dtype, device=dev)
    return xp.concat([cols, x, cols], axis=2)  # (N, H + 2p, W + 2p, C)


def _tap(i: int, j: int, Ho: int, Wo: int, s: int) -> tuple:
    """The index of the pixels ``(u s + i, v s + j)``, u < Ho, v < Wo, of a padded image: two strided slices."""
    return (slice(None), slice(i, i + s * (Ho - 1) + 1, s), slice(j, j + s * (Wo - 1) + 1, s), slice(None))


def im2col(x: Array, kh: int, kw: int, *, stride: int = 1, padding: int = 0) -> Array:
    """Every kh x kw patch of the zero-padded images as one row.

    Parameters
    ----------
    x : (N, Hi, Wi, C) float
    kh, kw : the patch (kernel) size
    stride, padding : s, p

    Returns
    -------
    cols : (N Ho Wo, kh kw C), row ``(n, u, v)`` holds ``xpad[n, u s + i, v s + j, c]`` in the
        order (i, j, c); a new array
    """
    xp = B.get_namespace(x)
    N, Hi, Wi, C = x.shape
    Ho, Wo = conv_output_size(Hi, kh, stride, padding), conv_output_size(Wi, kw, stride, padding)
    xpad = _pad(x, padding)  # (N, Hi + 2p, Wi + 2p, C)
    # One strided slice per tap (i, j): the pixel that tap reads at every output position.
    taps = [xpad[_tap(i, j, Ho, Wo, stride)] for i in range(kh) for j in range(kw)]  # kh kw x (N, Ho, Wo, C)
    patches = xp.stack(taps, axis=3)  # (N, Ho, Wo, kh kw, C), the one copy
    return xp.reshape(patches, (N * Ho * Wo, kh * kw * C))  # (R, J)


def col2im(cols: Array, shape: tuple, kh: int, kw: int, *, stride: int = 1, padding: int = 0) -> Array:
    """The adjoint of :func:`im2col`: add every entry of ``cols`` into the pixel it was copied from.

    For any ``x`` of ``shape`` and ``g`` of the shape of ``im2col(x)``,
    ``<im2col(x), g> = <x, col2im(g, shape)>``.  Pixels in several patches receive the sum of
    their entries; pixels in no patch (rows and columns a strided kernel never reaches) and the
    padding's contributions (cropped off) receive nothing.

    Parameters
    ----------
    cols : (N Ho Wo, kh kw C) float, with Ho, Wo those of an image of ``shape``
    shape : (N, Hi, Wi, C), the images :func:`im2col` read
    kh, kw, stride, padding : as for :func:`im2col`

    Returns
    -------
    x : (N, Hi, Wi, C), a new array
    """
    xp = B.get_namespace(cols)
    N, Hi, Wi, C = shape
    Ho, Wo = conv_output_size(Hi, kh, stride, padding), conv_output_size(Wi, kw, stride, padding)
    if tuple(cols.shape) != (N * Ho * Wo, kh * kw * C):
        raise ValueError(
            f"col2im: cols has shape {tuple(cols.shape)}, but images of shape {tuple(shape)} with a "
            f"{kh}x{kw} kernel, stride {stride} and padding {padding} have {(N * Ho * Wo, kh * kw * C)}"
        )
    per_tap = xp.reshape(cols, (N, Ho, Wo, kh * kw, C))  # (N, Ho, Wo, kh kw, C)
    p = padding
    out = xp.zeros((N, Hi + 2 * p, Wi + 2 * p, C), dtype=cols.dtype, device=B.get_device(cols))
    for i in range(kh):
        for j in range(kw):
            # A strided slice has no repeated pixel, so each value lands once; the taps that
            # overlap on a pixel add up across the iterations.
            at = _tap(i, j, Ho, Wo, stride)
            out[at] = out[at] + per_tap[:, :, :, i * kw + j, :]  # (N, Ho, Wo, C)
    return out[:, p : p + Hi, p : p + Wi, :]  # (N, Hi, Wi, C), the padding cropped off


def _im2col_numpy(x: Array, kh: int, kw: int, *, stride: int = 1, padding: int = 0) -> Array:
    """numpy fast path of :func:`im2col` (the same array, bit for bit): every window of the padded
    images as a view, the stride taken by slicing the view, then one copy in the order (i, j, c)."""
    N, Hi, Wi, C = x.shape
    Ho, Wo = conv_output_size(Hi, kh, stride, padding), conv_output_size(Wi, kw, stride, padding)
    xpad = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))  # (N, Hi + 2p, Wi + 2p, C)
    windows = sliding_window_view(xpad, (kh, kw), axis=(1, 2))  # (N, Hi + 2p - kh + 1, ..., C, kh, kw), a view
    windows = windows[:, : stride * (Ho - 1) + 1 : stride, : stride * (Wo - 1) + 1 : stride]  # (N, Ho, Wo, C, kh, kw)
    patches = np.ascontiguousarray(windows.transpose(0, 1, 2, 4, 5, 3))  # (N, Ho, Wo, kh, kw, C), the one copy
    return patches.reshape(N * Ho * Wo, kh * kw * C)  # (R, J)


def _patches(x: Array, kh: int, kw: int, stride: int, padding: int) -> Array:
    """:func:`im2col`, by its numpy fast path on numpy arrays."""
    gather = _im2col_numpy if B.is_numpy(B.get_namespace(x)) else im2col
    return gather(x, kh, kw, stride=stride, padding=padding)


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------


class Conv2dCache(NamedTuple):
    cols: Array  # (R, J) the patches of the input, computed by the forward (no reference to x)
    W: Array  # (J, F) a copy of the kernel as a matrix, rows in the order (i, j, c)
    x_shape: tuple  # (N, Hi, Wi, C), for col2im
    kernel: tuple  # (kh, kw)
    stride: int  # s
    padding: int  # p


def conv2d_forward(
    x: Array, W: Array, b: Array | None, *, stride: int = 1, padding: int = 0
) -> tuple[Array, Conv2dCache]:
    """Two-dimensional convolution (cross-correlation) of channels-last images, eq. (1).

    Parameters
    ----------
    x : (N, Hi, Wi, C) float
    W : (kh, kw, C, F) float, the kernel (torch's ``(F, C, kh, kw)`` is ``W.permute(3, 2, 0, 1)``)
    b : (F,) float, or None for a convolution without bias
    stride, padding : s >= 1 and p >= 0, the same along both axes

    Returns
    -------
    y : (N, Ho, Wo, F)
    cache : Conv2dCache(cols, W_mat, x_shape, (kh, kw), s, p); the patches are new arrays and the
        kernel a copy, so changing ``x`` or ``W`` in place afterwards changes no gradient

    Notes
    -----
    The patch matrix costs kh kw / s^2 times the input's memory (4x for the 4x4, stride-2
    kernels of the VQ-VAE's encoder); caching it spares the backward a second gather.
    """
    xp = B.get_namespace(x, W)
    kh, kw, C, F = _check_kernel(W, "(kh, kw, C, F)")
    s, p = _check_geometry((kh, kw), stride, padding)
    _check_images("x", x, C, f"the kernel W {tuple(W.shape)} = (kh, kw, C, F)")
    N, Hi, Wi, _ = x.shape
    Ho, Wo = conv_output_size(Hi, kh, s, p), conv_output_size(Wi, kw, s, p)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"a {kh}x{kw} kernel does not fit into {Hi}x{Wi} images with padding {p}: pad more")
    cols = _patches(x, kh, kw, s, p)  # (R, J)
    W_mat = xp.reshape(W, (kh * kw * C, F))  # (J, F)
    y = cols @ W_mat  # (R, F)
    if b is not None:
        y = y + b  # (R, F) the bias broadcast over every image and position
    cache = Conv2dCache(cols, xp.asarray(W_mat, copy=True), (N, Hi, Wi, C), (kh, kw), s, p)
    return xp.reshape(y, (N, Ho, Wo, F)), cache


def conv2d_backward(dy: Array, cache: Conv2dCache) -> tuple[Array, Array, Array]:
    """Gradients of :func:`conv2d_forward`.

    With ``y_mat = cols W_mat + b`` (rows r = (n, u, v)) the affine map's backward gives the
    kernel and bias gradients, and col2im carries the patch gradients back to the pixels::

        dW_mat = cols^T dy_mat           (J, F)   a sum over all R patches
        db     = sum_r dy_mat[r]          (F,)     b is added at every image and position
        dcols  = dy_mat W_mat^T          (R, J)
        dx     = col2im(dcols)            (N, Hi, Wi, C)

    Parameters
    ----------
    dy : (N, Ho, Wo, F) float
    cache : Conv2dCache from :func:`conv2d_forward`

    Returns
    -------
    dx : (N, Hi, Wi, C), dW : (kh, kw, C, F), db : (F,) (a caller without bias ignores it)
    """
    xp = B.get_namespace(dy)
    cols, W_mat, x_shape, (kh, kw), s, p = cache
    N, Hi, Wi, _ = x_shape
    F = W_mat.shape[1]
    _check_dy(dy, (N, conv_output_size(Hi, kh, s, p), conv_output_size(Wi, kw, s, p), F))
    dy_mat = xp.reshape(dy, (cols.shape[0], F))  # (R, F)
    dW = xp.reshape(cols.mT @ dy_mat, (kh, kw, x_shape[3], F))  # (kh, kw, C, F)
    db = xp.sum(dy_mat, axis=0)  # (F,)
    dcols = dy_mat @ W_mat.mT  # (R, J)
    dx = col2im(dcols, x_shape, kh, kw, stride=s, padding=p)  # (N, Hi, Wi, C)
    return dx, dW, db


# --------------------------------------------------------------------------------------------
# Transposed convolution
# --------------------------------------------------------------------------------------------


class ConvTranspose2dCache(NamedTuple):
    x: Array  # (N Hi Wi, Cin) a copy of the input as a matrix, one row per pixel
    W: Array  # (Cin, kh kw Cout) a copy of the kernel as a matrix, columns in the order (i, j, c)
    y_shape: tuple  # (N, Ho, Wo, Cout), for im2col of dy
    kernel: tuple  # (kh, kw)
    stride: int  # s
    padding: int  # p


def conv_transpose2d_forward(
    x: Array, W: Array, b: Array | None, *, stride: int = 1, padding: int = 0, output_padding: int = 0
) -> tuple[Array, ConvTranspose2dCache]:
    """Transposed convolution of channels-last images: the adjoint of eq. (1) in its input, plus a bias.

    ``y = col2im(x_mat W_mat) + b``: every input pixel adds its ``kh x kw x Cout`` block
    ``x[n, a, b, :] W`` onto the output at rows ``a s - p + i`` and columns ``b s - p + j``.
    Without the bias it is exactly the backward of :func:`conv2d_forward` with respect to its
    input, for the conv2d kernel ``W2[i, j, co, ci] = W[ci, i, j, co]`` (Cout -> Cin channels)
    and an output of the size computed here.

    Parameters
    ----------
    x : (N, Hi, Wi, Cin) float
    W : (Cin, kh, kw, Cout) float (torch's ``(Cin, Cout, kh, kw)`` is ``W.permute(0, 3, 1, 2)``)
    b : (Cout,) float, or None
    stride, padding : s >= 1, p >= 0: those of the convolution this one transposes
    output_padding : in ``[0, s)``, extra rows and columns at the bottom and right (which only
        the bias reaches), to choose among the output sizes a stride-s convolution maps to Hi

    Returns
    -------
    y : (N, Ho, Wo, Cout), ``Ho = (Hi - 1) s - 2p + kh + output_padding``, Wo likewise
    cache : ConvTranspose2dCache(x_mat, W_mat, y_shape, (kh, kw), s, p), copies
    """
    xp = B.get_namespace(x, W)
    Cin, kh, kw, Cout = _check_kernel(W, "(Cin, kh, kw, Cout)")
    s, p = _check_geometry((kh, kw), stride, padding)
    integer = isinstance(output_padding, (int, np.integer)) and not isinstance(output_padding, bool)
    if not integer or not 0 <= output_padding < s:
        raise ValueError(f"output_padding must be an integer in [0, stride) = [0, {s}), got {output_padding!r}")
    op = int(output_padding)
    _check_images("x", x, Cin, f"the kernel W {tuple(W.shape)} = (Cin, kh, kw, Cout)")
    N, Hi, Wi, _ = x.shape
    Ho = conv_transpose_output_size(Hi, kh, s, p, op)
    Wo = conv_transpose_output_size(Wi, kw, s, p, op)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"padding {p} crops everything from the {Ho + 2 * p}x{Wo + 2 * p} output: pad less")
    x_mat = xp.reshape(x, (N * Hi * Wi, Cin))  # (N Hi Wi, Cin)
    W_mat = xp.reshape(W, (Cin, kh * kw * Cout))  # (Cin, kh kw Cout)
    cols = x_mat @ W_mat  # (N Hi Wi, kh kw Cout): the block each input pixel scatters
    y = col2im(cols, (N, Ho, Wo, Cout), kh, kw, stride=s, padding=p)  # (N, Ho, Wo, Cout)
    if b is not None:
        y = y + b  # (N, Ho, Wo, Cout)
    cache = ConvTranspose2dCache(
        xp.asarray(x_mat, copy=True), xp.asarray(W_mat, copy=True), (N, Ho, Wo, Cout), (kh, kw), s, p
    )
    return y, cache


def conv_transpose2d_backward(dy: Array, cache: ConvTranspose2dCache) -> tuple[Array, Array, Array]:
    """Gradients of :func:`conv_transpose2d_forward`.

    The forward is ``y = col2im(x_mat W_mat) + b``, and im2col is col2im's adjoint, so::

        dcols  = im2col(dy)              (N Hi Wi, kh kw Cout)   every output pixel a block came to
        dx_mat = dcols W_mat^T           (N Hi Wi, Cin)          = a convolution of dy
        dW_mat = x_mat^T dcols           (Cin, kh kw Cout)
        db     = sum over n, rows, columns of dy     (Cout,)

    Parameters
    ----------
    dy : (N, Ho, Wo, Cout) float
    cache : ConvTranspose2dCache from :func:`conv_transpose2d_forward`

    Returns
    -------
    dx : (N, Hi, Wi, Cin), dW : (Cin, kh, kw, Cout), db : (Cout,)
    """
    xp = B.get_namespace(dy)
    x_mat, W_mat, (N, Ho, Wo, Cout), (kh, kw), s, p = cache
    _check_dy(dy, (N, Ho, Wo, Cout))
    Cin = W_mat.shape[0]
    dcols = _patches(dy, kh, kw, s, p)  # (N Hi Wi, kh kw Cout); output_padding rows: never read
    Hi, Wi = conv_output_size(Ho, kh, s, p), conv_output_size(Wo, kw, s, p)  # the input's size again
    dx = xp.reshape(dcols @ W_mat.mT, (N, Hi, Wi, Cin))  # (N, Hi, Wi, Cin)
    dW = xp.reshape(x_mat.mT @ dcols, (Cin, kh, kw, Cout))  # (Cin, kh, kw, Cout)
    db = xp.sum(xp.reshape(dy, (N * Ho * Wo, Cout)), axis=0)  # (Cout,)
    return dx, dW, db
