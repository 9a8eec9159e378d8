"""bsr_conv2d_wgrad and bsr_conv2d_grad_scores: the filter gradient of the block-sparse convolution, at the
layout's blocks only (wgrad) or as per-block norms of the dense gradient (grad scores, for RigL/BiDST).

Both reduce dW = dYᵀ im2col(X) over the M = B*OH*OW output pixels, with the im2col tiles gathered from the NHWC
image as in the forward (``conv.py``); neither im2col nor the dense dW is written.

wgrad: as bsr_sddmm, one program per (stored block i, M-chunk s): dY[chunk, n-block]ᵀ im2col[chunk, k-block]
for block (coo_row[i], col_idx[i]) in fp32; several chunks write fp32 partials that are summed in a fixed order
(deterministic, no atomics).

grad scores: as block_grad_scores, one program per TILE_N x TILE_K tile of the dense dW, reduced over all of M
in registers, then folded into its blocks' norms (a norm needs the whole sum, so M is not split).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import (BLOCK_SIZES, TunedKernels, cdiv, check, check_index, conv_wgrad_gather_configs,
                      dot_precision, grad_scores_configs, m_bucket, sddmm_configs)
from ._tma import tma_enabled
from .conv import (check_filter_layout, check_image, conv_geometry, decode_block_columns, decode_columns,
                   geometry_jit, im2col_tile, output_pixels)
from .conv_tma import launch_conv2d_wgrad
from .grad_scores import store_block_norms
from .sddmm import sddmm_splits


@geometry_jit
def _bsr_conv2d_wgrad_kernel(DY, X, COO_ROW, COL_IDX, OUT,
                             M, N, K, H, W, C, OH, OW, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
                             nnz, CHUNK,
                             CIN_ALIGNED: tl.constexpr, BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr):
    i = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.load(COO_ROW + i)
    c = tl.load(COL_IDX + i)
    offs_b = tl.arange(0, BS)
    n = r * BS + offs_b
    n_in = n < N
    # The block's columns are decoded once: only the output pixels change along the reduction.
    offset, dh, dw, k_in = decode_block_columns(c, offs_b, K, C, KW, W, dil_h, dil_w, BS, CIN_ALIGNED)

    m_begin = split * CHUNK
    m_end = tl.minimum(m_begin + CHUNK, M)
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        corner, ih0, iw0, _ = output_pixels(offs_m, M, OH, OW, H, W, C, stride_h, stride_w, pad_top, pad_left)
        m_in = offs_m < m_end
        # Entries past N, K or M load as zero, so the block's padding region comes out zero as in the reference.
        dyt = tl.load(DY + offs_m.to(tl.int64)[None, :] * N + n[:, None], mask=n_in[:, None] & m_in[None, :],
                      other=0.0)
        x = im2col_tile(X, corner, ih0, iw0, m_in, offset, dh, dw, k_in, H, W)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)

    out_ptrs = OUT + (split.to(tl.int64) * nnz + i) * (BS * BS) + offs_b[:, None] * BS + offs_b[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty))


@geometry_jit
def _conv_grad_scores_kernel(DY, X, OUT,
                             M, N, K, H, W, C, OH, OW, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
                             n_block_cols, M_BUCKET,
                             BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                             TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    n_in = offs_n < N
    # A tile spans several blocks (and taps): each column is decoded.
    offset, dh, dw, k_in = decode_columns(pid_k * TILE_K + tl.arange(0, TILE_K), K, C, KW, W, dil_h, dil_w)

    acc = tl.zeros((TILE_N, TILE_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        corner, ih0, iw0, m_in = output_pixels(offs_m, M, OH, OW, H, W, C, stride_h, stride_w, pad_top, pad_left)
        dyt = tl.load(DY + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None], mask=n_in[:, None] & m_in[None, :],
                      other=0.0)
        x = im2col_tile(X, corner, ih0, iw0, m_in, offset, dh, dw, k_in, H, W)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)

    store_block_norms(acc, OUT, pid_n, pid_k, N, n_block_cols, BS, TILE_N, TILE_K)


_tuned_wgrad = {aligned: TunedKernels(_bsr_conv2d_wgrad_kernel, configs, key=["CHUNK", "nnz", "N", "K"])
                for aligned, configs in ((True, sddmm_configs), (False, conv_wgrad_gather_configs))}
_tuned_scores = TunedKernels(_conv_grad_scores_kernel, grad_scores_configs, key=["M_BUCKET", "N", "K"])


def _check_pair(dy: torch.Tensor, x: torch.Tensor, block_size: int) -> None:
    check(block_size in BLOCK_SIZES, f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    check_image("dy", dy)
    check_image("x", x, like=dy)
    check(dy.shape[0] == x.shape[0], f"dy has batch {dy.shape[0]} but x has {x.shape[0]}")


def bsr_conv2d_wgrad(dy: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                     coo_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor,
                     block_size: int, kernel_size: List[int], stride: List[int], padding: List[int],
                     dilation: List[int]) -> torch.Tensor:
    """dW[i] = (dYᵀ im2col(X)) at block (coo_row[i], col_idx[i]) for every stored block: [nnz, bs, bs], zero where
    a block reaches past N or K. dy [B, OH, OW, N], x [B, H, W, C] NHWC. fp32 accumulation (split-M partials in
    fp32); output in the input dtype."""
    _check_pair(dy, x, block_size)
    kh, kw, sh, sw, pt, pl, dh, dw = conv_geometry(kernel_size, stride, padding, dilation)
    batch, height, width, channels = x.shape
    _, out_h, out_w, n_features = dy.shape
    k_features = kh * kw * channels
    nnz = col_idx.numel()
    check_index((("col_idx", col_idx), ("coo_row", coo_row)), dy.device, nnz)
    check_filter_layout(row_ptr, col_ptr, n_features, k_features, block_size)

    bs = block_size
    out = torch.empty(nnz, bs, bs, dtype=dy.dtype, device=dy.device)
    m = batch * out_h * out_w
    if nnz == 0:
        return out
    if m == 0 or x.numel() == 0:
        return out.zero_()
    dy, x = dy.contiguous(), x.contiguous()
    splits, chunk = sddmm_splits(m, nnz, dy.device)
    target = out if splits == 1 else torch.empty(splits, nnz, bs, bs, dtype=torch.float32, device=dy.device)
    aligned = channels % bs == 0
    if not (tma_enabled() and launch_conv2d_wgrad(dy, x, coo_row, col_idx, target, kh, kw, sh, sw, pt, pl, dh, dw)):
        kernel = _tuned_wgrad[aligned](bs, dy.dtype, dy.device)
        kernel[(nnz, splits)](dy, x, coo_row, col_idx, target,
                              m, n_features, k_features, height, width, channels, out_h, out_w, kw, sh, sw, pt, pl,
                              dh, dw, nnz, chunk,
                              CIN_ALIGNED=aligned, BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    if splits > 1:
        out.copy_(target.sum(dim=0))  # fixed-order fp32 reduction of the partials, then one rounding
    return out


def bsr_conv2d_grad_scores(dy: torch.Tensor, x: torch.Tensor, block_size: int, kernel_size: List[int],
                           stride: List[int], padding: List[int], dilation: List[int]) -> torch.Tensor:
    """S[r, c] = ‖(dYᵀ im2col(X))[r*bs : +bs, c*bs : +bs]‖_F for every block of the dense filter gradient
    [N, kh*kw*C]: [ceil(N/bs), ceil(K/bs)] in fp32 (fp32 accumulation). float64 inputs are refused with a
    TypeError (use the reference or CPU backend)."""
    _check_pair(dy, x, block_size)
    kh, kw, sh, sw, pt, pl, dh, dw = conv_geometry(kernel_size, stride, padding, dilation)
    batch, height, width, channels = x.shape
    _, out_h, out_w, n_features = dy.shape
    k_features = kh * kw * channels
    bs = block_size
    n_block_cols = cdiv(k_features, bs)
    out = torch.empty(cdiv(n_features, bs), n_block_cols, dtype=torch.float32, device=dy.device)
    m = batch * out_h * out_w
    if out.numel() == 0:
        return out
    if m == 0 or x.numel() == 0:
        return out.zero_()
    dy, x = dy.contiguous(), x.contiguous()
    kernel = _tuned_scores(bs, dy.dtype, dy.device)
    grid = lambda meta: (triton.cdiv(n_features, meta["TILE_N"]), triton.cdiv(k_features, meta["TILE_K"]))
    kernel[grid](dy, x, out, m, n_features, k_features, height, width, channels, out_h, out_w, kw, sh, sw, pt, pl,
                 dh, dw, n_block_cols, m_bucket(m),
                 BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return out
