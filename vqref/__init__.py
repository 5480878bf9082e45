"""vqref: a NumPy-first reference implementation of vector quantization with manual gradients.

The public names: the quantizer modules (:class:`VectorQuantize`, :class:`ResidualVQ`), the
clustering estimators (:class:`VQClustering`, :class:`ResidualClustering`) and the standalone
k-means (:func:`kmeans`).  Subpackages: :mod:`vqref.ops` and :mod:`vqref.core` (the math),
:mod:`vqref.nn` (the small training kit), :mod:`vqref.testing` (gradient checkers),
:mod:`vqref.interop` (vector-quantize-pytorch conversion).
"""

__version__ = "0.1.0"

from .cluster import ResidualClustering, VQClustering
from .core.kmeans import KMeansResult, kmeans
from .quantizers import FSQ, LFQ, GroupedResidualVQ, ResidualFSQ, ResidualLFQ, ResidualVQ, VectorQuantize

__all__ = [
    "VectorQuantize",
    "ResidualVQ",
    "GroupedResidualVQ",
    "FSQ",
    "ResidualFSQ",
    "LFQ",
    "ResidualLFQ",
    "VQClustering",
    "ResidualClustering",
    "kmeans",
    "KMeansResult",
    "__version__",
]
