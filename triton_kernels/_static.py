"""Ahead-of-time compilation of the shipped kernels for a GPU architecture, with no GPU present.

Used by ``tests/test_triton_static.py`` (tensor-core instructions and shared memory in CI) and
``benchmarks/triton_static_report.py`` (registers, spills, SASS counts). Each kernel is described once:
its argument types for a dtype, its constexprs for a block size, and its shipped config list, so the
checks compile exactly what the launchers would run (``triton_kernels/_common.py``). ``--masked-sgd`` compiles
the optimizer step's kernel instead, in the specialisations its launches get.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from . import _common
from .conv import _bsr_conv2d_kernel
from .conv_dgrad import _bsr_conv2d_dgrad_kernel
from .conv_tma import (_bsr_conv2d_dgrad_tma_kernel, _bsr_conv2d_tma_kernel, _bsr_conv2d_wgrad_tma_kernel,
                       conv_tma_configs, conv_wgrad_tma_configs)
from .conv_wgrad import _bsr_conv2d_wgrad_kernel, _conv_grad_scores_kernel
from .grad_scores import _block_grad_scores_kernel
from .linear import _bsr_linear_kernel
from .linear_dx import _bsr_linear_dx_kernel
from .linear_tma import _bsr_linear_dx_tma_kernel, _bsr_linear_tma_kernel, tma_gemm_configs
from .wgrad_tma import (GROUP_N, _block_grad_scores_tma_kernel, _bsr_sddmm_tma_kernel, tma_grad_scores_configs,
                        tma_sddmm_configs)
from .masked_sgd import LAUNCH_OPTIONS, _masked_sgd_kernel
from .sddmm import _bsr_sddmm_kernel

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    name: str
    kernel: object  # the triton.jit function
    # arg name -> type string, constexprs excluded: "{dtype}" is filled in with the data dtype, and a tensor
    # descriptor's box with "{bs}" and the config's meta-parameters in lower case ("{block_m}", "{tile_n}")
    arg_types: dict
    # (block_size, input_precision) -> constexprs besides the config's meta-parameters
    constexprs: Callable
    config_fn: Callable
    # args compiled as multiples of 16, as Triton's JIT specialises them for the shapes that matter (pointers
    # from torch's allocator; N, K and row strides of layers whose widths are multiples of 16). N and K matter:
    # the masks along the contiguous dimension are only uniform over 16-element runs when they are, and
    # without that the loads cannot be vectorised into cp.async and the loop is not software-pipelined.
    divisible: tuple
    # Whether the CI subset compiles every bf16 config (else the first and the largest, as for fp16/fp32).
    every_bf16_config: bool = True
    # Whether multi-stage configs must come out software-pipelined (cp.async ring buffers for both operands).
    # False for the convolutions' per-column decode: its gathers of 16-bit values cannot use cp.async (4 bytes
    # at least), so Triton pipelines the other operand at most.
    pipelined: bool = True
    # The architectures it is built for (the TMA kernels: Hopper only), and whether it must load through TMA.
    archs: tuple = (90, 80)
    tma: bool = False


SPECS = (
    KernelSpec(
        "bsr_linear", _bsr_linear_kernel,
        {"X": "*{dtype}", "VALUES": "*{dtype}", "ROW_PTR": "*i32", "COL_IDX": "*i32", "BIAS": "*{dtype}",
         "Y": "*{dtype}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
         "n_block_rows": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"HAS_BIAS": True, "BS": bs, "INPUT_PRECISION": precision},
        _common.gemm_configs,
        ("X", "VALUES", "ROW_PTR", "COL_IDX", "BIAS", "Y", "N", "K", "stride_xm", "stride_ym"),
    ),
    KernelSpec(
        "bsr_linear_dx", _bsr_linear_dx_kernel,
        {"DY": "*{dtype}", "VALUES": "*{dtype}", "COL_PTR": "*i32", "ROW_IDX": "*i32", "PERM": "*i32",
         "DX": "*{dtype}", "M": "i32", "N": "i32", "K": "i32", "stride_dym": "i32", "stride_dxm": "i32",
         "n_block_cols": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision},
        _common.gemm_configs,
        ("DY", "VALUES", "COL_PTR", "ROW_IDX", "PERM", "DX", "N", "K", "stride_dym", "stride_dxm"),
    ),
    KernelSpec(
        "bsr_sddmm", _bsr_sddmm_kernel,
        {"DY": "*{dtype}", "X": "*{dtype}", "COO_ROW": "*i32", "COL_IDX": "*i32", "OUT": "*fp32",
         "M": "i32", "N": "i32", "K": "i32", "stride_dym": "i32", "stride_xm": "i32", "nnz": "i32", "CHUNK": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision},
        _common.sddmm_configs,
        ("DY", "X", "COO_ROW", "COL_IDX", "OUT", "N", "K", "stride_dym", "stride_xm", "CHUNK"),
    ),
    KernelSpec(
        "block_grad_scores", _block_grad_scores_kernel,
        {"DY": "*{dtype}", "X": "*{dtype}", "OUT": "*fp32", "M": "i32", "N": "i32", "K": "i32",
         "stride_dym": "i32", "stride_xm": "i32", "n_block_cols": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision},
        _common.grad_scores_configs,
        ("DY", "X", "OUT", "N", "K", "stride_dym", "stride_xm"),
    ),
    KernelSpec(
        "bsr_linear_tma", _bsr_linear_tma_kernel,
        {"X_DESC": "tensordesc<{dtype}[{block_m}, {bs}]>", "W_DESC": "tensordesc<{dtype}[{bs}, {bs}]>",
         "ROW_PTR": "*i32", "COL_IDX": "*i32", "BIAS": "*{dtype}", "Y_DESC": "tensordesc<{dtype}[{block_m}, {bs}]>",
         "M": "i32", "N": "i32", "K": "i32", "n_block_rows": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"HAS_BIAS": True, "BS": bs, "INPUT_PRECISION": precision},
        tma_gemm_configs,
        ("ROW_PTR", "COL_IDX", "BIAS", "N", "K"),
        archs=(90,), tma=True,
    ),
    KernelSpec(
        "bsr_linear_dx_tma", _bsr_linear_dx_tma_kernel,
        {"DY_DESC": "tensordesc<{dtype}[{block_m}, {bs}]>", "W_DESC": "tensordesc<{dtype}[{bs}, {bs}]>",
         "COL_PTR": "*i32", "ROW_IDX": "*i32", "PERM": "*i32", "DX_DESC": "tensordesc<{dtype}[{block_m}, {bs}]>",
         "M": "i32", "N": "i32", "n_block_cols": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision},
        tma_gemm_configs,
        ("COL_PTR", "ROW_IDX", "PERM", "N"),
        archs=(90,), tma=True,
    ),
    KernelSpec(
        "bsr_sddmm_tma", _bsr_sddmm_tma_kernel,
        {"DY_DESC": "tensordesc<{dtype}[{block_m}, {bs}]>", "X_DESC": "tensordesc<{dtype}[{block_m}, {bs}]>",
         "COO_ROW": "*i32", "COL_IDX": "*i32", "OUT_DESC": "tensordesc<fp32[{bs}, {bs}]>", "M": "i32", "N": "i32",
         "K": "i32", "nnz": "i32", "CHUNK": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision},
        tma_sddmm_configs,
        ("COO_ROW", "COL_IDX", "N", "K", "CHUNK"),
        archs=(90,), tma=True,
    ),
    KernelSpec(
        "block_grad_scores_tma", _block_grad_scores_tma_kernel,
        {"DY_DESC": "tensordesc<{dtype}[{block_m}, {tile_n}]>", "X_DESC": "tensordesc<{dtype}[{block_m}, {tile_k}]>",
         "OUT": "*fp32", "M": "i32", "N": "i32", "K": "i32", "n_block_cols": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision, "GROUP_N": GROUP_N},
        tma_grad_scores_configs,
        ("OUT", "N", "K"),
        archs=(90,), tma=True,
    ),
)

# The convolutions, each in its two forms: in_channels a multiple of the block (every ResNet/VGG layer but the
# stem; C and K divisible by 16, the vectorised path) and not (the stem's C = 3: per-column decode).
_CONV_GEOMETRY = {name: "i32" for name in ("H", "W", "C", "OH", "OW", "KW", "stride_h", "stride_w", "pad_top",
                                           "pad_left", "dil_h", "dil_w")}


def _conv_specs(aligned: bool):
    suffix = "" if aligned else "_unaligned"
    channels = ("C", "K") if aligned else ()
    return (
        KernelSpec(
            "bsr_conv2d" + suffix, _bsr_conv2d_kernel,
            {"X": "*{dtype}", "VALUES": "*{dtype}", "ROW_PTR": "*i32", "COL_IDX": "*i32", "BIAS": "*{dtype}",
             "Y": "*{dtype}", "M": "i32", "N": "i32", "K": "i32", **_CONV_GEOMETRY, "n_block_rows": "i32",
             "M_BUCKET": "i32"},
            lambda bs, precision: {"HAS_BIAS": True, "CIN_ALIGNED": aligned, "BS": bs, "INPUT_PRECISION": precision},
            _common.conv_configs if aligned else _common.conv_gather_configs,
            ("X", "VALUES", "ROW_PTR", "COL_IDX", "BIAS", "Y", "N") + channels,
            every_bf16_config=aligned, pipelined=aligned,
        ),
        KernelSpec(
            "bsr_conv2d_dgrad" + suffix, _bsr_conv2d_dgrad_kernel,
            {"DY": "*{dtype}", "VALUES": "*{dtype}", "COL_PTR": "*i32", "ROW_IDX": "*i32", "PERM": "*i32",
             "DX": "*{dtype}", "B": "i32", **_CONV_GEOMETRY, "N": "i32", "n_taps": "i32", "HP": "i32", "WP": "i32",
             "n_chunks": "i32", "M_BUCKET": "i32"},
            lambda bs, precision: {"CIN_ALIGNED": aligned, "BS": bs, "INPUT_PRECISION": precision},
            _common.conv_configs if aligned else _common.conv_gather_configs,
            ("DY", "VALUES", "COL_PTR", "ROW_IDX", "PERM", "DX", "N") + channels[:1],
            every_bf16_config=aligned, pipelined=aligned,
        ),
        KernelSpec(
            "bsr_conv2d_wgrad" + suffix, _bsr_conv2d_wgrad_kernel,
            {"DY": "*{dtype}", "X": "*{dtype}", "COO_ROW": "*i32", "COL_IDX": "*i32", "OUT": "*fp32",
             "M": "i32", "N": "i32", "K": "i32", **_CONV_GEOMETRY, "nnz": "i32", "CHUNK": "i32"},
            lambda bs, precision: {"CIN_ALIGNED": aligned, "BS": bs, "INPUT_PRECISION": precision},
            _common.sddmm_configs if aligned else _common.conv_wgrad_gather_configs,
            ("DY", "X", "COO_ROW", "COL_IDX", "OUT", "N", "CHUNK") + channels,
            every_bf16_config=aligned, pipelined=aligned,
        ),
    )


SPECS += _conv_specs(aligned=True) + _conv_specs(aligned=False) + (
    KernelSpec(
        "bsr_conv2d_grad_scores", _conv_grad_scores_kernel,
        {"DY": "*{dtype}", "X": "*{dtype}", "OUT": "*fp32", "M": "i32", "N": "i32", "K": "i32", **_CONV_GEOMETRY,
         "n_block_cols": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision},
        _common.grad_scores_configs,
        ("DY", "X", "OUT", "N", "K", "C"),
    ),
)
SPECS += (
    KernelSpec(
        "bsr_conv2d_tma", _bsr_conv2d_tma_kernel,
        {"X_DESC": "tensordesc<{dtype}[1, {tile_h}, 1, {tile_w}, {bs}]>", "W_DESC": "tensordesc<{dtype}[{bs}, {bs}]>",
         "ROW_PTR": "*i32", "COL_IDX": "*i32", "BIAS": "*{dtype}",
         "Y_DESC": "tensordesc<{dtype}[1, {tile_h}, {tile_w}, {bs}]>", "M": "i32", "N": "i32", "K": "i32", "C": "i32",
         "OH": "i32", "OW": "i32", "KW": "i32", "stride_h": "i32", "stride_w": "i32", "pad_top": "i32",
         "pad_left": "i32", "dil_h": "i32", "dil_w": "i32", "n_block_rows": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"HAS_BIAS": True, "BS": bs, "INPUT_PRECISION": precision},
        conv_tma_configs,
        ("ROW_PTR", "COL_IDX", "BIAS", "N", "K", "C"),
        archs=(90,), tma=True,
    ),
    KernelSpec(
        "bsr_conv2d_dgrad_tma", _bsr_conv2d_dgrad_tma_kernel,
        {"DY_DESC": "tensordesc<{dtype}[1, {tile_h}, {tile_w}, {bs}]>", "W_DESC": "tensordesc<{dtype}[{bs}, {bs}]>",
         "LIST_PTR": "*i32", "ORDER": "*i32", "ROWS": "*i32", "TAPS": "*i32",
         "DX_DESC": "tensordesc<{dtype}[1, {tile_h}, 1, {tile_w}, {bs}]>", "B": "i32", "HP": "i32", "WP": "i32",
         "N": "i32", "C": "i32", "KW": "i32", "stride_h": "i32", "stride_w": "i32", "pad_top": "i32",
         "pad_left": "i32", "dil_h": "i32", "dil_w": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision},
        conv_tma_configs,
        ("LIST_PTR", "ORDER", "ROWS", "TAPS", "N", "C"),
        archs=(90,), tma=True,
    ),
    KernelSpec(
        "bsr_conv2d_wgrad_tma", _bsr_conv2d_wgrad_tma_kernel,
        {"DY_DESC": "tensordesc<{dtype}[1, {tile_h}, {tile_w}, {bs}]>",
         "X_DESC": "tensordesc<{dtype}[1, {tile_h}, 1, {tile_w}, {bs}]>", "COO_ROW": "*i32", "COL_IDX": "*i32",
         "OUT_DESC": "tensordesc<fp32[{bs}, {bs}]>", "B": "i32", "N": "i32", "K": "i32", "C": "i32", "OH": "i32",
         "OW": "i32", "KW": "i32", "stride_h": "i32", "stride_w": "i32", "pad_top": "i32", "pad_left": "i32",
         "dil_h": "i32", "dil_w": "i32", "nnz": "i32", "M_BUCKET": "i32"},
        lambda bs, precision: {"BS": bs, "INPUT_PRECISION": precision},
        conv_wgrad_tma_configs,
        ("COO_ROW", "COL_IDX", "N", "K", "C"),
        archs=(90,), tma=True,
    ),
)
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}


def shipped_configs(spec: KernelSpec, block_size: int, dtype: torch.dtype, arch: int):
    """The configs the launcher would autotune over on a GPU of compute capability ``arch`` (e.g. 90)."""
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    budget = _common.SMEM_BUDGET.get(arch, _common.SMEM_BUDGET_DEFAULT)
    return spec.config_fn(block_size, elem_bytes, budget, interpret=False)


def _check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Under the interpreter triton.jit (ours and Triton's own tl.standard helpers) returned interpreted
        # functions, which the compiler cannot lower: compile in a process without it (see ``main``).
        raise RuntimeError("ahead-of-time compilation needs a process without TRITON_INTERPRET=1; "
                           "run `python -m sparsekern.triton_kernels._static` instead")


def compile_kernel(spec: KernelSpec, block_size: int, dtype: torch.dtype, config, arch: int,
                   input_precision: str = "tf32"):
    """triton.compile the kernel for ``sm_{arch}`` with one config; returns the CompiledKernel
    (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _check_not_interpreted()
    data = TRITON_TYPES[dtype]
    constexprs = dict(spec.constexprs(block_size, input_precision))
    constexprs.update(config.kwargs)
    signature = {}
    for name in spec.kernel.arg_names:
        signature[name] = ("constexpr" if name in constexprs else
                           spec.arg_types[name].format(dtype=data, bs=block_size,
                                                       **{k.lower(): v for k, v in config.kwargs.items()}))
    # Divisibility hints in the format Triton's JIT produces (triton >= 3.2, incl. 3.6 and 3.8):
    # {(arg index,): [["tt.divisibility", 16]]}.
    attrs = {(spec.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible}
    source = ASTSource(fn=spec.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def shared_bytes(compiled) -> int:
    metadata = compiled.metadata
    return int(metadata.shared if hasattr(metadata, "shared") else metadata["shared"])


def tensor_core_counts(ptx: str) -> dict:
    """Counts in PTX of the tensor-core instructions, wgmma (Hopper warpgroup MMA) and mma.sync (Ampere-style),
    and of the TMA's tile loads into shared memory (cp.async.bulk.tensor, global to shared)."""
    return {"wgmma": ptx.count("wgmma.mma_async"), "mma.sync": ptx.count("mma.sync"),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx))}


def resource_usage(cubin: bytes) -> dict:
    """{"regs": registers a thread, "stack": stack-frame bytes a thread} of the kernel in ``cubin``, from the
    ``cuobjdump`` that Triton ships. A stack frame is where ptxas puts what it spills; the kernels declare no local
    arrays, so a frame of 0 means no spills."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        result = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", result.stdout)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {result.stdout[-500:]}")
    return {"regs": int(found.group(1)), "stack": int(found.group(2))}


def config_label(config) -> str:
    meta = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{meta},w={config.num_warps},s={config.num_stages}"


# ----------------------------------------------------------------------------------------------
# Selections of (kernel, arch, dtype, block size, config) to compile, and a JSON-lines command line.

ARCHS = (90, 80)
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _estimated_smem(config, spec, block_size, elem_bytes):
    m = config.kwargs
    if spec.config_fn in (_common.sddmm_configs, _common.conv_wgrad_gather_configs, tma_sddmm_configs):
        per_stage = 2 * m["BLOCK_M"] * block_size
    elif spec.config_fn in (_common.grad_scores_configs, tma_grad_scores_configs):
        per_stage = (m["TILE_N"] + m["TILE_K"]) * m["BLOCK_M"]
    elif spec.config_fn is conv_tma_configs:
        per_stage = (m["TILE_H"] * m["TILE_W"] + block_size) * block_size
    elif spec.config_fn is conv_wgrad_tma_configs:
        per_stage = 2 * m["TILE_H"] * m["TILE_W"] * block_size
    else:
        per_stage = (m["BLOCK_M"] + block_size) * block_size
    return per_stage * elem_bytes * config.num_stages


def selection(subset: str = "ci", archs=ARCHS):
    """[(spec, arch, dtype, block_size, config)]. ``full``: every shipped config for every dtype.
    ``ci``: every config in bf16 (the training dtype); in fp16 and fp32 (TF32) the first config and the one
    with the most shared memory (where a budget would break). Specs with ``every_bf16_config=False`` (the
    convolutions' per-column decode, the stem's path) get the first and the largest in bf16 too."""
    items = []
    for spec in SPECS:
        for arch in (arch for arch in archs if arch in spec.archs):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for bs in _common.BLOCK_SIZES:
                    configs = shipped_configs(spec, bs, dtype, arch)
                    if subset == "ci" and (dtype != torch.bfloat16 or not spec.every_bf16_config):
                        elem = torch.empty((), dtype=dtype).element_size()
                        biggest = max(configs, key=lambda c: _estimated_smem(c, spec, bs, elem))
                        configs = [configs[0]] + ([biggest] if biggest is not configs[0] else [])
                    items.extend((spec, arch, dtype, bs, config) for config in configs)
    return items


# ----------------------------------------------------------------------------------------------
# masked_sgd: one fixed config, no tensor cores; what can break on a GPU only is a specialisation Triton's JIT
# makes from the launch's values (an int argument equal to 1 becomes a constexpr: slice_len of a 1-D param) and
# the rounding of its products.

def masked_sgd_cases():
    """[(param dtype, slice_len is 1)]: fp32 params with coupled decay and nesterov, bf16 params with an fp32
    master and decoupled decay (every branch of the kernel), each with a runtime slice_len and with 1."""
    return [(dtype, one) for dtype in (torch.float32, torch.bfloat16) for one in (False, True)]


def compile_masked_sgd(param_dtype: torch.dtype, slice_len_one: bool, arch: int):
    """triton.compile the masked_sgd kernel for ``sm_{arch}`` as its launcher would run it (its launch options,
    every optional operand present)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _check_not_interpreted()
    master = param_dtype != torch.float32
    constexprs = {"HAS_MASTER": master, "USE_MOMENTUM": True, "NESTEROV": not master, "COUPLED_DECAY": not master,
                  "DECOUPLED_DECAY": master, "HAS_GRAD_SCALE": True, "HAS_INV_LOSS_SCALE": True,
                  "HAS_FOUND_INF": True, "BLOCK": 1024}
    if slice_len_one:
        constexprs["slice_len"] = 1
    param = "*" + TRITON_TYPES[param_dtype]
    types = {"WEIGHTS": "*fp32", "PARAM": param, "GRAD": param, "BUFFER": "*fp32", "GRAD_SCALE": "*fp32",
             "INV_LOSS_SCALE": "*fp32", "FOUND_INF": "*fp32", "STEP": "*i64", "numel": "i32", "slice_len": "i32",
             "momentum": "fp32", "dampening_keep": "fp32", "weight_decay": "fp32", "decay": "fp32", "neg_lr": "fp32"}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in _masked_sgd_kernel.arg_names}
    source = ASTSource(fn=_masked_sgd_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, **LAUNCH_OPTIONS})


def unrounded_float_ops(ptx: str) -> int:
    """fp32 add/sub/mul/fma without a rounding modifier in PTX: those that ptxas may contract into FMAs."""
    return len(re.findall(r"\b(?:add|sub|mul|fma)(?:\.ftz)?(?:\.sat)?\.f32\b", ptx))


def describe(spec, arch, dtype, block_size, config, compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return {"kernel": spec.name, "arch": arch, "dtype": TRITON_TYPES[dtype], "block_size": block_size,
            "config": config_label(config), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "shared": shared_bytes(compiled), **tensor_core_counts(ptx), "sqrt.approx": ptx.count("sqrt.approx"),
            **resource_usage(compiled.asm["cubin"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compile the shipped Triton kernel configs ahead of time and "
                                                 "print one JSON line per compile.")
    parser.add_argument("--subset", choices=("ci", "full"), default="ci")
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    parser.add_argument("--masked-sgd", action="store_true", help="compile masked_sgd_'s kernel instead")
    args = parser.parse_args(argv)
    if args.masked_sgd:
        for arch in args.arch or ARCHS:
            for dtype, one in masked_sgd_cases():
                record = {"kernel": "masked_sgd", "arch": arch, "dtype": TRITON_TYPES[dtype],
                          "slice_len": "1" if one else "runtime"}
                try:
                    record["unrounded"] = unrounded_float_ops(compile_masked_sgd(dtype, one, arch).asm["ptx"])
                except Exception as error:
                    record["error"] = f"{type(error).__name__}: {error}"[:2000]
                print(json.dumps(record), flush=True)
        return
    for spec, arch, dtype, bs, config in selection(args.subset, tuple(args.arch or ARCHS)):
        try:
            record = describe(spec, arch, dtype, bs, config, compile_kernel(spec, bs, dtype, config, arch))
        except Exception as error:  # report and go on: the test names the failing kernel/config
            record = {"kernel": spec.name, "arch": arch, "dtype": TRITON_TYPES[dtype], "block_size": bs,
                      "config": config_label(config), "error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
