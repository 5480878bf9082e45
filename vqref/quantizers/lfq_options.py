"""The options of :class:`vqref.LFQ` and :class:`vqref.ResidualLFQ`, their initial state, and
what their forward and backward share.

Symbols: D = dim, C = num_codebooks, d = log2(codebook_size), K = codebook_size, N tokens.

The option checks turn constructor arguments into validated values (Python ``int``, ``float``,
``bool``, ``None``) in the form ``config()`` holds them, or raise an error that names the option.
The initial state is drawn on the host from the module's generator with torch's distributions
(:func:`linear_init`, :func:`orthogonal_init`).  The forward's helpers choose the tokens of the
entropy penalty (:func:`token_rows`) and compute the usage statistics (:func:`usage_stats`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import backend as B
from ..backend import Array
from ..metrics import code_usage
from ..ops.lfq import MAX_CODEBOOK_DIM
from ..validation import check_bool, check_dtype_name, check_fits, check_int, check_real, fits
from .base import Quantizer
from .options import MAX_NUM_QUANTIZERS

__all__ = [
    "FIT_FIX",
    "PARAM_KEYS",
    "MAX_NUM_CODEBOOKS",
    "check_codebook_size",
    "check_lfq_options",
    "check_residual_lfq_options",
    "linear_init",
    "orthogonal_init",
    "check_mask",
    "token_rows",
    "usage_stats",
    "check_upstream",
    "state_grads",
]

MAX_NUM_CODEBOOKS = 1 << 12
FIT_FIX = "scale the upstream gradient or run the forward on float64 input"
# state name -> the key of core.lfq's gradients and parameters
PARAM_KEYS = {"project_in.W": "project_in_W", "project_in.b": "project_in_b",
               "project_out.W": "project_out_W", "project_out.b": "project_out_b"}  # fmt: skip


def check_codebook_size(codebook_size: Any) -> int:
    """``codebook_size`` as an int, a power of two from 2 to 2^62."""
    K = check_int("codebook_size", codebook_size, 2, 1 << MAX_CODEBOOK_DIM)
    if K & (K - 1):
        raise ValueError(
            f"codebook_size must be a power of 2 for lookup-free quantization, got {K} "
            f"(e.g. {1 << (K - 1).bit_length()})"
        )
    return K


def _optional_real(name: str, value: Any, lo: float | None = None) -> float | None:
    return None if value is None else check_real(name, value, lo)


def check_lfq_options(**o: Any) -> dict:
    """The options of :class:`LFQ` validated and resolved (dim, codebook_size, keep_num_codebooks_dim,
    has_projections and cosine_sim_project_in_scale get their values), as ``config()`` holds them."""
    if o["dim"] is None and o["codebook_size"] is None:
        raise ValueError("LFQ needs dim or codebook_size (or both); e.g. LFQ(codebook_size=2**10)")
    dim = None if o["dim"] is None else check_int("dim", o["dim"], 1)
    if o["codebook_size"] is None:
        if dim > MAX_CODEBOOK_DIM:
            raise ValueError(f"codebook_size defaults to 2**dim, and dim={dim} gives more codes than int64 holds")
        K = 2**dim
    else:
        K = check_codebook_size(o["codebook_size"])
    d = K.bit_length() - 1
    C = check_int("num_codebooks", o["num_codebooks"], 1, MAX_NUM_CODEBOOKS)
    dim = d * C if dim is None else dim
    keep = (
        C > 1
        if o["keep_num_codebooks_dim"] is None
        else check_bool("keep_num_codebooks_dim", o["keep_num_codebooks_dim"])
    )
    if C > 1 and not keep:
        raise ValueError(f"keep_num_codebooks_dim=False needs num_codebooks=1, got num_codebooks={C}")
    has_proj = dim != d * C if o["has_projections"] is None else check_bool("has_projections", o["has_projections"])
    if not has_proj and dim != d * C:
        raise ValueError(
            f"has_projections=False needs dim == log2(codebook_size) * num_codebooks = {d * C}, got dim={dim}"
        )
    scale = check_real("codebook_scale", o["codebook_scale"])
    if scale <= 0:
        raise ValueError(f"codebook_scale must be > 0, got {scale}")
    frac = check_real("frac_per_sample_entropy", o["frac_per_sample_entropy"], hi=1.0)
    if frac <= 0:
        raise ValueError(f"frac_per_sample_entropy must be in (0, 1], got {frac}")
    clamp = _optional_real("soft_clamp_input_value", o["soft_clamp_input_value"])
    if clamp is not None and clamp < scale:
        raise ValueError(f"soft_clamp_input_value={clamp} must be >= codebook_scale={scale}")
    cosine = check_bool("cosine_sim_project_in", o["cosine_sim_project_in"])
    cos_scale = _optional_real("cosine_sim_project_in_scale", o["cosine_sim_project_in_scale"])
    return {
        "dim": dim,
        "codebook_size": K,
        "entropy_loss_weight": check_real("entropy_loss_weight", o["entropy_loss_weight"], 0.0),
        "commitment_loss_weight": check_real("commitment_loss_weight", o["commitment_loss_weight"], 0.0),
        "diversity_gamma": check_real("diversity_gamma", o["diversity_gamma"], 0.0),
        "num_codebooks": C,
        "keep_num_codebooks_dim": keep,
        "codebook_scale": scale,
        "frac_per_sample_entropy": frac,
        "has_projections": has_proj,
        "projection_has_bias": check_bool("projection_has_bias", o["projection_has_bias"]),
        "soft_clamp_input_value": clamp,
        "cosine_sim_project_in": cosine,
        "cosine_sim_project_in_scale": (scale if cos_scale is None else cos_scale) if cosine and has_proj else None,
        "experimental_softplus_entropy_loss": check_bool(
            "experimental_softplus_entropy_loss", o["experimental_softplus_entropy_loss"]
        ),
        "entropy_loss_offset": check_real("entropy_loss_offset", o["entropy_loss_offset"]),
        "spherical": check_bool("spherical", o["spherical"]),
        "orthogonal_rotation": check_bool("orthogonal_rotation", o["orthogonal_rotation"]),
        "channel_first": None if o["channel_first"] is None else check_bool("channel_first", o["channel_first"]),
    }


def linear_init(rng: np.random.Generator, din: int, dout: int, bias: bool) -> dict:
    """torch ``nn.Linear``'s initial distribution, drawn on the host: ``W, b ~ U(-1/sqrt(din), 1/sqrt(din))``;
    ``W`` input-major ``(din, dout)``."""
    a = 1.0 / math.sqrt(din)
    out = {"W": rng.uniform(-a, a, size=(din, dout))}
    if bias:
        out["b"] = rng.uniform(-a, a, size=(dout,))
    return out


def orthogonal_init(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random orthogonal (d, d) matrix as torch's ``nn.init.orthogonal_`` draws it: the Q of
    the QR factorisation of a standard normal matrix, each column's sign fixed by R's diagonal
    (which makes the distribution uniform over the orthogonal group)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def check_mask(mask: Any, like: Array, lead: tuple) -> None:
    """Refuse a mask that is not a boolean array of the module's library shaped like the tokens."""
    if not B.is_array(mask):
        raise TypeError(
            f"mask must be a boolean array of shape {lead} (one entry per token), got {type(mask).__name__}"
        )
    if B.library_name(mask) != B.library_name(like):
        raise TypeError(f"mask is a {B.library_name(mask)} array but this module holds {B.library_name(like)} arrays")
    xp = B.get_namespace(like)
    if not xp.isdtype(mask.dtype, "bool"):
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask must have the input's leading shape {tuple(lead)}, got {tuple(mask.shape)}")


def token_rows(mask: Any, n: int, frac: float, rng: np.random.Generator | None) -> np.ndarray | None:
    """Host int64 token indices for the entropy penalty: the mask's tokens (all without a mask),
    then, with ``rng``, a random subset of ``max(1, int(m * frac))`` of those m tokens, in order.
    ``None`` stands for all n tokens."""
    rows = None if mask is None else np.flatnonzero(B.to_numpy(mask).reshape(-1)).astype(np.int64)
    if rng is None or frac >= 1.0:
        return rows
    m = n if rows is None else rows.shape[0]
    if m == 0:
        return rows
    pick = np.sort(rng.choice(m, size=max(1, int(m * frac)), replace=False)).astype(np.int64)
    return pick if rows is None else rows[pick]


def usage_stats(indices: Array, rows: np.ndarray | None, codebook_size: int) -> dict:
    """:func:`vqref.metrics.code_usage` of every column of ``indices (N, C)`` over the ``rows``
    (None: all); plain numbers for one column, a tuple per key for several."""
    xp = B.get_namespace(indices)
    if rows is not None:
        indices = xp.take(indices, B.from_numpy(rows, xp, device=B.get_device(indices)), axis=0)
    per = [code_usage(indices[:, c], codebook_size) for c in range(indices.shape[1])]
    if len(per) == 1:
        return per[0]
    return {key: tuple(p[key] for p in per) for key in per[0]}


def check_upstream(module: Quantizer, name: str, value: Any, dtype_name: str, shapes: tuple) -> Any:
    """An upstream gradient of a loss: a real number or an array of one of ``shapes``."""
    if isinstance(value, np.generic):
        value = value.item()
    if B.is_array(value):
        if tuple(value.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(value.shape)}")
        module.check_input(name, value, shape=tuple(value.shape))
        check_fits(name, value, dtype_name, "the forward's input", FIT_FIX)
        return value
    value = check_real(name, value)
    check_fits(name, value, dtype_name, "the forward's input", FIT_FIX)
    return value


def state_grads(module: Quantizer, core_grads: dict, keys: dict) -> dict:
    """The core's gradients under the module's state names (``keys``: state name -> core key),
    checked to fit the state dtype and cast to it."""
    grads, dtype_name = {}, check_dtype_name("dtype", module.dtype)
    for name in module.learnable_names():
        g = core_grads[keys[name]]
        if not (B.all_finite(g) and fits(g, dtype_name)):
            raise ValueError(
                f"the gradient of {name} overflows the module's {dtype_name} state; scale the upstream gradients"
            )
        grads[name] = module.xp.astype(g, module.dtype)
    return grads


def check_residual_lfq_options(**o: Any) -> dict:
    """The options of :class:`ResidualLFQ`, validated, in the form ``config()`` holds them."""
    frac = check_real("frac_per_sample_entropy", o["frac_per_sample_entropy"], hi=1.0)
    if frac <= 0:
        raise ValueError(f"frac_per_sample_entropy must be in (0, 1], got {frac}")
    clamp = (
        None
        if o["soft_clamp_input_value"] is None
        else check_real("soft_clamp_input_value", o["soft_clamp_input_value"])
    )
    if clamp is not None and clamp < 1.0:
        raise ValueError(
            f"soft_clamp_input_value={clamp} must be >= 1 (depth l clamps at value * 2^-l, at least its codebook scale 2^-l)"
        )
    return {
        "dim": check_int("dim", o["dim"], 1),
        "num_quantizers": check_int("num_quantizers", o["num_quantizers"], 1, MAX_NUM_QUANTIZERS),
        "codebook_size": check_codebook_size(o["codebook_size"]),
        "soft_clamp_input_value": clamp,
        "entropy_loss_weight": check_real("entropy_loss_weight", o["entropy_loss_weight"], 0.0),
        "commitment_loss_weight": check_real("commitment_loss_weight", o["commitment_loss_weight"], 0.0),
        "diversity_gamma": check_real("diversity_gamma", o["diversity_gamma"], 0.0),
        "frac_per_sample_entropy": frac,
        "experimental_softplus_entropy_loss": check_bool(
            "experimental_softplus_entropy_loss", o["experimental_softplus_entropy_loss"]
        ),
        "entropy_loss_offset": check_real("entropy_loss_offset", o["entropy_loss_offset"]),
        "spherical": check_bool("spherical", o["spherical"]),
        "orthogonal_rotation": check_bool("orthogonal_rotation", o["orthogonal_rotation"]),
    }
