"""Solution 10: residual VQ and its two gradient routings.

Symbols: N vectors, D features, K codes per depth, Q depths; M = N * D.

``r_{l+1} = r_l - sg[o_l]`` has identity Jacobian with respect to ``r_l``, so every residual has
identity Jacobian with respect to x: whatever reaches a residual reaches x unchanged.

* The decoder's gradient: with ``"per_depth"`` each of the Q estimators ``o_l = r_l + sg[...]``
  passes it to its residual, so x receives ``Q * dquantized``; with ``"sum"`` the single estimator
  on the total passes it once.
* Each commitment loss ``beta * mse(r_l, sg[c_l])`` adds ``dlosses[l] * beta * (2/M)(r_l - c_l)``.

    dx = n * dquantized + sum_l dlosses[l] beta (2/M)(r_l - c_l),      n = Q or 1
"""

from array_api_compat import array_namespace


def residual_forward(x, codebooks, indices):
    """The value ``sum_l c_l`` and the residuals ``r_0 .. r_Q``."""
    xp = array_namespace(x, codebooks)
    residuals = [x]
    for level in range(codebooks.shape[0]):
        code = xp.take(codebooks[level, ...], indices[:, level], axis=0)  # (N, D) c_l
        residuals.append(residuals[-1] - code)
    return x - residuals[-1], residuals


def residual_backward(dquantized, dlosses, x, codebooks, indices, beta, routing):
    """``dx = n dquantized + sum_l dlosses[l] beta (2/M)(r_l - c_l)``.

    Parameters
    ----------
    dquantized : (N, D) float
    dlosses : (Q,) float
    x : (N, D) float
    codebooks : (Q, K, D) float
    indices : (N, Q) int
    beta : float
    routing : "per_depth" or "sum"

    Returns
    -------
    dx : (N, D)
    """
    if routing not in ("per_depth", "sum"):
        raise ValueError(f"routing must be 'per_depth' or 'sum', got {routing!r}")
    xp = array_namespace(dquantized, x, codebooks)
    Q = codebooks.shape[0]
    M = x.shape[0] * x.shape[1]
    dx = (Q if routing == "per_depth" else 1) * dquantized  # (N, D) the decoder's gradient
    residual = x  # (N, D) r_0
    for level in range(Q):
        code = xp.take(codebooks[level, ...], indices[:, level], axis=0)  # (N, D) c_l
        dx = dx + dlosses[level] * (beta * 2.0 / M) * (residual - code)  # depth l's commitment loss
        residual = residual - code  # r_{l+1}
    return dx
