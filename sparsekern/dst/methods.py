"""SET and RigL: how they choose the blocks to grow."""
from __future__ import annotations

import torch
from torch import Tensor

from .scheduler import DSTScheduler


class SET(DSTScheduler):
    """Sparse Evolutionary Training (Mocanu et al. 2018): grow uniformly at random among inactive blocks."""

    def grow_scores(self, name, layer) -> Tensor:
        # Drawn on the CPU generator (whose state the checkpoint keeps); a pinned, non-blocking copy
        # keeps the update free of host synchronisation on a GPU.
        scores = torch.rand(layer.layout.block_grid, generator=self.generator)
        if layer.layout.device.type == "cuda":
            scores = scores.pin_memory()
        return scores.to(layer.layout.device, non_blocking=True)


class RigL(DSTScheduler):
    """Rigging the Lottery (Evci et al. 2020): grow the inactive blocks whose dense weight gradient has the
    largest block norm, measured on the update step's batch (``block_grad_scores``)."""

    needs_grad_scores = True

    def grow_scores(self, name, layer) -> Tensor:
        if layer.grad_scores is None:
            raise RuntimeError(f"layer {name!r} recorded no gradient scores on this update step: call "
                               "dst.step() after every optimizer.step(), with a forward and backward in between")
        return layer.grad_scores
