"""Conversion of ``VectorQuantize`` and ``ResidualVQ`` to and from vector-quantize-pytorch.

Symbols: D = dim, K = codebook_size, Q = num_quantizers, H = vector-quantize-pytorch's leading
codebook (head) axis, always 1 for the modules converted here.

What is converted.  The configuration (dim, codebook_size, decay, eps, commitment_weight,
ema_update, learnable_codebook, k-means settings, use_cosine_sim, the orthogonal regulariser
and its code subsets, threshold_ema_dead_code, rotation_trick, stochastic_sample_codes,
sample_codebook_temp, straight_through, codebook_diversity_loss_weight,
codebook_diversity_temperature, num_quantizers, shared_codebook) and the state of every
codebook: ``codebook`` (torch: ``embed``, shape ``(1, K, D)``), ``cluster_size`` (``(1, K)``),
``embed_avg`` (``(1, K, D)``) and ``initted``.

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
distribution; the two libraries draw their noise from different generators.

Unsupported options (multi-head codebooks, projections, DiVeQ, affine parameters, quantize
dropout, beam search, implicit neural codebooks, channel-first or image inputs, vqref's
``soft_assignment``, ...) raise a ``ValueError`` that names every offending option at
once, rather than converting to a module that would compute something else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from .common import raise_unsupported, torch_to_host

__all__ = ["from_vqp", "to_vqp", "export_state_dict"]

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
)


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
    need(vq.heads != 1, f"heads={vq.heads} (multi-head codebooks)")
    need(bool(vq.separate_codebook_per_head) or cb.num_codebooks != 1, "separate_codebook_per_head=True")
    need(bool(vq.has_projections), "codebook_dim != dim (project_in/project_out projections)")
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
    need(bool(cb.use_ddp), "sync_codebook=True (distributed codebook synchronisation)")
    need(bool(cb.manual_ema_update) and not in_shared_stack, "manual_ema_update=True")
    need(
        cb.threshold_ema_dead_code > 0 and cb.reset_cluster_size != cb.threshold_ema_dead_code,
        f"reset_cluster_size={cb.reset_cluster_size} != threshold_ema_dead_code",
    )
    config = {
        "dim": int(vq.dim),
        "codebook_size": int(vq.codebook_size),
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
    }
    return config, unsupported


def _read_state(vq: Any) -> dict:
    """vqref's state of one torch ``VectorQuantize`` (host arrays, head axis dropped)."""
    cb = vq._codebook
    return {
        "codebook": torch_to_host(cb.embed)[0],  # (K, D)
        "cluster_size": torch_to_host(cb.cluster_size)[0],  # (K,)
        "embed_avg": torch_to_host(cb.embed_avg)[0],  # (K, D)
        "initted": np.asarray(bool(cb.initted)),
    }


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
        out.load_state_dict(_read_state(module))
        return out.train(module.training)
    if isinstance(module, TorchRVQ):
        return _from_residual(module, seed=seed, backend=backend)
    raise TypeError(f"expected a vector_quantize_pytorch VectorQuantize or ResidualVQ, got {type(module).__name__}")


def _from_residual(rvq: Any, *, seed: Any, backend: dict):
    from ..quantizers import ResidualVQ

    problems = []

    def need(condition: bool, text: str) -> None:
        if condition:
            problems.append(text)

    need(bool(rvq.quantize_dropout), "quantize_dropout=True")
    need(bool(rvq.implicit_neural_codebook), "implicit_neural_codebook=True (QINCo)")
    need(bool(rvq.diveq), "diveq=True")
    need(rvq.quant_grad_frac != 0, f"quant_grad_frac={rvq.quant_grad_frac}")
    need(rvq.beam_size is not None and rvq.beam_size > 1, f"beam_size={rvq.beam_size}")
    need(rvq.eval_beam_size is not None and rvq.eval_beam_size > 1, f"eval_beam_size={rvq.eval_beam_size}")
    need(bool(rvq.has_projections), "codebook_dim != dim (project_in/project_out projections)")
    need(bool(rvq.accept_image_fmap), "accept_image_fmap=True")
    need(not rvq.uniform_codebook_size, f"per-depth codebook sizes {tuple(rvq.codebook_sizes)}")
    shared = bool(rvq.shared_codebook)
    configs = []
    for layer in rvq.layers:
        config, layer_problems = _read_vq_layer(layer, in_shared_stack=shared)
        configs.append(config)
        problems.extend(layer_problems)
    if not problems:
        # vqref applies one set of options at every depth.
        for level, config in enumerate(configs[1:], start=1):
            diff = sorted(k for k in config if k != "kmeans_init" and config[k] != configs[0][k])
            need(bool(diff), f"depth {level} configured differently from depth 0 ({', '.join(diff)})")
    raise_unsupported("ResidualVQ", problems)

    options = {k: configs[0][k] for k in _VQ_OPTIONS}
    # Depths whose codebook is not yet initialised run k-means; the flag only matters there.
    options["kmeans_init"] = any(c["kmeans_init"] for c in configs)
    out = ResidualVQ(
        dim=int(rvq.layers[0].dim),
        num_quantizers=int(rvq.num_quantizers),
        codebook_size=int(rvq.codebook_size),
        shared_codebook=shared,
        seed=seed,
        **options,
        **backend,
    )
    state = {}
    layers = rvq.layers[:1] if shared else rvq.layers
    # state keys: "codebook", ... for a shared codebook, "0.codebook", "1.codebook", ... otherwise
    prefixes = [""] if shared else [f"{level}." for level in range(len(layers))]
    for prefix, layer in zip(prefixes, layers):
        state.update({prefix + k: v for k, v in _read_state(layer).items()})
    out.load_state_dict(state)
    return out.train(rvq.training)


# ---------------------------------------------------------------------------- vqref -> torch


def _check_exportable(module: Any) -> None:
    from ..quantizers import ResidualVQ, VectorQuantize

    if not isinstance(module, (VectorQuantize, ResidualVQ)):
        raise TypeError(f"expected a vqref VectorQuantize or ResidualVQ, got {type(module).__name__}")
    problems = []
    first = module.layers[0] if isinstance(module, ResidualVQ) else module
    if first.codebook_weight is not None:
        problems.append(
            f"codebook_weight={first.codebook_weight} (vector-quantize-pytorch has a single commitment term)"
        )
    if first.soft_assignment:
        problems.append("soft_assignment=True (vqref's soft estimator)")
    if first.straight_through and first.learnable_codebook:
        problems.append("straight_through=True with learnable_codebook=True (vector-quantize-pytorch refuses it)")
    if isinstance(module, ResidualVQ) and module.gradient_routing != "per_depth":
        problems.append(f"gradient_routing={module.gradient_routing!r} (vector-quantize-pytorch routes per depth)")
    if problems:
        raise ValueError("vector-quantize-pytorch has no equivalent of " + "; ".join(problems))


def _layer_state_arrays(layer: Any, dtype: Any) -> dict:
    """One vqref codebook's state in torch's keys and shapes (leading head axis of 1)."""
    return {
        "_codebook.initted": np.asarray(bool(layer.initted)),
        "_codebook.cluster_size": np.ascontiguousarray(B.to_numpy(layer.cluster_size).astype(dtype)[None, :]),
        "_codebook.embed_avg": np.ascontiguousarray(B.to_numpy(layer.embed_avg).astype(dtype)[None, :, :]),
        "_codebook.embed": np.ascontiguousarray(B.to_numpy(layer.codebook).astype(dtype)[None, :, :]),
    }


def export_state_dict(module: Any, *, dtype: Any = "float32") -> dict:
    """The state of a vqref module as numpy arrays keyed and shaped like vector-quantize-pytorch's.

    ``VectorQuantize``: ``_codebook.embed (1, K, D)``, ``_codebook.embed_avg (1, K, D)``,
    ``_codebook.cluster_size (1, K)``, ``_codebook.initted ()`` (bool).  ``ResidualVQ``: the same
    under ``layers.{l}.`` for every depth l; with a shared codebook every depth repeats the one
    codebook, as torch's ``state_dict()`` does.  Load it with
    ``torch_module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Parameters
    ----------
    module : vqref VectorQuantize or ResidualVQ
    dtype : float dtype of the arrays (default "float32", what torch keeps the buffers in)

    Returns
    -------
    dict of str -> numpy.ndarray (host copies)
    """
    from ..quantizers import ResidualVQ

    _check_exportable(module)
    dtype = np.dtype(dtype)
    if not isinstance(module, ResidualVQ):
        return _layer_state_arrays(module, dtype)
    out = {}
    for level in range(module.num_quantizers):
        layer = module.layers[level]
        out.update({f"layers.{level}.{k}": v for k, v in _layer_state_arrays(layer, dtype).items()})
    return out


def to_vqp(module: Any):
    """The vector-quantize-pytorch module equivalent to a vqref ``VectorQuantize`` or ``ResidualVQ``.

    The torch module is built with the same options (``rotation_trick`` and ``ema_update``
    explicitly, ``sync_codebook=False``: vqref has no distributed mode) and loads the state of
    :func:`export_state_dict` in float32.  torch's global random state is left as it was (the
    random initial codebook that the constructor draws is overwritten anyway).

    Returns
    -------
    ``vector_quantize_pytorch.VectorQuantize`` or ``ResidualVQ``, in the same train/eval mode

    Raises
    ------
    ValueError : vqref options with no vector-quantize-pytorch equivalent (``codebook_weight``,
        ``gradient_routing="sum"``, ``soft_assignment``, ``straight_through`` with
        ``learnable_codebook``)
    """
    import torch

    from ..quantizers import ResidualVQ

    TorchVQ, TorchRVQ = _vqp_classes()
    _check_exportable(module)
    first = module.layers[0] if isinstance(module, ResidualVQ) else module
    config = first.config()
    options = {k: config[k] for k in _VQ_OPTIONS}
    options["sync_codebook"] = False
    with torch.random.fork_rng(devices=[]):
        if isinstance(module, ResidualVQ):
            out = TorchRVQ(
                dim=module.dim,
                num_quantizers=module.num_quantizers,
                codebook_size=module.codebook_size,
                shared_codebook=module.shared_codebook,
                **options,
            )
        else:
            out = TorchVQ(dim=module.dim, codebook_size=module.codebook_size, **options)
    state = {k: torch.from_numpy(v) for k, v in export_state_dict(module).items()}
    out.load_state_dict(state)
    return out.train(module.training)
