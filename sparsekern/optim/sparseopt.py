"""SparseOpt: momentum SGD that removes the gradient skew BatchNorm puts on sparse neurons.

After a sparse layer, BatchNorm divides neuron i's pre-activation by a standard deviation that scales
with sqrt(d_i) (d_i = 1 - s_i, the density of its incoming weights), so the surviving weights of sparse
neurons get gradients amplified by ~1/sqrt(d_i). SparseOpt multiplies the gradient of neuron i's incoming
weights by sqrt(d_i) / sqrt(d_avg) before it enters the momentum buffer (d_avg: the layer's mean neuron
density), so every neuron of a layer learns at the layer's average rate. See docs/sparseopt.md.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .masked_sgd import MaskedSGD


def _row_factors(layout) -> Tensor:
    """[R] factor sqrt(d_r / d_avg) of each block-row (all its neurons have the same density d_r)."""
    bs, n_rows = layout.block_size, layout.shape[0]
    row_density = layout.row_densities()
    neurons_in_row = (n_rows - torch.arange(row_density.numel(), device=row_density.device) * bs).clamp(max=bs)
    mean_density = (row_density * neurons_in_row).sum() / n_rows
    return (row_density / mean_density.clamp(min=1e-12)).sqrt()


def neuron_factors(layout) -> Tensor:
    """[N] per-neuron (output row) factors sqrt(d_i / d_avg) of a layout, computed on its device."""
    rows = _row_factors(layout)
    return rows.repeat_interleave(layout.block_size, output_size=rows.numel() * layout.block_size)[: layout.shape[0]]


def block_factors(layout) -> Tensor:
    """[nnz] the factor of each stored block."""
    return _row_factors(layout)[layout.coo_row.long()]


class SparseOpt(MaskedSGD):
    """MaskedSGD whose sparse-layer gradients are rescaled per neuron (dense parameters: plain SGD).

    Sparse-layer values are recognised by the ``block_layout`` link that SparseLinear/SparseConv2d put
    on them. The factors are recomputed on the device whenever that layout changes.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, decoupled_weight_decay: bool = False):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, decoupled_weight_decay)
        self._factor_cache: Dict[int, Tuple[int, Tensor]] = {}

    def _grad_scale(self, param: Tensor) -> Optional[Tensor]:
        layout = getattr(param, "block_layout", None)
        if layout is None:
            return None
        cached = self._factor_cache.get(id(param))
        if cached is None or cached[0] != layout.version or cached[1].device != param.device:
            cached = (layout.version, block_factors(layout))
            self._factor_cache[id(param)] = cached
        return cached[1]

    def neuron_factors(self, param: Tensor) -> Tensor:
        """Inspect the per-neuron factors applied to ``param`` (all ones for a dense parameter)."""
        layout = getattr(param, "block_layout", None)
        if layout is None:
            return torch.ones(param.shape[0], device=param.device)
        return neuron_factors(layout)
