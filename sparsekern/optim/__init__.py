"""Optimizers that step compact block values in one fused pass per tensor."""
from .masked_sgd import MaskedSGD, block_state
from .sparseopt import SparseOpt

__all__ = ["MaskedSGD", "SparseOpt", "block_state"]
