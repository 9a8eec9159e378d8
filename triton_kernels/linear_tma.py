"""bsr_linear and bsr_linear_dx for Hopper: tensor-memory-accelerator (TMA) loads, persistent programs.

The same two GEMMs as ``linear.py`` and ``linear_dx.py`` (same block-CSR walk, same fp32 accumulation), with the
tiles moved by TMA instead of per-thread loads: a block-sparse gather along K is one TMA box at a block-aligned
coordinate of the dense operand ([BLOCK_M, bs] at (m0, c*bs)), and a stored block is one [bs, bs] box of the
values seen as a [nnz*bs, bs] matrix. TMA fills what lies past M, N or K with zeros and clips the stores, so
the kernels need no masks. Programs are persistent (one per multiprocessor), walking the output tiles in the
pointer kernels' order (block-row fastest, so that neighbouring programs share the dense operand's panel in L2).

**Not yet run on a GPU**: ``auto`` and the ``triton`` backend do not use these kernels. They are tested in the
interpreter, compiled ahead of time for sm_90 (tests/test_triton_static.py checks their SASS for TMA loads and
wgmma), and measured next to the pointer kernels by the gpu-linear suite (``triton-tma`` rows).

TMA needs 16-byte aligned base addresses and row strides (a multiple of 8 features in 16-bit types, 4 in fp32);
``tma_unsupported`` says why a call does not qualify.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TunedKernels, dot_precision, gemm_configs, m_bucket
from ._tma import TensorDescriptor, box_hook, descriptor, instead, persistent_grid, tma_unsupported, with_hook
from .linear import check_linear_args
from .linear_dx import check_linear_dx_args

__all__ = ["TensorDescriptor", "bsr_linear_dx_tma", "bsr_linear_tma", "tma_unsupported"]


@triton.jit
def _bsr_linear_tma_kernel(X_DESC, W_DESC, ROW_PTR, COL_IDX, BIAS, Y_DESC,
                           M, N, K, n_block_rows, M_BUCKET,
                           HAS_BIAS: tl.constexpr, BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    # K is read only by the autotune key (the blocks per row, hence the loop length, grow with it).
    n_tiles = n_block_rows * tl.cdiv(M, BLOCK_M)
    offs_b = tl.arange(0, BS)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        r = tile % n_block_rows
        m0 = (tile // n_block_rows) * BLOCK_M
        start = tl.load(ROW_PTR + r)
        end = tl.load(ROW_PTR + r + 1)
        acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
        # The next block's column is fetched one iteration ahead, as in linear.py, so that the TMA loads depend
        # on a loop-carried value and the pipeliner keeps num_stages of them in flight.
        c_next = tl.load(COL_IDX + start, mask=start < end, other=0)
        for j in range(start, end):
            c = c_next
            c_next = tl.load(COL_IDX + j + 1, mask=j + 1 < end, other=0)
            x = X_DESC.load([m0, c * BS])
            w = W_DESC.load([j * BS, 0])  # values[j] as [n, k]: its transpose is the MMA's K-major B operand
            acc = tl.dot(x, w.T, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            n = r * BS + offs_b
            acc += tl.load(BIAS + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        Y_DESC.store([m0, r * BS], acc.to(Y_DESC.dtype))


@triton.jit
def _bsr_linear_dx_tma_kernel(DY_DESC, W_DESC, COL_PTR, ROW_IDX, PERM, DX_DESC,
                              M, N, n_block_cols, M_BUCKET,
                              BS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    # N is read only by the autotune key (the blocks per column grow with it).
    n_tiles = n_block_cols * tl.cdiv(M, BLOCK_M)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        c = tile % n_block_cols
        m0 = (tile // n_block_cols) * BLOCK_M
        start = tl.load(COL_PTR + c)
        end = tl.load(COL_PTR + c + 1)
        acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
        r_next = tl.load(ROW_IDX + start, mask=start < end, other=0)
        j_next = tl.load(PERM + start, mask=start < end, other=0)
        for q in range(start, end):
            r = r_next
            j = j_next
            r_next = tl.load(ROW_IDX + q + 1, mask=q + 1 < end, other=0)
            j_next = tl.load(PERM + q + 1, mask=q + 1 < end, other=0)
            dy = DY_DESC.load([m0, r * BS])
            w = W_DESC.load([j * BS, 0])  # values[j] as [n, k]: already this MMA's [K, N] operand
            acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
        DX_DESC.store([m0, c * BS], acc.to(DX_DESC.dtype))


def tma_gemm_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """The pointer GEMMs' configs (same tiles; stages fitted beside the output tile that the TMA store stages in
    shared memory), each setting the activation boxes' rows."""
    rows = ("BLOCK_M", None)
    epilogue = lambda meta: meta["BLOCK_M"] * block_size * elem_bytes
    return with_hook(gemm_configs(block_size, elem_bytes, budget, interpret, epilogue),
                     box_hook({"X_DESC": rows, "Y_DESC": rows, "DY_DESC": rows, "DX_DESC": rows}))


_tuned_linear = TunedKernels(_bsr_linear_tma_kernel, tma_gemm_configs, key=["M_BUCKET", "N", "K"])
_tuned_dx = TunedKernels(_bsr_linear_dx_tma_kernel, tma_gemm_configs, key=["M_BUCKET", "N", "n_block_cols"])


def bsr_linear_tma(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                   coo_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor,
                   out_features: int, bias: Optional[torch.Tensor], fallback: Optional[Callable] = None) -> torch.Tensor:
    """``bsr_linear`` (Y = X Wᵀ + b) through TMA and persistent programs; where TMA cannot take the operands
    (``tma_unsupported``), ``fallback`` (the pointer kernel) runs instead, or without one ValueError says why."""
    bs = check_linear_args(x, values, row_ptr, col_idx, col_ptr, out_features, bias)
    m, k_features = x.shape
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return y
    if values.shape[0] == 0:
        return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
    values = values.contiguous()
    why = tma_unsupported(x, y, values.view(-1, bs))
    if why:
        return instead("bsr_linear_tma", why, fallback)(x, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm,
                                                        out_features, bias)
    n_block_rows = row_ptr.numel() - 1
    kernel = _tuned_linear(bs, x.dtype, x.device)
    # 64 rows is a placeholder: the chosen config's pre-hook sets the activation boxes' rows.
    x_desc, w_desc, y_desc = (descriptor(x, [64, bs]), descriptor(values.view(-1, bs), [bs, bs]),
                              descriptor(y, [64, bs]))
    kernel[persistent_grid(lambda meta: n_block_rows * triton.cdiv(m, meta["BLOCK_M"]), x.device)](
        x_desc, w_desc, row_ptr, col_idx, bias.contiguous() if bias is not None else y, y_desc,
        m, out_features, k_features, n_block_rows, m_bucket(m),
        HAS_BIAS=bias is not None, BS=bs, INPUT_PRECISION=dot_precision(x.dtype))
    return y


def bsr_linear_dx_tma(dy: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                      coo_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor,
                      in_features: int, fallback: Optional[Callable] = None) -> torch.Tensor:
    """``bsr_linear_dx`` (dX = dY W) through TMA and persistent programs; where TMA cannot take the operands
    (``tma_unsupported``), ``fallback`` (the pointer kernel) runs instead, or without one ValueError says why."""
    bs = check_linear_dx_args(dy, values, row_ptr, col_ptr, row_idx, perm, in_features)
    m = dy.shape[0]
    dx = torch.empty(m, in_features, dtype=dy.dtype, device=dy.device)
    if m == 0 or in_features == 0:
        return dx
    if values.shape[0] == 0:
        return dx.zero_()
    values = values.contiguous()
    why = tma_unsupported(dy, dx, values.view(-1, bs))
    if why:
        return instead("bsr_linear_dx_tma", why, fallback)(dy, values, row_ptr, col_idx, coo_row, col_ptr, row_idx,
                                                           perm, in_features)
    n_block_cols = col_ptr.numel() - 1
    kernel = _tuned_dx(bs, dy.dtype, dy.device)
    dy_desc, w_desc, dx_desc = (descriptor(dy, [64, bs]), descriptor(values.view(-1, bs), [bs, bs]),
                                descriptor(dx, [64, bs]))
    kernel[persistent_grid(lambda meta: n_block_cols * triton.cdiv(m, meta["BLOCK_M"]), dy.device)](
        dy_desc, w_desc, col_ptr, row_idx, perm, dx_desc, m, dy.shape[1], n_block_cols, m_bucket(m),
        BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return dx
