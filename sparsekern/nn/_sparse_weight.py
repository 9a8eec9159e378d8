"""What SparseLinear and SparseConv2d share: a block-sparse [N, K] weight matrix in compact form.

The only weight storage is ``values`` [nnz_blocks, bs, bs] plus the ``layout`` submodule; a layer
maps its usual dense weight to and from that matrix (Linear: identity; Conv2d: K ordered (kh, kw, cin)).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .. import ops, reference
from ..layout import BlockSparseLayout, blocks_for_density, top_blocks_mask


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


class BlockSparseWeight(nn.Module):
    """Base class: owns ``layout`` and ``values``; subclasses define the dense weight <-> matrix map."""

    layout: BlockSparseLayout
    values: nn.Parameter
    # DST (RigL/BiDST) sets capture_grad_scores for the forward/backward of an update step; the backward
    # then leaves the block norms of the dense weight gradient in grad_scores ([R, C]).
    capture_grad_scores: bool = False
    grad_scores = None

    def _gemm(self, x2d: Tensor) -> Tensor:
        """bsr_linear of the layer on a 2-D input, recording gradient scores when DST asks for them."""
        y = ops.bsr_linear(x2d, *self._weights())
        if self.capture_grad_scores and y.requires_grad:
            x_saved = x2d.detach()
            # Under autocast the gradient comes in the autocast dtype while x2d is the layer's input.
            y.register_hook(lambda grad: self._record_grad_scores(ops.block_grad_scores(grad, x_saved.to(grad.dtype),
                                                                                       self.block_size)))
        return y

    def _weights(self):
        """(layout, values, bias) from the module's own dicts, not nn.Module.__getattr__: three lookups through it
        cost more than an op's checks. (A parametrized values or bias is a property instead, found by getattr.)"""
        params = self._parameters
        values = params["values"] if "values" in params else self.values
        bias = params["bias"] if "bias" in params else self.bias
        return self._modules["layout"], values, bias

    def _record_grad_scores(self, scores: Tensor) -> None:
        self.grad_scores = scores

    def _init_sparse_weight(self, matrix_shape, sparsity: float, block_size: int, fan_in: int, device, dtype):
        check_sparsity(sparsity)
        self.layout = BlockSparseLayout.random(matrix_shape, block_size, 1.0 - sparsity, device=device)
        bs = block_size
        self._set_values(nn.Parameter(torch.empty(self.layout.nnz_blocks, bs, bs, device=device, dtype=dtype)))
        # Same distribution as nn.Linear / nn.Conv2d (kaiming_uniform with a=sqrt(5) => U(-1/sqrt(fan_in), ..)).
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            self.values.uniform_(-bound, bound).mul_(self.layout.padding_mask(self.values.dtype))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    # -- subclass hooks ---------------------------------------------------------------------------
    dense_weight_shape: tuple  # shape of the matching torch layer's ``weight``

    def _weight_to_matrix(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _matrix_to_weight(self, matrix: Tensor) -> Tensor:
        raise NotImplementedError

    # -- dense views ------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def density(self) -> float:
        """Fraction of the weight's blocks that are stored."""
        return self.layout.density

    def weight_matrix(self) -> Tensor:
        """The dense [N, K] matrix the values stand for (differentiable in ``values``)."""
        n_rows, n_cols = self.layout.block_grid
        dense = reference.blocks_to_dense(self.values, self.layout.coo_row, self.layout.col_idx, n_rows, n_cols)
        return dense[: self.layout.shape[0], : self.layout.shape[1]]

    def dense_weight(self) -> Tensor:
        """The equivalent dense ``weight`` of the matching torch layer (differentiable)."""
        return self._matrix_to_weight(self.weight_matrix())

    def _adopt_matrix(self, matrix: Tensor, n_blocks: int) -> None:
        """Replace layout and values by the ``n_blocks`` largest-norm blocks of ``matrix`` (construction only)."""
        self.layout, values = compact_from_matrix(matrix, n_blocks, self.layout.block_size)
        self._set_values(nn.Parameter(values.to(self.values.dtype)))

    def _set_values(self, values: nn.Parameter) -> None:
        # The values carry a link to their layout, so that optimizers given only parameters
        # (sparsekern.optim) can find each block's row.
        values.block_layout = self.layout
        self.values = values

    def __deepcopy__(self, memo):
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        clone.values.block_layout = clone.layout
        return clone

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A dense checkpoint (key ``weight``) loads by keeping its largest-norm blocks, up to this
        # layer's fixed capacity: a sparse -> dense -> sparse round trip restores the same blocks.
        dense_key = prefix + "weight"
        if dense_key in state_dict:
            weight = state_dict.pop(dense_key)
            expected = tuple(self.dense_weight_shape)
            if tuple(weight.shape) != expected:
                error_msgs.append(f"{dense_key}: dense weight of shape {tuple(weight.shape)} cannot load into "
                                  f"{type(self).__name__} whose weight has shape {expected}")
            else:
                matrix = self._weight_to_matrix(weight.to(self.values.device))
                layout, values = compact_from_matrix(matrix, self.layout.nnz_blocks, self.layout.block_size)
                for name, tensor in layout.state_dict().items():
                    state_dict[prefix + "layout." + name] = tensor
                state_dict[prefix + "values"] = values
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def compact_from_matrix(matrix: Tensor, n_blocks: int, block_size: int):
    """(layout, values) of the ``n_blocks`` largest-norm blocks of a dense [N, K] matrix."""
    with torch.no_grad():
        scores = reference.block_norms(matrix.float(), block_size)
        layout = BlockSparseLayout.from_block_mask(top_blocks_mask(scores, n_blocks), block_size, matrix.shape)
        values = reference.dense_to_blocks(matrix, layout.coo_row, layout.col_idx, block_size)
    return layout, values.contiguous()


def blocks_kept(matrix_shape, sparsity: float, block_size: int) -> int:
    n_blocks = math.ceil(matrix_shape[0] / block_size) * math.ceil(matrix_shape[1] / block_size)
    return blocks_for_density(1.0 - sparsity, n_blocks)
