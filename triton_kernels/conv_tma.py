"""bsr_conv2d, its dgrad and its wgrad for Hopper: implicit GEMMs with the image's tiles moved by TMA.

For a stride-1 convolution, the im2col tile of a TILE_H x TILE_W patch of output pixels at one filter tap is the
image's patch shifted by that tap: one 4-D TMA box [1, TILE_H, TILE_W, bs] of the NHWC image at
(b, oh0 - pad_top + kh*dh, ow0 - pad_left + kw*dw, channel block), which the tensor-memory accelerator fills with
zeros wherever it lies outside the image (the padding), and whose rows are the MMA's M side. So the kernel does no
per-pixel address arithmetic and needs no masks, which in the pointer kernel (conv.py) cost the registers that
capped its tiles. One persistent program per multiprocessor walks (output patch, block-row r of W) pairs, block-row
fastest, and for each the stored blocks of row r, as bsr_linear does; the output patch is stored by TMA, clipped at
the image's edges.

The input gradient (dgrad) is the same walk over dY: a program owns a patch of dX pixels and one chunk of bs input
channels, and sums, over every stored block whose columns are that chunk (at any tap), dY's patch shifted back by
the block's tap times the block. Those blocks lie in kh*kw block-columns of the transposed index, about one block
each at 90% (256 channels, block 32), so the launcher lists them chunk by chunk (a stable sort of the blocks: one
flat, pipelined loop per program instead of kh*kw short ones).

A strided convolution reads every stride-th pixel, which is no box of the image, but is one of its phase view
[B, H/sh, sh, W/sw, sw*C] (a free view of the contiguous NHWC image when H and W are multiples of the stride): the
pixels a tap reads for a patch of output pixels are one phase's TILE_H x TILE_W patch (``tap_shift``). The forward
and wgrad read the image that way. The dgrad writes dX that way: a program owns a patch of one phase's pixels, which
each tap reaches from one shifted patch of dY or not at all (``phase_chunk_blocks`` lists each phase's blocks).

The filter gradient (wgrad) reduces dY[patch, n-block]ᵀ im2col[patch, k-block] over the output patches for each
stored block, as bsr_sddmm does over rows: dY's patch and the image's shifted patch are both TMA boxes (dY's rows
past the output's edge come in as zeros, so they add nothing), split over the patches into chunks whose fp32
partials are summed in a fixed order.

Applies with in_channels a multiple of the block and 16-byte aligned channel rows (in_channels and out_channels
multiples of 8 in 16-bit types, 4 in fp32), any padding and dilation, and any stride that divides the image's height
and width; elsewhere the pointer kernels run. **Not yet run on a GPU**: the launchers in conv.py, conv_dgrad.py and
conv_wgrad.py call these only under SPARSEKERN_TRITON_TMA=1, after their own checks.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TunedKernels, _fit, dot_precision, geometry_jit, m_bucket
from ._tma import box_hook, descriptor, persistent_grid, tma_unsupported, with_hook


@triton.jit
def tap_shift(offset, stride):
    """A tap's offset from an output pixel's window corner, ``offset`` = k*dilation - padding, as (q, p) with offset =
    q*stride + p and 0 <= p < stride: input pixel oh*stride + offset is row q + oh of phase p of the image viewed as
    [B, H/stride, stride, W/stride, stride*C] (p = 0, q = offset for stride 1)."""
    p = ((offset % stride) + stride) % stride  # % truncates toward zero: a negative offset gives a negative rest
    return (offset - p) // stride, p


@geometry_jit
def _bsr_conv2d_tma_kernel(X_DESC, W_DESC, ROW_PTR, COL_IDX, BIAS, Y_DESC,
                           M, N, K, C, OH, OW, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, n_block_rows,
                           M_BUCKET,
                           HAS_BIAS: tl.constexpr, BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                           TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    # M (= B*OH*OW, through M_BUCKET) and K are read only by the autotune key.
    tiles_w = tl.cdiv(OW, TILE_W)
    patches = (M // (OH * OW)) * tl.cdiv(OH, TILE_H) * tiles_w
    blocks_per_tap = C // BS
    offs_b = tl.arange(0, BS)
    for tile in range(tl.program_id(0), patches * n_block_rows, tl.num_programs(0)):
        r = tile % n_block_rows
        patch = tile // n_block_rows
        ow0 = (patch % tiles_w) * TILE_W
        rest = patch // tiles_w
        oh0 = (rest % tl.cdiv(OH, TILE_H)) * TILE_H
        b = rest // tl.cdiv(OH, TILE_H)
        start = tl.load(ROW_PTR + r)
        end = tl.load(ROW_PTR + r + 1)
        acc = tl.zeros((TILE_H * TILE_W, BS), dtype=tl.float32)
        # The next block's column one iteration ahead, as in linear.py, so the TMA loads stay pipelinable.
        c_next = tl.load(COL_IDX + start, mask=start < end, other=0)
        for j in range(start, end):
            c = c_next
            c_next = tl.load(COL_IDX + j + 1, mask=j + 1 < end, other=0)
            tap = c // blocks_per_tap
            q_h, p_h = tap_shift((tap // KW) * dil_h - pad_top, stride_h)
            q_w, p_w = tap_shift((tap % KW) * dil_w - pad_left, stride_w)
            x = X_DESC.load([b, oh0 + q_h, p_h, ow0 + q_w, p_w * C + (c % blocks_per_tap) * BS])
            x = x.reshape(TILE_H * TILE_W, BS)
            w = W_DESC.load([j * BS, 0])  # values[j] as [n, k]: its transpose is the MMA's K-major B operand
            acc = tl.dot(x, w.T, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            n = r * BS + offs_b
            acc += tl.load(BIAS + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        Y_DESC.store([b, oh0, ow0, r * BS], acc.reshape(1, TILE_H, TILE_W, BS).to(Y_DESC.dtype))


@geometry_jit
def _bsr_conv2d_dgrad_tma_kernel(DY_DESC, W_DESC, LIST_PTR, ORDER, ROWS, TAPS, DX_DESC,
                                 B, HP, WP, N, C, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, M_BUCKET,
                                 BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                                 TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    # N (and M through M_BUCKET) are read only by the autotune key. dX is written through its stride-phase view
    # [B, HP, sh, WP, sw*C]: a program owns a patch of one phase's pixels and one chunk of channels.
    n_chunks = C // BS
    tiles_w = tl.cdiv(WP, TILE_W)
    tiles_h = tl.cdiv(HP, TILE_H)
    per_phase = B * tiles_h * tiles_w * n_chunks
    for tile in range(tl.program_id(0), per_phase * stride_h * stride_w, tl.num_programs(0)):
        chunk = tile % n_chunks
        rest = tile // n_chunks
        j0 = (rest % tiles_w) * TILE_W
        rest = rest // tiles_w
        i0 = (rest % tiles_h) * TILE_H
        rest = rest // tiles_h
        b = rest % B
        phase = rest // B
        ph = phase // stride_w
        pw = phase % stride_w
        start = tl.load(LIST_PTR + phase * n_chunks + chunk)
        end = tl.load(LIST_PTR + phase * n_chunks + chunk + 1)
        acc = tl.zeros((TILE_H * TILE_W, BS), dtype=tl.float32)
        # The next block's (value index, block-row, tap) one iteration ahead, so the TMA loads stay pipelinable.
        j_next = tl.load(ORDER + start, mask=start < end, other=0)
        r_next = tl.load(ROWS + start, mask=start < end, other=0)
        t_next = tl.load(TAPS + start, mask=start < end, other=0)
        for q in range(start, end):
            j = j_next
            r = r_next
            tap = t_next
            j_next = tl.load(ORDER + q + 1, mask=q + 1 < end, other=0)
            r_next = tl.load(ROWS + q + 1, mask=q + 1 < end, other=0)
            t_next = tl.load(TAPS + q + 1, mask=q + 1 < end, other=0)
            # dX[ih = i*sh + ph] gathers dY[oh = (ih + pad - tap offset) / sh], a whole row for the taps listed for
            # this phase (the division is exact); rows outside dY come in as zeros.
            oh = i0 + (ph + pad_top - (tap // KW) * dil_h) // stride_h
            ow = j0 + (pw + pad_left - (tap % KW) * dil_w) // stride_w
            dy = DY_DESC.load([b, oh, ow, r * BS]).reshape(TILE_H * TILE_W, BS)
            w = W_DESC.load([j * BS, 0])  # values[j] as [n, c]: already this MMA's [K, N] operand
            acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
        DX_DESC.store([b, i0, ph, j0, pw * C + chunk * BS],
                      acc.reshape(1, TILE_H, 1, TILE_W, BS).to(DX_DESC.dtype))


@geometry_jit
def _bsr_conv2d_wgrad_tma_kernel(DY_DESC, X_DESC, COO_ROW, COL_IDX, OUT_DESC,
                                 B, N, K, C, OH, OW, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, nnz,
                                 M_BUCKET,
                                 BS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                                 TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    # N and K are read only by the autotune key. The launcher fixes the number of splits (it sizes the partials'
    # buffer); each config cuts its own patches into that many chunks.
    i = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.load(COO_ROW + i)
    c = tl.load(COL_IDX + i)
    blocks_per_tap = C // BS
    tap = c // blocks_per_tap
    q_h, p_h = tap_shift((tap // KW) * dil_h - pad_top, stride_h)
    q_w, p_w = tap_shift((tap % KW) * dil_w - pad_left, stride_w)
    channel = p_w * C + (c % blocks_per_tap) * BS
    tiles_w = tl.cdiv(OW, TILE_W)
    tiles_h = tl.cdiv(OH, TILE_H)
    n_patches = B * tiles_h * tiles_w
    chunk = tl.cdiv(n_patches, tl.num_programs(1))
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for patch in range(split * chunk, tl.minimum(split * chunk + chunk, n_patches)):
        ow0 = (patch % tiles_w) * TILE_W
        rest = patch // tiles_w
        oh0 = (rest % tiles_h) * TILE_H
        b = rest // tiles_h
        dy = DY_DESC.load([b, oh0, ow0, r * BS]).reshape(TILE_H * TILE_W, BS)
        x = X_DESC.load([b, oh0 + q_h, p_h, ow0 + q_w, channel]).reshape(TILE_H * TILE_W, BS)
        acc = tl.dot(dy.T, x, acc, input_precision=INPUT_PRECISION)
    OUT_DESC.store([(split * nnz + i) * BS, 0], acc.to(OUT_DESC.dtype))


# The image's box in its phase view [B, H/sh, sh, W/sw, sw*C]: TILE_H x TILE_W pixels of one phase.
PHASE_PATCH = (None, "TILE_H", None, "TILE_W", None)


def conv_tma_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """The forward's and dgrad's: output patches of 64-256 pixels (the MMA's M side), 8 or 16 wide so that a patch
    row fills the TMA box's swizzle; stages fitted beside the output patch that the TMA store stages in shared
    memory."""
    if interpret:
        configs = [triton.Config({"TILE_H": 8, "TILE_W": 8}, num_warps=4, num_stages=1)]
    else:
        bs = block_size
        if bs <= 32:
            candidates = [({"TILE_H": 16, "TILE_W": 8}, 4, 4), ({"TILE_H": 8, "TILE_W": 16}, 4, 4),
                          ({"TILE_H": 8, "TILE_W": 8}, 4, 6), ({"TILE_H": 16, "TILE_W": 16}, 8, 4)]
        elif bs == 64:
            candidates = [({"TILE_H": 16, "TILE_W": 8}, 4, 4), ({"TILE_H": 8, "TILE_W": 8}, 4, 4),
                          ({"TILE_H": 16, "TILE_W": 16}, 8, 3)]
        else:  # a 128-wide fp32 accumulator needs two warpgroups (dgrad in fp32 spills on one)
            candidates = [({"TILE_H": 16, "TILE_W": 8}, 8, 3), ({"TILE_H": 8, "TILE_W": 8}, 8, 4)]
        pixels = lambda meta: meta["TILE_H"] * meta["TILE_W"]
        configs = _fit(candidates, lambda meta: (pixels(meta) + bs) * bs * elem_bytes, budget,
                       lambda meta: pixels(meta) * bs * elem_bytes)
    patch = (None, "TILE_H", "TILE_W", None)
    return with_hook(configs, box_hook({"X_DESC": PHASE_PATCH, "Y_DESC": patch, "DY_DESC": patch,
                                        "DX_DESC": PHASE_PATCH}))


def conv_wgrad_tma_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """Patches of 64 or 128 pixels per reduction step (the MMA's K side); 8 warps for the 128 x 128 accumulator;
    stages fitted beside the [bs, bs] fp32 block that the TMA store stages in shared memory."""
    if interpret:
        configs = [triton.Config({"TILE_H": 8, "TILE_W": 8}, num_warps=4, num_stages=1)]
    else:
        warps = 8 if block_size == 128 else 4
        candidates = [({"TILE_H": 16, "TILE_W": 8}, warps, 4), ({"TILE_H": 8, "TILE_W": 8}, warps, 4),
                      ({"TILE_H": 8, "TILE_W": 16}, warps, 4)]
        configs = _fit(candidates, lambda meta: 2 * meta["TILE_H"] * meta["TILE_W"] * block_size * elem_bytes,
                       budget, lambda meta: block_size * block_size * 4)
    return with_hook(configs, box_hook({"DY_DESC": (None, "TILE_H", "TILE_W", None), "X_DESC": PHASE_PATCH}))


_tuned = TunedKernels(_bsr_conv2d_tma_kernel, conv_tma_configs, key=["M_BUCKET", "N", "K", "OW"])
_tuned_dgrad = TunedKernels(_bsr_conv2d_dgrad_tma_kernel, conv_tma_configs, key=["M_BUCKET", "N", "C", "WP"])
_tuned_wgrad = TunedKernels(_bsr_conv2d_wgrad_tma_kernel, conv_wgrad_tma_configs,
                            key=["M_BUCKET", "nnz", "N", "K", "OW"])


def _phase_view(image: torch.Tensor, sh: int, sw: int, bs: int, *others: torch.Tensor) -> Optional[torch.Tensor]:
    """The contiguous NHWC image (x, or dX) as [B, H/sh, sh, W/sw, sw*C], its pixels split by stride phase, so that
    the pixels one tap reads (or writes) for a patch of output pixels are one box. None where the TMA convolutions
    cannot take the call: H or W not a multiple of the stride, C not a multiple of the block, or the image or the
    ``others`` (2-D views of the other operands) not TMA operands."""
    batch, height, width, channels = image.shape
    if height % sh or width % sw or channels % bs or tma_unsupported(image.view(-1, channels), *others):
        return None
    return image.view(batch, height // sh, sh, width // sw, sw * channels)


def launch_conv2d(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                  bias: Optional[torch.Tensor], y: torch.Tensor, kh: int, kw: int, sh: int, sw: int, pt: int, pl: int,
                  dh: int, dw: int) -> bool:
    """The forward into ``y`` [B, OH, OW, N] through TMA and persistent programs, for bsr_conv2d's launcher after its
    checks; False, launching nothing, where TMA cannot take the call."""
    bs, (batch, _, _, channels), (_, out_h, out_w, out_channels) = values.shape[-1], x.shape, y.shape
    phases = _phase_view(x, sh, sw, bs, y.view(-1, out_channels), values.view(-1, bs))
    if phases is None:
        return False
    n_block_rows = row_ptr.numel() - 1
    m = batch * out_h * out_w
    kernel = _tuned(bs, x.dtype, x.device)
    patches = lambda meta: batch * triton.cdiv(out_h, meta["TILE_H"]) * triton.cdiv(out_w, meta["TILE_W"])
    # 8 x 8 patches are placeholders: the chosen config's pre-hook sets the boxes.
    kernel[persistent_grid(lambda meta: patches(meta) * n_block_rows, x.device)](
        descriptor(phases, [1, 8, 1, 8, bs]), descriptor(values.view(-1, bs), [bs, bs]), row_ptr, col_idx,
        bias if bias is not None else y, descriptor(y, [1, 8, 8, bs]), m, out_channels, kh * kw * channels,
        channels, out_h, out_w, kw, sh, sw, pt, pl, dh, dw, n_block_rows, m_bucket(m),
        HAS_BIAS=bias is not None, BS=bs, INPUT_PRECISION=dot_precision(x.dtype))
    return True


def phase_chunk_blocks(col_idx: torch.Tensor, coo_row: torch.Tensor, n_chunks: int, kw: int, sh: int, sw: int,
                       pt: int, pl: int, dh: int, dw: int) -> tuple:
    """The stored blocks grouped by (stride phase of the dX pixels they reach, chunk of input channels they cover):
    block-column c is tap c // n_chunks (kh, kw) and chunk c % n_chunks, and a tap reaches exactly the dX pixels of
    phase (kh*dh - pt mod sh, kw*dw - pl mod sw). Returns (list_ptr [sh*sw*n_chunks + 1], value indices, block-rows,
    taps), int32, in the layout's order within a group (one flat loop per program; at stride 1 one phase)."""
    tap = torch.div(col_idx, n_chunks, rounding_mode="floor")
    ph = torch.remainder(torch.div(tap, kw, rounding_mode="floor") * dh - pt, sh)
    pw = torch.remainder(torch.remainder(tap, kw) * dw - pl, sw)
    group = (ph * sw + pw) * n_chunks + torch.remainder(col_idx, n_chunks)
    order = torch.argsort(group, stable=True)
    list_ptr = torch.zeros(sh * sw * n_chunks + 1, dtype=torch.int32, device=col_idx.device)
    list_ptr[1:] = torch.cumsum(torch.bincount(group, minlength=sh * sw * n_chunks), 0)
    return list_ptr, order.to(torch.int32), coo_row[order].contiguous(), tap[order].to(torch.int32)


def launch_conv2d_dgrad(dy: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, coo_row: torch.Tensor,
                        dx: torch.Tensor, kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, dh: int,
                        dw: int) -> bool:
    """dX into ``dx`` [B, H, W, C] through TMA and persistent programs, for bsr_conv2d_dgrad's launcher after its
    checks; False, launching nothing, where TMA cannot take the call."""
    bs, (_, _, _, n_features), (batch, height, width, in_channels) = values.shape[-1], dy.shape, dx.shape
    phases = _phase_view(dx, sh, sw, bs, dy.view(-1, n_features), values.view(-1, bs))
    if phases is None:
        return False
    n_chunks = in_channels // bs
    list_ptr, order, rows, taps = phase_chunk_blocks(col_idx, coo_row, n_chunks, kw, sh, sw, pt, pl, dh, dw)
    hp, wp = height // sh, width // sw
    kernel = _tuned_dgrad(bs, dy.dtype, dy.device)
    patches = lambda meta: sh * sw * batch * triton.cdiv(hp, meta["TILE_H"]) * triton.cdiv(wp, meta["TILE_W"])
    # 8 x 8 patches are placeholders: the chosen config's pre-hook sets the boxes.
    kernel[persistent_grid(lambda meta: patches(meta) * n_chunks, dy.device)](
        descriptor(dy, [1, 8, 8, bs]), descriptor(values.view(-1, bs), [bs, bs]), list_ptr, order, rows, taps,
        descriptor(phases, [1, 8, 1, 8, bs]), batch, hp, wp, n_features, in_channels, kw, sh, sw, pt, pl, dh, dw,
        m_bucket(batch * height * width), BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return True


def launch_conv2d_wgrad(dy: torch.Tensor, x: torch.Tensor, coo_row: torch.Tensor, col_idx: torch.Tensor,
                        target: torch.Tensor, kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, dh: int,
                        dw: int) -> bool:
    """dW at the stored blocks into ``target`` ([splits, nnz, bs, bs] fp32 partials, or [nnz, bs, bs] with one split)
    through TMA, for bsr_conv2d_wgrad's launcher after its checks and split; False, launching nothing, where TMA
    cannot take the call."""
    (batch, _, _, channels), (_, out_h, out_w, n_features) = x.shape, dy.shape
    nnz, bs = col_idx.numel(), target.shape[-1]
    flat_target = target.view(-1, bs)
    phases = _phase_view(x, sh, sw, bs, dy.view(-1, n_features), flat_target)
    if phases is None:
        return False
    kernel = _tuned_wgrad(bs, dy.dtype, dy.device)
    # 8 x 8 patches are placeholders: the chosen config's pre-hook sets the boxes.
    kernel[(nnz, flat_target.shape[0] // (nnz * bs))](
        descriptor(dy, [1, 8, 8, bs]), descriptor(phases, [1, 8, 1, 8, bs]), coo_row, col_idx,
        descriptor(flat_target, [bs, bs]), batch, n_features, kh * kw * channels, channels, out_h, out_w, kw, sh, sw,
        pt, pl, dh, dw, nnz,
        m_bucket(batch * out_h * out_w), BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return True
