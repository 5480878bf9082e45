"""Tests of vqref.nn.conv (conv2d and its transpose by im2col) and vqref.nn.conv_layers.

* torch autograd (float64) of ``F.conv2d`` / ``F.conv_transpose2d``: outputs and all three
  gradients, with a random upstream gradient, over strides, paddings, output paddings,
  non-square kernels and odd image sizes (a fixed table and a hypothesis property);
* finite differences (float64) of the same pairs, and negative controls: a col2im that writes
  instead of adding (what ``out[idx] += v`` with repeated indices does) and a kernel gradient
  in the wrong tap order must fail the checks;
* oracles independent of the code: the adjoint identities ``<im2col(x), g> = <x, col2im(g)>``
  and ``<conv2d(u), v> = <u, conv_transpose2d(v)>``, and a patch gather written as loops;
* the numpy fast path pinned to the definition, bit for bit, and chosen on numpy only;
* every backend in float32 and float64; caches that no caller can change; refusals;
* the layers: parameters, gradients, reach (which pixels one input pixel can change).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from vqref import backend as B
from vqref.nn import Adam
from vqref.nn import conv as C
from vqref.nn.conv import (
    col2im,
    conv2d_backward,
    conv2d_forward,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
    im2col,
)
from vqref.nn.conv_layers import Conv2d, ConvNet, ConvTranspose2d
from vqref.testing import check_vjp, rel_error

torch = pytest.importorskip("torch")
F = torch.nn.functional

# (N, Hi, Wi, Cin, Cout, kh, kw, stride, padding): distinct sizes, odd and non-square images and
# kernels, strides that do and do not divide the padded size, kernels larger than the stride
# (overlapping patches) and not (every pixel in at most one patch).
GEOMETRIES = [
    (2, 7, 9, 3, 4, 3, 2, 2, 1),
    (1, 5, 6, 2, 3, 3, 3, 1, 0),
    (3, 8, 6, 1, 2, 4, 4, 2, 1),
    (2, 9, 7, 3, 2, 3, 5, 3, 2),
    (2, 6, 5, 2, 5, 2, 2, 2, 0),
    (2, 5, 7, 4, 3, 1, 1, 1, 0),
]
IDS = ["k3x2-s2-p1", "k3-s1-p0", "k4-s2-p1", "k3x5-s3-p2", "k2-s2-nooverlap", "k1"]


def _nchw(a):
    return torch.tensor(np.ascontiguousarray(np.asarray(a, dtype=np.float64).transpose(0, 3, 1, 2)), requires_grad=True)


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_conv2d(x, W, b, dy, stride, padding):
    """``F.conv2d`` on the same numbers (NCHW, weight (F, C, kh, kw)); returns y, dx, dW, db in vqref's layouts."""
    xt = _nchw(x)
    Wt = torch.tensor(np.ascontiguousarray(np.asarray(W).transpose(3, 2, 0, 1)), requires_grad=True)
    bt = torch.tensor(np.asarray(b), requires_grad=True)
    yt = F.conv2d(xt, Wt, bt, stride=stride, padding=padding)
    (yt * torch.tensor(np.ascontiguousarray(np.asarray(dy).transpose(0, 3, 1, 2)))).sum().backward()
    return _nhwc(yt), _nhwc(xt.grad), Wt.grad.numpy().transpose(2, 3, 1, 0), bt.grad.numpy()


def torch_conv_transpose2d(x, W, b, dy, stride, padding, output_padding):
    """``F.conv_transpose2d`` (weight (Cin, Cout, kh, kw)); returns y, dx, dW, db in vqref's layouts."""
    xt = _nchw(x)
    Wt = torch.tensor(np.ascontiguousarray(np.asarray(W).transpose(0, 3, 1, 2)), requires_grad=True)
    bt = torch.tensor(np.asarray(b), requires_grad=True)
    yt = F.conv_transpose2d(xt, Wt, bt, stride=stride, padding=padding, output_padding=output_padding)
    (yt * torch.tensor(np.ascontiguousarray(np.asarray(dy).transpose(0, 3, 1, 2)))).sum().backward()
    return _nhwc(yt), _nhwc(xt.grad), Wt.grad.numpy().transpose(0, 2, 3, 1), bt.grad.numpy()


def _problem(gen, geometry, transposed=False):
    N, Hi, Wi, Cin, Cout, kh, kw, s, p = geometry
    x = gen.standard_normal((N, Hi, Wi, Cin))
    W = gen.standard_normal((Cin, kh, kw, Cout) if transposed else (kh, kw, Cin, Cout))
    b = gen.standard_normal(Cout)
    return x, W, b, s, p


def _close(a, ref, tol=1e-12):
    assert tuple(np.shape(a)) == tuple(np.shape(ref))
    assert rel_error(a, ref) < tol, rel_error(a, ref)


# --------------------------------------------------------------------------------------------
# Against torch autograd
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_conv2d_matches_torch(bk64, rng, geometry):
    x, W, b, s, p = _problem(rng, geometry)
    y, cache = conv2d_forward(bk64.asarray(x), bk64.asarray(W), bk64.asarray(b), stride=s, padding=p)
    dy = rng.standard_normal(tuple(y.shape))
    dx, dW, db = conv2d_backward(bk64.asarray(dy), cache)
    ref = torch_conv2d(x, W, b, dy, s, p)
    for mine, theirs in zip((y, dx, dW, db), ref):
        assert B.library_name(mine) == bk64.name and mine.dtype == bk64.dtype
        _close(bk64.np(mine), theirs)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_conv_transpose2d_matches_torch(bk64, rng, geometry):
    s = geometry[7]
    for op in range(s):  # every output size a stride-s convolution maps to the same input size
        x, W, b, s, p = _problem(rng, geometry, transposed=True)
        y, cache = conv_transpose2d_forward(
            bk64.asarray(x), bk64.asarray(W), bk64.asarray(b), stride=s, padding=p, output_padding=op
        )
        dy = rng.standard_normal(tuple(y.shape))
        dx, dW, db = conv_transpose2d_backward(bk64.asarray(dy), cache)
        ref = torch_conv_transpose2d(x, W, b, dy, s, p, op)
        for mine, theirs in zip((y, dx, dW, db), ref):
            assert B.library_name(mine) == bk64.name and mine.dtype == bk64.dtype
            _close(bk64.np(mine), theirs)


@fuzz_settings(ci=25, nightly=400)
@given(
    n=st.integers(1, 3),
    hi=st.integers(1, 9),
    wi=st.integers(1, 9),
    cin=st.integers(1, 4),
    cout=st.integers(1, 4),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    output_padding=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_any_geometry_matches_torch(n, hi, wi, cin, cout, kh, kw, stride, padding, output_padding, seed):
    gen = np.random.default_rng(seed)
    geometry = (n, hi, wi, cin, cout, kh, kw, stride, padding)
    if C.conv_output_size(hi, kh, stride, padding) >= 1 and C.conv_output_size(wi, kw, stride, padding) >= 1:
        x, W, b, s, p = _problem(gen, geometry)
        y, cache = conv2d_forward(x, W, b, stride=s, padding=p)
        dy = gen.standard_normal(y.shape)
        for mine, theirs in zip((y, *conv2d_backward(dy, cache)), torch_conv2d(x, W, b, dy, s, p)):
            _close(mine, theirs)
    op = output_padding % stride
    if min(C.conv_transpose_output_size(v, k, stride, padding, op) for v, k in ((hi, kh), (wi, kw))) >= 1:
        x, W, b, s, p = _problem(gen, geometry, transposed=True)
        y, cache = conv_transpose2d_forward(x, W, b, stride=s, padding=p, output_padding=op)
        dy = gen.standard_normal(y.shape)
        ref = torch_conv_transpose2d(x, W, b, dy, s, p, op)
        for mine, theirs in zip((y, *conv_transpose2d_backward(dy, cache)), ref):
            _close(mine, theirs)


# --------------------------------------------------------------------------------------------
# Finite differences and negative controls
# --------------------------------------------------------------------------------------------


def _col2im_overwriting(cols, shape, kh, kw, *, stride=1, padding=0):
    """A broken col2im: each tap *writes* its values, so overlapping patches keep only the last
    one -- what a fancy-index ``dx[idx] += v`` with repeated indices does in numpy."""
    N, Hi, Wi, Cc = shape
    Ho, Wo = C.conv_output_size(Hi, kh, stride, padding), C.conv_output_size(Wi, kw, stride, padding)
    per_tap = np.reshape(cols, (N, Ho, Wo, kh * kw, Cc))
    out = np.zeros((N, Hi + 2 * padding, Wi + 2 * padding, Cc))
    for i in range(kh):
        for j in range(kw):
            out[:, i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride] = per_tap[
                :, :, :, i * kw + j
            ]
    return out[:, padding : padding + Hi, padding : padding + Wi]


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=IDS[:4])
def test_conv2d_finite_differences(rng, geometry):
    x, W, b, s, p = _problem(rng, geometry)
    f = lambda x_, W_, b_: conv2d_forward(x_, W_, b_, stride=s, padding=p)[0]  # noqa: E731
    vjp = lambda dy, x_, W_, b_: conv2d_backward(dy, conv2d_forward(x_, W_, b_, stride=s, padding=p)[1])  # noqa: E731
    res = check_vjp(f, vjp, [x, W, b], seed=1, rtol=1e-8)
    assert max(res.errors) < 1e-8


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=IDS[:4])
def test_conv_transpose2d_finite_differences(rng, geometry):
    x, W, b, s, p = _problem(rng, geometry, transposed=True)
    op = s - 1
    fwd = lambda x_, W_, b_: conv_transpose2d_forward(x_, W_, b_, stride=s, padding=p, output_padding=op)  # noqa: E731
    res = check_vjp(lambda *a: fwd(*a)[0], lambda dy, *a: conv_transpose2d_backward(dy, fwd(*a)[1]), [x, W, b], seed=2)
    assert max(res.errors) < 1e-8


def test_negative_control_col2im_that_overwrites(rng, monkeypatch):
    """Overlapping patches (k3 s2): the overwriting col2im loses contributions and fails the
    check on dx (and only there).  Without overlap (k2 s2) it is right, so the check passes:
    the failure is the overlap, not a difference elsewhere."""
    monkeypatch.setattr(C, "col2im", _col2im_overwriting)
    for geometry, overlapping in ((GEOMETRIES[0], True), (GEOMETRIES[4], False)):
        x, W, b, s, p = _problem(rng, geometry)
        f = lambda x_, W_, b_: conv2d_forward(x_, W_, b_, stride=s, padding=p)[0]  # noqa: E731
        vjp = lambda dy, *a: conv2d_backward(dy, conv2d_forward(*a, stride=s, padding=p)[1])  # noqa: E731
        res = check_vjp(f, vjp, [x, W, b], seed=1, raise_on_failure=False)
        assert res.passed is not overlapping
        assert (res.errors[0] > 1e-2) is overlapping and max(res.errors[1:]) < 1e-8


def test_negative_control_kernel_gradient_in_the_wrong_tap_order(rng):
    """dW reshaped as (kw, kh, C, F) instead of (kh, kw, C, F) (the taps transposed): fails."""
    x, W, b, s, p = _problem(rng, GEOMETRIES[3])  # kh = 3 != kw = 5

    def vjp_swapped(dy, x_, W_, b_):
        dx, dW, db = conv2d_backward(dy, conv2d_forward(x_, W_, b_, stride=s, padding=p)[1])
        kh, kw, Cin, Cout = dW.shape
        flat = np.reshape(dW, (kh * kw, Cin, Cout))
        wrong = np.reshape(np.transpose(np.reshape(flat, (kw, kh, Cin, Cout)), (1, 0, 2, 3)), (kh, kw, Cin, Cout))
        return dx, wrong, db

    f = lambda x_, W_, b_: conv2d_forward(x_, W_, b_, stride=s, padding=p)[0]  # noqa: E731
    res = check_vjp(f, vjp_swapped, [x, W, b], seed=1, raise_on_failure=False)
    assert res.passed is False and res.errors[1] > 0.1 and max(res.errors[0], res.errors[2]) < 1e-8


# --------------------------------------------------------------------------------------------
# Oracles that do not use the code under test
# --------------------------------------------------------------------------------------------


def _im2col_loops(x, kh, kw, s, p):
    """The patch matrix from its definition, one entry at a time."""
    N, Hi, Wi, Cc = x.shape
    Ho, Wo = (Hi + 2 * p - kh) // s + 1, (Wi + 2 * p - kw) // s + 1
    out = np.zeros((N * Ho * Wo, kh * kw * Cc))
    for n in range(N):
        for u in range(Ho):
            for v in range(Wo):
                for i in range(kh):
                    for j in range(kw):
                        r, c = u * s + i - p, v * s + j - p
                        if 0 <= r < Hi and 0 <= c < Wi:  # else: padding, zero
                            out[(n * Ho + u) * Wo + v, (i * kw + j) * Cc : (i * kw + j + 1) * Cc] = x[n, r, c]
    return out


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_im2col_and_its_fast_path_are_the_patch_matrix(bk, rng, geometry):
    N, Hi, Wi, Cin, _, kh, kw, s, p = geometry
    x = rng.standard_normal((N, Hi, Wi, Cin))
    ref = _im2col_loops(x, kh, kw, s, p)
    cols = im2col(bk.asarray(x), kh, kw, stride=s, padding=p)
    assert cols.dtype == bk.dtype and B.library_name(cols) == bk.name
    np.testing.assert_array_equal(bk.np(cols), ref.astype(bk.np(cols).dtype))  # a gather: exact
    if bk.name == "numpy":
        fast = C._im2col_numpy(bk.asarray(x), kh, kw, stride=s, padding=p)
        assert fast.dtype == cols.dtype
        np.testing.assert_array_equal(fast, cols)  # the fast path, bit for bit


@fuzz_settings(ci=30, nightly=500)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 8), st.integers(1, 8), st.integers(1, 3)),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_col2im_is_the_adjoint_of_im2col_and_the_fast_path_is_im2col(shape, kernel, stride, padding, seed):
    kh, kw = kernel
    if min(C.conv_output_size(shape[1], kh, stride, padding), C.conv_output_size(shape[2], kw, stride, padding)) < 1:
        return
    gen = np.random.default_rng(seed)
    x = gen.standard_normal(shape)
    cols = im2col(x, kh, kw, stride=stride, padding=padding)
    np.testing.assert_array_equal(C._im2col_numpy(x, kh, kw, stride=stride, padding=padding), cols)
    g = gen.standard_normal(cols.shape)
    back = col2im(g, shape, kh, kw, stride=stride, padding=padding)
    assert back.shape == shape
    lhs, rhs = float(np.sum(cols * g)), float(np.sum(x * back))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, np.abs(cols * g).sum())


def test_the_fast_path_is_chosen_on_numpy_only(rng, monkeypatch):
    import array_api_strict

    calls = []
    real = C._im2col_numpy
    monkeypatch.setattr(C, "_im2col_numpy", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, W, b, s, p = _problem(rng, GEOMETRIES[0])
    y, cache = conv2d_forward(x, W, b, stride=s, padding=p)
    conv_transpose2d_forward(y, np.transpose(W, (3, 0, 1, 2)), None, stride=s, padding=p)
    assert len(calls) == 1  # the conv2d forward; the transposed forward scatters, it gathers nothing
    conv2d_backward(y, cache)
    assert len(calls) == 1
    ns = B.namespace_from_module(array_api_strict)
    conv2d_forward(B.from_numpy(x, ns), B.from_numpy(W, ns), None, stride=s, padding=p)
    assert len(calls) == 1  # array_api_strict takes the definition


def test_conv_transpose2d_is_the_adjoint_of_conv2d(rng):
    """``<conv2d(u, W2), v> = <u, conv_transpose2d(v, W)>`` with ``W2[i, j, co, ci] = W[ci, i, j, co]``,
    for both output sizes that a stride-2 convolution maps to the same grid (output_padding 0 and 1)."""
    N, c_big, c_small, k, s, p = 2, 3, 4, 3, 2, 1
    W = rng.standard_normal((c_small, k, k, c_big))  # transposed conv: c_small -> c_big
    W2 = np.transpose(W, (1, 2, 3, 0))  # conv: c_big -> c_small
    for (Hu, Wu), op in (((11, 9), 0), ((12, 10), 1)):
        u = rng.standard_normal((N, Hu, Wu, c_big))
        y, _ = conv2d_forward(u, W2, None, stride=s, padding=p)  # (N, 6, 5, c_small) both times
        assert y.shape == (N, 6, 5, c_small)
        v = rng.standard_normal(y.shape)
        z, _ = conv_transpose2d_forward(v, W, None, stride=s, padding=p, output_padding=op)
        assert z.shape == u.shape
        assert abs(np.sum(y * v) - np.sum(u * z)) < 1e-12 * np.abs(y * v).sum()


# --------------------------------------------------------------------------------------------
# Backends, dtypes, caches, refusals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_every_backend_and_dtype_agrees_with_float64(bk, rng, transposed):
    x, W, b, s, p = _problem(rng, GEOMETRIES[0], transposed)
    fwd, bwd = (
        (conv_transpose2d_forward, conv_transpose2d_backward) if transposed else (conv2d_forward, conv2d_backward)
    )
    y64, c64 = fwd(x, W, b, stride=s, padding=p)
    dy = rng.standard_normal(y64.shape)
    ref = (y64, *bwd(dy, c64))
    y, cache = fwd(bk.asarray(x), bk.asarray(W), bk.asarray(b), stride=s, padding=p)
    out = (y, *bwd(bk.asarray(dy), cache))
    for mine, theirs in zip(out, ref):
        assert mine.dtype == bk.dtype and B.library_name(mine) == bk.name
        assert rel_error(bk.np(mine), theirs) < 10 * bk.rtol


def test_no_bias_and_an_empty_batch(rng):
    x, W, _, s, p = _problem(rng, GEOMETRIES[0])
    y, cache = conv2d_forward(x, W, None, stride=s, padding=p)
    y_b, _ = conv2d_forward(x, W, np.zeros(W.shape[3]), stride=s, padding=p)
    np.testing.assert_array_equal(y, y_b)
    empty = np.zeros((0,) + x.shape[1:])
    y0, c0 = conv2d_forward(empty, W, np.ones(W.shape[3]), stride=s, padding=p)
    dx, dW, db = conv2d_backward(np.zeros(y0.shape), c0)
    assert y0.shape == (0,) + y.shape[1:] and dx.shape == empty.shape
    assert not np.any(dW) and not np.any(db)
    yt, ct = conv_transpose2d_forward(np.zeros((0, 3, 4, 2)), rng.standard_normal((2, 3, 3, 5)), None, stride=2)
    assert yt.shape == (0, 7, 9, 5) and conv_transpose2d_backward(np.zeros(yt.shape), ct)[0].shape == (0, 3, 4, 2)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_caches_hold_their_own_arrays(rng, transposed):
    """Changing x or W in place between the forward and the backward changes no gradient."""
    x, W, b, s, p = _problem(rng, GEOMETRIES[2], transposed)
    fwd, bwd = (
        (conv_transpose2d_forward, conv_transpose2d_backward) if transposed else (conv2d_forward, conv2d_backward)
    )
    y, cache = fwd(x, W, b, stride=s, padding=p)
    dy = rng.standard_normal(y.shape)
    before = bwd(dy, cache)
    x[...] = 7.0
    W[...] = -3.0
    y[...] = 0.0
    for a, c in zip(before, bwd(dy, cache)):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, W: conv2d_forward(x[0], W, None), r"\(N, H, W, C\)"),
        (lambda x, W: conv2d_forward(x[..., :2], W, None), "channels"),
        (lambda x, W: conv2d_forward(x, W[0], None), r"4 axes \(kh, kw, C, F\)"),
        (lambda x, W: conv_transpose2d_forward(x, W[..., None], None), r"4 axes \(Cin, kh, kw, Cout\)"),
        (lambda x, W: conv2d_forward(x, W, None, stride=0), "stride"),
        (lambda x, W: conv2d_forward(x, W, None, stride=1.5), "stride"),
        (lambda x, W: conv2d_forward(x, W, None, stride=True), "stride"),
        (lambda x, W: conv2d_forward(x, W, None, padding=-1), "padding"),
        (lambda x, W: conv2d_forward(x[:, :1, :1], W, None), "does not fit"),
        (
            lambda x, W: conv_transpose2d_forward(x, np.ones((3, 2, 2, 1)), None, stride=2, output_padding=2),
            "output_padding",
        ),
        (lambda x, W: conv_transpose2d_forward(x, np.ones((3, 2, 2, 1)), None, padding=5), "crops everything"),
        (lambda x, W: col2im(np.ones((5, 4)), x.shape, 2, 2), "cols has shape"),
        # a dy of the right size but a transposed grid: a reshape would take it silently
        (lambda x, W: conv2d_backward(np.ones((2, 6, 5, 4)), conv2d_forward(x, W, None, padding=1)[1]), "dy must"),
        (
            lambda x, W: conv_transpose2d_backward(
                np.ones((2, 12, 10, 1)), conv_transpose2d_forward(x, np.ones((3, 2, 2, 1)), None, stride=2)[1]
            ),
            "dy must",
        ),
    ],
)
def test_refusals_name_the_argument(call, match):
    """Each refusal names what is wrong (and the kernel layout or the way out where there is one)."""
    x, W = np.ones((2, 5, 6, 3)), np.ones((3, 3, 3, 4))
    with pytest.raises(ValueError, match=match):
        call(x, W)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_layer_forward_backward_are_the_pair_and_params_are_live(rng, cls):
    kw = dict(stride=2, padding=1) | ({"output_padding": 1} if cls is ConvTranspose2d else {})
    layer = cls(3, 5, 3, rng=0, dtype="float64", **kw)
    assert layer.params["W"].shape == layer.kernel_shape == ((3, 3, 3, 5) if cls is Conv2d else (3, 3, 3, 5))
    layer.params["b"] = rng.standard_normal(5)  # a non-zero bias, so db is not vacuous
    x = rng.standard_normal((2, 7, 6, 3))
    fwd, bwd = (
        (conv2d_forward, conv2d_backward) if cls is Conv2d else (conv_transpose2d_forward, conv_transpose2d_backward)
    )
    y = layer.forward(x)
    y_ref, cache = fwd(x, layer.params["W"], layer.params["b"], **kw)
    np.testing.assert_array_equal(y, y_ref)
    assert y.shape[1:3] == (layer.output_size(7), layer.output_size(6))
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    for a, c in zip((dx, layer.grads["W"], layer.grads["b"]), bwd(dy, cache)):
        np.testing.assert_array_equal(a, c)
    W0 = layer.params["W"]
    Adam(layer.params, lr=0.1).step(layer.grads)
    assert not np.array_equal(W0, layer.params["W"])  # the optimizer wrote back into the layer
    with pytest.raises(ValueError, match="dy must have the shape"):
        layer.backward(dy[:, :-1])


@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_layer_refusals_change_nothing(rng, cls):
    layer = cls(2, 3, 2, stride=2, rng=0, dtype="float64")
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((1, 2, 2, 3)))
    x = rng.standard_normal((2, 4, 4, 2))
    y = layer.forward(x)
    state = layer.state_dict()
    for bad, exc in (
        (np.full((2, 4, 4, 2), np.nan), ValueError),
        (np.ones((2, 2, 4, 4)), ValueError),  # channels first
        (x.astype(np.int64), TypeError),
        (x.tolist(), TypeError),
    ):
        with pytest.raises(exc):
            layer.forward(bad)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(layer.backward(dy), layer.gradients(dy, layer.apply(x)[1])[0])  # x's cache kept
    bad_state = {**state, "b": np.full(3, np.inf)}
    with pytest.raises(ValueError):
        layer.load_state_dict(bad_state)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_layer_options_are_checked_before_drawing():
    gen = np.random.default_rng(0)
    before = gen.bit_generator.state
    for kwargs in (dict(stride=0), dict(padding=-1), dict(stride=2, output_padding=2), dict(kernel_size=True)):
        k = kwargs.pop("kernel_size", 3)
        with pytest.raises(ValueError):
            ConvTranspose2d(2, 3, k, rng=gen, **kwargs)
    assert gen.bit_generator.state == before


def _changed(net, x, lo, hi):
    """The output positions (rows) that change when input rows lo..hi change."""
    x2 = x.copy()
    x2[:, lo : hi + 1] += 1.0 + np.random.default_rng(5).random(x2[:, lo : hi + 1].shape)
    diff = np.abs(net(x2) - net(x)).max(axis=(0, 2, 3))
    return np.flatnonzero(diff > 0)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: Conv2d(2, 3, 4, stride=2, padding=1, rng=1, dtype="float64"),
        lambda: Conv2d(2, 3, 3, stride=3, padding=2, rng=1, dtype="float64"),
        lambda: ConvTranspose2d(2, 3, 4, stride=2, padding=1, rng=1, dtype="float64"),
        lambda: ConvTranspose2d(2, 3, 3, stride=3, padding=1, output_padding=2, rng=1, dtype="float64"),
    ],
)
def test_reach_is_exactly_what_one_layer_changes(layer):
    """For one layer with generic weights, the changed outputs are exactly the reach."""
    layer = layer()
    x = np.random.default_rng(0).standard_normal((1, 13, 5, 2))
    for lo, hi in ((0, 0), (6, 6), (12, 12), (3, 5)):
        first, last, size = layer.reach(lo, hi, 13)
        assert size == layer.output_size(13)
        np.testing.assert_array_equal(_changed(lambda a: layer.apply(a)[0], x, lo, hi), np.arange(first, last + 1))


def test_stack_reach_contains_what_changes():
    gen = np.random.default_rng(0)
    net = ConvNet(
        [
            Conv2d(2, 4, 1, rng=gen, dtype="float64"),
            ConvTranspose2d(4, 4, 4, stride=2, padding=1, rng=gen, dtype="float64"),
            ConvTranspose2d(4, 3, 4, stride=2, padding=1, rng=gen, dtype="float64"),
        ]
    )
    for layer in net.layers:  # positive biases keep the ReLUs open, so the reach is attained
        layer.params["b"] = np.full(layer.out_channels, 5.0)
    x = np.random.default_rng(1).standard_normal((1, 6, 3, 2))
    for u in range(6):
        first, last = net.reach(u, u, 6)
        assert (first, last) == (max(4 * u - 3, 0), min(4 * u + 6, 23))
        np.testing.assert_array_equal(_changed(lambda a: net.apply(a)[0], x, u, u), np.arange(first, last + 1))


def test_convnet_gradients_match_torch(rng):
    gen = np.random.default_rng(2)
    net = ConvNet(
        [
            Conv2d(3, 4, 4, stride=2, padding=1, rng=gen, dtype="float64"),
            Conv2d(4, 2, 1, rng=gen, dtype="float64"),
            ConvTranspose2d(2, 3, 4, stride=2, padding=1, rng=gen, dtype="float64"),
        ]
    )
    for layer in net.layers:
        layer.params["b"] = rng.standard_normal(layer.out_channels) * 0.3
    x = rng.standard_normal((2, 6, 10, 3))
    out = net.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = net.backward(dout)
    xt = _nchw(x)
    p = {k: torch.tensor(v, requires_grad=True) for k, v in net.state_dict().items()}
    h = F.relu(F.conv2d(xt, p["0.W"].permute(3, 2, 0, 1), p["0.b"], stride=2, padding=1))
    h = F.relu(F.conv2d(h, p["1.W"].permute(3, 2, 0, 1), p["1.b"]))
    h = F.conv_transpose2d(h, p["2.W"].permute(0, 3, 1, 2), p["2.b"], stride=2, padding=1)
    (h * torch.tensor(dout.transpose(0, 3, 1, 2))).sum().backward()
    _close(out, _nhwc(h))
    _close(dx, _nhwc(xt.grad))
    assert sorted(net.grads) == sorted(p)
    for k, v in p.items():
        _close(net.grads[k], v.grad.numpy())
    with pytest.raises(ValueError, match="layer 0 gives 4 channels"):
        ConvNet([Conv2d(3, 4, 1, rng=0), Conv2d(5, 2, 1, rng=0)])
