"""bsr_sddmm and block_grad_scores for Hopper: the two backward-weight kernels with TMA tile loads.

The same products of dYᵀX as ``sddmm.py`` and ``grad_scores.py`` (fp32 accumulation, the same M split, the same
norms epilogue), with the [BLOCK_M, width] panels of dY and X moved by the tensor-memory accelerator, which fills
rows past M and columns past N or K with zeros (so the padded blocks come out as in the reference, with no masks).
dY's panel is read as stored ([m, n]) and transposed in shared memory for the MMA, as the pointer kernels do.
The scores run persistent programs over the dense gradient's tiles in groups of GROUP_N tile-rows,
so that the programs running together share X's panels in L2.

**Not yet run on a GPU**: sddmm.py and grad_scores.py call these only under SPARSEKERN_TRITON_TMA=1 (see
linear_tma.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TunedKernels, _fit, dot_precision, grad_scores_configs, m_bucket, sddmm_configs
from ._tma import box_hook, descriptor, persistent_grid, tma_unsupported, with_hook
from .grad_scores import store_block_norms

GROUP_N = 8  # tile-rows of the dense gradient per group in the scores' order


@triton.jit
def _bsr_sddmm_tma_kernel(DY_DESC, X_DESC, COO_ROW, COL_IDX, OUT_DESC, M, N, K, nnz, CHUNK,
                          BS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    # N and K are read only by the autotune key.
    i = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.load(COO_ROW + i)
    c = tl.load(COL_IDX + i)
    m_begin = split * CHUNK
    # Chunks are multiples of every BLOCK_M (sddmm.CHUNK_GRANULE), so a panel never crosses into the next chunk;
    # the last one's rows past M come in as zeros.
    m_end = tl.minimum(m_begin + CHUNK, M)
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        dy = DY_DESC.load([m0, r * BS])
        x = X_DESC.load([m0, c * BS])
        acc = tl.dot(dy.T, x, acc, input_precision=INPUT_PRECISION)
    OUT_DESC.store([(split * nnz + i) * BS, 0], acc.to(OUT_DESC.dtype))


@triton.jit
def _block_grad_scores_tma_kernel(DY_DESC, X_DESC, OUT, M, N, K, n_block_cols, M_BUCKET,
                                  BS: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
                                  TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr):
    tiles_n = tl.cdiv(N, TILE_N)
    tiles_k = tl.cdiv(K, TILE_K)
    per_group = GROUP_N * tiles_k
    for tile in range(tl.program_id(0), tiles_n * tiles_k, tl.num_programs(0)):
        first_n = (tile // per_group) * GROUP_N
        rows_in_group = tl.minimum(tiles_n - first_n, GROUP_N)
        pid_n = first_n + (tile % per_group) % rows_in_group
        pid_k = (tile % per_group) // rows_in_group
        acc = tl.zeros((TILE_N, TILE_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            dy = DY_DESC.load([m0, pid_n * TILE_N])
            x = X_DESC.load([m0, pid_k * TILE_K])
            acc = tl.dot(dy.T, x, acc, input_precision=INPUT_PRECISION)
        store_block_norms(acc, OUT, pid_n, pid_k, N, n_block_cols, BS, TILE_N, TILE_K)


def tma_sddmm_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """The pointer SDDMM's configs (stages fitted beside the [bs, bs] fp32 output block that the TMA store stages in
    shared memory), each setting the dY and X boxes' rows."""
    rows = ("BLOCK_M", None)
    epilogue = lambda meta: block_size * block_size * 4
    return with_hook(sddmm_configs(block_size, elem_bytes, budget, interpret, epilogue),
                     box_hook({"DY_DESC": rows, "X_DESC": rows}))


def tma_grad_scores_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """The pointer kernel's configs plus a 128 x 256 tile (the shape of cuBLAS's fastest Hopper GEMMs: it halves
    the reads of dY per FLOP), each setting the boxes to [BLOCK_M, TILE_N] and [BLOCK_M, TILE_K]."""
    configs = grad_scores_configs(block_size, elem_bytes, budget, interpret)
    if not interpret:
        wide = {"TILE_N": max(128, block_size), "TILE_K": 256, "BLOCK_M": 64}
        configs += _fit([(wide, 8, 4)], lambda meta: (meta["TILE_N"] + meta["TILE_K"]) * meta["BLOCK_M"] * elem_bytes,
                        budget)
    return with_hook(configs, box_hook({"DY_DESC": ("BLOCK_M", "TILE_N"), "X_DESC": ("BLOCK_M", "TILE_K")}))


_tuned_sddmm = TunedKernels(_bsr_sddmm_tma_kernel, tma_sddmm_configs, key=["CHUNK", "nnz", "N", "K"])
_tuned_scores = TunedKernels(_block_grad_scores_tma_kernel, tma_grad_scores_configs, key=["M_BUCKET", "N", "K"])


def launch_sddmm(dy: torch.Tensor, x: torch.Tensor, coo_row: torch.Tensor, col_idx: torch.Tensor,
                 target: torch.Tensor, chunk: int) -> bool:
    """dYᵀX at the stored blocks into ``target`` ([splits, nnz, bs, bs] fp32 partials, or [nnz, bs, bs] with one
    split) through TMA, for bsr_sddmm's launcher after its checks and split; False, launching nothing, where TMA
    cannot take the operands."""
    nnz, bs = col_idx.numel(), target.shape[-1]
    flat_target = target.view(-1, bs)
    if tma_unsupported(dy, x, flat_target):
        return False
    splits = flat_target.shape[0] // (nnz * bs)
    kernel = _tuned_sddmm(bs, dy.dtype, dy.device)
    kernel[(nnz, splits)](descriptor(dy, [64, bs]), descriptor(x, [64, bs]), coo_row, col_idx,
                          descriptor(flat_target, [bs, bs]), dy.shape[0], dy.shape[1], x.shape[1], nnz, chunk,
                          BS=bs, INPUT_PRECISION=dot_precision(dy.dtype))
    return True


def launch_grad_scores(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor, block_size: int) -> bool:
    """The block norms of dYᵀX into ``out`` through TMA and persistent programs, for block_grad_scores' launcher
    after its checks; False, launching nothing, where TMA cannot take the operands."""
    if tma_unsupported(dy, x):
        return False
    (m, n_features), k_features = dy.shape, x.shape[1]
    kernel = _tuned_scores(block_size, dy.dtype, dy.device)
    tiles = lambda meta: triton.cdiv(n_features, meta["TILE_N"]) * triton.cdiv(k_features, meta["TILE_K"])
    # 64-wide boxes are placeholders: the chosen config's pre-hook sets them.
    kernel[persistent_grid(tiles, dy.device)](descriptor(dy, [64, 64]), descriptor(x, [64, 64]), out, m, n_features,
                                              k_features, out.shape[1], m_bucket(m), BS=block_size,
                                              INPUT_PRECISION=dot_precision(dy.dtype), GROUP_N=GROUP_N)
    return True
