"""SparseLinear: nn.Linear with a block-sparse weight stored as compact blocks."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._sparse_weight import BlockSparseWeight, blocks_kept


class SparseLinear(BlockSparseWeight):
    """y = x Wᵀ + b with W [out_features, in_features] block-sparse (a random layout at ``sparsity``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, sparsity: float = 0.9,
                 block_size: int = 32, device=None, dtype=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
                                if bias else None)
        self._init_sparse_weight((out_features, in_features), sparsity, block_size, in_features, device, dtype)

    @property
    def dense_weight_shape(self) -> tuple:
        return (self.out_features, self.in_features)

    def _weight_to_matrix(self, weight: Tensor) -> Tensor:
        return weight

    def _matrix_to_weight(self, matrix: Tensor) -> Tensor:
        return matrix

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # no reshapes: each costs a microsecond; bsr_linear checks the features
            return self._gemm(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        y = self._gemm(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: float = 0.9, block_size: int = 32) -> "SparseLinear":
        """Keep the largest-norm blocks of ``linear.weight`` (magnitude pruning at block granularity)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, sparsity, block_size,
                    device=weight.device, dtype=weight.dtype)
        layer._adopt_matrix(weight, blocks_kept(weight.shape, sparsity, block_size))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with the same function (zeros outside the stored blocks)."""
        weight = self.dense_weight().detach()
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, density={self.density:.3f}")
