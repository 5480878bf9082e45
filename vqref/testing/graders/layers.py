"""Graders of the exercises on compositions: residual routings, conv2d by im2col, FSQ.

Symbols: N vectors, D features, K codes, Q residual depths; for conv2d B images, C input
channels, H x W pixels, F filters of kh x kw, Ho x Wo output positions; for FSQ d channels with
L_j levels.

=====  ============================  ==========================================================
ex10   residual VQ routings          dx for "per_depth" and "sum" (torch autograd, .detach())
ex11   conv2d backward (im2col)      dx, dw, db (torch autograd of F.conv2d)
ex12   FSQ backward                  bound, round (straight through), scale (torch, .detach())
=====  ============================  ==========================================================
"""

from __future__ import annotations

import numpy as np

from .engine import Case, Exercise, Mistake, Output, torch_module

__all__ = ["LAYER_EXERCISES"]


# ---------------------------------------------------------------- ex10 residual routings


def _residual_cases(rng):
    cases = []
    for routing, N, K, D, Q in (
        ("per_depth", 11, 7, 5, 3),
        ("sum", 9, 6, 4, 2),
        ("per_depth", 8, 5, 6, 2),
        ("sum", 10, 4, 6, 3),
    ):
        inputs = {
            "dquantized": rng.standard_normal((N, D)),
            "dlosses": rng.uniform(0.3, 2.0, size=Q),
            "x": rng.standard_normal((N, D)),
            "codebooks": rng.standard_normal((Q, K, D)) * (0.6 ** np.arange(Q))[:, None, None],
            "indices": rng.integers(0, K, size=(N, Q)).astype(np.int64),
            "beta": float(rng.uniform(0.1, 0.6)),
            "routing": routing,
        }
        cases.append(Case(f"routing={routing!r}, N={N}, K={K}, D={D}, Q={Q}", inputs, {"N": N, "K": K, "D": D, "Q": Q}))
    return cases


def _residual_expected(a):
    torch_module()  # a clear message when torch is missing
    from ..torch_reference.residual import residual_vq_grads

    Q = a["codebooks"].shape[0]
    _, _, dx, _ = residual_vq_grads(
        a["x"],
        [a["codebooks"][level] for level in range(Q)],
        a["indices"],
        a["dquantized"],
        a["dlosses"],
        routing=a["routing"],
        commitment_weight=a["beta"],
    )
    return (dx,)


def _residual(a, *, copies: str = "routing", residual: str = "r_l", depths: str = "all", dl: str = "each"):
    """dx written out; the keyword arguments make the known mistakes."""
    x, C, idx, g = a["x"], a["codebooks"], a["indices"], a["dquantized"]
    Q = C.shape[0]
    M = x.size
    n_copies = {"routing": Q if a["routing"] == "per_depth" else 1, "once": 1, "Q": Q}[copies]
    dx = n_copies * g
    r = x
    for level in range(Q):
        c = C[level][idx[:, level]]  # (N, D) the code of depth l
        weight = a["dlosses"][level if dl == "each" else 0]
        if depths == "all" or level == 0:
            dx = dx + weight * a["beta"] * 2.0 / M * ((r if residual == "r_l" else x) - c)
        r = r - c
    return (dx,)


RESIDUAL = Exercise(
    key="ex10",
    function="residual_backward",
    stem="ex10_residual_routing",
    title="residual VQ gradient routings (per depth and sum)",
    oracle="torch autograd of residual VQ with .detach() (float64)",
    outputs=(Output("dx", ("N", "D")),),
    cases=_residual_cases,
    expected=_residual_expected,
    mistakes=(
        Mistake(
            "the decoder's gradient reached x once, but with routing 'per_depth' every depth's straight-through "
            "estimator passes it to its residual, and every residual has identity Jacobian: Q copies",
            lambda a: _residual(a, copies="once"),
        ),
        Mistake(
            "the decoder's gradient reached x Q times, but with routing 'sum' one estimator sits on the total "
            "x + sg[sum_l c_l - x]: it passes the gradient once",
            lambda a: _residual(a, copies="Q"),
        ),
        Mistake(
            "each depth's commitment loss compares its own residual r_l (not x) with its code: "
            "beta (2/M) dloss_l (r_l - c_l)",
            lambda a: _residual(a, residual="x"),
        ),
        Mistake(
            "only depth 0's commitment loss reached x; r_{l+1} = r_l - sg[o_l] has identity Jacobian, so every "
            "depth's loss reaches x",
            lambda a: _residual(a, depths="first"),
        ),
        Mistake("each depth's loss has its own upstream gradient dlosses[l]", lambda a: _residual(a, dl="first")),
    ),
    suspects="how many times the decoder gradient arrives (per routing), the residuals r_l, beta (2/M) dlosses[l]",
)


# ---------------------------------------------------------------- ex11 conv2d backward


def _conv_cases(rng):
    cases = []
    for B, C, H, W, F, kh, kw, s, p in (
        (1, 3, 9, 6, 5, 4, 2, 1, 1),
        (3, 2, 8, 9, 5, 3, 3, 2, 1),
        (1, 4, 6, 5, 2, 2, 3, 2, 0),
    ):
        Ho, Wo = (H + 2 * p - kh) // s + 1, (W + 2 * p - kw) // s + 1
        inputs = {
            "dout": rng.standard_normal((B, F, Ho, Wo)),
            "x": rng.standard_normal((B, C, H, W)),
            "w": rng.standard_normal((F, C, kh, kw)),
            "stride": s,
            "padding": p,
        }
        sizes = {"B": B, "C": C, "H": H, "W": W, "F": F, "kh": kh, "kw": kw, "Ho": Ho, "Wo": Wo}
        cases.append(Case(f"x {(B, C, H, W)}, w {(F, C, kh, kw)}, stride={s}, padding={p}", inputs, sizes))
    return cases


def _conv_expected(a):
    torch = torch_module()
    x = torch.tensor(a["x"], requires_grad=True)
    w = torch.tensor(a["w"], requires_grad=True)
    b = torch.zeros(a["w"].shape[0], dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(x, w, b, stride=a["stride"], padding=a["padding"])
    out.backward(torch.tensor(a["dout"]))
    return x.grad.numpy(), w.grad.numpy(), b.grad.numpy()


def _patch_index(a):
    """For every (b, ho, wo, c, i, j) column entry of im2col, the flat index into the padded x."""
    B, C, H, W = a["x"].shape
    _, _, kh, kw = a["w"].shape
    _, _, Ho, Wo = a["dout"].shape
    s, p = a["stride"], a["padding"]
    Hp, Wp = H + 2 * p, W + 2 * p
    b, ho, wo, c, i, j = np.meshgrid(*(np.arange(n) for n in (B, Ho, Wo, C, kh, kw)), indexing="ij")
    return ((b * C + c) * Hp + ho * s + i) * Wp + wo * s + j, (B, C, Hp, Wp)


def _conv(a, *, assign: str = "", crop: bool = True, dw_order: str = "c,i,j", db: str = "sum"):
    """dx, dw, db by im2col written out on the host; the keyword arguments make the known mistakes."""
    F_, C, kh, kw = a["w"].shape
    dout = a["dout"]
    p = a["padding"]
    flat, padded = _patch_index(a)  # (B, Ho, Wo, C, kh, kw)
    xpad = np.pad(a["x"], ((0, 0), (0, 0), (p, p), (p, p)))
    cols = xpad.reshape(-1)[flat].reshape(-1, C * kh * kw)  # (B Ho Wo, C kh kw)
    dout_mat = dout.transpose(0, 2, 3, 1).reshape(-1, F_)  # (B Ho Wo, F)
    dcols = dout_mat @ a["w"].reshape(F_, -1)  # (B Ho Wo, C kh kw)
    dxp = np.zeros(int(np.prod(padded)))
    if assign == "by patch":  # a loop over the patches that assigns: the last patch to touch a pixel wins
        dxp[flat.reshape(-1)] = dcols.reshape(-1)
    elif assign == "by offset":  # a loop over the kernel offsets (i, j) that assigns: the last offset wins
        order = (4, 5, 0, 1, 2, 3)  # (b, ho, wo, c, i, j) -> (i, j, b, ho, wo, c)
        dxp[flat.transpose(order).reshape(-1)] = dcols.reshape(flat.shape).transpose(order).reshape(-1)
    else:
        np.add.at(dxp, flat.reshape(-1), dcols.reshape(-1))
    dx = dxp.reshape(padded)
    if crop:
        dx = dx[:, :, p : padded[2] - p, p : padded[3] - p]
    if dw_order == "c,i,j":
        dw = (dout_mat.T @ cols).reshape(F_, C, kh, kw)
    else:  # columns taken in (i, j, c) order but reshaped as (c, i, j)
        reordered = cols.reshape(-1, C, kh, kw).transpose(0, 2, 3, 1).reshape(-1, C * kh * kw)
        dw = (dout_mat.T @ reordered).reshape(F_, C, kh, kw)
    dbias = dout.sum(axis=(0, 2, 3)) if db == "sum" else dout.mean(axis=(0, 2, 3))
    return dx, dw, dbias


CONV2D = Exercise(
    key="ex11",
    function="conv2d_backward",
    stem="ex11_conv2d_backward",
    title="conv2d backward by im2col",
    oracle="torch autograd of torch.nn.functional.conv2d (float64)",
    outputs=(Output("dx", ("B", "C", "H", "W")), Output("dw", ("F", "C", "kh", "kw")), Output("db", ("F",))),
    cases=_conv_cases,
    expected=_conv_expected,
    mistakes=(
        Mistake(
            "overlapping patches share pixels, and col2im assigned where it must add: each pixel's gradient is the "
            "sum over every patch that contains it (np.add.at, or `dx_pad[..., slice] += block` per kernel offset)",
            lambda a: _conv(a, assign="by patch"),
        ),
        Mistake(
            "overlapping patches share pixels, and col2im assigned where it must add: for each kernel offset (i, j), "
            "`dx_pad[..., i:..:s, j:..:s] += block`, not `= block`",
            lambda a: _conv(a, assign="by offset"),
        ),
        Mistake(
            "dx still has the padding: the forward padded x, so crop dx_pad[:, :, p:p+H, p:p+W]",
            lambda a: _conv(a, crop=False),
        ),
        Mistake(
            "dw's entries are in another order than im2col's columns: reshape dout^T @ cols in the order the "
            "columns were built, (C, kh, kw)",
            lambda a: _conv(a, dw_order="i,j,c"),
        ),
        Mistake(
            "db averages dout; the bias is added at every position of every image, so db sums them",
            lambda a: _conv(a, db="mean"),
        ),
    ),
    suspects="col2im's scatter-add, the padding crop, the order of im2col's columns, db = sum over (B, Ho, Wo)",
)


# ---------------------------------------------------------------- ex12 FSQ backward


def _fsq_constants(levels: tuple):
    """Host float64 ``(h, o, s, w)``, each (d,), written from the paper's appendix A.1."""
    L = np.asarray(levels, dtype=np.float64)
    h = (L - 1) * (1 + 1e-3) / 2
    o = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
    return h, o, np.arctanh(o / h), np.asarray(levels) // 2


def _fsq_cases(rng):
    cases = []
    for N, levels in ((11, (8, 5, 3, 4, 7)), (9, (6, 5)), (7, (4, 3, 5, 8))):
        z = 1.5 * rng.standard_normal((N, len(levels)))
        inputs = {"dcodes": rng.standard_normal((N, len(levels))), "z": z, "levels": levels}
        cases.append(Case(f"N={N}, levels={levels}", inputs, {"N": N, "d": len(levels)}))
    return cases


def _fsq_expected(a):
    torch = torch_module()
    h, o, s, w = (torch.tensor(np.asarray(c, dtype=np.float64)) for c in _fsq_constants(a["levels"]))
    z = torch.tensor(a["z"], requires_grad=True)
    bounded = torch.tanh(z + s) * h - o
    rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight through the rounding
    (rounded / w * torch.tensor(a["dcodes"])).sum().backward()
    return (z.grad.numpy(),)


def _fsq(a, *, scale: str = "divide", shift: bool = True, slope: str = "1-t^2", half: bool = True):
    h, o, s, w = _fsq_constants(a["levels"])
    t = np.tanh(a["z"] + (s if shift else 0.0))
    local = {"1-t^2": 1 - t * t, "1-t": 1 - t}[slope] * (h if half else 1.0)
    factor = {"divide": 1.0 / w, "none": 1.0, "multiply": w, "zero": 0.0}[scale]
    return (a["dcodes"] * factor * local,)


FSQ = Exercise(
    key="ex12",
    function="fsq_backward",
    stem="ex12_fsq_backward",
    title="FSQ backward: bound, round (straight through), scale",
    oracle="torch autograd with .detach() on the rounding (float64)",
    outputs=(Output("dz", ("N", "d")),),
    cases=_fsq_cases,
    expected=_fsq_expected,
    mistakes=(
        Mistake(
            "zero: rounding has derivative zero almost everywhere, which is why FSQ passes the gradient straight "
            "through it (round's backward is the identity)",
            lambda a: _fsq(a, scale="zero"),
        ),
        Mistake("the scale step's 1/w is missing: z_q = z_r / w, so dz_r = dz_q / w", lambda a: _fsq(a, scale="none")),
        Mistake("the scale step divides by w = L // 2; its backward divides too", lambda a: _fsq(a, scale="multiply")),
        Mistake(
            "tanh' must be taken at z + s: for even L the bound is tanh(z + s) h - o with the shift s = atanh(o / h)",
            lambda a: _fsq(a, shift=False),
        ),
        Mistake("tanh'(u) = 1 - tanh(u)^2, not 1 - tanh(u)", lambda a: _fsq(a, slope="1-t")),
        Mistake("the bound's factor h = (L - 1)(1 + eps) / 2 is missing", lambda a: _fsq(a, half=False)),
    ),
    suspects="the chain bound -> round (identity) -> scale (1/w), tanh' at z + s, h",
)

LAYER_EXERCISES = (RESIDUAL, CONV2D, FSQ)
