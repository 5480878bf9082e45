"""Conversion of ``LFQ`` and ``ResidualLFQ`` to and from vector-quantize-pytorch.

Symbols: D = dim, C = num_codebooks, d = log2(codebook_size), Q = num_quantizers.

What is converted.  Every option of vector-quantize-pytorch's ``LFQ`` that changes a number:
dim, codebook_size, the loss weights (entropy_loss_weight, commitment_loss_weight,
diversity_gamma), num_codebooks, keep_num_codebooks_dim, codebook_scale,
frac_per_sample_entropy, has_projections, projection_has_bias, soft_clamp_input_value,
cosine_sim_project_in and its scale, experimental_softplus_entropy_loss with its
entropy_loss_offset, spherical, orthogonal_rotation and channel_first; for ``ResidualLFQ`` dim,
num_quantizers, codebook_size, soft_clamp_input_value and the options its depths share.  The
state: the projections (torch's ``nn.Linear`` keeps ``weight (Dout, Din)``, vqref ``W = weight^T
(Din, Dout)`` and ``b = bias``; the cosine-similarity projection keeps ``weight (Din, Dout)`` in
both) and the ``orthogonal_rot (d, d)`` buffers.  torch's ``mask`` buffer (the bit values
``2^(d-1) .. 1``) follows from the configuration.

What has no effect and is not carried.  ``force_quantization_f32``: vqref quantizes in the
input's dtype (for float32 inputs the two are the same; docs/deviations.md section 12).

Refused with a ``ValueError`` naming each option: a ``straight_through_activation`` other than
``nn.Identity``; on ``ResidualLFQ``: ``quantize_dropout`` and depths configured differently
(beyond the scale ``2^-l`` and the soft clamp ``v 2^-l`` that vector-quantize-pytorch gives
depth l), and depths with their own ``channel_first`` or ``keep_num_codebooks_dim=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import raise_unsupported, state_in_torch_layout, torch_to_host

__all__ = ["from_vqp", "to_vqp", "export_state_dict"]

_PROJECTIONS = ("project_in", "project_out")
# the options every depth of a ResidualLFQ shares, in both libraries' names
_DEPTH_OPTIONS = (
    "entropy_loss_weight", "commitment_loss_weight", "diversity_gamma", "frac_per_sample_entropy",
    "experimental_softplus_entropy_loss", "entropy_loss_offset", "spherical", "orthogonal_rotation",
)  # fmt: skip


def _vqp_classes():
    import vector_quantize_pytorch as vqp

    return vqp.LFQ, vqp.ResidualLFQ


def _is_cosine(linear: Any) -> bool:
    return type(linear).__name__ == "CosineSimLinear"


def _lfq_config(lfq: Any) -> tuple[dict, list[str]]:
    """The vqref configuration of a torch ``LFQ`` and what vqref lacks."""
    problems = []
    if type(lfq.activation).__name__ != "Identity":
        problems.append(f"straight_through_activation={type(lfq.activation).__name__} (only nn.Identity)")
    proj = bool(lfq.has_projections)
    cosine = proj and _is_cosine(lfq.project_in)
    config = {
        "dim": int(lfq.dim),
        "codebook_size": int(lfq.codebook_size),
        "entropy_loss_weight": float(lfq.entropy_loss_weight),
        "commitment_loss_weight": float(lfq.commitment_loss_weight),
        "diversity_gamma": float(lfq.diversity_gamma),
        "num_codebooks": int(lfq.num_codebooks),
        "keep_num_codebooks_dim": bool(lfq.keep_num_codebooks_dim),
        "codebook_scale": float(lfq.codebook_scale),
        "frac_per_sample_entropy": float(lfq.frac_per_sample_entropy),
        "has_projections": proj,
        "projection_has_bias": not proj or lfq.project_out.bias is not None,
        "soft_clamp_input_value": None if lfq.soft_clamp_input_value is None else float(lfq.soft_clamp_input_value),
        "cosine_sim_project_in": cosine,
        "cosine_sim_project_in_scale": float(lfq.project_in.scale) if cosine else None,
        "experimental_softplus_entropy_loss": bool(lfq.experimental_softplus_entropy_loss),
        "entropy_loss_offset": float(lfq.entropy_loss_offset),
        "spherical": bool(lfq.spherical),
        "orthogonal_rotation": bool(lfq.orthogonal_rotation),
        "channel_first": None if lfq.channel_first is None else bool(lfq.channel_first),
    }
    return config, problems


def _read_projections(module: Any) -> dict:
    """vqref's projection entries of a torch module (host arrays, W input-major)."""
    state = {}
    if not module.has_projections:
        return state
    for name in _PROJECTIONS:
        linear = getattr(module, name)
        weight = torch_to_host(linear.weight)
        state[name + ".W"] = weight if _is_cosine(linear) else weight.T.copy()  # (Din, Dout)
        if getattr(linear, "bias", None) is not None:
            state[name + ".b"] = torch_to_host(linear.bias)
    return state


def from_vqp(module: Any, *, dtype: Any, xp: Any, device: Any, seed: Any):
    """The vqref module equivalent to a vector-quantize-pytorch ``LFQ`` or ``ResidualLFQ``.

    Parameters
    ----------
    module : ``vector_quantize_pytorch.LFQ`` or ``vector_quantize_pytorch.ResidualLFQ``; its
        training mode is copied too
    dtype, xp, device : the vqref module's state dtype, array library and device
    seed : seed or numpy Generator of the vqref module (the random tokens of
        ``frac_per_sample_entropy < 1``); torch's random stream cannot be carried over

    Raises
    ------
    TypeError : ``module`` is neither class
    ValueError : the module uses options vqref does not implement; the message names each one
    """
    from ..quantizers import LFQ, ResidualLFQ

    TorchLFQ, TorchRLFQ = _vqp_classes()
    backend = dict(dtype=dtype, xp=xp, device=device, seed=seed)
    if isinstance(module, TorchLFQ):
        config, problems = _lfq_config(module)
        raise_unsupported("LFQ", problems)
        out = LFQ(**config, **backend)
        state = _read_projections(module)
        if module.orthogonal_rotation:
            state["orthogonal_rot"] = torch_to_host(module.orthogonal_rot)
        out.load_state_dict(state)
        return out.train(module.training)
    if isinstance(module, TorchRLFQ):
        options, problems = _read_residual_layers(module)
        raise_unsupported("ResidualLFQ", problems)
        out = ResidualLFQ(
            dim=int(module.project_in.in_features) if module.has_projections else options.pop("codebook_dim"),
            num_quantizers=int(module.num_quantizers),
            codebook_size=int(module.layers[0].codebook_size),
            **{k: v for k, v in options.items() if k != "codebook_dim"},
            **backend,
        )
        state = _read_projections(module)
        for level, layer in enumerate(module.layers):
            if layer.orthogonal_rotation:
                state[f"layers.{level}.orthogonal_rot"] = torch_to_host(layer.orthogonal_rot)
        out.load_state_dict(state)
        return out.train(module.training)
    raise TypeError(f"expected a vector_quantize_pytorch LFQ or ResidualLFQ, got {type(module).__name__}")


def _read_residual_layers(rlfq: Any) -> tuple[dict, list[str]]:
    """The options of a torch ``ResidualLFQ`` in vqref's names, and what vqref lacks."""
    problems = []

    def need(condition: bool, text: str) -> None:
        if condition:
            problems.append(text)

    need(bool(rlfq.quantize_dropout), "quantize_dropout=True")
    configs = []
    for layer in rlfq.layers:
        config, layer_problems = _lfq_config(layer)
        configs.append(config)
        problems.extend(layer_problems)
    first = configs[0]
    need(first["channel_first"] is not None, f"channel_first={first['channel_first']} in the depths")
    need(first["keep_num_codebooks_dim"], "keep_num_codebooks_dim=True in the depths")
    clamp = first["soft_clamp_input_value"]
    for level, config in enumerate(configs):
        diff = sorted(k for k in _DEPTH_OPTIONS + ("channel_first", "keep_num_codebooks_dim") if config[k] != first[k])
        need(bool(diff), f"depth {level} configured differently from depth 0 ({', '.join(diff)})")
        need(config["codebook_scale"] != 2.0**-level, f"depth {level} has codebook_scale={config['codebook_scale']}")
        want = None if clamp is None else clamp * 0.5**level
        need(
            config["soft_clamp_input_value"] != want,
            f"depth {level} has soft_clamp_input_value={config['soft_clamp_input_value']}",
        )
    options = {k: first[k] for k in _DEPTH_OPTIONS}
    options.update(soft_clamp_input_value=clamp, codebook_dim=int(rlfq.layers[0].codebook_dim))
    return options, problems


# ---------------------------------------------------------------------------- vqref -> torch


def export_state_dict(module: Any, *, dtype: Any = "float32") -> dict:
    """The state of a vqref ``LFQ`` or ``ResidualLFQ`` keyed and shaped like vector-quantize-pytorch's
    ``state_dict()``: ``mask (d,)`` int64 (``layers.{l}.mask`` per depth), ``project_in.weight
    (C d, D)`` (``(D, C d)`` for the cosine-similarity projection), ``project_in.bias``,
    ``project_out.weight (D, C d)``, ``project_out.bias`` (when projected), ``orthogonal_rot
    (d, d)`` (``layers.{l}.orthogonal_rot``).

    Returns
    -------
    dict of str -> numpy.ndarray (host copies; float entries in ``dtype``)
    """
    from ..quantizers import LFQ, ResidualLFQ

    if not isinstance(module, (LFQ, ResidualLFQ)):
        raise TypeError(f"expected a vqref LFQ or ResidualLFQ, got {type(module).__name__}")
    dtype = np.dtype(dtype)
    cosine = isinstance(module, LFQ) and module.cosine_sim_project_in
    bits = np.left_shift(np.int64(1), np.arange(module.codebook_dim - 1, -1, -1, dtype=np.int64))  # (d,)
    out = (
        {"mask": bits}
        if isinstance(module, LFQ)
        else {f"layers.{q}.mask": bits.copy() for q in range(module.num_quantizers)}
    )
    out.update(state_in_torch_layout(module.state_dict(), dtype, as_stored=("project_in",) if cosine else ()))
    return out


def to_vqp(module: Any):
    """The vector-quantize-pytorch module equivalent to a vqref ``LFQ`` or ``ResidualLFQ``.

    Built with the same options (torch's global random state is left as it was; the random
    projections and rotations it draws are overwritten by the state of :func:`export_state_dict`
    in float32), in the same train/eval mode.
    """
    import torch

    from ..quantizers import LFQ, ResidualLFQ

    TorchLFQ, TorchRLFQ = _vqp_classes()
    if not isinstance(module, (LFQ, ResidualLFQ)):
        raise TypeError(f"expected a vqref LFQ or ResidualLFQ, got {type(module).__name__}")
    config = module.config()
    config.pop("dtype")
    with torch.random.fork_rng(devices=[]):
        out = TorchLFQ(**config) if isinstance(module, LFQ) else TorchRLFQ(**config)
    state = {k: torch.from_numpy(v) for k, v in export_state_dict(module).items()}
    out.load_state_dict(state)
    return out.train(module.training)
