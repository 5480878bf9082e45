"""Exercise 11: the backward of conv2d, by im2col.

Symbols: B images, C input channels, H x W pixels; F filters of kh x kw; stride s, padding p;
Ho = (H + 2p - kh) // s + 1 and Wo = (W + 2p - kw) // s + 1 output positions.

The forward.  A convolution layer (as ``torch.nn.functional.conv2d`` computes it, a
cross-correlation) slides every filter over the zero-padded image:

    out[b, f, u, v] = b_f + sum_{c, i, j} w[f, c, i, j] * x_pad[b, c, u s + i, v s + j]

im2col turns it into one matrix product.  Every patch becomes a row of ``cols (B Ho Wo, C kh kw)``
(columns in the order (c, i, j)); with ``W_mat = w.reshape(F, C kh kw)``,

    out_mat = cols @ W_mat^T + b          (B Ho Wo, F), then reshaped to (B, F, Ho, Wo)

:func:`im2col` and :func:`conv2d_forward` below are given.

Your task.  Given ``dout (B, F, Ho, Wo)``, return ``(dx, dw, db)`` with the shapes of x, w and b.
Write :func:`col2im`, the adjoint of :func:`im2col`, and use it in :func:`conv2d_backward`.  The
grader compares with torch autograd of ``F.conv2d``.

Hints.
* The matrix product's backward: ``dW_mat = dout_mat^T @ cols`` and ``dcols = dout_mat @ W_mat``.
  Check the shapes; reshape ``dW_mat`` in the order im2col built its columns.
* ``db`` collects the bias's every use: every image and every position.
* col2im sends every entry of ``dcols`` back to the pixel it was copied from.  When patches
  overlap (stride < kernel), a pixel appears in several patches: what must happen to its entries?
* The forward padded x; dx must have x's shape.

Check it: ``vqref grade ex11`` from the repository root.
"""

from array_api_compat import array_namespace


def output_size(H, W, kh, kw, stride, padding):
    """``(Ho, Wo)``.  Given."""
    return (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1


def im2col(x, kh, kw, stride, padding):
    """Every patch of the padded x as a row.  x (B, C, H, W) -> cols (B Ho Wo, C kh kw).  Given."""
    xp = array_namespace(x)
    B, C, H, W = x.shape
    Ho, Wo = output_size(H, W, kh, kw, stride, padding)
    x_pad = xp.zeros((B, C, H + 2 * padding, W + 2 * padding), dtype=x.dtype)
    x_pad[:, :, padding : padding + H, padding : padding + W] = x
    patches = []
    for i in range(kh):  # one strided view per kernel offset (i, j): pixel (u s + i, v s + j)
        for j in range(kw):
            rows = slice(i, i + stride * (Ho - 1) + 1, stride)
            cols = slice(j, j + stride * (Wo - 1) + 1, stride)
            patches.append(x_pad[:, :, rows, cols])  # (B, C, Ho, Wo)
    cols = xp.reshape(xp.stack(patches, axis=2), (B, C * kh * kw, Ho, Wo))  # columns in (c, i, j) order
    return xp.reshape(xp.permute_dims(cols, (0, 2, 3, 1)), (B * Ho * Wo, C * kh * kw))


def conv2d_forward(x, w, b, stride, padding):
    """``F.conv2d(x, w, b, stride, padding)`` by im2col.  -> out (B, F, Ho, Wo).  Given."""
    xp = array_namespace(x, w, b)
    B, C, H, W = x.shape
    F, _, kh, kw = w.shape
    Ho, Wo = output_size(H, W, kh, kw, stride, padding)
    out = im2col(x, kh, kw, stride, padding) @ xp.reshape(w, (F, C * kh * kw)).T + b  # (B Ho Wo, F)
    return xp.permute_dims(xp.reshape(out, (B, Ho, Wo, F)), (0, 3, 1, 2))


def col2im(dcols, x_shape, kh, kw, stride, padding):
    """The adjoint of :func:`im2col`.  dcols (B Ho Wo, C kh kw) -> dx (B, C, H, W)."""
    raise NotImplementedError


def conv2d_backward(dout, x, w, stride, padding):
    """Gradients of ``<dout, conv2d_forward(x, w, b, stride, padding)>``.

    Parameters
    ----------
    dout : (B, F, Ho, Wo) float
    x : (B, C, H, W) float
    w : (F, C, kh, kw) float
    stride, padding : int

    Returns
    -------
    dx : (B, C, H, W)
    dw : (F, C, kh, kw)
    db : (F,)
    """
    raise NotImplementedError
