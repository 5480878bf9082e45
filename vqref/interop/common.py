"""What the converters of :mod:`vqref.interop` share."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["raise_unsupported", "torch_to_host"]


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
