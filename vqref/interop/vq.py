"""Conversion of ``VectorQuantize`` and ``ResidualVQ`` to and from vector-quantize-pytorch.

Symbols: D = dim, d = codebook_dim, H = heads, E = H d, K = codebook_size (K_l per depth),
Q = num_quantizers.

What is converted.  The configuration (dim, codebook_size -- one per depth too --, codebook_dim,
heads, separate_codebook_per_head, decay, eps, commitment_weight, ema_update,
learnable_codebook, k-means settings, use_cosine_sim, the orthogonal regulariser and its code
subsets, threshold_ema_dead_code, rotation_trick, stochastic_sample_codes,
sample_codebook_temp, straight_through, codebook_diversity_loss_weight,
codebook_diversity_temperature, return_zeros_for_masked_padding, and for a ``ResidualVQ``
num_quantizers, shared_codebook, quantize_dropout and its cutoff and multiple, beam_size,
eval_beam_size and beam_score_quantizer_weights) and the state: every codebook's ``codebook``
(torch: ``embed``, shape ``(1, K, d)``, or ``(H, K, d)`` with a codebook per head),
``cluster_size`` (``(1, K)``), ``embed_avg`` and ``initted``, and the projections
``project_in`` / ``project_out`` (torch's ``nn.Linear`` keeps ``weight (out, in)``; vqref's
``W (in, out)`` is its transpose).

The gradient estimator is always written out explicitly.  vector-quantize-pytorch's default is
the rotation trick (for dim > 1) and vqref's is the straight-through estimator, so relying on
either library's default would silently change the gradient; ``rotation_trick`` is read from
the source module and passed on both ways.

``kmeans_init`` is not stored by vector-quantize-pytorch, only its effect: ``initted`` is False
until the first forward has run k-means.  A converted module gets ``kmeans_init = not
initted``; an already initialised codebook behaves identically whether or not it came from
k-means.

``straight_through`` converts to itself although the two libraries differ: vqref's is the
straight-through Gumbel-softmax estimator of the paper, vector-quantize-pytorch's final
straight-through step discards it (docs/deviations.md §13).  Sampling converts as the same
distribution; the two libraries draw their noise from different generators, and so their quantize
dropout depths (vector-quantize-pytorch: ``random.Random``; vqref: the module's generator).
vqref's own ``beam_score="error"`` and ``quantize_dropout_per_sample`` have no counterpart.

Unsupported options (DiVeQ, affine parameters, a LayerNorm after ``project_in``, implicit neural
codebooks, channel-first or image inputs, vqref's ``soft_assignment``, ...) raise a
``ValueError`` that names every offending option at once, rather than converting to a module
that would compute something else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from .common import raise_unsupported, torch_to_host

__all__ = ["from_vqp", "to_vqp", "export_state_dict", "read_residual", "residual_state", "layer_state_arrays",
           "vqp_options", "check_exportable"]  # fmt: skip

# The options every quantizer (or every depth of a residual stack) carries, in vqref's names.
_VQ_OPTIONS = (
    "decay",
    "eps",
    "commitment_weight",
    "ema_update",
    "learnable_codebook",
    "kmeans_init",
    "kmeans_iters",
    "use_cosine_sim",
    "orthogonal_reg_weight",
    "orthogonal_reg_active_codes_only",
    "orthogonal_reg_max_codes",
    "threshold_ema_dead_code",
    "rotation_trick",
    "stochastic_sample_codes",
    "sample_codebook_temp",
    "straight_through",
    "codebook_diversity_loss_weight",
    "codebook_diversity_temperature",
    "return_zeros_for_masked_padding",
    "sync_codebook",
    "sync_kmeans",
)
_PROJECTIONS = ("project_in", "project_out")


def _vqp_classes():
    import vector_quantize_pytorch as vqp

    return vqp.VectorQuantize, vqp.ResidualVQ


# ---------------------------------------------------------------------------- torch -> vqref


def _read_vq_layer(vq: Any, *, in_shared_stack: bool = False) -> tuple[dict, list[str]]:
    """Configuration of one torch ``VectorQuantize`` in vqref's names, and what vqref lacks.

    ``in_shared_stack``: the layer belongs to a ResidualVQ with ``shared_codebook=True``, which
    sets ``manual_ema_update`` on its layers (vqref's shared stack does the same thing itself).
    """
    cb = vq._codebook
    unsupported = []

    def need(condition: bool, text: str) -> None:
        if condition:
            unsupported.append(text)

    gumbel = getattr(cb, "gumbel_sample", None)
    keywords = getattr(gumbel, "keywords", None)
    need(keywords is None, "a custom gumbel_sample function")
    keywords = keywords or {}
    need(
        bool(vq.has_projections) and not isinstance(vq.project_in, torch_linear()),
        "layernorm_after_project_in=True (a LayerNorm after project_in)",
    )
    separate = bool(vq.separate_codebook_per_head) and vq.heads > 1
    unsupported.extend(_head_problems(separate, bool(vq.orthogonal_reg_active_codes_only),
                                      float(vq.codebook_diversity_loss_weight)))  # fmt: skip
    stochastic, straight = bool(keywords.get("stochastic", False)), bool(keywords.get("straight_through", False))
    temperature = float(cb.sample_codebook_temp)
    need(temperature < 0, f"sample_codebook_temp={temperature} < 0 (vqref takes 0 for no sampling)")
    need(
        straight and temperature <= 0,
        f"straight_through=True with sample_codebook_temp={temperature} (vqp then ignores straight_through; "
        "vqref's estimator needs a temperature > 0)",
    )
    need(
        vq.codebook_diversity_temperature < 0, f"codebook_diversity_temperature={vq.codebook_diversity_temperature} < 0"
    )
    need(bool(vq.directional_reparam), "directional_reparam=True (DiVeQ)")
    need(bool(vq.commitment_use_cross_entropy_loss), "commitment_use_cross_entropy_loss=True")
    need(vq.sync_update_v > 0, f"sync_update_v={vq.sync_update_v}")
    need(vq.in_place_codebook_optimizer is not None, "in_place_codebook_optimizer")
    need(bool(vq.accept_image_fmap), "accept_image_fmap=True")
    need(bool(vq.accept_3d_fmap), "accept_3d_fmap=True")
    need(not vq.channel_last, "channel_last=False")
    need(not vq.route_gradients_to_input, "route_gradients_to_input=False")
    need(bool(vq.freeze_codebook), "freeze_codebook=True")
    need(bool(cb.affine_param), "affine_param=True")
    need(cb.vq_bridge is not None, "vq_bridge (FVQ)")
    need(bool(cb.manual_ema_update) and not in_shared_stack, "manual_ema_update=True")
    need(
        cb.threshold_ema_dead_code > 0 and cb.reset_cluster_size != cb.threshold_ema_dead_code,
        f"reset_cluster_size={cb.reset_cluster_size} != threshold_ema_dead_code",
    )
    config = {
        "dim": int(vq.dim),
        "codebook_size": int(vq.codebook_size),
        "codebook_dim": int(cb.embed.shape[-1]),
        "heads": int(vq.heads),
        "separate_codebook_per_head": bool(vq.separate_codebook_per_head),
        "return_zeros_for_masked_padding": bool(vq.return_zeros_for_masked_padding),
        "decay": float(cb.decay),
        "eps": float(cb.eps),
        "commitment_weight": float(vq.commitment_weight),
        "ema_update": bool(cb.ema_update),
        "learnable_codebook": bool(vq.learnable_codebook),
        "kmeans_init": not bool(cb.initted),
        "kmeans_iters": int(cb.kmeans_iters),
        "use_cosine_sim": bool(vq.use_cosine_sim),
        "orthogonal_reg_weight": float(vq.orthogonal_reg_weight),
        "orthogonal_reg_active_codes_only": bool(vq.orthogonal_reg_active_codes_only),
        "orthogonal_reg_max_codes": None if vq.orthogonal_reg_max_codes is None else int(vq.orthogonal_reg_max_codes),
        "threshold_ema_dead_code": float(cb.threshold_ema_dead_code),
        "rotation_trick": bool(vq.rotation_trick),
        "stochastic_sample_codes": stochastic,
        "sample_codebook_temp": temperature,
        "straight_through": straight,
        "codebook_diversity_loss_weight": float(max(vq.codebook_diversity_loss_weight, 0.0)),
        "codebook_diversity_temperature": float(vq.codebook_diversity_temperature),
        # vqp resolves its default (synchronise when a process group exists) at construction;
        # not synchronising becomes vqref's default, which synchronises only over a multi-rank comm
        "sync_codebook": True if cb.use_ddp else None,
        "sync_kmeans": not cb.use_ddp or cb.kmeans_all_reduce_fn is not _vqp_noop(),
    }
    return config, unsupported


def _vqp_noop():
    from vector_quantize_pytorch.vector_quantize_pytorch import noop

    return noop


def torch_linear():
    import torch

    return torch.nn.Linear


def _read_state(vq: Any) -> dict:
    """vqref's state of one torch ``VectorQuantize`` (host arrays; the head axis dropped unless
    there is a codebook per head)."""
    cb = vq._codebook
    keep = slice(None) if vq.separate_codebook_per_head else 0
    return {
        "codebook": torch_to_host(cb.embed)[keep],  # (K, d) or (H, K, d)
        "cluster_size": torch_to_host(cb.cluster_size)[keep],  # (K,) or (H, K)
        "embed_avg": torch_to_host(cb.embed_avg)[keep],  # (K, d) or (H, K, d)
        "initted": np.asarray(bool(cb.initted)),
    }


def _read_projections(module: Any) -> dict:
    """``project_in.W (D, E)``, ``project_in.b``, ``project_out.W (E, D)``, ``project_out.b`` of a
    torch module with projections (W is the transpose of torch's weight), else {}."""
    if not module.has_projections:
        return {}
    out = {}
    for name in _PROJECTIONS:
        layer = getattr(module, name)
        out[name + ".W"] = torch_to_host(layer.weight).T.copy()
        out[name + ".b"] = torch_to_host(layer.bias)
    return out


def from_vqp(module: Any, *, dtype: Any, xp: Any, device: Any, seed: Any):
    """The vqref module equivalent to a vector-quantize-pytorch ``VectorQuantize`` or ``ResidualVQ``.

    Parameters
    ----------
    module : ``vector_quantize_pytorch.VectorQuantize`` or ``vector_quantize_pytorch.ResidualVQ``
        (with or without ``shared_codebook``).  Its training mode is copied too.
    dtype : dtype of the vqref state (default "float32", the dtype torch keeps it in)
    xp : array library of the vqref state (numpy by default; cupy; array_api_strict)
    device : device for ``xp``
    seed : seed or numpy Generator of the vqref module (k-means sampling, dead-code restarts,
        random code subsets, Gumbel noise); torch's random stream cannot be carried over

    Returns
    -------
    :class:`vqref.VectorQuantize` or :class:`vqref.ResidualVQ` with the same configuration and a
    copy of the state (``codebook (K, D)``, ``cluster_size (K,)``, ``embed_avg (K, D)``,
    ``initted``; per depth for a residual stack, once for a shared codebook).

    Raises
    ------
    TypeError : ``module`` is not one of the two supported classes
    ValueError : the module uses options vqref does not implement; the message names each one
    """
    from ..quantizers import VectorQuantize

    TorchVQ, TorchRVQ = _vqp_classes()
    backend = dict(dtype=dtype, xp=xp, device=device)
    if isinstance(module, TorchVQ):
        config, problems = _read_vq_layer(module)
        raise_unsupported("VectorQuantize", problems)
        out = VectorQuantize(**config, seed=seed, **backend)
        out.load_state_dict({**_read_state(module), **_read_projections(module)})
        return out.train(module.training)
    if isinstance(module, TorchRVQ):
        return _from_residual(module, seed=seed, backend=backend)
    raise TypeError(f"expected a vector_quantize_pytorch VectorQuantize or ResidualVQ, got {type(module).__name__}")


def _from_residual(rvq: Any, *, seed: Any, backend: dict):
    from ..quantizers import ResidualVQ

    config, problems = read_residual(rvq)
    raise_unsupported("ResidualVQ", problems)
    out = ResidualVQ(**config, seed=seed, **backend)
    out.load_state_dict(residual_state(rvq))
    return out.train(rvq.training)


def read_residual(rvq: Any) -> tuple[dict, list]:
    """The ``ResidualVQ`` constructor options of a torch ``ResidualVQ`` and what vqref lacks."""
    problems = []

    def need(condition: bool, text: str) -> None:
        if condition:
            problems.append(text)

    need(bool(rvq.implicit_neural_codebook), "implicit_neural_codebook=True (QINCo)")
    need(bool(rvq.diveq), "diveq=True")
    need(rvq.quant_grad_frac != 0, f"quant_grad_frac={rvq.quant_grad_frac}")
    need(bool(rvq.accept_image_fmap), "accept_image_fmap=True")
    shared = bool(rvq.shared_codebook)
    configs = []
    for layer in rvq.layers:
        config, layer_problems = _read_vq_layer(layer, in_shared_stack=shared)
        configs.append(config)
        problems.extend(layer_problems)
    if not problems:
        # vqref applies one set of options at every depth.
        for level, config in enumerate(configs[1:], start=1):
            diff = sorted(k for k in config if k not in ("kmeans_init", "codebook_size") and config[k] != configs[0][k])
            need(bool(diff), f"depth {level} configured differently from depth 0 ({', '.join(diff)})")
    options = {k: configs[0][k] for k in _VQ_OPTIONS}
    # Depths whose codebook is not yet initialised run k-means; the flag only matters there.
    options["kmeans_init"] = any(c["kmeans_init"] for c in configs)
    sizes = [int(k) for k in rvq.codebook_sizes]
    weights = [float(w) for w in rvq.beam_score_weights.tolist()]
    beam = rvq.beam_size
    config = dict(
        dim=int(rvq.project_in.in_features) if rvq.has_projections else int(rvq.layers[0].dim),
        num_quantizers=int(rvq.num_quantizers),
        codebook_size=sizes[0] if len(set(sizes)) == 1 else sizes,
        codebook_dim=int(rvq.codebook_dim),
        shared_codebook=shared,
        quantize_dropout=bool(rvq.quantize_dropout),
        quantize_dropout_cutoff_index=int(rvq.quantize_dropout_cutoff_index),
        quantize_dropout_multiple_of=int(rvq.quantize_dropout_multiple_of),
        beam_size=None if beam is None else int(beam),
        eval_beam_size=None if rvq.eval_beam_size is None else int(rvq.eval_beam_size),
        beam_score_quantizer_weights=None if all(w == 1.0 for w in weights) else weights,
        **options,
    )
    return config, problems


def residual_state(rvq: Any) -> dict:
    """vqref's state of a torch ``ResidualVQ`` (host arrays)."""
    shared = bool(rvq.shared_codebook)
    layers = rvq.layers[:1] if shared else rvq.layers
    # state keys: "codebook", ... for a shared codebook, "0.codebook", "1.codebook", ... otherwise
    prefixes = [""] if shared else [f"{level}." for level in range(len(layers))]
    state = _read_projections(rvq)
    for prefix, layer in zip(prefixes, layers):
        state.update({prefix + k: v for k, v in _read_state(layer).items()})
    return state


# ---------------------------------------------------------------------------- vqref -> torch


def check_exportable(module: Any) -> None:
    """Refuse (ValueError naming each) the options of a vqref module vqp has no equivalent of."""
    from ..quantizers import VectorQuantize

    if not isinstance(module, VectorQuantize):
        raise TypeError(f"expected a vqref VectorQuantize or ResidualVQ, got {type(module).__name__}")
    problems = []
    m = module
    if m.codebook_weight is not None:
        problems.append(f"codebook_weight={m.codebook_weight} (vector-quantize-pytorch has a single commitment term)")
    if m.soft_assignment:
        problems.append("soft_assignment=True (vqref's soft estimator)")
    if m.straight_through and m.learnable_codebook:
        problems.append("straight_through=True with learnable_codebook=True (vector-quantize-pytorch refuses it)")
    if m.is_stack and m.gradient_routing != "per_depth":
        problems.append(f"gradient_routing={m.gradient_routing!r} (vector-quantize-pytorch routes per depth)")
    if m.quantize_dropout_per_sample:
        problems.append("quantize_dropout_per_sample=True (vector-quantize-pytorch drops depths per batch)")
    if m.beam_score != "cumulative" and any(w is not None and w > 1 for w in (m.beam_size, m.eval_beam_size)):
        problems.append(f"beam_score={m.beam_score!r} (vector-quantize-pytorch scores the cumulative errors)")
    if m.is_stack and m.heads > 1:
        problems.append(f"heads={m.heads} in a residual stack")
    problems.extend(_head_problems(m.separate_codebook_per_head and m.heads > 1, m.orthogonal_reg_active_codes_only,
                                   m.codebook_diversity_loss_weight))  # fmt: skip
    if problems:
        raise ValueError("vector-quantize-pytorch has no equivalent of " + "; ".join(problems))


def _head_problems(separate: bool, active_codes: bool, diversity: float) -> list:
    """What a codebook per head cannot be converted with, either way."""
    out = []
    if separate and active_codes:
        out.append("orthogonal_reg_active_codes_only with separate_codebook_per_head (vqp refuses it in its forward)")
    if separate and diversity > 0:
        out.append(
            "codebook_diversity_loss_weight with separate_codebook_per_head (vqp pools the heads' distributions)"
        )
    return out


def layer_state_arrays(layer: Any, dtype: Any, per_head: bool = False) -> dict:
    """One vqref codebook's state in torch's keys and shapes (a leading head axis: 1, or H)."""
    lead = () if per_head else (None,)
    return {
        "_codebook.initted": np.asarray(bool(layer.initted)),
        "_codebook.cluster_size": np.ascontiguousarray(B.to_numpy(layer.cluster_size).astype(dtype)[lead]),
        "_codebook.embed_avg": np.ascontiguousarray(B.to_numpy(layer.embed_avg).astype(dtype)[lead]),
        "_codebook.embed": np.ascontiguousarray(B.to_numpy(layer.codebook).astype(dtype)[lead]),
    }


def _projection_arrays(module: Any, dtype: Any) -> dict:
    """``project_in.weight (E, D)``, ``project_in.bias``, ``project_out.weight (D, E)``, ``project_out.bias``."""
    if not module.has_projections:
        return {}
    out = {}
    for name in _PROJECTIONS:
        out[name + ".weight"] = np.ascontiguousarray(B.to_numpy(module.state_array(name + ".W")).astype(dtype).T)
        out[name + ".bias"] = np.ascontiguousarray(B.to_numpy(module.state_array(name + ".b")).astype(dtype))
    return out


def export_state_dict(module: Any, *, dtype: Any = "float32") -> dict:
    """The state of a vqref module as numpy arrays keyed and shaped like vector-quantize-pytorch's.

    ``VectorQuantize``: ``_codebook.embed (1, K, d)`` (``(H, K, d)`` with a codebook per head),
    ``_codebook.embed_avg`` (the same), ``_codebook.cluster_size (1, K)`` (``(H, K)``),
    ``_codebook.initted ()`` (bool), and with projections ``project_in.weight (E, D)``,
    ``project_in.bias (E,)``, ``project_out.weight (D, E)``, ``project_out.bias (D,)``.
    ``ResidualVQ``: the projections, and the codebook entries under ``layers.{l}.`` for every
    depth l; with a shared codebook every depth repeats the one codebook, as torch's
    ``state_dict()`` does.  Load it with
    ``torch_module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Parameters
    ----------
    module : vqref VectorQuantize or ResidualVQ
    dtype : float dtype of the arrays (default "float32", what torch keeps the buffers in)

    Returns
    -------
    dict of str -> numpy.ndarray (host copies)
    """
    check_exportable(module)
    dtype = np.dtype(dtype)
    out = _projection_arrays(module, dtype)
    if not module.is_stack:
        out.update(layer_state_arrays(module, dtype, per_head=module.separate_codebook_per_head))
        return out
    for level in range(module.num_quantizers):
        layer = module.layers[level]
        out.update({f"layers.{level}.{k}": v for k, v in layer_state_arrays(layer, dtype).items()})
    return out


def vqp_options(module: Any) -> dict:
    """The constructor options of the torch module equivalent to a vqref ``VectorQuantize`` or
    ``ResidualVQ`` (without the state)."""
    first = module.layers[0] if module.is_stack else module
    config = first.config()
    options = {k: config[k] for k in _VQ_OPTIONS}
    options.update(dim=module.dim, codebook_dim=module.codebook_dim)
    if not module.is_stack:
        options.update(codebook_size=module.codebook_size, heads=module.heads,
                       separate_codebook_per_head=module.separate_codebook_per_head)  # fmt: skip
        return options
    K = module.codebook_size
    weights = module.beam_score_quantizer_weights
    options.update(
        num_quantizers=module.num_quantizers, codebook_size=tuple(K) if isinstance(K, list) else K,
        shared_codebook=module.shared_codebook, quantize_dropout=module.quantize_dropout,
        quantize_dropout_cutoff_index=module.quantize_dropout_cutoff_index,
        quantize_dropout_multiple_of=module.quantize_dropout_multiple_of, beam_size=module.beam_size,
        eval_beam_size=module.eval_beam_size, beam_score_quantizer_weights=None if weights is None else list(weights),
    )  # fmt: skip
    return options


def to_vqp(module: Any):
    """The vector-quantize-pytorch module equivalent to a vqref ``VectorQuantize`` or ``ResidualVQ``.

    The torch module is built with the same options (``rotation_trick`` and ``ema_update``
    explicitly, ``sync_codebook`` and ``sync_kmeans`` as they are) and loads the state of :func:`export_state_dict` in
    float32.  torch's global random state is left as it was (the random initial codebook and
    projections that the constructor draws are overwritten anyway).

    Returns
    -------
    ``vector_quantize_pytorch.VectorQuantize`` or ``ResidualVQ``, in the same train/eval mode

    Raises
    ------
    ValueError : vqref options with no vector-quantize-pytorch equivalent (``codebook_weight``,
        ``gradient_routing="sum"``, ``soft_assignment``, ``straight_through`` with
        ``learnable_codebook``, ``quantize_dropout_per_sample``, ``beam_score="error"``, ...)
    """
    import torch

    TorchVQ, TorchRVQ = _vqp_classes()
    check_exportable(module)
    options = vqp_options(module)
    with torch.random.fork_rng(devices=[]):
        out = TorchRVQ(**options) if module.is_stack else TorchVQ(**options)
    state = {k: torch.from_numpy(v) for k, v in export_state_dict(module).items()}
    out.load_state_dict(state)
    return out.train(module.training)
