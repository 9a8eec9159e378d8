"""block_grad_scores: Frobenius norm of every bs x bs block of the dense dYᵀX, without materialising it.

One program per TILE_N x TILE_K tile of the dense gradient G = dYᵀX (tiles are whole numbers of blocks):
it accumulates its tile over M in fp32 registers, squares it, folds the tile into its blocks by a reshape
and two sums, and writes only the (TILE_N/bs) x (TILE_K/bs) norms. The dense gradient never reaches memory.
The reduction over M cannot be split across programs: a norm needs the whole sum before squaring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BLOCK_SIZES, TunedKernels, cdiv, check, check_matrix, dot_precision, grad_scores_configs,
                      m_bucket, rows_contiguous)
from ._tma import tma_enabled


@triton.jit
def store_block_norms(acc, OUT, pid_n, pid_k, N, n_block_cols, BS: tl.constexpr, TILE_N: tl.constexpr,
                      TILE_K: tl.constexpr):
    """Fold a TILE_N x TILE_K tile (pid_n, pid_k) of the dense gradient into its blocks' Frobenius norms and
    store those into OUT [ceil(N/bs), n_block_cols]."""
    square = acc * acc
    square = tl.reshape(square, (TILE_N // BS, BS, TILE_K // BS, BS))
    # sqrt_rn: correctly rounded as torch's (tl.sqrt is sqrt.approx on NVIDIA GPUs; the interpreter's is exact)
    norms = tl.sqrt_rn(tl.sum(tl.sum(square, axis=3), axis=1))  # [TILE_N // BS, TILE_K // BS]

    block_r = pid_n * (TILE_N // BS) + tl.arange(0, TILE_N // BS)
    block_c = pid_k * (TILE_K // BS) + tl.arange(0, TILE_K // BS)
    n_block_rows = tl.cdiv(N, BS)
    out_ptrs = OUT + block_r.to(tl.int64)[:, None] * n_block_cols + block_c[None, :]
    tl.store(out_ptrs, norms, mask=(block_r[:, None] < n_block_rows) & (block_c[None, :] < n_block_cols))


@triton.jit
def _block_grad_scores_kernel(DY, X, OUT,
                              M, N, K, stride_dym, stride_xm, n_block_cols, M_BUCKET,
                              BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    offs_k = pid_k * TILE_K + tl.arange(0, TILE_K)
    n_in = offs_n < N
    k_in = offs_k < K

    acc = tl.zeros((TILE_N, TILE_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < M
        rows = offs_m.to(tl.int64)
        # Entries past N, K or M load as zero, so the padded last blocks get the reference's norms.
        dyt = tl.load(DY + rows[None, :] * stride_dym + offs_n[:, None], mask=n_in[:, None] & m_in[None, :],
                      other=0.0)
        x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)

    store_block_norms(acc, OUT, pid_n, pid_k, N, n_block_cols, BS, TILE_N, TILE_K)


def _launch_tma(*args) -> bool:
    # Imported on first use: wgrad_tma imports this module's store_block_norms.
    from .wgrad_tma import launch_grad_scores
    return launch_grad_scores(*args)


_tuned = TunedKernels(_block_grad_scores_kernel, grad_scores_configs, key=["M_BUCKET", "N", "K"])


def block_grad_scores(dy: torch.Tensor, x: torch.Tensor, block_size: int) -> torch.Tensor:
    """S[r, c] = ‖(dYᵀ X)[r*bs : +bs, c*bs : +bs]‖_F for every block of the dense gradient:
    [ceil(N/bs), ceil(K/bs)] in fp32 (fp32 accumulation). float64 inputs are refused with a TypeError (use the
    reference or CPU backend), not computed in reduced precision."""
    check(block_size in BLOCK_SIZES, f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    check_matrix("dy", dy)
    check_matrix("x", x, like=dy)
    check(dy.shape[0] == x.shape[0], f"dy has {dy.shape[0]} rows but x has {x.shape[0]}")
    m, n_features = dy.shape
    k_features = x.shape[1]
    bs = block_size
    n_block_rows, n_block_cols = cdiv(n_features, bs), cdiv(k_features, bs)
    out = torch.empty(n_block_rows, n_block_cols, dtype=torch.float32, device=dy.device)
    if out.numel() == 0:
        return out
    if m == 0:
        return out.zero_()
    dy, x = rows_contiguous(dy), rows_contiguous(x)
    if tma_enabled() and _launch_tma(dy, x, out, bs):
        return out
    kernel = _tuned(bs, dy.dtype, dy.device)
    grid = lambda meta: (triton.cdiv(n_features, meta["TILE_N"]), triton.cdiv(k_features, meta["TILE_K"]))
    kernel[grid](dy, x, out, m, n_features, k_features, dy.stride(0), x.stride(0), n_block_cols, m_bucket(m),
                 BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return out
