"""Conversion between vqref modules and vector-quantize-pytorch (``vector_quantize_pytorch``).

vector-quantize-pytorch is the library most VQ-VAE code uses; vqref is its manually
differentiated reference.  These functions move a model between the two without changing a
number, so the same input gives the same outputs, losses, gradients and EMA trajectory in both
(tests/conformance proves it, docs/deviations.md lists every deliberate difference):

    from_vector_quantize_pytorch(module)  torch module  -> vqref module (configuration + state)
    to_vector_quantize_pytorch(module)    vqref module  -> torch module (configuration + state)
    export_state_dict(module)             vqref module  -> numpy arrays keyed and shaped as the
                                                           torch module's ``state_dict()``

One submodule per family converts both ways (:mod:`vqref.interop.vq`: ``VectorQuantize`` and
``ResidualVQ``; the others as listed in :data:`CONVERTERS`); each documents what it carries over
and refuses, with a ``ValueError`` naming every offending option, any configuration whose
conversion would compute something else.

torch and vector_quantize_pytorch are imported inside the functions only: importing vqref
never imports torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "VQP_VERSION",
    "CONVERTERS",
    "from_vector_quantize_pytorch",
    "to_vector_quantize_pytorch",
    "export_state_dict",
]

#: The vector-quantize-pytorch release the conversion and the conformance suite are checked against.
VQP_VERSION = "1.32.0"

#: Class name (the same in both libraries) -> the submodule of vqref.interop that converts it.
#: Each submodule provides ``from_vqp(module, *, dtype, xp, device, seed)``, ``to_vqp(module)``
#: and ``export_state_dict(module, *, dtype)``.
CONVERTERS = {
    "VectorQuantize": "vq",
    "ResidualVQ": "vq",
    "GroupedResidualVQ": "grouped",
    "FSQ": "fsq",
    "ResidualFSQ": "fsq",
    "LFQ": "lfq",
    "ResidualLFQ": "lfq",
}


def _converter(name: str):
    return import_module(f"{__name__}.{CONVERTERS[name]}")


def from_vector_quantize_pytorch(
    module: Any,
    *,
    dtype: Any = "float32",
    xp: Any = None,
    device: Any = None,
    seed: Any = None,
):
    """The vqref module equivalent to a vector-quantize-pytorch module.

    Parameters
    ----------
    module : an instance of one of the vector-quantize-pytorch classes named in
        :data:`CONVERTERS`.  Its training mode is copied too.
    dtype : dtype of the vqref state (default "float32", the dtype torch keeps it in)
    xp : array library of the vqref state (numpy by default; cupy; array_api_strict)
    device : device for ``xp``
    seed : seed or numpy Generator of the vqref module (k-means sampling, dead-code restarts,
        random code subsets, sampling); torch's random stream cannot be carried over

    Returns
    -------
    The vqref module of the same name, with the same configuration and a copy of the state.

    Raises
    ------
    TypeError : ``module`` is not of a supported class
    ValueError : the module uses options vqref does not implement; the message names each one
    """
    for cls in type(module).__mro__:  # the most derived vector-quantize-pytorch class with a converter
        if cls.__module__.startswith("vector_quantize_pytorch") and cls.__name__ in CONVERTERS:
            return _converter(cls.__name__).from_vqp(module, dtype=dtype, xp=xp, device=device, seed=seed)
    raise TypeError(
        f"from_vector_quantize_pytorch takes a vector_quantize_pytorch module of one of the classes "
        f"{', '.join(CONVERTERS)} (VectorQuantize or ResidualVQ, ...), got "
        f"{type(module).__module__}.{type(module).__name__}"
    )


def _vqref_class_name(module: Any) -> str:
    """The most derived vqref class of ``module`` that has a converter."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("vqref.") and cls.__name__ in CONVERTERS:
            return cls.__name__
    raise TypeError(
        f"expected a vqref module of one of the classes {', '.join(CONVERTERS)} "
        f"(VectorQuantize or ResidualVQ, ...), got {type(module).__name__}"
    )


def to_vector_quantize_pytorch(module: Any):
    """The vector-quantize-pytorch module equivalent to a vqref module (same train/eval mode).

    The torch module is built with the same options and loads the state of
    :func:`export_state_dict` in float32; torch's global random state is left as it was.

    Raises
    ------
    TypeError : ``module`` is not of a class named in :data:`CONVERTERS`
    ValueError : vqref options with no vector-quantize-pytorch equivalent (e.g. ``codebook_weight``,
        ``gradient_routing="sum"``)
    """
    return _converter(_vqref_class_name(module)).to_vqp(module)


def export_state_dict(module: Any, *, dtype: Any = "float32") -> dict:
    """The state of a vqref module as numpy arrays keyed and shaped like vector-quantize-pytorch's
    ``state_dict()`` (load it with ``torch_module.load_state_dict({k: torch.from_numpy(v) ...})``).

    Parameters
    ----------
    module : a vqref module of a class named in :data:`CONVERTERS`
    dtype : float dtype of the arrays (default "float32", what torch keeps the buffers in)
    """
    return _converter(_vqref_class_name(module)).export_state_dict(module, dtype=dtype)
