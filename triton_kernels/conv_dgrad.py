"""bsr_conv2d_dgrad: dX of the block-sparse convolution, gathered through the transposed index (no atomics).

dX[b, ih, iw, c] = sum over taps (kh, kw) and out channels n of dY[b, oh, ow, n] W[n, (kh, kw, c)], where
(oh, ow) is the output pixel that read (ih, iw) through that tap: oh = (ih + pad_top - kh*dh) / sh when that
is a whole number in [0, OH) (same for ow). Each program owns a tile of input pixels x bs input channels and
sums over the taps and, per tap, over the stored blocks of the K-block-column(s) holding (tap, its channels),
walked through ``col_ptr``/``row_idx``/``perm`` like bsr_linear_dx. Every dX element is written by exactly one
program, so there are no atomics and the result is deterministic.

Strided convolutions: whether a tap reaches an input pixel depends only on the pixel's phase
(ih mod sh, iw mod sw), so the pixels are tiled per phase and a program skips the taps its phase never uses
(a 3x3 stride-2 conv has 9 taps but each phase uses 1, 2 or 4 of them; a 1x1 stride-2 conv gives three phases
of plain zeros) instead of spending MMAs on masked-out rows.

Per tap, the program's bs channels are K-columns [tap*C + chunk*bs, +bs): one block-column when C is a multiple
of bs, else up to two (a block may straddle taps), each read at the matching shift inside its blocks.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import (TunedKernels, cdiv, check, check_index, check_values, conv_configs, conv_gather_configs,
                      dot_precision, geometry_jit, m_bucket)
from ._tma import tma_enabled
from .conv import check_filter_layout, check_image, conv_geometry
from .conv_tma import launch_conv2d_dgrad


@geometry_jit
def _bsr_conv2d_dgrad_kernel(DY, VALUES, COL_PTR, ROW_IDX, PERM, DX,
                             B, H, W, C, OH, OW, N, KW, n_taps, stride_h, stride_w, pad_top, pad_left,
                             dil_h, dil_w, HP, WP, n_chunks, M_BUCKET,
                             CIN_ALIGNED: tl.constexpr, BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr):
    # Channel chunk fastest (neighbours gather the same dY rows), then pixel tile, then phase.
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    rest = pid // n_chunks
    tiles_per_phase = tl.cdiv(B * HP * WP, BLOCK_M)
    tile = rest % tiles_per_phase
    phase = rest // tiles_per_phase
    phase_h = phase // stride_w
    phase_w = phase % stride_w

    # Input pixels of this phase: (b, i, j) -> (ih, iw) = (i*sh + phase_h, j*sw + phase_w).
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    j = offs_m % WP
    rest_m = offs_m // WP
    i = rest_m % HP
    b = rest_m // HP
    ih = i * stride_h + phase_h
    iw = j * stride_w + phase_w
    pixel_in = (b < B) & (ih < H) & (iw < W)
    # dY row (b, i, j); the tap adds a whole-pixel shift below.
    dy_corner = ((b.to(tl.int64) * OH + i) * OW + j) * N

    offs_b = tl.arange(0, BS)
    ci = chunk * BS + offs_b
    ci_in = ci < C
    acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
    for tap in range(0, n_taps):
        shift_h = phase_h + pad_top - (tap // KW) * dil_h
        shift_w = phase_w + pad_left - (tap % KW) * dil_w
        if (shift_h % stride_h == 0) & (shift_w % stride_w == 0):
            # oh = i + shift_h / sh exactly (the division is exact, so its rounding direction does not matter).
            oh_shift = shift_h // stride_h
            ow_shift = shift_w // stride_w
            oh = i + oh_shift
            ow = j + ow_shift
            row_in = pixel_in & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
            dy_rows = DY + dy_corner + (oh_shift * OW + ow_shift) * N
            k_first = tap * C + chunk * BS
            c_first = k_first // BS
            if CIN_ALIGNED:
                c_last = c_first
            else:
                c_last = (tap * C + tl.minimum(chunk * BS + BS, C) - 1) // BS
            for c in range(c_first, c_last + 1):
                # Column of each of our channels inside block-column c (out of [0, bs): another column's).
                if CIN_ALIGNED:
                    w_col = offs_b
                    w_col_in = offs_b < BS
                else:
                    w_col = k_first - c * BS + offs_b
                    w_col_in = ci_in & (w_col >= 0) & (w_col < BS)
                start = tl.load(COL_PTR + c).to(tl.int64)
                end = tl.load(COL_PTR + c + 1).to(tl.int64)
                # Index of the next block fetched one iteration ahead (see linear.py).
                r_next = tl.load(ROW_IDX + start, mask=start < end, other=0)
                v_next = tl.load(PERM + start, mask=start < end, other=0).to(tl.int64)
                for q in range(start, end):
                    r = r_next
                    v = v_next
                    r_next = tl.load(ROW_IDX + q + 1, mask=q + 1 < end, other=0)
                    v_next = tl.load(PERM + q + 1, mask=q + 1 < end, other=0).to(tl.int64)
                    n = r * BS + offs_b
                    n_in = n < N
                    dy = tl.load(dy_rows[:, None] + n[None, :], mask=row_in[:, None] & n_in[None, :], other=0.0)
                    w = tl.load(VALUES + v * (BS * BS) + offs_b[:, None] * BS + w_col[None, :],
                                mask=n_in[:, None] & w_col_in[None, :], other=0.0)
                    acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)

    dx_ptrs = DX + (((b.to(tl.int64) * H + ih) * W + iw) * C)[:, None] + ci[None, :]
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=pixel_in[:, None] & ci_in[None, :])


_tuned = {aligned: TunedKernels(_bsr_conv2d_dgrad_kernel, configs, key=["M_BUCKET", "N", "C", "n_taps"])
          for aligned, configs in ((True, conv_configs), (False, conv_gather_configs))}


def bsr_conv2d_dgrad(dy: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                     coo_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor,
                     in_channels: int, input_size: List[int], kernel_size: List[int], stride: List[int],
                     padding: List[int], dilation: List[int]) -> torch.Tensor:
    """dX [B, H, W, C = in_channels] of Y = conv(X, W) given dY [B, OH, OW, N], NHWC, W read block-column by
    block-column through the transposed index (col_ptr, row_idx, perm). fp32 accumulation; output in the input
    dtype."""
    check_image("dy", dy)
    bs = check_values(values, dy)
    kh, kw, sh, sw, pt, pl, dh, dw = conv_geometry(kernel_size, stride, padding, dilation)
    check(len(input_size) == 2 and min(input_size) >= 0, f"input_size must be two sizes, got {list(input_size)}")
    batch, out_h, out_w, n_features = dy.shape
    height, width = (int(v) for v in input_size)
    check_index((("col_ptr", col_ptr), ("row_idx", row_idx), ("perm", perm)), dy.device, values.shape[0])
    check_filter_layout(row_ptr, col_ptr, n_features, kh * kw * in_channels, bs)

    dx = torch.empty(batch, height, width, in_channels, dtype=dy.dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    if values.shape[0] == 0 or dy.numel() == 0:
        return dx.zero_()
    dy, values = dy.contiguous(), values.contiguous()
    if tma_enabled():
        # The TMA kernel lists the blocks from the block-CSR index, which the pointer kernel does not read.
        check_index((("col_idx", col_idx), ("coo_row", coo_row)), dy.device, values.shape[0])
        if launch_conv2d_dgrad(dy, values, col_idx, coo_row, dx, kh, kw, sh, sw, pt, pl, dh, dw):
            return dx
    hp, wp = cdiv(height, sh), cdiv(width, sw)  # pixels per phase, at most
    pixels = batch * hp * wp
    n_chunks = cdiv(in_channels, bs)
    aligned = in_channels % bs == 0
    kernel = _tuned[aligned](bs, dy.dtype, dy.device)
    grid = lambda meta: (n_chunks * triton.cdiv(pixels, meta["BLOCK_M"]) * sh * sw,)
    kernel[grid](dy, values, col_ptr, row_idx, perm, dx,
                 batch, height, width, in_channels, out_h, out_w, n_features, kw, kh * kw, sh, sw, pt, pl, dh, dw,
                 hp, wp, n_chunks, m_bucket(pixels),
                 CIN_ALIGNED=aligned, BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return dx
