"""bsr_linear_dx: dX = dY W with W block-sparse, the backward-input GEMM.

One program per (M-tile, block-column c of W): it owns dX[m-tile, c*bs:(c+1)*bs] and walks block-column c
through the transposed index (``col_ptr``/``row_idx``/``perm``): block q of the column is ``values[perm[q]]``
at block-row ``row_idx[q]``. The values are read in place, in their [n, k] storage order, which is already the
[K, N] operand of this MMA, so no transposed copy of W is ever made.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (TunedKernels, cdiv, check, check_index, check_matrix, check_values, dot_precision,
                      gemm_configs, m_bucket, rows_contiguous)
from ._tma import tma_enabled
from .linear_tma import launch_linear_dx


@triton.jit
def _bsr_linear_dx_kernel(DY, VALUES, COL_PTR, ROW_IDX, PERM, DX,
                          M, N, K, stride_dym, stride_dxm, n_block_cols, M_BUCKET,
                          BS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    c = pid % n_block_cols
    m_tile = pid // n_block_cols

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BS)
    m_in = offs_m < M
    k = c * BS + offs_b
    k_in = k < K
    dy_rows = DY + offs_m.to(tl.int64)[:, None] * stride_dym
    w_offsets = offs_b[:, None] * BS + offs_b[None, :]  # values[j, n, k] as [n, k]

    start = tl.load(COL_PTR + c).to(tl.int64)
    end = tl.load(COL_PTR + c + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
    # Index of the next block fetched one iteration ahead (see linear.py: keeps the tile loads pipelinable).
    r_next = tl.load(ROW_IDX + start, mask=start < end, other=0)
    j_next = tl.load(PERM + start, mask=start < end, other=0).to(tl.int64)
    for q in range(start, end):
        r = r_next
        j = j_next
        r_next = tl.load(ROW_IDX + q + 1, mask=q + 1 < end, other=0)
        j_next = tl.load(PERM + q + 1, mask=q + 1 < end, other=0).to(tl.int64)
        n = r * BS + offs_b
        n_in = n < N
        dy = tl.load(dy_rows + n[None, :], mask=m_in[:, None] & n_in[None, :], other=0.0)
        w = tl.load(VALUES + j * (BS * BS) + w_offsets, mask=n_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)

    dx_ptrs = DX + offs_m.to(tl.int64)[:, None] * stride_dxm + k[None, :]
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=m_in[:, None] & k_in[None, :])


_tuned = TunedKernels(_bsr_linear_dx_kernel, gemm_configs, key=["M_BUCKET", "N", "K"])


def bsr_linear_dx(dy: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                  coo_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor,
                  in_features: int) -> torch.Tensor:
    """dX[M, K] = dY[M, N] W, W [N, K = in_features] read block-column by block-column through the transposed
    index (col_ptr, row_idx, perm). fp32 accumulation; output in the input dtype."""
    check_matrix("dy", dy)
    bs = check_values(values, dy)
    m, n_features = dy.shape
    n_block_cols = col_ptr.numel() - 1
    check_index((("col_ptr", col_ptr), ("row_idx", row_idx), ("perm", perm)), dy.device, values.shape[0])
    check(n_block_cols == cdiv(in_features, bs),
          f"col_ptr has {n_block_cols} block-columns but in_features={in_features} needs {cdiv(in_features, bs)}")
    check(row_ptr.numel() - 1 == cdiv(n_features, bs),
          f"dy has {n_features} features but the layout has {row_ptr.numel() - 1} block-rows of {bs}")

    dx = torch.empty(m, in_features, dtype=dy.dtype, device=dy.device)
    if m == 0 or in_features == 0:
        return dx
    if values.shape[0] == 0:
        return dx.zero_()
    dy, values = rows_contiguous(dy), values.contiguous()
    if tma_enabled() and launch_linear_dx(dy, values, col_ptr, row_idx, perm, dx):
        return dx
    kernel = _tuned(bs, dy.dtype, dy.device)
    grid = lambda meta: (n_block_cols * triton.cdiv(m, meta["BLOCK_M"]),)
    kernel[grid](dy, values, col_ptr, row_idx, perm, dx,
                 m, n_features, in_features, dy.stride(0), dx.stride(0), n_block_cols, m_bucket(m),
                 BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return dx
