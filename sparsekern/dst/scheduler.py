"""The schedule and mask-update machinery shared by SET, RigL and BiDST.

Every ``update_interval`` steps until ``t_end`` each sparse layer drops its ``f(t) * k`` weakest active
blocks (Frobenius norm) and grows as many inactive ones (the method's choice), with
f(t) = drop_fraction / 2 * (1 + cos(pi * t / t_end)). The block count k of every layer never changes, so
the new mask is built with top-k on the device and ``BlockSparseLayout.update_`` rewrites the layout,
the values and the optimizer's per-block state in place, without a host synchronisation.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..layout import top_blocks_mask
from ..nn._sparse_weight import BlockSparseWeight
from ..optim import block_state


def drop_fraction_at(step: int, drop_fraction: float, t_end: int) -> float:
    """f(t): the cosine-decayed fraction of each layer's blocks replaced at ``step`` (0 from ``t_end`` on)."""
    if step >= t_end:
        return 0.0
    return drop_fraction / 2 * (1 + math.cos(math.pi * step / t_end))


def is_update_step(step: int, update_interval: int, t_end: int) -> bool:
    return step > 0 and step % update_interval == 0 and step < t_end


class DSTScheduler:
    """Base class: call :meth:`step` after every ``optimizer.step()``.

    Subclasses define :meth:`grow_scores` (higher = grown first) and may set ``needs_grad_scores`` to have
    each layer capture the block norms of its dense weight gradient during the update step's backward.
    """

    needs_grad_scores = False

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 update_interval: int = 100, drop_fraction: float = 0.3, t_end: Optional[int] = None,
                 total_steps: Optional[int] = None, seed: int = 0):
        if update_interval <= 0:
            raise ValueError(f"update_interval must be positive, got {update_interval}")
        if not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
        if t_end is None:
            if total_steps is None:
                raise ValueError("give t_end (last update step) or total_steps (t_end = 75% of it)")
            t_end = int(0.75 * total_steps)
        self.model, self.optimizer = model, optimizer
        self.update_interval, self.drop_fraction, self.t_end = update_interval, drop_fraction, t_end
        self.layers: Dict[str, BlockSparseWeight] = {
            name: m for name, m in model.named_modules() if isinstance(m, BlockSparseWeight)}
        if not self.layers:
            raise ValueError("the model has no sparse layers: call sparsekern.sparsify(model, ...) first")
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.update_seconds = 0.0
        self._started: Optional[float] = None
        self._arm_capture()

    # -- schedule -------------------------------------------------------------------------------
    def drop_fraction_at(self, step: int) -> float:
        """Cosine-decayed fraction of each layer's blocks replaced at ``step``."""
        return drop_fraction_at(step, self.drop_fraction, self.t_end)

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, self.update_interval, self.t_end)

    def _arm_capture(self) -> None:
        # The layers record gradient scores only during the forward/backward of an update step.
        capture = self.needs_grad_scores and self.is_update_step(self.step_count + 1)
        for layer in self.layers.values():
            layer.capture_grad_scores = capture

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()
        self.step_count += 1
        self.observe()
        if self.is_update_step(self.step_count):
            start = time.perf_counter()
            self.update(self.drop_fraction_at(self.step_count))
            self.update_seconds += time.perf_counter() - start
        self._arm_capture()

    def observe(self) -> None:
        """Per-step bookkeeping between updates (BiDST accumulates its score gradients here)."""

    @torch.no_grad()
    def update(self, fraction: float) -> None:
        for name, layer in self.layers.items():
            k = layer.layout.nnz_blocks
            n_swap = min(round(fraction * k), layer.layout.block_grid[0] * layer.layout.block_grid[1] - k)
            if n_swap > 0:
                self.apply_mask(layer, self.new_mask(name, layer, n_swap))
            layer.grad_scores = None

    def new_mask(self, name: str, layer: BlockSparseWeight, n_swap: int) -> Tensor:
        """Keep the ``k - n_swap`` largest-norm active blocks, grow the ``n_swap`` best-scoring others."""
        layout = layer.layout
        k = layout.nnz_blocks
        norms = layer.values.detach().float().pow(2).sum(dim=(1, 2))
        keep = norms.topk(k - n_swap).indices
        kept = torch.zeros(layout.block_grid, dtype=torch.bool, device=layout.device)
        kept[layout.coo_row[keep].long(), layout.col_idx[keep].long()] = True
        scores = self.grow_scores(name, layer).float().masked_fill(kept, float("-inf"))
        return kept | top_blocks_mask(scores, n_swap)

    def grow_scores(self, name: str, layer: BlockSparseWeight) -> Tensor:
        raise NotImplementedError

    def apply_mask(self, layer: BlockSparseWeight, mask: Tensor) -> None:
        """Rewrite the layer's layout for ``mask`` (same count), moving values and optimizer state along."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(mask, src=0)  # every rank takes rank 0's decision
        state = block_state(self.optimizer, layer.values) if self.optimizer is not None else []
        layer.layout.update_(mask, check=False, block_tensors=[layer.values.data, *state])

    # -- reporting and resume ---------------------------------------------------------------------
    def overhead(self) -> float:
        """Share of the wall time since the first step spent in mask updates."""
        if self._started is None:
            return 0.0
        return self.update_seconds / max(time.perf_counter() - self._started, 1e-12)

    def densities(self) -> Dict[str, float]:
        return {name: layer.density for name, layer in self.layers.items()}

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "generator": self.generator.get_state(),
                "update_seconds": self.update_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self.generator.set_state(state["generator"])
        self.update_seconds = state["update_seconds"]
        self._arm_capture()
