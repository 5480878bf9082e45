"""What the converters of :mod:`vqref.interop` share."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B

__all__ = ["raise_unsupported", "torch_to_host", "state_in_torch_layout"]


def raise_unsupported(kind: str, problems: list[str]) -> None:
    """Raise one ValueError naming every unsupported option of a ``kind`` module (none: return)."""
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ValueError(
            f"cannot convert this {kind}: vqref does not support "
            + "; ".join(unique)
            + " (see docs/deviations.md for what vqref implements)"
        )


def torch_to_host(t: Any) -> np.ndarray:
    """A numpy copy of a torch tensor (``.numpy()`` shares memory, and torch updates buffers in place)."""
    return t.detach().cpu().numpy().copy()


def state_in_torch_layout(state: dict, dtype: Any, *, as_stored: tuple = ()) -> dict:
    """A vqref state dict as host arrays in torch's names and layouts.

    vqref stores an affine map ``X`` as ``X.W (Din, Dout)`` and ``X.b`` (:mod:`vqref.ops.linear`);
    torch's ``nn.Linear`` as ``X.weight (Dout, Din)`` and ``X.bias``.  Other entries keep their
    name.  ``as_stored`` names the maps whose weight torch keeps in vqref's orientation (a
    parameter that is not an ``nn.Linear``).
    """
    out = {}
    for name, value in state.items():
        host = np.asarray(B.to_numpy(value)).astype(dtype)
        if name.endswith(".W"):
            keep = name[:-2] in as_stored
            out[name[:-2] + ".weight"] = host if keep else np.ascontiguousarray(host.T)  # torch: (Dout, Din)
        elif name.endswith(".b"):
            out[name[:-2] + ".bias"] = host
        else:
            out[name] = host
    return out
