"""BiDST: the mask as the upper-level variable of a bi-level problem (Ji et al., ICML 2024).

Each sparse layer has real-valued block scores psi [R, C]; the active set follows top-k(psi) with k fixed.
The lower level trains the active blocks' weights (the optimizer); the upper level moves psi against
the loss gradient with respect to the mask, approximated per block (see docs/bidst.md):

- active block b: the straight-through gradient <dW_b, W_b>, corrected by BiP's first-order implicit
  term, g_b <- g_b - eta2 * <W_b, dW_b ⊙ dW_b> (the per-block sum of g_psi ⊙ g_theta), averaged over the
  steps since the last update;
- inactive block b (its weights are zero, so <dW_b, W_b> = 0): the block norm of the dense weight
  gradient on the update step (``block_grad_scores``), *centred* over the layer's inactive blocks: a block
  whose gradient is above the inactive mean is pulled up, one below it is pushed down, and the inactive
  population as a whole does not drift.

Each part is normalised by its RMS over its own blocks, so that psi moves by about ``mask_lr`` per update
whatever the gradient scale, scaled by the cosine schedule (f(t) / drop_fraction), so that the topology
settles. Every ``update_interval`` steps psi takes that step and the mask is re-binarised to top-k(psi),
changing at most round(f(t) * k) blocks (SET's and RigL's budget): the strongest inactive blocks replace
the weakest active ones while their psi is larger.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from .scheduler import DSTScheduler


def _rms_normalised(t: Tensor) -> Tensor:
    return t / t.pow(2).mean().sqrt().clamp(min=1e-30) if t.numel() else t


def _centred_pull(scores: Tensor, inactive: Tensor, n_inactive: int) -> Tensor:
    """[R, C]: the inactive blocks' scores minus their mean, divided by the RMS of that over the inactive
    blocks; zero on active blocks. Means over a count known on the host: no synchronisation."""
    if n_inactive == 0:
        return torch.zeros_like(scores)
    weight = inactive.to(scores.dtype)
    centred = (scores - (scores * weight).sum() / n_inactive) * weight
    return centred / (centred.pow(2).sum() / n_inactive).sqrt().clamp(min=1e-30)


def _capped_top_k(psi: Tensor, active: Tensor, n_max: int) -> Tensor:
    """top-k(psi) with k = the active count, changing at most ``n_max`` blocks: the i-th strongest inactive
    block replaces the i-th weakest active one while its psi is larger (ties keep the active block). When
    top-k(psi) differs from ``active`` in at most ``n_max`` blocks, this is top-k(psi) exactly."""
    flat, current = psi.flatten(), active.flatten()
    drop_psi, drop_idx = flat.masked_fill(~current, float("inf")).topk(n_max, largest=False)
    grow_psi, grow_idx = flat.masked_fill(current, float("-inf")).topk(n_max)
    swap = grow_psi > drop_psi
    mask = current.clone()
    mask.scatter_(0, drop_idx, ~swap)
    mask.scatter_(0, grow_idx, swap)
    return mask.view_as(active)


class BiDST(DSTScheduler):
    needs_grad_scores = True

    def __init__(self, model, optimizer=None, update_interval: int = 100, drop_fraction: float = 0.3, t_end=None,
                 total_steps=None, seed: int = 0, mask_lr: float = 0.1, implicit_eta: float = 1e-4):
        super().__init__(model, optimizer, update_interval, drop_fraction, t_end, total_steps, seed)
        self.mask_lr, self.implicit_eta = mask_lr, implicit_eta
        self.psi: Dict[str, Tensor] = {}
        self.active_grad: Dict[str, Tensor] = {}
        self.observed_steps = 0
        for name, layer in self.layers.items():
            layout = layer.layout
            # Active blocks start one update's step (mask_lr) above inactive ones: a swap must be earned.
            self.psi[name] = layout.to_block_mask().float() * mask_lr
            self.active_grad[name] = torch.zeros(layout.nnz_blocks, device=layout.device)

    @torch.no_grad()
    def observe(self) -> None:
        """Accumulate the active blocks' mask gradient from this step's weight gradients (one fused pass)."""
        for name, layer in self.layers.items():
            grad = layer.values.grad
            if grad is None:
                continue
            weights, grad = layer.values.detach().float(), grad.float()
            straight_through = (grad * weights).sum(dim=(1, 2))
            implicit = (weights * grad * grad).sum(dim=(1, 2))
            self.active_grad[name] += straight_through - self.implicit_eta * implicit
        self.observed_steps += 1

    @torch.no_grad()
    def update(self, fraction: float) -> None:
        schedule = fraction / self.drop_fraction if self.drop_fraction > 0 else 0.0
        for name, layer in self.layers.items():
            layout, psi = layer.layout, self.psi[name]
            if layer.grad_scores is None:
                raise RuntimeError(f"layer {name!r} recorded no gradient scores on this update step: call "
                                   "dst.step() after every optimizer.step(), with a forward and backward between")
            active = layout.to_block_mask()
            rows, cols = layout.coo_row.long(), layout.col_idx.long()
            active_grad = self.active_grad[name] / max(self.observed_steps, 1)
            psi[rows, cols] -= self.mask_lr * schedule * _rms_normalised(active_grad)
            # Growing a zero block changes the loss by nothing to first order: its straight-through gradient
            # is 0. The dense-gradient norm stands in for it, centred over the inactive blocks: a raw norm is
            # never negative, and adding it every update lifted every inactive score by ~mask_lr per update
            # while the active ones only wandered, so the inactive blocks overtook the active ones wholesale
            # (most of the layer replaced at every update, trained blocks thrown away for zero blocks).
            n_inactive = psi.numel() - layout.nnz_blocks
            psi += self.mask_lr * schedule * _centred_pull(layer.grad_scores.float(), ~active, n_inactive)
            # At most SET's and RigL's number of swaps. Uncapped, top-k(psi) also swapped on noise: each part
            # moves psi by ~one step per update however weak its evidence, and the best of n candidates stands
            # ~sqrt(2 ln n) steps up, more than the margin a swap must earn (docs/bidst.md, difference 6).
            n_max = min(round(fraction * layout.nnz_blocks), n_inactive)
            if n_max > 0:
                self.apply_mask(layer, _capped_top_k(psi, active, n_max))
            self.active_grad[name].zero_()
            layer.grad_scores = None
        self.observed_steps = 0

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(psi={k: v.clone() for k, v in self.psi.items()},
                     active_grad={k: v.clone() for k, v in self.active_grad.items()},
                     observed_steps=self.observed_steps)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name in self.layers:
            self.psi[name].copy_(state["psi"][name])
            self.active_grad[name].copy_(state["active_grad"][name])
        self.observed_steps = state["observed_steps"]
