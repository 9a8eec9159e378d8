"""Drop-in block-sparse layers and the in-place model swap."""
from .conv import SparseConv2d
from .linear import SparseLinear
from .sparsify import layer_densities, sparsify

__all__ = ["SparseConv2d", "SparseLinear", "layer_densities", "sparsify"]
