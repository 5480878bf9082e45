"""Conversion of ``GroupedResidualVQ`` to and from vector-quantize-pytorch.

Symbols: D = dim, G = groups, D_g = D / G, Q = num_quantizers.

vector-quantize-pytorch's ``GroupedResidualVQ`` holds G ``ResidualVQ`` modules (``rvqs``), one per
slice of D_g features, all built with the same options.  Each group converts as a ``ResidualVQ``
(:mod:`vqref.interop.vq` says what carries over and what is refused); groups configured
differently from each other are refused, since vqref's groups share one set of options.  The
state of group g is vqref's entries ``"{g}.<ResidualVQ entry>"`` and torch's ``rvqs.{g}.<...>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from .common import raise_unsupported
from .vq import check_exportable, layer_state_arrays, read_residual, residual_state, vqp_options

__all__ = ["from_vqp", "to_vqp", "export_state_dict"]


def _vqp_class():
    import vector_quantize_pytorch as vqp

    return vqp.GroupedResidualVQ


def from_vqp(module: Any, *, dtype: Any, xp: Any, device: Any, seed: Any):
    """The vqref ``GroupedResidualVQ`` equivalent to a vector-quantize-pytorch one.

    Parameters are those of :func:`vqref.interop.from_vector_quantize_pytorch`.

    Returns
    -------
    :class:`vqref.GroupedResidualVQ` with the same configuration, the groups' state copied
    (``"{g}.{l}.codebook" (K, d)``, ..., ``"{g}.project_in.W" (D_g, d)``, ...), in the same mode.
    """
    from ..quantizers import GroupedResidualVQ

    if not isinstance(module, _vqp_class()):
        raise TypeError(f"expected a vector_quantize_pytorch GroupedResidualVQ, got {type(module).__name__}")
    problems = ["accept_image_fmap=True"] if module.accept_image_fmap else []
    configs = []
    for g, rvq in enumerate(module.rvqs):
        config, group_problems = read_residual(rvq)
        problems.extend(group_problems)
        configs.append(config)
        diff = sorted(k for k in config if k != "kmeans_init" and config[k] != configs[0][k])
        if not group_problems and diff:
            problems.append(f"group {g} configured differently from group 0 ({', '.join(diff)})")
    raise_unsupported("GroupedResidualVQ", problems)
    options = {k: v for k, v in configs[0].items() if k != "dim"}
    options["kmeans_init"] = any(c["kmeans_init"] for c in configs)
    out = GroupedResidualVQ(dim=int(module.dim), groups=int(module.groups), seed=seed, dtype=dtype, xp=xp,
                            device=device, **options)  # fmt: skip
    state = {}
    for g, rvq in enumerate(module.rvqs):
        state.update({f"{g}.{k}": v for k, v in residual_state(rvq).items()})
    out.load_state_dict(state)
    return out.train(module.training)


def export_state_dict(module: Any, *, dtype: Any = "float32") -> dict:
    """A vqref ``GroupedResidualVQ``'s state as numpy arrays keyed and shaped like torch's:
    every group's ``ResidualVQ`` entries under ``rvqs.{g}.`` (``project_in.weight (d, D_g)`` the
    transpose of vqref's ``W``; ``layers.{l}._codebook.embed (1, K, d)``, ...)."""
    check_exportable(module.group_template)
    dtype = np.dtype(dtype)
    out = {}
    for g, layers in enumerate(module.layers):
        if f"{g}.project_in.W" in module.state_spec():
            for name in ("project_in", "project_out"):
                W, b = (B.to_numpy(module.state_array(f"{g}.{name}.{k}")).astype(dtype) for k in ("W", "b"))
                out[f"rvqs.{g}.{name}.weight"], out[f"rvqs.{g}.{name}.bias"] = np.ascontiguousarray(W.T), b.copy()
        for level, layer in enumerate(layers):
            out.update({f"rvqs.{g}.layers.{level}.{k}": v for k, v in layer_state_arrays(layer, dtype).items()})
    return out


def to_vqp(module: Any):
    """The vector-quantize-pytorch ``GroupedResidualVQ`` equivalent to a vqref one (same mode);
    torch's global random state is left as it was."""
    import torch

    check_exportable(module.group_template)
    options = vqp_options(module.group_template)
    options.update(dim=module.dim, groups=module.groups)
    with torch.random.fork_rng(devices=[]):
        out = _vqp_class()(**options)
    out.load_state_dict({k: torch.from_numpy(v) for k, v in export_state_dict(module).items()})
    return out.train(module.training)
