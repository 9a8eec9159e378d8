"""``python -m sparsekern.info``: what is built and available here, and why not where not.

Paste its output into bug reports.
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from . import __version__, _native, ops


# What has run on which GPU, updated with each committed GPU check (benchmarks/results/<gpu>_gpu_check.txt).
GPU_VERIFIED = (
    "NVIDIA H200, 2026-12-04, main 3e59f8c (torch 2.11, triton 3.6): kernel suites correct; 694 of 835 `cuda` tests "
    "passed, 141 failed, 2 crashed. The fixes since then have not run on a GPU: run `make gpu-check OUT=DIR` there.",
)

# Kernels written and checked without a GPU (interpreter, ahead-of-time sm_90 compile) that no backend uses until
# they have passed on one; the gpu-linear suite measures them beside the backends.
AWAITING_GPU = (
    "triton_kernels.linear_tma: bsr_linear and bsr_linear_dx with TMA tile loads and persistent programs",
    "triton_kernels.wgrad_tma: bsr_sddmm and block_grad_scores with TMA tile loads (the scores: persistent programs "
    "grouped for L2 reuse, a 128x256 tile)",
    "triton_kernels.conv_tma: the convolution's bsr_conv2d, bsr_conv2d_dgrad and bsr_conv2d_wgrad, image and "
    "gradient patches as TMA boxes, strided layers through a stride-phase view (in_channels a multiple of the block, "
    "image sizes the stride divides)",
    "the triton backend's launchers run them only with SPARSEKERN_TRITON_TMA=1, where TMA can take the operands "
    "(compute capability 9.0+, 16-byte aligned rows); the GPU suites measure them with --backends triton,triton-tma",
    "csrc/cuda/bsr_gemm_sm90.cu, bsr_conv_sm90.cu (cuda backend, on CUTLASS's CuTe): bsr_linear, bsr_linear_dx, "
    "bsr_sddmm, block_grad_scores, and the stride-1 bsr_conv2d, bsr_conv2d_dgrad and bsr_conv2d_wgrad with TMA "
    "loads (image patches as 4-D boxes), wgmma and a warp-specialised pipeline (fp16/bf16, block 64 or 128, no padded "
    "blocks); run only with SPARSEKERN_CUDA_SM90=1 on compute capability 9.0, else the mma.sync kernels; measured "
    "with --backends cuda,cuda-sm90",
)


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def report() -> str:
    lines = [
        f"sparsekern        {__version__}",
        f"python            {platform.python_version()}",
        f"torch             {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton            {_triton_version()}",
        f"GPU               {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}",
        f"SPARSEKERN_BACKEND={os.environ.get('SPARSEKERN_BACKEND', 'auto')}",
        f"SPARSEKERN_AUTOTUNE={os.environ.get('SPARSEKERN_AUTOTUNE', '1')}",
        f"SPARSEKERN_TRITON_TMA={os.environ.get('SPARSEKERN_TRITON_TMA', '0')}",
        f"SPARSEKERN_CUDA_SM90={os.environ.get('SPARSEKERN_CUDA_SM90', '0')}",
        "",
    ]
    if _native.LOADED:
        info = _native.BUILD_INFO
        cuda = (f"yes, CUDA {info.get('cuda_version')} for {', '.join(info.get('cuda_archs', []))}"
                if info.get("cuda") else "no")
        lines += [f"sparsekern._C     built against torch {info.get('torch_version')}; CUDA kernels: {cuda}"]
        if info.get("cuda"):
            lines += ["                  Hopper kernels (CuTe): " + ("built" if info.get("cuda_sm90_gemms") else
                                                                 "not built (no CUTLASS headers at build time)")]
    else:
        lines += [f"sparsekern._C     NOT LOADED: {_native.LOAD_ERROR}"]
    lines += ["", "verified on GPUs:"] + [f"  {line}" for line in GPU_VERIFIED]
    lines += ["", "kernels awaiting a GPU run (used by no backend yet):"] + [f"  {line}" for line in AWAITING_GPU]
    lines += ["", "backend availability (per device):"]
    for backend in ops.BACKENDS:
        for device_type in ("cpu", "cuda"):
            why = ops.backend_unavailable_reason(backend, device_type)
            if backend not in ("reference", "triton", device_type):
                continue
            lines.append(f"  {backend:<10} on {device_type:<5} {'available' if why is None else 'unavailable: ' + why}")
    lines += ["", "ops: backend auto picks, per device  (ops a backend lacks run on the reference)"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in ops.OPS:
        native = [b for b in ("cpu", "cuda", "triton") if ops.backend_has_op(b, op)]
        picks = ", ".join(f"{d}: {ops.select_backend(op, torch.device(d))}" for d in devices)
        lines.append(f"  {op:<22} auto -> {picks:<28} kernels: {', '.join(native) or 'reference only'}")
    lines += ["  auto on cuda measures per shape: where triton and cuda both have the op for the dtype, the first "
              "call of each (op, device, dtype, argument shapes with the rows bucketed to a power of two, other "
              "argument values) times both and keeps the faster. Listed "
              "above is the static order (triton, cuda, reference), used instead with SPARSEKERN_AUTOTUNE=0, for the "
              "mutating ops, and under CUDA graph capture before a shape was measured (warm up before capturing)."]
    lines += ["  a forced SPARSEKERN_BACKEND applies to its own device's tensors (cuda: CUDA; cpu: CPU; triton: CUDA, "
              "and CPU under TRITON_INTERPRET=1); other devices keep auto's choice."]
    lines += _tuned_lines(ops.tuned_choices())
    lines += ["", "convolution (SparseConv2d):",
              "  groups=1      implicit GEMM over NHWC, no im2col (bsr_conv2d + dgrad/wgrad/grad_scores) where the "
              "backend has a kernel (triton and native cuda: fp16/bf16/fp32, any in_channels; native cpu: fp32/fp64, "
              "in_channels a multiple of the block); else im2col + bsr_linear. 1x1 stride-1: bsr_linear on the pixels.",
              "  groups>1      dense conv2d with the densified filter: each group's filter matrix is only "
              "kh*kw*in/groups wide (kh*kw for depthwise), too narrow for bs x bs blocks to skip work."]
    return "\n".join(lines)


def _tuned_lines(choices) -> list:
    """auto's measured choices in this process, when there are any (in-process ``report()`` calls)."""
    if not choices:
        return []
    lines = ["", "auto's measured choices in this process (median ms per backend):"]
    for key, choice in choices.items():
        times = ", ".join(f"{backend} {ms:.3f}" for backend, ms in choice.times_ms.items())
        failed = "".join(f"; {backend} dropped ({why})" for backend, why in choice.failures.items())
        dtype = str(key.dtype).replace("torch.", "")
        lines.append(f"  {key.op} {key.device} {dtype} {key.args} -> {choice.backend}  ({times}{failed})")
    return lines


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="python -m sparsekern.info", description=__doc__).parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()
