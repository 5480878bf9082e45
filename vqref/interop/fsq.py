"""Conversion of ``FSQ`` and ``ResidualFSQ`` to and from vector-quantize-pytorch.

Symbols: d = len(levels), C = num_codebooks, dim the input width, Q = num_quantizers.

What is converted.  The configuration (levels, dim, num_codebooks, keep_num_codebooks_dim,
channel_first, projection_has_bias, return_indices, preserve_symmetry, noise_dropout,
bound_hard_clamp, orthogonal_rotation; for ``ResidualFSQ`` num_quantizers, is_channel_first,
quantize dropout and its cutoff and multiple, soft_clamp_input_value) and the state: the
projections ``project_in``/``project_out`` when ``dim`` differs from the quantized width
(torch's ``nn.Linear`` keeps ``weight (Dout, Din)``; vqref keeps ``W = weight^T (Din, Dout)``
and ``b = bias``) and FSQ's ``orthogonal_rot (d, d)`` buffer.

What has no effect and is not carried.  ``scale`` (stored by vector-quantize-pytorch 1.32.0 and
never read) and ``force_quantization_f32`` with the default ``allowed_dtypes`` (float32 and
float64 inputs are quantized in their own dtype either way).

Refused with a ``ValueError`` naming each option: ``allowed_dtypes`` without float32 or float64
while ``force_quantization_f32`` is on (vector-quantize-pytorch would then quantize float64 input
in float32), and on ``ResidualFSQ`` layers: ``orthogonal_rotation``, ``keep_num_codebooks_dim``,
``channel_first``, ``return_indices=False`` and depths configured differently.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import raise_unsupported, state_in_torch_layout, torch_to_host

__all__ = ["from_vqp", "to_vqp", "export_state_dict"]

_PROJECTIONS = ("project_in", "project_out")


def _vqp_classes():
    import vector_quantize_pytorch as vqp

    return vqp.FSQ, vqp.ResidualFSQ


def _dtype_problems(layer: Any) -> list[str]:
    import torch

    allowed = tuple(layer.allowed_dtypes)
    if layer.force_quantization_f32 and not (torch.float32 in allowed and torch.float64 in allowed):
        return [f"allowed_dtypes={allowed} with force_quantization_f32=True (float64 input quantized in float32)"]
    return []


def _read_projections(module: Any) -> dict:
    """vqref's projection entries of a torch module (host arrays, W input-major)."""
    state = {}
    if not module.has_projections:
        return state
    for name in _PROJECTIONS:
        linear = getattr(module, name)
        state[name + ".W"] = torch_to_host(linear.weight).T.copy()  # (Din, Dout)
        if linear.bias is not None:
            state[name + ".b"] = torch_to_host(linear.bias)
    return state


def _fsq_config(fsq: Any) -> dict:
    levels = dict(fsq.named_buffers())["_levels"]  # FSQ keeps its levels in a buffer only
    return {
        "levels": [int(v) for v in levels.tolist()],
        "dim": int(fsq.dim),
        "num_codebooks": int(fsq.num_codebooks),
        "keep_num_codebooks_dim": bool(fsq.keep_num_codebooks_dim),
        "channel_first": bool(fsq.channel_first),
        "projection_has_bias": not fsq.has_projections or fsq.project_in.bias is not None,
        "return_indices": bool(fsq.return_indices),
        "preserve_symmetry": bool(fsq.preserve_symmetry),
        "noise_dropout": float(fsq.noise_dropout),
        "bound_hard_clamp": bool(fsq.bound_hard_clamp),
        "orthogonal_rotation": bool(fsq.orthogonal_rotation),
    }


def from_vqp(module: Any, *, dtype: Any, xp: Any, device: Any, seed: Any):
    """The vqref module equivalent to a vector-quantize-pytorch ``FSQ`` or ``ResidualFSQ``.

    Parameters
    ----------
    module : ``vector_quantize_pytorch.FSQ`` or ``vector_quantize_pytorch.ResidualFSQ``; its
        training mode is copied too
    dtype, xp, device : the vqref module's state dtype, array library and device
    seed : seed or numpy Generator of the vqref module (noise dropout, quantize dropout);
        torch's random stream cannot be carried over

    Raises
    ------
    TypeError : ``module`` is neither class
    ValueError : the module uses options vqref does not implement; the message names each one
    """
    from ..quantizers import FSQ, ResidualFSQ

    TorchFSQ, TorchRFSQ = _vqp_classes()
    backend = dict(dtype=dtype, xp=xp, device=device, seed=seed)
    if isinstance(module, TorchFSQ):
        raise_unsupported("FSQ", _dtype_problems(module))
        out = FSQ(**_fsq_config(module), **backend)
        state = _read_projections(module)
        if module.orthogonal_rotation:
            state["orthogonal_rot"] = torch_to_host(module.orthogonal_rot)
        out.load_state_dict(state)
        return out.train(module.training)
    if isinstance(module, TorchRFSQ):
        layer_config, problems = _read_residual_layers(module)
        raise_unsupported("ResidualFSQ", problems)
        soft = module.soft_clamp_input_value
        hard = layer_config["bound_hard_clamp"]
        if soft is not None and not hard:
            host = torch_to_host(soft) if hasattr(soft, "detach") else np.asarray(soft, dtype=np.float64)
            soft = [float(v) for v in np.broadcast_to(host, (len(module.levels),))]
        out = ResidualFSQ(
            levels=[int(v) for v in module.levels],
            num_quantizers=int(module.num_quantizers),
            dim=int(module.project_in.in_features) if module.has_projections else None,
            is_channel_first=bool(module.is_channel_first),
            quantize_dropout=bool(module.quantize_dropout),
            quantize_dropout_cutoff_index=int(module.quantize_dropout_cutoff_index),
            quantize_dropout_multiple_of=int(module.quantize_dropout_multiple_of),
            soft_clamp_input_value=None if hard else soft,
            bound_hard_clamp=hard,
            noise_dropout=layer_config["noise_dropout"],
            **backend,
        )
        out.load_state_dict(_read_projections(module))
        return out.train(module.training)
    raise TypeError(f"expected a vector_quantize_pytorch FSQ or ResidualFSQ, got {type(module).__name__}")


def _read_residual_layers(rfsq: Any) -> tuple[dict, list[str]]:
    """The options every depth of a torch ``ResidualFSQ`` shares, and what vqref lacks."""
    problems = []

    def need(condition: bool, text: str) -> None:
        if condition:
            problems.append(text)

    configs = [_fsq_config(layer) for layer in rfsq.layers]
    first = configs[0]
    need(first["orthogonal_rotation"], "orthogonal_rotation=True in the depths")
    need(first["keep_num_codebooks_dim"], "keep_num_codebooks_dim=True in the depths")
    need(first["channel_first"], "channel_first=True in the depths (use is_channel_first)")
    need(not first["return_indices"], "return_indices=False in the depths")
    for layer in rfsq.layers:
        problems.extend(_dtype_problems(layer))
    for level, config in enumerate(configs[1:], start=1):
        diff = sorted(k for k in config if config[k] != first[k])
        need(bool(diff), f"depth {level} configured differently from depth 0 ({', '.join(diff)})")
    return first, problems


# ---------------------------------------------------------------------------- vqref -> torch


def export_state_dict(module: Any, *, dtype: Any = "float32") -> dict:
    """The state of a vqref ``FSQ`` or ``ResidualFSQ`` keyed and shaped like vector-quantize-pytorch's
    ``state_dict()``: ``project_in.weight (C d, dim)``, ``project_in.bias``, ``project_out.weight
    (dim, C d)``, ``project_out.bias`` (when projected) and ``orthogonal_rot (d, d)`` (FSQ with
    ``orthogonal_rotation``).  An FSQ without either has an empty state.

    Returns
    -------
    dict of str -> numpy.ndarray (host copies in ``dtype``)
    """
    from ..quantizers import FSQ, ResidualFSQ

    if not isinstance(module, (FSQ, ResidualFSQ)):
        raise TypeError(f"expected a vqref FSQ or ResidualFSQ, got {type(module).__name__}")
    return state_in_torch_layout(module.state_dict(), np.dtype(dtype))


def to_vqp(module: Any):
    """The vector-quantize-pytorch module equivalent to a vqref ``FSQ`` or ``ResidualFSQ``.

    Built with the same options (torch's global random state is left as it was; the random
    projections and rotation it draws are overwritten by the state of :func:`export_state_dict`
    in float32), in the same train/eval mode.
    """
    import torch

    from ..quantizers import FSQ, ResidualFSQ

    TorchFSQ, TorchRFSQ = _vqp_classes()
    if not isinstance(module, (FSQ, ResidualFSQ)):
        raise TypeError(f"expected a vqref FSQ or ResidualFSQ, got {type(module).__name__}")
    config = module.config()
    config.pop("dtype")
    with torch.random.fork_rng(devices=[]):
        if isinstance(module, FSQ):
            out = TorchFSQ(**config)
        else:
            noise = config.pop("noise_dropout")
            out = TorchRFSQ(**config, **({"noise_dropout": noise} if noise else {}))
    state = {k: torch.from_numpy(v) for k, v in export_state_dict(module).items()}
    out.load_state_dict(state)
    return out.train(module.training)
