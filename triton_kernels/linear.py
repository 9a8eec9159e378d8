"""bsr_linear: Y = X Wᵀ (+ b) with W block-sparse (block-CSR), the forward GEMM.

One program per (M-tile, block-row r of W): it owns the output tile Y[m-tile, r*bs:(r+1)*bs] and walks the
blocks of block-row r through ``row_ptr``/``col_idx``. The activations sit on the MMA's M side (BLOCK_M rows),
the block's out-features are the MMA's N and its in-features the K, so each stored block is one
[BLOCK_M, bs] x [bs, bs] MMA step; the software pipeline keeps several blocks' X panels in flight.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (TunedKernels, cdiv, check, check_index, check_matrix, check_values, dot_precision,
                      gemm_configs, m_bucket, rows_contiguous)
from ._tma import tma_enabled
from .linear_tma import launch_linear


@triton.jit
def _bsr_linear_kernel(X, VALUES, ROW_PTR, COL_IDX, BIAS, Y,
                       M, N, K, stride_xm, stride_ym, n_block_rows, M_BUCKET,
                       HAS_BIAS: tl.constexpr, BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    # Block-row fastest: neighbouring programs share the X panel of one M-tile (it stays in L2) while the
    # sparse W is small enough to stay resident across M-tiles.
    pid = tl.program_id(0)
    r = pid % n_block_rows
    m_tile = pid // n_block_rows

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BS)
    m_in = offs_m < M
    n = r * BS + offs_b
    n_in = n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    # Wᵀ block as [k, n]: values[j, n, k] lives at n * BS + k, read transposed in place (no copy).
    wt_offsets = offs_b[None, :] * BS + offs_b[:, None]

    # 64-bit block positions: nnz * bs * bs may pass 2**31 elements.
    start = tl.load(ROW_PTR + r).to(tl.int64)
    end = tl.load(ROW_PTR + r + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
    # The next block's column is fetched one iteration ahead into a register: the tile loads then depend on a
    # loop-carried value rather than on a load in the same iteration, which lets Triton's software pipeliner
    # keep num_stages blocks of X and W in flight (with the index loaded in-iteration it treats the tile loads
    # as indirect and keeps only two buffers whatever num_stages is).
    c_next = tl.load(COL_IDX + start, mask=start < end, other=0)
    for j in range(start, end):
        c = c_next
        c_next = tl.load(COL_IDX + j + 1, mask=j + 1 < end, other=0)
        k = c * BS + offs_b
        k_in = k < K
        x = tl.load(x_rows + k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
        # The padding of a block (past N or K) is zero by convention; masking keeps stray values out anyway.
        wt = tl.load(VALUES + j * (BS * BS) + wt_offsets, mask=k_in[:, None] & n_in[None, :],
                     other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


_tuned = TunedKernels(_bsr_linear_kernel, gemm_configs, key=["M_BUCKET", "N", "K"])


def bsr_linear(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
               coo_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor,
               out_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Y[M, N] = X[M, K] Wᵀ + b, W [N = out_features, K] given by compact blocks ``values`` [nnz, bs, bs] at
    (coo_row[i], col_idx[i]) in block-CSR order. fp32 accumulation; output in the input dtype."""
    check_matrix("x", x)
    bs = check_values(values, x)
    m, k_features = x.shape
    n_block_rows = row_ptr.numel() - 1
    check_index((("row_ptr", row_ptr), ("col_idx", col_idx)), x.device, values.shape[0])
    check(n_block_rows == cdiv(out_features, bs),
          f"row_ptr has {n_block_rows} block-rows but out_features={out_features} needs {cdiv(out_features, bs)}")
    check(col_ptr.numel() - 1 == cdiv(k_features, bs),
          f"x has {k_features} features but the layout has {col_ptr.numel() - 1} block-columns of {bs}")
    if bias is not None:
        check(tuple(bias.shape) == (out_features,), f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        check(bias.dtype == x.dtype and bias.device == x.device,
              f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")

    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return y
    if values.shape[0] == 0:  # no blocks at all (density 0): nothing to launch over
        return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
    x, values = rows_contiguous(x), values.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if tma_enabled() and launch_linear(x, values, row_ptr, col_idx, bias, y):
        return y
    kernel = _tuned(bs, x.dtype, x.device)
    grid = lambda meta: (n_block_rows * triton.cdiv(m, meta["BLOCK_M"]),)
    kernel[grid](x, values, row_ptr, col_idx, bias if bias is not None else y, y,
                 m, out_features, k_features, x.stride(0), y.stride(0), n_block_rows, m_bucket(m),
                 HAS_BIAS=bias is not None, BS=bs, INPUT_PRECISION=dot_precision(x.dtype))
    return y
