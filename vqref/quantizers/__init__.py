"""The stateful quantizer modules, one file each, on one base (:mod:`vqref.quantizers.base`)."""

from ..params import ParamView
from .base import Quantizer, QuantizerState
from .fsq import FSQ
from .grouped_residual_vq import GroupedResidualVQ
from .lfq import LFQ
from .residual_fsq import ResidualFSQ
from .residual_lfq import ResidualLFQ
from .residual_vq import ResidualVQ
from .vector_quantize import VectorQuantize
from .views import CodebookView

__all__ = [
    "Quantizer",
    "QuantizerState",
    "ParamView",
    "CodebookView",
    "VectorQuantize",
    "ResidualVQ",
    "FSQ",
    "ResidualFSQ",
    "LFQ",
    "ResidualLFQ",
    "GroupedResidualVQ",
]
