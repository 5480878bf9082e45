"""Solution 11: the backward of conv2d, by im2col.

Symbols: B images, C channels, H x W pixels; F filters of kh x kw; Ho x Wo output positions.

The forward is ``out_mat = cols @ W_mat^T + b`` with ``out_mat (B Ho Wo, F)``.  Its backward:

    dW_mat = dout_mat^T @ cols       (F, C kh kw), reshaped to w's (F, C, kh, kw)
    db     = sum of dout over (B, Ho, Wo)                     (F,)
    dcols  = dout_mat @ W_mat        (B Ho Wo, C kh kw)
    dx     = col2im(dcols)           (B, C, H, W)

im2col copies each padded pixel into every patch that contains it, so its adjoint *adds* every
copy's gradient back into that pixel.  One kernel offset (i, j) at a time, the strided view holds
distinct pixels, so ``+=`` on the view is safe; across offsets the sums accumulate.  Last, the
padding is cropped: those zeros were constants, not inputs.  Pixels no patch reads (when
``(H + 2p - kh)`` is not a multiple of the stride) get a zero gradient.
"""

from array_api_compat import array_namespace


def output_size(H, W, kh, kw, stride, padding):
    """``(Ho, Wo)``."""
    return (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1


def im2col(x, kh, kw, stride, padding):
    """Every patch of the padded x as a row.  x (B, C, H, W) -> cols (B Ho Wo, C kh kw)."""
    xp = array_namespace(x)
    B, C, H, W = x.shape
    Ho, Wo = output_size(H, W, kh, kw, stride, padding)
    x_pad = xp.zeros((B, C, H + 2 * padding, W + 2 * padding), dtype=x.dtype)
    x_pad[:, :, padding : padding + H, padding : padding + W] = x
    patches = []
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * (Ho - 1) + 1, stride)
            cols = slice(j, j + stride * (Wo - 1) + 1, stride)
            patches.append(x_pad[:, :, rows, cols])  # (B, C, Ho, Wo)
    cols = xp.reshape(xp.stack(patches, axis=2), (B, C * kh * kw, Ho, Wo))  # columns in (c, i, j) order
    return xp.reshape(xp.permute_dims(cols, (0, 2, 3, 1)), (B * Ho * Wo, C * kh * kw))


def conv2d_forward(x, w, b, stride, padding):
    """``F.conv2d(x, w, b, stride, padding)`` by im2col.  -> out (B, F, Ho, Wo)."""
    xp = array_namespace(x, w, b)
    B, C, H, W = x.shape
    F, _, kh, kw = w.shape
    Ho, Wo = output_size(H, W, kh, kw, stride, padding)
    out = im2col(x, kh, kw, stride, padding) @ xp.reshape(w, (F, C * kh * kw)).T + b  # (B Ho Wo, F)
    return xp.permute_dims(xp.reshape(out, (B, Ho, Wo, F)), (0, 3, 1, 2))


def col2im(dcols, x_shape, kh, kw, stride, padding):
    """The adjoint of :func:`im2col`: add every patch entry back into its pixel, then crop."""
    xp = array_namespace(dcols)
    B, C, H, W = x_shape
    Ho, Wo = output_size(H, W, kh, kw, stride, padding)
    d = xp.reshape(dcols, (B, Ho, Wo, C, kh, kw))
    d = xp.permute_dims(d, (0, 3, 4, 5, 1, 2))  # (B, C, kh, kw, Ho, Wo)
    dx_pad = xp.zeros((B, C, H + 2 * padding, W + 2 * padding), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * (Ho - 1) + 1, stride)
            cols = slice(j, j + stride * (Wo - 1) + 1, stride)
            dx_pad[:, :, rows, cols] = dx_pad[:, :, rows, cols] + d[:, :, i, j, :, :]  # add, never assign
    return dx_pad[:, :, padding : padding + H, padding : padding + W]  # (B, C, H, W)


def conv2d_backward(dout, x, w, stride, padding):
    """``(dx, dw, db)`` through the im2col matrix product.

    Parameters
    ----------
    dout : (B, F, Ho, Wo) float
    x : (B, C, H, W) float
    w : (F, C, kh, kw) float
    stride, padding : int

    Returns
    -------
    dx (B, C, H, W), dw (F, C, kh, kw), db (F,)
    """
    xp = array_namespace(dout, x, w)
    F, C, kh, kw = w.shape
    cols = im2col(x, kh, kw, stride, padding)  # (B Ho Wo, C kh kw)
    dout_mat = xp.reshape(xp.permute_dims(dout, (0, 2, 3, 1)), (-1, F))  # (B Ho Wo, F)
    dw = xp.reshape(dout_mat.T @ cols, (F, C, kh, kw))  # (F, C, kh, kw)
    db = xp.sum(dout, axis=(0, 2, 3))  # (F,)
    dcols = dout_mat @ xp.reshape(w, (F, C * kh * kw))  # (B Ho Wo, C kh kw)
    dx = col2im(dcols, x.shape, kh, kw, stride, padding)  # (B, C, H, W)
    return dx, dw, db
