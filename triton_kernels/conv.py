"""bsr_conv2d: implicit-GEMM convolution of an NHWC image with a block-sparse filter, the forward pass.

The filter is the matrix W [N = out_channels, K = kh*kw*C] with K ordered (kh, kw, c) (design §2), and the
convolution is Y = im2col(X) Wᵀ (+ b) with the im2col matrix never built: row m of it is output pixel
(b, oh, ow), column k is filter tap (kh, kw) at input channel c, and its entry is
X[b, oh*sh - pad_top + kh*dh, ow*sw - pad_left + kw*dw, c], zero outside the image. The address splits into a
row part (the window's corner, per output pixel) plus a column part (the tap's offset, per k), so one tile of
im2col is a gather with a 2-D mask and no index tensor.

One program per (M-tile of output pixels, block-row r of W), as bsr_linear: it walks block-row r through
``row_ptr``/``col_idx`` and feeds each stored block's [BLOCK_M, bs] im2col tile and [bs, bs] filter block to
one MMA step. When C is a multiple of bs (every ResNet/VGG layer but the stem) a block is bs consecutive
channels at one tap: the tap is decoded once per block and the tile's rows are contiguous channel runs, so the
loads vectorise. Otherwise (the stem's C = 3, odd widths) a block may straddle taps and each column is decoded.

Also here: the pieces the backward kernels share (``conv_dgrad.py``, ``conv_wgrad.py``) and their checks.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import (TunedKernels, cdiv, check, check_device, check_float, check_index, check_values,
                      conv_configs, conv_gather_configs, dot_precision, geometry_jit, m_bucket)
from ._tma import tma_enabled
from .conv_tma import launch_conv2d


# ----------------------------------------------------------------------------------------------
# Implicit im2col, shared by the forward, wgrad and gradient-score kernels.

@triton.jit
def output_pixels(offs_m, M, OH, OW, H, W, C, stride_h, stride_w, pad_top, pad_left):
    """Rows of im2col: output pixel m = (b, oh, ow) -> (address of its window's corner in X, corner row,
    corner column, m < M). The corner may lie in the padding (negative or past the image)."""
    ow = offs_m % OW
    rest = offs_m // OW
    oh = rest % OH
    b = rest // OH
    ih0 = oh * stride_h - pad_top
    iw0 = ow * stride_w - pad_left
    # 64-bit: B*H*W*C may pass 2**31 elements.
    corner = ((b.to(tl.int64) * H + ih0) * W + iw0) * C
    return corner, ih0, iw0, offs_m < M


@triton.jit
def decode_columns(k, K, C, KW, W, dil_h, dil_w):
    """Columns of im2col, one by one: k = (kh, kw, c) -> (offset from the window's corner, tap row offset
    kh*dh, tap column offset kw*dw, k < K)."""
    c = k % C
    tap = k // C
    dh = (tap // KW) * dil_h
    dw = (tap % KW) * dil_w
    return (dh * W + dw) * C + c, dh, dw, k < K


@triton.jit
def decode_block_columns(c, offs_b, K, C, KW, W, dil_h, dil_w, BS: tl.constexpr, CIN_ALIGNED: tl.constexpr):
    """The columns of block-column c, as decode_columns. With C a multiple of BS the block is BS channels
    at one tap: one scalar decode, and unit-stride offsets with a per-row mask (vectorised loads)."""
    if CIN_ALIGNED:
        blocks_per_tap = C // BS
        tap = c // blocks_per_tap
        dh = (tap // KW) * dil_h
        dw = (tap % KW) * dil_w
        offset = (dh * W + dw) * C + (c % blocks_per_tap) * BS + offs_b
        return offset, tl.full((BS,), dh, tl.int32), tl.full((BS,), dw, tl.int32), offs_b < BS
    else:
        return decode_columns(c * BS + offs_b, K, C, KW, W, dil_h, dil_w)


@triton.jit
def im2col_tile(X, corner, ih0, iw0, m_in, offset, dh, dw, k_in, H, W):
    """im2col[rows, columns] gathered from the NHWC image; zero in the padding and past M or K."""
    ih = ih0[:, None] + dh[None, :]
    iw = iw0[:, None] + dw[None, :]
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    mask = m_in[:, None] & k_in[None, :] & inside
    return tl.load(X + corner[:, None] + offset[None, :], mask=mask, other=0.0)


# ----------------------------------------------------------------------------------------------
# Forward

@geometry_jit
def _bsr_conv2d_kernel(X, VALUES, ROW_PTR, COL_IDX, BIAS, Y,
                       M, N, K, H, W, C, OH, OW, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
                       n_block_rows, M_BUCKET,
                       HAS_BIAS: tl.constexpr, CIN_ALIGNED: tl.constexpr, BS: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    # Block-row fastest: neighbouring programs gather the same im2col rows (they stay in L2).
    pid = tl.program_id(0)
    r = pid % n_block_rows
    m_tile = pid // n_block_rows

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BS)
    corner, ih0, iw0, m_in = output_pixels(offs_m, M, OH, OW, H, W, C, stride_h, stride_w, pad_top, pad_left)
    n = r * BS + offs_b
    n_in = n < N
    wt_offsets = offs_b[None, :] * BS + offs_b[:, None]  # values[j, n, k] read as Wᵀ [k, n] in place

    start = tl.load(ROW_PTR + r).to(tl.int64)
    end = tl.load(ROW_PTR + r + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
    # Next block's column fetched one iteration ahead, so the tile loads stay pipelinable (see linear.py).
    c_next = tl.load(COL_IDX + start, mask=start < end, other=0)
    for j in range(start, end):
        c = c_next
        c_next = tl.load(COL_IDX + j + 1, mask=j + 1 < end, other=0)
        offset, dh, dw, k_in = decode_block_columns(c, offs_b, K, C, KW, W, dil_h, dil_w, BS, CIN_ALIGNED)
        x = im2col_tile(X, corner, ih0, iw0, m_in, offset, dh, dw, k_in, H, W)
        wt = tl.load(VALUES + j * (BS * BS) + wt_offsets, mask=k_in[:, None] & n_in[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


# Keyed by CIN_ALIGNED: the per-column decode ships smaller tiles (see _common.CONV_GATHER_TILE_PER_THREAD).
_tuned = {True: TunedKernels(_bsr_conv2d_kernel, conv_configs, key=["M_BUCKET", "N", "K"]),
          False: TunedKernels(_bsr_conv2d_kernel, conv_gather_configs, key=["M_BUCKET", "N", "K"])}


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the conv launchers

def check_image(name: str, t: torch.Tensor, like: Optional[torch.Tensor] = None) -> None:
    check(t.dim() == 4, f"{name} must be a 4-D NHWC image [batch, height, width, channels], got shape "
                        f"{tuple(t.shape)}")
    check_device(name, t)
    check_float(name, t)
    if like is not None:
        check(t.dtype == like.dtype, f"{name} has dtype {t.dtype} but the other operand has {like.dtype}")
        check(t.device == like.device, f"{name} is on {t.device} but the other operand is on {like.device}")


def conv_geometry(kernel_size, stride, padding, dilation) -> tuple:
    """(kh, kw, sh, sw, pad_top, pad_left, dh, dw) as ints, checked."""
    for name, pair in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding),
                       ("dilation", dilation)):
        check(len(pair) == 2, f"{name} must have 2 entries, got {list(pair)}")
    check(min(kernel_size) > 0 and min(stride) > 0 and min(dilation) > 0,
          f"kernel_size, stride and dilation must be positive, got {list(kernel_size)}, {list(stride)}, "
          f"{list(dilation)}")
    return tuple(int(v) for v in (*kernel_size, *stride, *padding, *dilation))


def check_filter_layout(row_ptr, col_ptr, n_features: int, k_features: int, bs: int) -> None:
    check(row_ptr.numel() - 1 == cdiv(n_features, bs),
          f"row_ptr has {row_ptr.numel() - 1} block-rows but {n_features} output channels need {cdiv(n_features, bs)}")
    check(col_ptr.numel() - 1 == cdiv(k_features, bs),
          f"col_ptr has {col_ptr.numel() - 1} block-columns but kh*kw*in_channels = {k_features} needs "
          f"{cdiv(k_features, bs)}")


def bsr_conv2d(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
               coo_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor, perm: torch.Tensor,
               out_channels: int, bias: Optional[torch.Tensor], kernel_size: List[int], stride: List[int],
               padding: List[int], dilation: List[int], output_size: List[int]) -> torch.Tensor:
    """Y [B, OH, OW, N] = conv(X [B, H, W, C], W) (+ b), NHWC, W [N, kh*kw*C] block-sparse with K ordered
    (kh, kw, c); ``padding`` = (top, left), ``output_size`` fixes the bottom/right. fp32 accumulation, output
    in the input dtype."""
    check_image("x", x)
    bs = check_values(values, x)
    kh, kw, sh, sw, pt, pl, dh, dw = conv_geometry(kernel_size, stride, padding, dilation)
    check(len(output_size) == 2 and min(output_size) > 0, f"output_size must be two positive sizes, got "
                                                          f"{list(output_size)}")
    batch, height, width, channels = x.shape
    out_h, out_w = (int(v) for v in output_size)
    k_features = kh * kw * channels
    check_index((("row_ptr", row_ptr), ("col_idx", col_idx)), x.device, values.shape[0])
    check_filter_layout(row_ptr, col_ptr, out_channels, k_features, bs)
    if bias is not None:
        check(tuple(bias.shape) == (out_channels,), f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
        check(bias.dtype == x.dtype and bias.device == x.device,
              f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")

    y = torch.empty(batch, out_h, out_w, out_channels, dtype=x.dtype, device=x.device)
    m = batch * out_h * out_w
    if y.numel() == 0:
        return y
    if values.shape[0] == 0 or x.numel() == 0:  # density 0 (or no input channels): the bias alone
        return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
    x, values = x.contiguous(), values.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if tma_enabled() and launch_conv2d(x, values, row_ptr, col_idx, bias, y, kh, kw, sh, sw, pt, pl, dh, dw):
        return y
    n_block_rows = row_ptr.numel() - 1
    aligned = channels % bs == 0
    kernel = _tuned[aligned](bs, x.dtype, x.device)
    grid = lambda meta: (n_block_rows * triton.cdiv(m, meta["BLOCK_M"]),)
    kernel[grid](x, values, row_ptr, col_idx, bias if bias is not None else y, y,
                 m, out_channels, k_features, height, width, channels, out_h, out_w, kw, sh, sw, pt, pl, dh, dw,
                 n_block_rows, m_bucket(m),
                 HAS_BIAS=bias is not None, CIN_ALIGNED=aligned, BS=bs,
                 INPUT_PRECISION=dot_precision(x.dtype))
    return y
