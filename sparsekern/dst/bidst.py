"""BiDST: the mask as the upper-level variable of a bi-level problem (Ji et al., ICML 2024).

Each sparse layer has real-valued block scores psi [R, C]; the active set is top-k(psi) with k fixed.
The lower level trains the active blocks' weights (the optimizer); the upper level moves psi against
the loss gradient with respect to the mask, approximated per block (see docs/bidst.md):

- active block b: the straight-through gradient <dW_b, W_b>, corrected by BiP's first-order implicit
  term, g_b <- g_b - eta2 * <W_b, dW_b ⊙ dW_b> (the per-block sum of g_psi ⊙ g_theta), averaged over the
  steps since the last update;
- inactive block b (its weights are zero, so <dW_b, W_b> = 0): minus the block norm of the dense weight
  gradient on the update step (``block_grad_scores``): the larger, the more growing it would help.

Both are normalised by their RMS per layer, so that psi moves by about ``mask_lr`` per update whatever
the gradient scale, scaled by the cosine schedule (f(t) / drop_fraction), so that the topology settles.
Every ``update_interval`` steps psi takes that step and the mask is re-binarised to top-k(psi).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from .scheduler import DSTScheduler


def _rms_normalised(t: Tensor) -> Tensor:
    return t / t.pow(2).mean().sqrt().clamp(min=1e-30) if t.numel() else t


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
            inactive_pull = torch.where(active, torch.zeros_like(psi), layer.grad_scores.float())
            psi += self.mask_lr * schedule * _rms_normalised(inactive_pull)
            mask = torch.zeros_like(active).flatten()
            mask[psi.flatten().topk(layout.nnz_blocks).indices] = True
            self.apply_mask(layer, mask.view_as(active))
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
