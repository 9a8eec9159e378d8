"""Shared pieces of the Triton kernels: argument checks, autotune config lists, device facts.

Config lists are plain functions of (block size, element size, shared-memory budget) so that the
launchers, the ahead-of-time static checks (``triton_kernels/_static.py``) and the static report all
see exactly the configs that ship.
"""
from __future__ import annotations

import inspect
import os
from functools import lru_cache

import torch
import triton

# triton.jit decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Usable shared memory per block (bytes) by compute capability: H100/H200 opt in to 227 KB, A100 to 163 KB;
# consumer parts (sm_86/sm_89) have 99 KB.
SMEM_BUDGET = {90: 227 * 1024, 80: 163 * 1024}
SMEM_BUDGET_DEFAULT = 99 * 1024


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------------------
# Argument checks: one line each, naming the tensor.

def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    if t.device.type == "cpu":
        raise ValueError(f"{name} is a CPU tensor: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                         f"set before sparsekern.triton_kernels is imported")
    raise ValueError(f"{name} is on {t.device}: the Triton kernels run on CUDA tensors only")


def check_float(name: str, t: torch.Tensor) -> None:
    # fp64 is refused rather than silently computed in fp32: the float64 paths (gradcheck) belong to the
    # reference and CPU backends, and a quiet precision drop would hide itself in those checks.
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels support float16, bfloat16 and float32 "
                        f"(use SPARSEKERN_BACKEND=reference or cpu for {t.dtype})")


def check_matrix(name: str, t: torch.Tensor, like: torch.Tensor = None) -> None:
    check(t.dim() == 2, f"{name} must be 2-D, got shape {tuple(t.shape)}")
    check_device(name, t)
    check_float(name, t)
    if like is not None:
        check(t.dtype == like.dtype, f"{name} has dtype {t.dtype} but the other operand has {like.dtype}")
        check(t.device == like.device, f"{name} is on {t.device} but the other operand is on {like.device}")


def check_values(values: torch.Tensor, like: torch.Tensor) -> int:
    """Check compact block values [nnz, bs, bs]; returns the block size."""
    check(values.dim() == 3 and values.shape[1] == values.shape[2],
          f"values must have shape [nnz_blocks, bs, bs], got {tuple(values.shape)}")
    bs = values.shape[-1]
    check(bs in BLOCK_SIZES, f"values have block size {bs}; the Triton kernels support {BLOCK_SIZES}")
    check(values.dtype == like.dtype, f"values have dtype {values.dtype} but the activations have {like.dtype}")
    check(values.device == like.device, f"values are on {values.device} but the activations are on {like.device}")
    return bs


def check_index(names_and_tensors, device: torch.device, nnz: int = None) -> None:
    for name, t in names_and_tensors:
        check(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
        check(t.dim() == 1, f"{name} must be 1-D, got shape {tuple(t.shape)}")
        check(t.device == device, f"{name} is on {t.device} but the data is on {device}")
        if nnz is not None and name in ("col_idx", "coo_row", "row_idx", "perm"):
            check(t.numel() == nnz, f"{name} has {t.numel()} entries but there are {nnz} blocks")


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride but need unit stride along features."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 goes through TF32 only where PyTorch's own fp32 matmuls would. That is
    torch.backends.cuda.matmul.fp32_precision (torch >= 2.9), which allow_tf32 = True/False and
    set_float32_matmul_precision also set; reading allow_tf32 itself raises once a user has set the new flag."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision != "tf32":
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs (so their kernels do not depend on the flag)


# ----------------------------------------------------------------------------------------------
# Image sizes and the conv geometry change from layer to layer: Triton's JIT would compile a variant per pattern
# of divisibility by 16 (and of == 1) of each, multiplying warm-up compiles and autotuning for nothing, since
# only C, N and K decide whether the loads vectorise. These arguments are not specialised.
GEOMETRY_ARGS = ("M", "B", "H", "W", "OH", "OW", "KW", "n_taps", "stride_h", "stride_w", "pad_top", "pad_left",
                 "dil_h", "dil_w", "HP", "WP")


def geometry_jit(fn):
    """triton.jit without specialisation on the geometry arguments ``fn`` has (the convolutions' kernels)."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[name for name in GEOMETRY_ARGS if name in names])


# ----------------------------------------------------------------------------------------------
# Device facts.

@lru_cache(maxsize=None)
def _device_facts(device_index: int):
    props = torch.cuda.get_device_properties(device_index)
    budget = getattr(props, "shared_memory_per_block_optin", 0) or SMEM_BUDGET.get(
        props.major * 10 + props.minor, SMEM_BUDGET_DEFAULT)
    return props.multi_processor_count, int(budget)


def smem_budget(device: torch.device) -> int:
    if device.type != "cuda":
        return SMEM_BUDGET[90]
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[1]


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so that tests reach the split-K path at small sizes
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[0]


def m_bucket(m: int) -> int:
    """Autotune key for the activation rows: powers of two, so a new batch size does not re-tune."""
    return triton.next_power_of_2(max(int(m), 1))


# ----------------------------------------------------------------------------------------------
# Autotune configs. Reasoning (HOPPER.md, design.md §8): the activations take the MMA's M side in tiles of
# 64-128 rows (wgmma is m64 per warpgroup), the block is the MMA's N and K; each block gives only K = bs, so
# latency is hidden by pipelining loads across blocks (num_stages 3-4, more for small blocks where a stage
# is cheap); 8 warps (two warpgroups) when the fp32 accumulator is large (128 x 128), 4 otherwise.
# Every config is fitted to the device's shared memory: stages are lowered (to 1) until it fits.

def _fit(candidates, stage_bytes, budget, epilogue_bytes=None):
    """[(meta, warps, stages)] -> triton.Configs whose estimated shared memory fits ``budget``: num_stages pipeline
    stages plus, where given, ``epilogue_bytes(meta)`` of staging for the output (the TMA kernels' stores)."""
    configs, seen = [], set()
    for meta, warps, stages in candidates:
        per_stage = stage_bytes(meta)
        room = budget - (epilogue_bytes(meta) if epilogue_bytes else 0)
        while stages > 1 and stages * per_stage > room:
            stages -= 1
        if per_stage * stages > room:
            continue
        key = (tuple(sorted(meta.items())), warps, stages)
        if key not in seen:
            seen.add(key)
            configs.append(triton.Config(dict(meta), num_warps=warps, num_stages=stages))
    # An unpipelined config (1 stage) is only worth shipping when nothing pipelined fits.
    pipelined = [config for config in configs if config.num_stages > 1]
    return pipelined or configs


def gemm_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET, epilogue_bytes=None):
    """bsr_linear and bsr_linear_dx: BLOCK_M activation rows x one bs-wide block column per program."""
    if interpret:
        return [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)]
    return _fit(_gemm_candidates(block_size), _gemm_stage_bytes(block_size, elem_bytes), budget, epilogue_bytes)


def _gemm_stage_bytes(bs: int, elem_bytes: int):
    return lambda meta: (meta["BLOCK_M"] * bs + bs * bs) * elem_bytes


def _gemm_candidates(bs: int):
    if bs <= 32:
        # A stage is only BLOCK_M x bs: go deep, and wide in M to amortise the index loads.
        candidates = [({"BLOCK_M": 128}, 4, 4), ({"BLOCK_M": 128}, 4, 6), ({"BLOCK_M": 64}, 4, 6),
                      ({"BLOCK_M": 256}, 8, 4)]
    elif bs == 64:
        candidates = [({"BLOCK_M": 128}, 4, 4), ({"BLOCK_M": 128}, 8, 3), ({"BLOCK_M": 64}, 4, 4),
                      ({"BLOCK_M": 256}, 8, 3)]
    else:
        candidates = [({"BLOCK_M": 128}, 8, 3), ({"BLOCK_M": 128}, 8, 4), ({"BLOCK_M": 64}, 4, 4),
                      ({"BLOCK_M": 64}, 8, 3)]
    return candidates


def sddmm_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET, epilogue_bytes=None):
    """bsr_sddmm: one bs x bs output block per program, reducing over BLOCK_M rows of M per step."""
    if interpret:
        return [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)]
    return _fit(_sddmm_candidates(block_size), _sddmm_stage_bytes(block_size, elem_bytes), budget, epilogue_bytes)


def _sddmm_stage_bytes(bs: int, elem_bytes: int):
    return lambda meta: 2 * meta["BLOCK_M"] * bs * elem_bytes


def _sddmm_candidates(bs: int):
    if bs <= 32:
        candidates = [({"BLOCK_M": 128}, 4, 4), ({"BLOCK_M": 64}, 4, 4), ({"BLOCK_M": 128}, 4, 6)]
    elif bs == 64:
        candidates = [({"BLOCK_M": 128}, 4, 3), ({"BLOCK_M": 64}, 4, 4), ({"BLOCK_M": 128}, 4, 4)]
    else:
        # A 128 x 128 fp32 accumulator is 128 registers a thread on 4 warps: 8 warps, or it spills on sm_80.
        candidates = [({"BLOCK_M": 64}, 8, 3), ({"BLOCK_M": 128}, 8, 3), ({"BLOCK_M": 64}, 8, 4)]
    return candidates


def grad_scores_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """block_grad_scores: a dense TILE_N x TILE_K tile of dYᵀX per program (tiles are multiples of bs)."""
    bs = block_size
    if interpret:
        t = max(64, bs)
        return [triton.Config({"TILE_N": t, "TILE_K": t, "BLOCK_M": 64}, num_warps=4, num_stages=1)]
    candidates = [
        ({"TILE_N": 128, "TILE_K": 128, "BLOCK_M": 64}, 8, 3),
        ({"TILE_N": 128, "TILE_K": 128, "BLOCK_M": 32}, 8, 4),
        ({"TILE_N": 128, "TILE_K": 64, "BLOCK_M": 64}, 4, 4),
        ({"TILE_N": 64, "TILE_K": 64, "BLOCK_M": 64}, 4, 4),
    ]
    candidates = [({"TILE_N": max(m["TILE_N"], bs), "TILE_K": max(m["TILE_K"], bs), "BLOCK_M": m["BLOCK_M"]}, w, s)
                  for m, w, s in candidates]
    # Tiles widened to the block size get the warps their accumulator needs (128 x 128 fp32: 8 warps).
    candidates = [(m, 8 if m["TILE_N"] * m["TILE_K"] >= 128 * 128 else w, s) for m, w, s in candidates]
    return _fit(candidates, lambda meta: (meta["TILE_N"] + meta["TILE_K"]) * meta["BLOCK_M"] * elem_bytes, budget)


def _cap_tile_per_thread(candidates, bs: int, cap: int):
    """Give each config the warps (up to 8), then the smaller BLOCK_M (down to wgmma's 64), that keep its
    [BLOCK_M, bs] tile at ``cap`` elements a thread or fewer."""
    capped = []
    for meta, warps, stages in candidates:
        rows = meta["BLOCK_M"]
        if rows * bs > cap * 32 * warps:
            warps = 8
        while rows * bs > cap * 32 * warps and rows > 64:
            rows //= 2
        capped.append(({**meta, "BLOCK_M": rows}, warps, stages))
    return capped


# The convolutions keep per-pixel state live next to the accumulator (window corners, padding masks, the
# dgrad's tap shifts), which the GEMMs do not: with the GEMMs' 64 fp32 accumulators a thread (128 x 64 on 4
# warps) they spill on sm_80. Their per-column decode (in_channels not a multiple of the block) also gives
# every gathered element its own 64-bit address, so those tiles are halved again.
CONV_TILE_PER_THREAD = 32
CONV_GATHER_TILE_PER_THREAD = 16


def conv_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """bsr_conv2d and its dgrad with in_channels a multiple of the block: the GEMM configs (BLOCK_M pixels x
    one bs-wide block per program) capped at CONV_TILE_PER_THREAD accumulators a thread."""
    if interpret:
        return gemm_configs(block_size, elem_bytes, budget, interpret)
    candidates = _cap_tile_per_thread(_gemm_candidates(block_size), block_size, CONV_TILE_PER_THREAD)
    return _fit(candidates, _gemm_stage_bytes(block_size, elem_bytes), budget)


def conv_gather_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """bsr_conv2d and its dgrad with the per-column decode: capped at CONV_GATHER_TILE_PER_THREAD."""
    if interpret:
        return gemm_configs(block_size, elem_bytes, budget, interpret)
    candidates = _cap_tile_per_thread(_gemm_candidates(block_size), block_size, CONV_GATHER_TILE_PER_THREAD)
    return _fit(candidates, _gemm_stage_bytes(block_size, elem_bytes), budget)


def conv_wgrad_gather_configs(block_size: int, elem_bytes: int, budget: int, interpret: bool = INTERPRET):
    """bsr_conv2d_wgrad with the per-column decode: the SDDMM configs with the gathered [BLOCK_M, bs] image tile
    capped at CONV_GATHER_TILE_PER_THREAD elements a thread."""
    if interpret:
        return sddmm_configs(block_size, elem_bytes, budget, interpret)
    candidates = _cap_tile_per_thread(_sddmm_candidates(block_size), block_size, CONV_GATHER_TILE_PER_THREAD)
    return _fit(candidates, _sddmm_stage_bytes(block_size, elem_bytes), budget)


# Autotune results kept on disk (Triton's cache dir) so that a new process does not re-tune a shape it has seen;
# triton.autotune takes cache_results since 3.3.
_AUTOTUNE_ON_DISK = ({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters
                     else {})


class TunedKernels:
    """One autotuned wrapper of a jit kernel per (block size, element size, smem budget). The kernel's
    INPUT_PRECISION joins the autotune key: fp32 under TF32 (MMA) and IEEE (FMA) are tuned apart."""

    def __init__(self, kernel, config_fn, key, **autotune_kwargs):
        self.kernel, self.config_fn, self.autotune_kwargs = kernel, config_fn, autotune_kwargs
        self.key = [*key, "INPUT_PRECISION"]
        self._cache = {}

    def __call__(self, block_size: int, dtype: torch.dtype, device: torch.device):
        elem_bytes = torch.empty((), dtype=dtype).element_size()
        budget = smem_budget(device)
        slot = (block_size, elem_bytes, budget)
        if slot not in self._cache:
            configs = self.config_fn(block_size, elem_bytes, budget)
            self._cache[slot] = triton.autotune(configs=configs, key=self.key, **_AUTOTUNE_ON_DISK,
                                                **self.autotune_kwargs)(self.kernel)
        return self._cache[slot]
