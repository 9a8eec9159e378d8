"""sparsekern: block-sparse kernels and layers for dynamic sparse training."""
from . import _native  # loads the compiled kernels (one warning if they are missing)
from . import dst, ops, optim
from .layout import BlockSparseLayout
from .nn import SparseConv2d, SparseLinear, sparsify

__version__ = "0.1.0"
__all__ = ["BlockSparseLayout", "SparseConv2d", "SparseLinear", "dst", "ops", "optim", "sparsify"]
