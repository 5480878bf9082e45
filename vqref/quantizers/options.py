"""The options of a vector quantizer: their checks, their names in files, and the state layout.

Symbols: D = dim, K = codebook_size (K_l at depth l when the depths differ), Q = num_quantizers,
d = codebook_dim, H = heads, E = H d.

:func:`check_options` turns constructor arguments into validated values (Python ``int``,
``float``, ``bool``, ``str``; aliases resolved) or raises an error that names the option;
:func:`state_spec` says which state entries a configuration has and their shapes, by arithmetic
alone, so that a model file can be checked before anything is built.
"""

from __future__ import annotations

from typing import Any

from ..core.beam import BEAM_SCORES
from ..core.residual import GRADIENT_ROUTINGS
from ..validation import check_alias, check_bool, check_choice, check_int, check_real

__all__ = ["CONFIG_KEYS", "CONFIG_DEFAULTS", "MAX_STATE_ELEMENTS", "MAX_NUM_QUANTIZERS", "MAX_KMEANS_ITERS",
           "check_options", "check_temperature", "state_prefixes", "state_spec", "codebook_sizes"]  # fmt: skip

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
    "codebook_diversity_loss_weight", "codebook_diversity_temperature", "codebook_dim", "heads",
    "separate_codebook_per_head", "return_zeros_for_masked_padding", "quantize_dropout",
    "quantize_dropout_cutoff_index", "quantize_dropout_multiple_of", "quantize_dropout_per_sample", "beam_size",
    "eval_beam_size", "beam_score_quantizer_weights", "beam_score", "sync_codebook", "sync_kmeans",
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
    "codebook_dim": None,
    "heads": 1,
    "separate_codebook_per_head": False,
    "return_zeros_for_masked_padding": True,
    "quantize_dropout": False,
    "quantize_dropout_cutoff_index": 0,
    "quantize_dropout_multiple_of": 1,
    "quantize_dropout_per_sample": False,
    "beam_size": None,
    "eval_beam_size": None,
    "beam_score_quantizer_weights": None,
    "beam_score": "cumulative",
    "sync_codebook": None,
    "sync_kmeans": True,
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
    "separate_codebook_per_head",
    "return_zeros_for_masked_padding",
    "quantize_dropout",
    "quantize_dropout_per_sample",
    "sync_kmeans",
)


def check_options(name: str, *, stacked: bool = False, **kw: Any) -> dict:
    """Validated options of :class:`vqref.VectorQuantize` (``name``: the class, for messages).

    Takes every constructor option except seed, dtype, xp and device; returns them without the
    aliases (``n_embed`` -> ``codebook_size``, ``commitment`` -> ``commitment_weight``).
    ``stacked``: the class is a residual stack whatever its depth (``ResidualVQ``).  A sequence
    of sizes as ``codebook_size`` gives each depth its own (stacks only); ``num_quantizers=None``
    then means one depth per size.
    """
    # each of an option and its alias is checked before they are compared (an array would not compare)
    sizes = {k: None if kw[k] is None else _check_sizes(k, kw[k]) for k in ("codebook_size", "n_embed")}
    codebook_size = check_alias("codebook_size", sizes["codebook_size"], "n_embed", sizes["n_embed"], None)
    if codebook_size is None:
        raise TypeError(f"{name} needs codebook_size (or its alias n_embed)")
    weights = {k: None if kw[k] is None else check_real(k, kw[k], 0.0) for k in ("commitment_weight", "commitment")}
    commitment = check_alias(
        "commitment_weight", weights["commitment_weight"], "commitment", weights["commitment"], 1.0
    )
    max_codes, codebook_weight, chunk_size = kw["orthogonal_reg_max_codes"], kw["codebook_weight"], kw["chunk_size"]
    Q = kw["num_quantizers"]
    if Q is None and isinstance(codebook_size, list):
        Q = len(codebook_size)
    elif Q is None:
        raise TypeError(f"{name} needs num_quantizers (or one codebook_size per depth)")
    cb_dim = kw.get("codebook_dim")
    out = {
        "dim": check_int("dim", kw["dim"], 1),
        "codebook_size": codebook_size,
        "num_quantizers": check_int("num_quantizers", Q, 1, MAX_NUM_QUANTIZERS),
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
        "codebook_dim": None if cb_dim is None else check_int("codebook_dim", cb_dim, 1),
        "heads": check_int("heads", kw.get("heads", 1), 1),
        "quantize_dropout_cutoff_index": check_int(
            "quantize_dropout_cutoff_index", kw.get("quantize_dropout_cutoff_index", 0), 0
        ),
        "quantize_dropout_multiple_of": check_int(
            "quantize_dropout_multiple_of", kw.get("quantize_dropout_multiple_of", 1), 1
        ),
        "beam_score": check_choice("beam_score", kw.get("beam_score", "cumulative"), BEAM_SCORES),
        "sync_codebook": None if kw.get("sync_codebook") is None else check_bool("sync_codebook", kw["sync_codebook"]),
    }
    flags = {flag: kw.get(flag, CONFIG_DEFAULTS.get(flag)) for flag in _FLAGS}
    out.update({flag: check_bool(flag, value) for flag, value in flags.items()})
    _check_beam(out, kw, stacked=stacked)  # the values only; the combinations below, after the older checks
    _check_size(out)
    if out["ema_update"] and out["learnable_codebook"]:
        raise ValueError("learnable_codebook=True needs ema_update=False: the EMA would overwrite every gradient step")
    if out["use_cosine_sim"] and out["learnable_codebook"]:
        raise ValueError("use_cosine_sim cannot be combined with learnable_codebook (as in vector-quantize-pytorch)")
    if out["codebook_weight"] is not None and not out["learnable_codebook"]:
        raise ValueError("codebook_weight only applies with learnable_codebook=True and ema_update=False")
    if out["rotation_trick"] and _code_width(out) == 1:
        raise ValueError("rotation_trick needs dim > 1: in one dimension the only rotation is the identity")
    _check_estimator(out)
    _check_structure(out, stacked=stacked)
    return out


def _check_sizes(name: str, value: Any) -> Any:
    """``codebook_size``: a positive int, or a sequence of them (one per depth) as a list."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} must be a positive integer or a non-empty sequence of them, got {value!r}")
        return [check_int(f"{name}[{i}]", v, 1) for i, v in enumerate(value)]
    return check_int(name, value, 1)


def codebook_sizes(options: dict) -> tuple:
    """Each depth's number of codes K_l, a tuple of Q ints."""
    K, Q = options["codebook_size"], options["num_quantizers"]
    return tuple(K) if isinstance(K, list) else (K,) * Q


def _code_width(out: dict) -> int:
    """d, the width of a code: ``codebook_dim``, by default ``dim`` (vector-quantize-pytorch's
    default, also with heads: H heads then project dim to H dim)."""
    return out["codebook_dim"] if out["codebook_dim"] is not None else out["dim"]


def _check_structure(out: dict, *, stacked: bool) -> None:
    """Projections, heads, per-depth sizes and quantize dropout."""
    Q, H = out["num_quantizers"], out["heads"]
    stack = stacked or Q > 1
    if isinstance(out["codebook_size"], list):
        if not stack:
            raise ValueError(
                "codebook_size as one size per depth needs a residual stack (ResidualVQ, or num_quantizers > 1)"
            )
        if len(out["codebook_size"]) != Q:
            raise ValueError(
                f"codebook_size has {len(out['codebook_size'])} sizes but num_quantizers={Q}; give one size per depth"
            )
        if out["shared_codebook"] and len(set(out["codebook_size"])) > 1:
            raise ValueError("shared_codebook=True needs one codebook_size for every depth (it is one codebook)")
    if H > 1 and stack:
        raise ValueError(f"heads={H} with a residual stack: residual VQ quantizes whole vectors (as vector-quantize-"
                         "pytorch, which refuses multi-headed codes in ResidualVQ); use heads=1")  # fmt: skip
    if out["quantize_dropout_per_sample"] and not out["quantize_dropout"]:
        raise ValueError("quantize_dropout_per_sample=True needs quantize_dropout=True")
    if out["quantize_dropout"] and stack and out["quantize_dropout_cutoff_index"] >= Q:
        raise ValueError(
            f"quantize_dropout_cutoff_index={out['quantize_dropout_cutoff_index']} must be < num_quantizers={Q} "
            "(the first depth a dropout may stop after)"
        )


def _check_beam(out: dict, kw: dict, *, stacked: bool) -> None:
    """``beam_size``, ``eval_beam_size`` and the cumulative score's weights (residual stacks only)."""
    beam, eval_beam, weights = kw.get("beam_size"), kw.get("eval_beam_size"), kw.get("beam_score_quantizer_weights")
    out["beam_size"] = None if beam is None else check_int("beam_size", beam, 1)
    out["eval_beam_size"] = None if eval_beam is None else check_int("eval_beam_size", eval_beam, 1)
    if out["eval_beam_size"] is not None and out["beam_size"] is None:
        raise ValueError("eval_beam_size needs beam_size (the training width), as in vector-quantize-pytorch")
    Q = out["num_quantizers"]
    if weights is not None:
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise TypeError(f"beam_score_quantizer_weights must be a sequence of {Q} numbers, got {weights!r}")
        weights = [check_real(f"beam_score_quantizer_weights[{i}]", w, 0.0) for i, w in enumerate(weights)]
        if len(weights) != Q:
            raise ValueError(f"beam_score_quantizer_weights needs one weight per depth ({Q}), got {len(weights)}")
    out["beam_score_quantizer_weights"] = weights
    widths = [w for w in (out["beam_size"], out["eval_beam_size"]) if w is not None and w > 1]
    if widths and not (stacked or Q > 1):
        raise ValueError("beam_size searches the codes of a residual stack; use ResidualVQ (or num_quantizers > 1)")
    if weights is not None and out["beam_score"] != "cumulative":
        raise ValueError("beam_score_quantizer_weights weigh beam_score='cumulative'; drop them or use that score")


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
    beam = any(w is not None and w > 1 for w in (out["beam_size"], out["eval_beam_size"]))
    if beam and (soft or out["stochastic_sample_codes"]):
        chosen = (soft or ["stochastic_sample_codes"])[0]
        raise ValueError(f"beam_size chooses the codes by search and {chosen}=True by sampling; use one of them")


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
    """``name -> shape`` of every state entry of a configuration (flags: ``None``).

    Per codebook ``codebook (K, d)``, ``cluster_size (K,)``, ``embed_avg (K, d)``, ``initted``
    (prefixed per depth for a stack); with a codebook per head ``(H, K, d)`` and ``(H, K)``; with
    projections ``project_in.W (D, E)``, ``project_in.b (E,)``, ``project_out.W (E, D)``,
    ``project_out.b (D,)``.
    """
    options = {k: config.get(k, CONFIG_DEFAULTS.get(k)) for k in CONFIG_KEYS if k != "dtype"}
    options["codebook_size"] = _check_sizes("codebook_size", options["codebook_size"])
    D = check_int("dim", options["dim"], 1)
    Q = check_int("num_quantizers", options.get("num_quantizers") or 1, 1, MAX_NUM_QUANTIZERS)
    H = check_int("heads", options["heads"], 1)
    shared = check_bool("shared_codebook", options["shared_codebook"])
    separate = check_bool("separate_codebook_per_head", options["separate_codebook_per_head"])
    options.update(dim=D, num_quantizers=Q, heads=H)
    d = None if options["codebook_dim"] is None else check_int("codebook_dim", options["codebook_dim"], 1)
    options["codebook_dim"] = d
    if isinstance(options["codebook_size"], list) and len(options["codebook_size"]) != Q:
        raise ValueError(f"codebook_size has {len(options['codebook_size'])} sizes but num_quantizers={Q}")
    _check_size(options)
    d = _code_width(options)
    head = (H,) if separate else ()
    spec = {}
    sizes = codebook_sizes(options)
    for level, p in enumerate(state_prefixes(Q, shared=shared, stacked=stacked)):
        K = sizes[level]
        spec.update({p + "codebook": head + (K, d), p + "cluster_size": head + (K,), p + "embed_avg": head + (K, d),
                     p + "initted": None})  # fmt: skip
    E = H * d
    if E != D:
        spec.update({"project_in.W": (D, E), "project_in.b": (E,), "project_out.W": (E, D), "project_out.b": (D,)})
    return spec


def _check_size(options: dict) -> None:
    """Refuse a state larger than :data:`MAX_STATE_ELEMENTS` (the codebooks and the projections)."""
    D, H, Q = options["dim"], options["heads"], options["num_quantizers"]
    d = _code_width(options)
    heads = H if options.get("separate_codebook_per_head") else 1
    sizes = codebook_sizes(options)
    projections = 2 * D * H * d if H * d != D else 0
    if sum(sizes) * d * heads + projections > MAX_STATE_ELEMENTS:
        K = sizes[0] if len(set(sizes)) == 1 else f"mean({list(sizes)})"
        extra = f" (with {heads} heads)" if heads > 1 else ""
        extra += f" plus {projections} projection entries" if projections else ""
        raise ValueError(
            f"num_quantizers * codebook_size * dim = {Q} * {K} * {d}{extra} exceeds {MAX_STATE_ELEMENTS} elements "
            "(a 16 GiB float32 state); this is refused as a size no quantizer needs"
        )
