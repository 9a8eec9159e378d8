"""Static report of the Triton kernels, no GPU needed: per kernel / config / architecture, the registers, spills,
shared memory and tensor-core instruction counts of the shipped autotune configs.

    python benchmarks/triton_static_report.py                 # every config, sm_90 and sm_80 (a few minutes)
    python benchmarks/triton_static_report.py --subset ci --arch 90 --kernel bsr_linear

Compiles with ``sparsekern.triton_kernels._static`` (the same signatures, hints and configs the tests check),
then reads the machine code with /work/shared/tools/gpu_static_report.py (ptxas -v for registers and spills,
cuobjdump SASS for HGMMA = wgmma / HMMA = mma.sync / LDGSTS = cp.async counts). Without that tool it falls back
to ``ptxas -v`` alone. Must run without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are decorated by triton.jit


from sparsekern.triton_kernels import _static  # noqa: E402

TOOL_DIRS = [os.environ.get("GPU_STATIC_REPORT_DIR", ""), "/work/shared/tools"]


def _load_tool():
    for folder in TOOL_DIRS:
        if folder and os.path.exists(os.path.join(folder, "gpu_static_report.py")):
            sys.path.insert(0, folder)
            import gpu_static_report
            return gpu_static_report
    return None


def _ptxas():
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else (shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas")


def _ptxas_usage(ptx: str, arch: int):
    """(registers, (spill store bytes, spill load bytes)) from ptxas -v; the fallback when the tool is absent."""
    with tempfile.TemporaryDirectory() as folder:
        src, out = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        result = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", out], capture_output=True, text=True)
    regs = re.findall(r"Used (\d+) registers", result.stderr)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return (int(regs[-1]) if regs else None), (tuple(map(int, spill[-1])) if spill else None)


def report(compiled, arch: int, tool):
    ptx = compiled.asm["ptx"]
    if tool is not None:
        regs, spill = tool._ptxas_usage(ptx, arch)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "k.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = next(iter(tool._sass_counts(path).values()), {})
    else:
        regs, spill = _ptxas_usage(ptx, arch)
        sass = {}
    counts = _static.tensor_core_counts(ptx)
    return regs, spill, sass, counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("ci", "full"), default="full")
    parser.add_argument("--arch", type=int, action="append", help="90, 80 (default: both)")
    parser.add_argument("--kernel", action="append", choices=[s.name for s in _static.SPECS])
    args = parser.parse_args(argv)
    tool = _load_tool()
    if tool is None:
        print("gpu_static_report.py not found: registers and spills from ptxas -v only, no SASS counts")

    header = (f"{'arch':<6}{'kernel':<27}{'dtype':<6}{'bs':>4}  {'config':<44}{'regs':>5}{'spill st/ld':>13}"
              f"{'smem':>8}{'wgmma':>7}{'mma':>6}  sass")
    print(header)
    print("-" * len(header))
    spills = []
    for spec, arch, dtype, bs, config in _static.selection(args.subset, tuple(args.arch or _static.ARCHS)):
        if args.kernel and spec.name not in args.kernel:
            continue
        label = _static.config_label(config)
        try:
            compiled = _static.compile_kernel(spec, bs, dtype, config, arch)
        except Exception as error:
            print(f"sm_{arch:<3}{spec.name:<27}{_static.TRITON_TYPES[dtype]:<6}{bs:>4}  {label:<44}"
                  f"COMPILE ERROR {type(error).__name__}: {str(error)[:200]}")
            continue
        regs, spill, sass, counts = report(compiled, arch, tool)
        spill_text = f"{spill[0]}/{spill[1]}" if spill else "?"
        if spill and any(spill):
            spills.append(f"sm_{arch} {spec.name} {_static.TRITON_TYPES[dtype]} bs={bs} {label}: {spill_text} B")
        sass_text = " ".join(f"{k}={v}" for k, v in sass.items())
        print(f"sm_{arch:<3}{spec.name:<27}{_static.TRITON_TYPES[dtype]:<6}{bs:>4}  {label:<44}{regs!s:>5}"
              f"{spill_text:>13}{_static.shared_bytes(compiled):>8}{counts['wgmma']:>7}{counts['mma.sync']:>6}  "
              f"{sass_text}", flush=True)
    print()
    print("spills: " + ("none" if not spills else f"{len(spills)} configs\n  " + "\n  ".join(spills)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
