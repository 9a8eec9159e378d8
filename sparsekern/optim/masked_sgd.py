"""MaskedSGD: momentum SGD on compact block values (and ordinary dense parameters), one fused pass each.

"Masked" because sparse layers store only their blocks: the step touches exactly the stored weights,
with no dense weight and no mask multiply. The arithmetic is torch.optim.SGD's, in the same order.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops

LOW_PRECISION = (torch.float16, torch.bfloat16)


def block_state(optimizer: Optimizer, values: Tensor) -> List[Tensor]:
    """Every state tensor that any optimizer keeps per block of ``values`` (leading dimension nnz_blocks:
    momentum, Adam moments, fp32 masters): what must move with the blocks when the layout changes."""
    state = optimizer.state.get(values, {})
    return [t for t in state.values() if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == values.shape[0]]


class MaskedSGD(Optimizer):
    """SGD with momentum, dampening, nesterov and coupled or decoupled weight decay.

    fp16/bf16 parameters get an fp32 master copy in the optimizer state. Under ``torch.amp.GradScaler``
    the step reads the scaler's ``found_inf`` on the device: an overflowing step changes nothing, momentum
    included, without a host synchronisation. After a layout change, :meth:`block_state` lists the
    per-block state tensors that must move with the values (``BlockSparseLayout.update_`` does it).
    """

    # GradScaler hands us found_inf / grad_scale instead of synchronising and skipping step() itself.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, decoupled_weight_decay: bool = False):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if momentum < 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    # -- hooks for SparseOpt --------------------------------------------------------------------
    def _grad_scale(self, param: Tensor) -> Optional[Tensor]:
        """Per-block gradient factors for ``param`` (None: plain SGD)."""
        return None

    # -- state ----------------------------------------------------------------------------------
    def _state_for(self, param: Tensor, momentum: float) -> dict:
        state = self.state[param]
        if not state:
            weights_dtype = torch.float32 if param.dtype in LOW_PRECISION else param.dtype
            state["taken_steps"] = torch.zeros((), dtype=torch.int64, device=param.device)
            if param.dtype in LOW_PRECISION:
                state["master"] = param.detach().to(torch.float32)
            if momentum != 0:
                state["momentum_buffer"] = torch.zeros_like(param, dtype=weights_dtype)
        return state

    def block_state(self, values: Tensor) -> List[Tensor]:
        """The state tensors of ``values`` laid out per block ([nnz, ...]): permute them on a layout change."""
        return block_state(self, values)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        loss_scale = getattr(self, "grad_scale", None)
        inv_loss_scale = None if loss_scale is None else loss_scale.double().reciprocal().float()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("MaskedSGD does not take torch.sparse gradients")
                state = self._state_for(param, group["momentum"])
                device = param.device
                ops.masked_sgd_(
                    param, param.grad, state.get("momentum_buffer"), state.get("master"), state["taken_steps"],
                    lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], grad_scale=self._grad_scale(param),
                    inv_loss_scale=None if inv_loss_scale is None else inv_loss_scale.to(device),
                    found_inf=None if found_inf is None else found_inf.to(device))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded state to each parameter's dtype; ours keeps its own (fp32 masters and
        # momentum of low-precision parameters, an int64 step counter), so restore those exactly.
        id_to_param = {}
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            id_to_param.update(zip(saved_group["params"], group["params"]))
        for param_id, saved in state_dict["state"].items():
            param = id_to_param[param_id]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self.state[param][key] = value.to(device=param.device, copy=True)
