"""masked_sgd_: one fused SGD step in place, with torch.optim.SGD's arithmetic in its order.

    g   = grad * inv_loss_scale * grad_scale[leading index]          (each factor optional)
    g   = g + wd * w                                                  (coupled weight decay)
    buf = g if step == 0 else momentum * buf + (1 - dampening) * g
    g   = g + momentum * buf if nesterov else buf
    w   = w * (1 - lr * wd) (decoupled) ;  w = w - lr * g ;  param = round(w) when w is an fp32 master

A flat 1-D kernel over numel: each program reads BLOCK elements of the weights, the gradient and the momentum
buffer once and writes the weights, the buffer and (with a master) the low-precision param once. found_inf,
inv_loss_scale and the step counter are read on the device, so nothing waits for the host; a non-zero
found_inf masks every store except the param's refresh from the master (as the reference does). The step
counter is advanced by a second one-program launch, after every program of the first has read it.
Every ``x.add(y, alpha=a)`` of the reference is one ``tl.fma`` (the interpreter rounds it twice) and every other
product is rounded on its own: the launch turns off Triton's contraction of a * b + c into FMAs (``LAUNCH_OPTIONS``),
as the CUDA kernel does with ``__fmul_rn``.
The kernel is not autotuned: it updates its operands in place, so a tuning rerun would apply the step twice.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check, check_device

# Round each product as the reference does (PTX mul.rn / add.rn, which ptxas never fuses).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _masked_sgd_kernel(WEIGHTS, PARAM, GRAD, BUFFER, GRAD_SCALE, INV_LOSS_SCALE, FOUND_INF, STEP,
                       numel, slice_len, momentum, dampening_keep, weight_decay, decay, neg_lr,
                       HAS_MASTER: tl.constexpr, USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                       COUPLED_DECAY: tl.constexpr, DECOUPLED_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                       HAS_INV_LOSS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK)
    offs = base + lane
    in_range = offs < numel
    if HAS_FOUND_INF:
        # broadcast to the block before combining with the mask (the interpreter cannot & a scalar with a vector)
        take = (tl.zeros([BLOCK], dtype=tl.float32) + tl.load(FOUND_INF).to(tl.float32)) == 0.0
        live = in_range & take
    else:
        live = in_range
    w = tl.load(WEIGHTS + offs, mask=in_range, other=0.0)
    g = tl.load(GRAD + offs, mask=live, other=0.0).to(w.dtype)
    if HAS_INV_LOSS_SCALE:
        g = g * tl.load(INV_LOSS_SCALE).to(w.dtype)
    if HAS_GRAD_SCALE:
        # one 64-bit division per program, 32-bit ones per element (a slice, so its offsets, fit in int32). A 1-D
        # param has slice_len 1, which Triton's JIT passes as a constexpr: no tensor methods on it (no .to).
        first_slice = base // slice_len
        within = (base - first_slice * slice_len).to(tl.int32) + lane
        index = first_slice + within // slice_len
        g = g * tl.load(GRAD_SCALE + index, mask=live, other=1.0).to(w.dtype)
    if COUPLED_DECAY:
        g = tl.fma(w, weight_decay, g)
    if USE_MOMENTUM:
        first_step = (tl.zeros([BLOCK], dtype=tl.int64) + tl.load(STEP)) == 0
        buf = tl.load(BUFFER + offs, mask=live & (first_step == 0), other=0.0)
        buf = tl.where(first_step, g, tl.fma(g, dampening_keep, buf * momentum))
        tl.store(BUFFER + offs, buf, mask=live)
        if NESTEROV:
            g = tl.fma(buf, momentum, g)
        else:
            g = buf
    if DECOUPLED_DECAY:
        new_w = tl.fma(g, neg_lr, w * decay)
    else:
        new_w = tl.fma(g, neg_lr, w)
    tl.store(WEIGHTS + offs, new_w, mask=live)
    if HAS_MASTER:
        if HAS_FOUND_INF:
            new_w = tl.where(take, new_w, w)
        tl.store(PARAM + offs, new_w.to(PARAM.dtype.element_ty), mask=in_range)


@triton.jit
def _advance_step_kernel(STEP, FOUND_INF, HAS_FOUND_INF: tl.constexpr):
    step = tl.load(STEP)
    if HAS_FOUND_INF:
        step += (tl.load(FOUND_INF) == 0.0).to(tl.int64)
    else:
        step += 1
    tl.store(STEP, step)


def _as_fp32(x: float) -> float:
    """A Python float rounded to fp32 the way torch rounds it for an fp32 tensor (round to nearest even)."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


def masked_sgd_(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: Optional[torch.Tensor],
                master: Optional[torch.Tensor], step: torch.Tensor, grad_scale: Optional[torch.Tensor],
                inv_loss_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], lr: float, momentum: float,
                dampening: float, weight_decay: float, nesterov: bool, decoupled_weight_decay: bool) -> None:
    """One SGD step in place (see the module docstring; sparsekern.reference.masked_sgd_ is the definition).
    The weights (master, else param) must be fp32; param fp32, bf16 or fp16; grad of param's dtype or fp32."""
    weights = master if master is not None else param
    check_device("param", param)
    check(weights.dtype == torch.float32,
          f"the weights ({'master' if master is not None else 'param'}) must be float32 for the Triton kernel, got "
          f"{weights.dtype} (bf16/fp16 params need an fp32 master; use SPARSEKERN_BACKEND=reference or cpu for fp64)")
    check(param.dtype in (torch.float32, torch.bfloat16, torch.float16),
          f"param must be float32, bfloat16 or float16, got {param.dtype}")
    check(grad.shape == param.shape, f"grad has shape {tuple(grad.shape)} but param has {tuple(param.shape)}")
    check(grad.dtype in (param.dtype, weights.dtype),
          f"grad must have the dtype of param ({param.dtype}) or of the weights ({weights.dtype}), got {grad.dtype}")
    use_momentum = momentum != 0
    named = [("grad", grad), ("master", master), ("step", step), ("grad_scale", grad_scale),
             ("inv_loss_scale", inv_loss_scale), ("found_inf", found_inf)]
    if use_momentum:
        check(momentum_buffer is not None, "momentum_buffer is required when momentum != 0")
        check(momentum_buffer.shape == param.shape and momentum_buffer.dtype == weights.dtype,
              f"momentum_buffer must have shape {tuple(param.shape)} and dtype {weights.dtype}")
        named.append(("momentum_buffer", momentum_buffer))
    for name, t in named:
        if t is not None:
            check(t.device == param.device, f"{name} is on {t.device} but param is on {param.device}")
    if master is not None:
        check(master.shape == param.shape, f"master has shape {tuple(master.shape)} but param has {tuple(param.shape)}")
    check(step.dtype == torch.int64 and step.numel() == 1, f"step must be one int64, got {step.dtype} {tuple(step.shape)}")
    n_slices = param.shape[0] if param.dim() > 0 else 1
    if grad_scale is not None:
        check(grad_scale.numel() == n_slices and grad_scale.dim() <= 1,
              f"grad_scale must have one factor per leading index of param ({n_slices}), got {tuple(grad_scale.shape)}")
    for name, t in (("inv_loss_scale", inv_loss_scale), ("found_inf", found_inf)):
        if t is not None:
            check(t.numel() == 1, f"{name} must hold one element, got shape {tuple(t.shape)}")

    # Strided operands go through contiguous copies (nothing in sparsekern passes one).
    param_c, grad_c = param.contiguous(), grad.contiguous()
    weights_c = weights.contiguous() if master is not None else param_c
    buffer_c = momentum_buffer.contiguous() if use_momentum else None

    numel = param.numel()
    if numel > 0:
        block = 1024 if INTERPRET or numel < (1 << 20) else 2048
        decoupled = decoupled_weight_decay and weight_decay != 0
        dummy = weights_c  # stands in for absent operands; never read (its flag is off)
        _masked_sgd_kernel[(triton.cdiv(numel, block),)](
            weights_c, param_c, grad_c, buffer_c if use_momentum else dummy,
            grad_scale.contiguous() if grad_scale is not None else dummy,
            inv_loss_scale if inv_loss_scale is not None else dummy,
            found_inf if found_inf is not None else dummy, step,
            numel, numel // n_slices if n_slices > 0 else 1,
            _as_fp32(momentum), _as_fp32(1 - dampening), _as_fp32(weight_decay),
            _as_fp32(1 - lr * weight_decay) if decoupled else 1.0, _as_fp32(-lr),
            HAS_MASTER=master is not None, USE_MOMENTUM=use_momentum, NESTEROV=bool(nesterov),
            COUPLED_DECAY=weight_decay != 0 and not decoupled_weight_decay, DECOUPLED_DECAY=decoupled,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_INV_LOSS_SCALE=inv_loss_scale is not None,
            HAS_FOUND_INF=found_inf is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8,
            **LAUNCH_OPTIONS)
    _advance_step_kernel[(1,)](step, found_inf if found_inf is not None else step, HAS_FOUND_INF=found_inf is not None)

    if param_c.data_ptr() != param.data_ptr():
        param.copy_(param_c)
    if master is not None and weights_c.data_ptr() != master.data_ptr():
        master.copy_(weights_c)
    if use_momentum and buffer_c.data_ptr() != momentum_buffer.data_ptr():
        momentum_buffer.copy_(buffer_c)
