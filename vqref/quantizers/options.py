"""The options of a vector quantizer: their checks, their names in files, and the state layout.

Symbols: D = dim, K = codebook_size, Q = num_quantizers.

:func:`check_options` turns constructor arguments into validated values (Python ``int``,
``float``, ``bool``, ``str``; aliases resolved) or raises an error that names the option;
:func:`state_spec` says which state entries a configuration has and their shapes, by arithmetic
alone, so that a model file can be checked before anything is built.
"""

from __future__ import annotations

from typing import Any

from ..core.residual import GRADIENT_ROUTINGS
from ..validation import check_alias, check_bool, check_choice, check_int, check_real

__all__ = ["CONFIG_KEYS", "CONFIG_DEFAULTS", "MAX_STATE_ELEMENTS", "MAX_NUM_QUANTIZERS", "MAX_KMEANS_ITERS",
           "check_options", "check_temperature", "state_prefixes", "state_spec"]  # fmt: skip

# Upper bounds of the sizes an option may ask for.  They are far beyond any real quantizer
# (2**32 elements is a 16 GiB float32 codebook), and they exist so that a configuration --
# above all one read from a file -- cannot ask for an absurd allocation or a loop that never ends.
MAX_STATE_ELEMENTS = 1 << 32  # Q * K * D, the elements of all codebooks together
MAX_NUM_QUANTIZERS = 1 << 12  # Q
MAX_KMEANS_ITERS = 10_000

# What config() returns and a model file's configuration may hold.
CONFIG_KEYS = (
    "dim", "codebook_size", "decay", "eps", "commitment_weight", "codebook_weight", "ema_update",
    "learnable_codebook", "kmeans_init", "kmeans_iters", "use_cosine_sim", "orthogonal_reg_weight",
    "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes", "threshold_ema_dead_code",
    "rotation_trick", "num_quantizers", "shared_codebook", "gradient_routing", "dtype", "chunk_size",
    "stochastic_sample_codes", "sample_codebook_temp", "straight_through", "soft_assignment",
    "codebook_diversity_loss_weight", "codebook_diversity_temperature",
)  # fmt: skip

# The options added after model files were first written, with the value that gives the behaviour
# of a file written before them: a file without such a key loads with this value.
CONFIG_DEFAULTS = {
    "stochastic_sample_codes": False,
    "sample_codebook_temp": 1.0,
    "straight_through": False,
    "soft_assignment": False,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
}

_FLAGS = (
    "ema_update",
    "learnable_codebook",
    "kmeans_init",
    "use_cosine_sim",
    "orthogonal_reg_active_codes_only",
    "rotation_trick",
    "shared_codebook",
    "stochastic_sample_codes",
    "straight_through",
    "soft_assignment",
)


def check_options(name: str, **kw: Any) -> dict:
    """Validated options of :class:`vqref.VectorQuantize` (``name``: the class, for messages).

    Takes every constructor option except seed, dtype, xp and device; returns them without the
    aliases (``n_embed`` -> ``codebook_size``, ``commitment`` -> ``commitment_weight``).
    """
    # each of an option and its alias is checked before they are compared (an array would not compare)
    sizes = {k: None if kw[k] is None else check_int(k, kw[k], 1) for k in ("codebook_size", "n_embed")}
    codebook_size = check_alias("codebook_size", sizes["codebook_size"], "n_embed", sizes["n_embed"], None)
    if codebook_size is None:
        raise TypeError(f"{name} needs codebook_size (or its alias n_embed)")
    weights = {k: None if kw[k] is None else check_real(k, kw[k], 0.0) for k in ("commitment_weight", "commitment")}
    commitment = check_alias(
        "commitment_weight", weights["commitment_weight"], "commitment", weights["commitment"], 1.0
    )
    max_codes, codebook_weight, chunk_size = kw["orthogonal_reg_max_codes"], kw["codebook_weight"], kw["chunk_size"]
    out = {
        "dim": check_int("dim", kw["dim"], 1),
        "codebook_size": codebook_size,
        "num_quantizers": check_int("num_quantizers", kw["num_quantizers"], 1, MAX_NUM_QUANTIZERS),
        "decay": check_real("decay", kw["decay"], 0.0, 1.0),
        "eps": check_real("eps", kw["eps"], 0.0),
        "commitment_weight": check_real("commitment_weight", commitment, 0.0),
        "codebook_weight": None if codebook_weight is None else check_real("codebook_weight", codebook_weight, 0.0),
        "kmeans_iters": check_int("kmeans_iters", kw["kmeans_iters"], 1, MAX_KMEANS_ITERS),
        "orthogonal_reg_weight": check_real("orthogonal_reg_weight", kw["orthogonal_reg_weight"], 0.0),
        "orthogonal_reg_max_codes": None if max_codes is None else check_int("orthogonal_reg_max_codes", max_codes, 1),
        "threshold_ema_dead_code": check_real("threshold_ema_dead_code", kw["threshold_ema_dead_code"], 0.0),
        "gradient_routing": check_choice("gradient_routing", kw["gradient_routing"], GRADIENT_ROUTINGS),
        "chunk_size": None if chunk_size is None else check_int("chunk_size", chunk_size, 1),
        "sample_codebook_temp": check_real("sample_codebook_temp", kw["sample_codebook_temp"], 0.0),
        "codebook_diversity_loss_weight": check_real(
            "codebook_diversity_loss_weight", kw["codebook_diversity_loss_weight"], 0.0
        ),
        "codebook_diversity_temperature": check_real(
            "codebook_diversity_temperature", kw["codebook_diversity_temperature"], 0.0
        ),
    }
    out.update({flag: check_bool(flag, kw[flag]) for flag in _FLAGS})
    _check_size(out["num_quantizers"], out["codebook_size"], out["dim"])
    if out["ema_update"] and out["learnable_codebook"]:
        raise ValueError("learnable_codebook=True needs ema_update=False: the EMA would overwrite every gradient step")
    if out["use_cosine_sim"] and out["learnable_codebook"]:
        raise ValueError("use_cosine_sim cannot be combined with learnable_codebook (as in vector-quantize-pytorch)")
    if out["codebook_weight"] is not None and not out["learnable_codebook"]:
        raise ValueError("codebook_weight only applies with learnable_codebook=True and ema_update=False")
    if out["rotation_trick"] and out["dim"] == 1:
        raise ValueError("rotation_trick needs dim > 1: in one dimension the only rotation is the identity")
    _check_estimator(out)
    return out


def _check_estimator(out: dict) -> None:
    """The combinations of the gradient estimators and the sampling options that are refused."""
    chosen = [k for k in ("rotation_trick", "straight_through", "soft_assignment") if out[k]]
    if len(chosen) > 1:
        raise ValueError(
            f"{' and '.join(chosen)} are different gradient estimators; set at most one of rotation_trick, "
            "straight_through and soft_assignment"
        )
    if out["soft_assignment"] and out["stochastic_sample_codes"]:
        raise ValueError(
            "soft_assignment outputs the expected code softmax(-d / tau) C and samples nothing; "
            "use stochastic_sample_codes=False with it (or straight_through=True to sample)"
        )
    soft = [k for k in ("straight_through", "soft_assignment") if out[k]]
    if soft:
        check_temperature(out["sample_codebook_temp"], soft[0])
        if out["gradient_routing"] == "sum":
            raise ValueError(
                f"{soft[0]}=True acts at every depth (its gradient goes to each depth's logits); use "
                "gradient_routing='per_depth' with it (gradient_routing='sum' puts one STE on the total)"
            )


def check_temperature(value: float, estimator: str | None) -> float:
    """``sample_codebook_temp`` for an estimator that divides by it (``straight_through``,
    ``soft_assignment``) must be > 0; without one, 0 means no sampling (the nearest code)."""
    if estimator is not None and not value > 0:
        raise ValueError(
            f"{estimator}=True needs sample_codebook_temp > 0 (it computes softmax(-d / tau)), got {value!r}; "
            "a small temperature such as 0.1 approaches the nearest code"
        )
    return value


def state_prefixes(num_quantizers: int, *, shared: bool, stacked: bool = False) -> list:
    """The prefixes of the state entries: ``[""]`` for one codebook (plain VQ, or a shared one),
    ``["0.", "1.", ...]`` for one codebook per depth of a stack."""
    if shared or not (stacked or num_quantizers > 1):
        return [""]
    return [f"{level}." for level in range(num_quantizers)]


def state_spec(config: dict, *, stacked: bool = False) -> dict:
    """``name -> shape`` of every state entry of a configuration (flags: ``None``)."""
    K = check_int("codebook_size", config.get("codebook_size"), 1)
    D = check_int("dim", config.get("dim"), 1)
    Q = check_int("num_quantizers", config.get("num_quantizers", 1), 1, MAX_NUM_QUANTIZERS)
    shared = check_bool("shared_codebook", config.get("shared_codebook", False))
    _check_size(Q, K, D)
    spec = {}
    for p in state_prefixes(Q, shared=shared, stacked=stacked):
        spec.update({p + "codebook": (K, D), p + "cluster_size": (K,), p + "embed_avg": (K, D), p + "initted": None})
    return spec


def _check_size(Q: int, K: int, D: int) -> None:
    if Q * K * D > MAX_STATE_ELEMENTS:
        raise ValueError(
            f"num_quantizers * codebook_size * dim = {Q} * {K} * {D} exceeds {MAX_STATE_ELEMENTS} elements "
            "(a 16 GiB float32 state); this is refused as a size no quantizer needs"
        )
