"""vqref: a NumPy-first reference implementation of vector quantization with manual gradients."""
__version__ = "0.1.0"

from .cluster import ResidualClustering, VQClustering
from .modules import ResidualVQ, VectorQuantize

__all__ = ["VectorQuantize", "ResidualVQ", "VQClustering", "ResidualClustering", "__version__"]
