"""Optimizers that step compact block values in one fused pass per tensor."""
from .masked_sgd import MaskedSGD
from .sparseopt import SparseOpt

__all__ = ["MaskedSGD", "SparseOpt"]
