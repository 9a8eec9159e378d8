"""Static checks of the hand-written CUDA GEMM and convolution kernels, with no GPU: compile their .cu files for sm_90a (H100) and
sm_80 (A100) with the flags the build uses, then read ptxas' resource report and the SASS.

- no kernel spills registers (0 bytes spill stores/loads, no stack frame, no local loads/stores in the SASS);
- the fp16/bf16 GEMMs run on tensor cores (HMMA) fed by ldmatrix (LDSM) from cp.async copies (LDGSTS);
- the fp32 GEMMs use FFMA, also fed by cp.async, and no tensor cores;
- the Hopper kernels (bsr_gemm_sm90.cu, bsr_conv_sm90.cu: CuTe, sm_90a only) run on wgmma (HGMMA) fed by TMA loads
  (UTMALDG) and keep their TMA descriptors in the parameter space (no local memory: a copy there would break the
  loads); on the host, their TMA tiles land where their wgmmas read them (tests/cuda_sm90_host_checks.cu);
- every expected kernel instantiation is there (nothing silently compiled out);
- the integer helpers (FastDivmod) give plain division's results, run on the host (tests/cuda_host_checks.cu).

The .cu files include CUDA headers only (design §5): each compiles in 10-40 s per architecture, and the compiles
run in parallel once per test session.
"""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sparsekern._build_paths import cutlass_include

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("bsr_gemm_linear.cu", "bsr_gemm_wgrad.cu", "bsr_conv_dgrad.cu")
HOPPER_SOURCES = ("bsr_gemm_sm90.cu", "bsr_conv_sm90.cu")  # sm_90a only; need CUTLASS's headers
ARCHS = ("sm_90a", "sm_80")
DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "fp32", "N7cutlass6half_t": "fp16",
          "N7cutlass10bfloat16_t": "bf16"}
# Instantiations per architecture, 3 dtypes x 4 block sizes times: bsr_gemm_kernel 3 (linear forward and input
# gradient on a plain matrix, the convolution forward on the implicit im2col); weight_grad_kernel 4 ((sddmm,
# scores) x (plain matrix, im2col)); conv_dgrad_kernel 1. Plus the 3 partial-sum kernels of the split SDDMM.
# On sm_90a, the Hopper kernels, 2 dtypes x 2 block sizes times: bsr_gemm_sm90_kernel 2 (forward, input gradient),
# 1 each of the SDDMM, the block scores and the convolution's three passes.
EXPECTED = {"bsr_gemm_kernel": 36, "weight_grad_kernel": 48, "conv_dgrad_kernel": 12, "sum_partials_kernel": 3}
EXPECTED_HOPPER = {"bsr_gemm_sm90_kernel": 8, "bsr_sddmm_sm90_kernel": 4, "block_scores_sm90_kernel": 4,
                   "bsr_conv2d_sm90_kernel": 4, "bsr_conv2d_dgrad_sm90_kernel": 4, "bsr_conv2d_wgrad_sm90_kernel": 4}
SASS_OPS = ("HMMA", "LDSM", "LDGSTS", "FFMA", "HGMMA", "UTMALDG", "LDL", "STL")


def _cuda_home():
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"


def _nvcc():
    path = os.path.join(_cuda_home(), "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _cuobjdump():
    """The toolkit's cuobjdump, else the one inside the triton wheel (a bare toolkit may lack it)."""
    path = os.path.join(_cuda_home(), "bin", "cuobjdump")
    if os.path.exists(path):
        return path
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


NVCC, CUOBJDUMP = _nvcc(), _cuobjdump()
CUTLASS = cutlass_include()
pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")


def _nvcc_flags():
    # The flags torch's CUDAExtension passes (no implicit half conversions, relaxed constexpr), and ours.
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return list(COMMON_NVCC_FLAGS) + ["-O3", "-std=c++17", f"-I{ROOT / 'csrc'}"]


def _kernel_kind(name):
    """(kernel, dtype) of a mangled name, or None for anything else."""
    m = re.search(r"(bsr_gemm_kernel|bsr_gemm_sm90_kernel|bsr_sddmm_sm90_kernel|block_scores_sm90_kernel|"
                  r"bsr_conv2d_sm90_kernel|bsr_conv2d_dgrad_sm90_kernel|bsr_conv2d_wgrad_sm90_kernel|"
                  r"weight_grad_kernel|conv_dgrad_kernel|sum_partials_kernel)"
                  r"I(6__half|13__nv_bfloat16|f|N7cutlass6half_t|N7cutlass10bfloat16_t)", name)
    return (m.group(1), DTYPES[m.group(2)]) if m else None


def _parse_ptxas(log):
    """{kernel: {registers, stack, spill_stores, spill_loads}} from `ptxas -v` output."""
    report, entry, props = {}, None, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            entry = m.group(1)
            report.setdefault(entry, {})
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props is not None:
            report.setdefault(props, {}).update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                                spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and entry is not None:
            report[entry]["registers"] = int(m.group(1))
    return report


def _parse_sass(sass):
    """{kernel: {SASS op: count}} from `cuobjdump -sass`."""
    counts, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            counts[name] = dict.fromkeys(SASS_OPS, 0)
            continue
        if name is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
        if m and m.group(1) in counts[name]:
            counts[name][m.group(1)] += 1
    return counts


def _compile(job):
    source, arch, out_dir = job
    cubin = out_dir / f"{Path(source).stem}.{arch}.cubin"
    includes = [f"-I{CUTLASS}"] if source in HOPPER_SOURCES else []
    cmd = [NVCC, "-cubin", f"-arch={arch}", *_nvcc_flags(), *includes, "-Xptxas", "-v",
           str(ROOT / "csrc" / "cuda" / source), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for {source} on {arch}:\n{proc.stderr[-4000:]}"
    sass = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr
    ptxas, ops = _parse_ptxas(proc.stderr + proc.stdout), _parse_sass(sass.stdout)
    kernels = {}
    for name, usage in ptxas.items():
        kind = _kernel_kind(name)
        if kind is not None and "registers" in usage:
            kernels[name] = dict(source=source, arch=arch, kernel=kind[0], dtype=kind[1], **usage,
                                 **ops.get(name, dict.fromkeys(SASS_OPS, -1)))
    return kernels


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cuda_static")
    jobs = [(source, arch, out_dir) for source in SOURCES for arch in ARCHS]
    if CUTLASS is not None:
        jobs += [(source, "sm_90a", out_dir) for source in HOPPER_SOURCES]
    with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        results = list(pool.map(_compile, jobs))
    return [record for per_job in results for record in per_job.values()]


def _label(r):
    return f"{r['arch']} {r['kernel']} {r['dtype']}: {r['registers']} registers"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_is_compiled(report, arch):
    for kernel, count in EXPECTED.items():
        found = [r for r in report if r["arch"] == arch and r["kernel"] == kernel]
        assert len(found) == count, f"{kernel} on {arch}: {len(found)} instantiations, expected {count}"


@pytest.mark.skipif(CUTLASS is None, reason="no CUTLASS headers (pip install --no-deps nvidia-cutlass)")
def test_every_hopper_kernel_is_compiled(report):
    for kernel, count in EXPECTED_HOPPER.items():
        found = [r for r in report if r["arch"] == "sm_90a" and r["kernel"] == kernel]
        assert len(found) == count, f"{kernel}: {len(found)} instantiations, expected {count}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(report, arch):
    spilling = [f"{_label(r)}, stack {r.get('stack')} B, spill stores {r.get('spill_stores')} B, spill loads "
                f"{r.get('spill_loads')} B, LDL {r['LDL']}, STL {r['STL']}"
                for r in report if r["arch"] == arch and
                (r.get("stack") != 0 or r.get("spill_stores") != 0 or r.get("spill_loads") != 0 or
                 r["LDL"] != 0 or r["STL"] != 0)]
    assert not spilling, "kernels using local memory:\n" + "\n".join(spilling)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_cores_and_async_copies(report, arch):
    wrong = []
    for r in report:
        if r["arch"] != arch or r["kernel"] == "sum_partials_kernel":
            continue
        if r["kernel"] in EXPECTED_HOPPER:
            ok = r["HGMMA"] > 0 and r["UTMALDG"] > 0 and r["HMMA"] == 0 and r["LDGSTS"] == 0
        elif r["dtype"] in ("fp16", "bf16"):
            ok = r["HMMA"] > 0 and r["LDSM"] > 0 and r["LDGSTS"] > 0
        else:
            ok = r["HMMA"] == 0 and r["FFMA"] > 0 and r["LDGSTS"] > 0
        if not ok:
            wrong.append(f"{_label(r)}: " + " ".join(f"{op}={r[op]}" for op in SASS_OPS))
    assert not wrong, "unexpected instruction mix:\n" + "\n".join(wrong)


def test_host_checks_of_the_integer_helpers(tmp_path):
    binary = tmp_path / "cuda_host_checks"
    cmd = [NVCC, "-arch=sm_80", *_nvcc_flags(), str(ROOT / "tests" / "cuda_host_checks.cu"), "-o", str(binary)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr


@pytest.mark.skipif(CUTLASS is None, reason="no CUTLASS headers (pip install --no-deps nvidia-cutlass)")
@pytest.mark.parametrize("checks", ["cuda_sm90_host_checks.cu", "cuda_sm90_conv_host_checks.cu"])
def test_hopper_tiles_land_where_the_wgmmas_read(tmp_path, checks):
    # The Hopper kernels' TMA copies emulated on the host: the GEMMs' tiles, wgmma descriptors and accumulator pairs
    # (tests/cuda_sm90_host_checks.cu); the convolutions' kernels run on the host end to end, their tiles and outputs
    # against direct loops (tests/cuda_sm90_conv_host_checks.cu). Only host code runs, and it is the same for every
    # -arch: sm_80 is the shorter build (the GEMMs' kernel bodies are the trap stubs of the non-sm_90a images there;
    # the convolutions' kernels are compiled as host functions).
    binary = tmp_path / Path(checks).stem
    cmd = [NVCC, "-arch=sm_80", *_nvcc_flags(), f"-I{CUTLASS}", str(ROOT / "tests" / checks), "-o", str(binary)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr
