"""bsr_linear and bsr_linear_dx for Hopper: tensor-memory-accelerator (TMA) loads, persistent programs.

The same two GEMMs as ``linear.py`` and ``linear_dx.py`` (same block-CSR walk, same fp32 accumulation), with the
tiles moved by TMA instead of per-thread loads: a block-sparse gather along K is one TMA box at a block-aligned
coordinate of the dense operand ([BLOCK_M, bs] at (m0, c*bs)), and a stored block is one [bs, bs] box of the
values seen as a [nnz*bs, bs] matrix. TMA fills what lies past M, N or K with zeros and clips the stores, so
the kernels need no masks. Programs are persistent (one per multiprocessor), walking the output tiles in the
pointer kernels' order (block-row fastest, so that neighbouring programs share the dense operand's panel in L2).

**Not yet run on a GPU**: the launchers in linear.py and linear_dx.py call these only under
SPARSEKERN_TRITON_TMA=1 (``_tma.tma_enabled``), after their own checks, and run the pointer kernels where TMA cannot
take the operands: 16-byte aligned base addresses and row strides (a multiple of 8 features in 16-bit types, 4 in
fp32); ``_tma.tma_unsupported`` says why a call does not qualify. Tested in the interpreter, compiled ahead of time
for sm_90 (tests/test_triton_static.py checks for TMA loads and wgmma), measured as the suites' ``triton-tma`` rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TunedKernels, dot_precision, gemm_configs, m_bucket
from ._tma import box_hook, descriptor, persistent_grid, tma_unsupported, with_hook


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


def launch_linear(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                  bias: Optional[torch.Tensor], y: torch.Tensor) -> bool:
    """Y = X Wᵀ (+ b) into ``y`` through TMA, for bsr_linear's launcher after its checks; False, launching nothing,
    where TMA cannot take the operands (``tma_unsupported``)."""
    bs = values.shape[-1]
    if tma_unsupported(x, y, values.view(-1, bs)):
        return False
    (m, k_features), out_features = x.shape, y.shape[1]
    n_block_rows = row_ptr.numel() - 1
    kernel = _tuned_linear(bs, x.dtype, x.device)
    # 64 rows is a placeholder: the chosen config's pre-hook sets the activation boxes' rows.
    kernel[persistent_grid(lambda meta: n_block_rows * triton.cdiv(m, meta["BLOCK_M"]), x.device)](
        descriptor(x, [64, bs]), descriptor(values.view(-1, bs), [bs, bs]), row_ptr, col_idx,
        bias if bias is not None else y, descriptor(y, [64, bs]), m, out_features, k_features, n_block_rows,
        m_bucket(m), HAS_BIAS=bias is not None, BS=bs, INPUT_PRECISION=dot_precision(x.dtype))
    return True


def launch_linear_dx(dy: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor,
                     perm: torch.Tensor, dx: torch.Tensor) -> bool:
    """dX = dY W into ``dx`` through TMA, for bsr_linear_dx's launcher after its checks; False, launching nothing,
    where TMA cannot take the operands."""
    bs = values.shape[-1]
    if tma_unsupported(dy, dx, values.view(-1, bs)):
        return False
    m = dy.shape[0]
    n_block_cols = col_ptr.numel() - 1
    kernel = _tuned_dx(bs, dy.dtype, dy.device)
    kernel[persistent_grid(lambda meta: n_block_cols * triton.cdiv(m, meta["BLOCK_M"]), dy.device)](
        descriptor(dy, [64, bs]), descriptor(values.view(-1, bs), [bs, bs]), col_ptr, row_idx, perm,
        descriptor(dx, [64, bs]), m, dy.shape[1], n_block_cols, m_bucket(m),
        BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return True
