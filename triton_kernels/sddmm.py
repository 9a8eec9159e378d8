"""bsr_sddmm: dW = (dYᵀ X) sampled at the layout's blocks, the backward-weight GEMM.

Each output block is only bs x bs while the reduction (M = batch rows) is long, so the work is split two ways:
one program per (stored block i, M-chunk s). Program (i, s) computes dY[chunk, n-block]ᵀ X[chunk, k-block]
for block (coo_row[i], col_idx[i]) in fp32. With one chunk the result is stored directly in the output
dtype; with several, each program writes its own fp32 partial and the partials are summed in a fixed order
afterwards (deterministic, no atomics, so autotuning re-runs and repeated steps give identical bits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BLOCK_SIZES, INTERPRET, TunedKernels, cdiv, check, check_index, check_matrix, dot_precision,
                      rows_contiguous, sddmm_configs, sm_count)
from ._tma import tma_enabled
from .wgrad_tma import launch_sddmm

# Chunks are whole multiples of the largest BLOCK_M any config uses.
CHUNK_GRANULE = 128


@triton.jit
def _bsr_sddmm_kernel(DY, X, COO_ROW, COL_IDX, OUT,
                      M, N, K, stride_dym, stride_xm, nnz, CHUNK,
                      BS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    i = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.load(COO_ROW + i)
    c = tl.load(COL_IDX + i)
    offs_b = tl.arange(0, BS)
    n = r * BS + offs_b
    k = c * BS + offs_b
    n_in = n < N
    k_in = k < K

    m_begin = split * CHUNK
    m_end = tl.minimum(m_begin + CHUNK, M)
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < m_end
        rows = offs_m.to(tl.int64)
        # dYᵀ panel [bs, BLOCK_M] read in place (unit stride along n); rows past N or M load as zero, so the
        # block's padding region comes out zero as in the reference.
        dyt = tl.load(DY + rows[None, :] * stride_dym + n[:, None], mask=n_in[:, None] & m_in[None, :], other=0.0)
        x = tl.load(X + rows[:, None] * stride_xm + k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)

    out_ptrs = OUT + (split.to(tl.int64) * nnz + i) * (BS * BS) + offs_b[:, None] * BS + offs_b[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty))


_tuned = TunedKernels(_bsr_sddmm_kernel, sddmm_configs, key=["CHUNK", "nnz", "N", "K"])


def sddmm_splits(m: int, nnz: int, device: torch.device) -> tuple:
    """(number of M-chunks, rows per chunk): enough programs to fill the GPU a few times over, but chunks
    of at least 256 rows (128 under the interpreter) so that each program pipelines a useful loop."""
    min_rows = CHUNK_GRANULE if INTERPRET else 2 * CHUNK_GRANULE
    wanted = cdiv(4 * sm_count(device), max(nnz, 1))
    splits = max(1, min(wanted, m // min_rows))
    chunk = cdiv(cdiv(m, splits), CHUNK_GRANULE) * CHUNK_GRANULE
    return cdiv(m, chunk), chunk


def bsr_sddmm(dy: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
              coo_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor,
              block_size: int) -> torch.Tensor:
    """dW[i] = (dYᵀ X)[coo_row[i]*bs : +bs, col_idx[i]*bs : +bs] for every stored block i: [nnz, bs, bs],
    zero where a block reaches past N or K. fp32 accumulation (split-K partials in fp32); output in the input
    dtype."""
    check(block_size in BLOCK_SIZES, f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    check_matrix("dy", dy)
    check_matrix("x", x, like=dy)
    check(dy.shape[0] == x.shape[0], f"dy has {dy.shape[0]} rows but x has {x.shape[0]}")
    nnz = col_idx.numel()
    check_index((("col_idx", col_idx), ("coo_row", coo_row)), dy.device, nnz)
    m, n_features = dy.shape
    k_features = x.shape[1]
    check(row_ptr.numel() - 1 == cdiv(n_features, block_size),
          f"dy has {n_features} features but the layout has {row_ptr.numel() - 1} block-rows of {block_size}")
    check(col_ptr.numel() - 1 == cdiv(k_features, block_size),
          f"x has {k_features} features but the layout has {col_ptr.numel() - 1} block-columns of {block_size}")

    bs = block_size
    out = torch.empty(nnz, bs, bs, dtype=dy.dtype, device=dy.device)
    if nnz == 0:
        return out
    if m == 0:
        return out.zero_()
    dy, x = rows_contiguous(dy), rows_contiguous(x)
    splits, chunk = sddmm_splits(m, nnz, dy.device)
    target = out if splits == 1 else torch.empty(splits, nnz, bs, bs, dtype=torch.float32, device=dy.device)
    if not (tma_enabled() and launch_sddmm(dy, x, coo_row, col_idx, target, chunk)):
        kernel = _tuned(bs, dy.dtype, dy.device)
        kernel[(nnz, splits)](dy, x, coo_row, col_idx, target,
                              m, n_features, k_features, dy.stride(0), x.stride(0), nnz, chunk,
                              BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    if splits > 1:
        out.copy_(target.sum(dim=0))  # fixed-order fp32 reduction of the partials, then one rounding
    return out
