"""``python -m sparsekern.bench``: the command line of every suite (see the package docstring)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, List, Optional

import torch

import sparsekern as sk

from . import e2e, gpu_conv, gpu_linear, gpu_optim
from .common import OURS, VARIANTS, available_backends, device_name, write_rows
from .kernels import bench_linear, bench_resnet18_convs, format_table, write_csv
from .plots import plot_e2e, plot_kernel_speedup

SUITES = ("default", "gpu-linear", "gpu-optim", "gpu-conv", "gpu-e2e", "gpu")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STATIC_REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "benchmarks", "triton_static_report.py")


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparsekern.bench",
        description="Block-sparse vs dense timings, side by side in one process, medians of event-timed rounds. "
                    "Suite 'default': Linear 2048^3 and CIFAR ResNet-18 convolutions (fp32) with a speedup column, "
                    "then end-to-end training images/s of dense vs simulated-masking DST vs sparsekern (ResNet-18 "
                    "32x32 and ResNet-50 224x224); writes <out>/<device-name>.csv, <device-name>_e2e.csv and, with "
                    "matplotlib, PNG plots. GPU suites (they also run on a CPU with small shapes): 'gpu-linear' "
                    "(forward, dX, SDDMM and block_grad_scores at M,N,K = 8192,4096,4096 bf16: dense, torch BSR, "
                    "stk, every backend; correctness checked first), 'gpu-optim' (masked_sgd_ bandwidth vs copy, "
                    "layout_update_ of ResNet-50's layers), 'gpu-conv' (ResNet-50 and CIFAR ResNet-18 convolutions "
                    "per layer, forward and forward+backward), 'gpu-e2e' (training steps per second of dense, "
                    "simulated masking and sparsekern, ResNet-50 224 px batch 128 and ViT-B/16's MLP blocks on 8192 "
                    "tokens, bf16 autocast, channels_last, eager and as CUDA graphs, with the size of the training "
                    "state and each step's peak memory), 'gpu' (linear, optim, conv); they write "
                    "<device-name>_gpu_linear.csv, _gpu_optim.csv, _gpu_conv.csv, _e2e.csv and exit 1 when one of "
                    "our backends gives a wrong result. --static prints the Triton kernels' registers and spills.")
    parser.add_argument("--device", default="cpu", help="torch device to run on: cpu (default) or cuda[:i]")
    parser.add_argument("--suite", choices=SUITES, default=None,
                        help="what to run (default: 'default', or nothing but the report with --static)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for the CSVs and plots (default: benchmarks/results)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds per case (default suite: 5 quick, 10 full; gpu-linear and gpu-optim 20, "
                             "gpu-conv 10, gpu-e2e 5; on a CPU the GPU suites default to 3, gpu-e2e to 2)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--sparsities", type=_floats, default=None,
                        help="comma-separated sparsities (default suite: 0.5,0.75,0.9,0.95, quick 0.5,0.9; "
                             "gpu-linear 0.5,0.75,0.9,0.95; gpu-conv and gpu-e2e 0.8,0.9,0.95)")
    parser.add_argument("--blocks", type=_ints, default=None,
                        help="comma-separated block sizes (default suite: 16,32,64, quick 32; gpu-linear 32,64,128; "
                             "gpu-conv 32,64)")
    parser.add_argument("--backends", type=_names, default=None,
                        help="comma-separated sparsekern backends for the GPU suites, 'auto' included (default: every "
                             "one that runs on the device, the reference excluded, then auto where it measures to "
                             "choose between them); one that lacks an op gets an n/a row. Also the kernel variants "
                             f"no backend uses by default, only when named here ({', '.join(VARIANTS)}: the Triton "
                             "kernels with TMA tile loads, and the cuda backend's Hopper kernels on CuTe for the four "
                             "GEMMs and the stride-1 convolutions, neither run on a GPU yet)")

    gpu = parser.add_argument_group("GPU suites")
    gpu.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                     help="data type of gpu-linear and gpu-conv (default: bfloat16 on a GPU, float32 on a CPU, "
                          "where the Triton interpreter computes bf16 wrongly)")
    gpu.add_argument("--shape", type=_ints, default=None, metavar="M,N,K",
                     help="gpu-linear: x [M, K], W [N, K] (default 8192,4096,4096)")
    gpu.add_argument("--no-graphs", action="store_true",
                     help="time launches back to back instead of replaying CUDA graphs of them")
    gpu.add_argument("--sgd-numel", type=int, default=None,
                     help="gpu-optim: dense weights the masked_sgd_ values stand for (default: ResNet-50's sparse "
                          "layers, 23.5M)")
    gpu.add_argument("--densities", type=_floats, default=None,
                     help="gpu-optim: masked_sgd_ densities (default 0.1,0.5,1.0)")
    gpu.add_argument("--models", type=_names, default=None,
                     help=f"gpu-conv: comma-separated models (default {','.join(gpu_conv.MODELS)})")
    gpu.add_argument("--batch", type=int, default=None, help=f"gpu-conv: batch size (default {gpu_conv.BATCH})")
    gpu.add_argument("--image-size", type=int, default=None,
                     help="gpu-conv: input size for every model (default 224 for resnet50, 32 for resnet18)")

    static = parser.add_argument_group("static report (no GPU needed)")
    static.add_argument("--static", action="store_true",
                        help="print benchmarks/triton_static_report.py: registers, spills (ptxas -v), shared "
                             "memory and tensor-core instructions of every shipped Triton kernel config; also "
                             "written to <out>/triton_static_report.txt")
    static.add_argument("--static-subset", choices=("ci", "full"), default="ci",
                        help="ci (default): every bf16 config and two per other dtype; full: every config")
    static.add_argument("--static-arch", type=int, action="append", help="90 and/or 80 (default: both)")

    default = parser.add_argument_group("default suite")
    default.add_argument("--quick", action="store_true",
                         help="kernels: sparsities 50/90 and block 32 only, fewer repetitions, no reference "
                              "backend; end to end: ResNet-18 at 90%% only, no ResNet-50 (a minute or two on 2 "
                              "CPU cores)")
    default.add_argument("--e2e-reps", type=int, default=None,
                         help="timed ordinary training steps per end-to-end case (default 3 quick, 5 full; "
                              "plus 1 or 2 mask-update steps)")
    default.add_argument("--skip-conv", action="store_true", help="no per-layer convolution table")
    default.add_argument("--skip-kernels", action="store_true",
                         help="no Linear/convolution tables (end to end only; the kernel CSV is left as it is)")
    default.add_argument("--skip-e2e", action="store_true", help="no end-to-end training-throughput table")
    return parser


def _say(text: str) -> None:
    print(text, flush=True)


def run_default(args, device: torch.device) -> int:
    sparsities = args.sparsities or ([0.5, 0.9] if args.quick else [0.5, 0.75, 0.9, 0.95])
    blocks = args.blocks or ([32] if args.quick else [16, 32, 64])
    reps = args.reps or (5 if args.quick else 10)
    backends = available_backends(device, include_reference=not args.quick)
    name = device_name(device)

    print(f"device: {name} ({device}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"backends {', '.join(backends)}, {reps} rounds (medians)")
    rows: List[dict] = []
    if not args.skip_kernels:
        rows = bench_linear(device, sparsities, blocks, backends, reps)
        print(format_table(rows), flush=True)
        if not args.skip_conv:
            conv_rows = bench_resnet18_convs(device, sparsities, 32, backends, reps)
            print()
            print(format_table(conv_rows))
            rows += conv_rows
        path = write_csv(rows, args.out, device)
        print(f"\nwrote {path}")
        if not args.no_plots:
            plot = plot_kernel_speedup(rows, os.path.join(args.out, f"{name}_speedup.png"), f"{name}: kernels")
            if plot:
                print(f"wrote {plot}")

    if not args.skip_e2e:
        e2e_reps = args.e2e_reps or (3 if args.quick else 5)
        e2e_sparsities = [0.9] if args.quick else e2e.E2E_SPARSITIES
        simulated = ("rigl-torch's RigLScheduler" if e2e.rigl_torch_scheduler() is not None else
                     "rigl-torch is not importable, so a dense x fixed-mask loop written here (gradients and "
                     "weights masked every step, no mask updates: a lower bound on the cost of simulated DST)")
        print(f"\nend-to-end training throughput (random data, block {e2e.E2E_BLOCK}, mask update every "
              f"{e2e.E2E_UPDATE_INTERVAL} steps, amortised; {e2e_reps} ordinary steps per case, medians)")
        print(f"simulated-masking DST: {simulated}", flush=True)
        rows = e2e.bench_e2e(e2e.e2e_cases(device, args.quick), e2e_sparsities, device, e2e_reps,
                             update_reps=1 if args.quick else 2, report=_say)
        path = e2e.write_e2e_csv(rows, args.out, device)
        print(f"\nwrote {path}")
        if not args.no_plots:
            plot = plot_e2e(rows, os.path.join(args.out, f"{name}_e2e.png"), f"{name}: training throughput")
            if plot:
                print(f"wrote {plot}")
    return 0


def _wrong_in_ours(rows: List[dict]) -> List[dict]:
    """Rows where one of our backends gave a wrong result or failed (baselines that fail are only reported)."""
    return [r for r in rows if r["impl"] in OURS and r["status"] in ("MISMATCH", "error")]


def _write(rows: List[dict], fields, args, device, suite: str, plot_rows: Optional[Callable[[], List[dict]]] = None):
    name = device_name(device)
    path = write_rows(rows, fields, args.out, f"{name}_{suite.replace('-', '_')}.csv")
    print(f"\nwrote {path}")
    if plot_rows is not None and not args.no_plots:
        plot = plot_kernel_speedup(plot_rows(), os.path.join(args.out, f"{name}_{suite.replace('-', '_')}.png"),
                                   f"{name}: {suite}")
        if plot:
            print(f"wrote {plot}")


def run_gpu_suites(args, device: torch.device, suites: List[str]) -> int:
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    use_graphs = not args.no_graphs
    print(f"device: {device_name(device)} ({device}), torch {torch.__version__}, sparsekern backends here: "
          f"{', '.join(b for b in sk.ops.BACKENDS if sk.ops.backend_unavailable_reason(b, device.type) is None)}"
          f"{'' if on_gpu else '; on a CPU timings are host times (no CUDA graphs)'}", flush=True)
    wrong: List[dict] = []
    if "gpu-linear" in suites:
        rows = gpu_linear.bench_gpu_linear(
            device, dtype, args.shape or gpu_linear.SHAPE, args.sparsities or gpu_linear.SPARSITIES,
            args.blocks or gpu_linear.BLOCKS, args.reps or (20 if on_gpu else 3), args.backends, use_graphs, _say)
        print(gpu_linear.goal_summary(rows, OURS))
        print(gpu_linear.density_fit(rows, OURS))
        _write(rows, gpu_linear.FIELDS, args, device, "gpu-linear", lambda: [
            {"op": r["op"], "sparsity": r["sparsity"], "block": r["block"], "backend": r["impl"],
             "speedup": r["speedup"]}
            for r in rows if r["impl"] != "dense" and r["speedup"] is not None and r["sparsity"] is not None])
        wrong += _wrong_in_ours(rows)
    if "gpu-optim" in suites:
        rows = gpu_optim.bench_gpu_optim(device, args.sgd_numel, args.densities or gpu_optim.SGD_DENSITIES,
                                         args.reps or (20 if on_gpu else 3), args.backends, use_graphs, _say)
        print(gpu_optim.goal_summary(rows))
        _write(rows, gpu_optim.FIELDS, args, device, "gpu-optim")
        wrong += _wrong_in_ours(rows)
    if "gpu-conv" in suites:
        rows = gpu_conv.bench_gpu_conv(
            device, dtype, args.models or tuple(gpu_conv.MODELS), args.sparsities or gpu_conv.SPARSITIES,
            args.blocks or gpu_conv.BLOCKS, args.batch or gpu_conv.BATCH, args.image_size,
            args.reps or (10 if on_gpu else 3), args.backends, use_graphs, _say)
        _write(rows, gpu_conv.FIELDS, args, device, "gpu-conv", lambda: [
            {"op": f"{r['model']} {r['pass']}", "sparsity": r["sparsity"], "block": r["block"], "backend": r["impl"],
             "speedup": r["speedup"]}
            for r in rows if r["layer"] == "total" and r["impl"] != "dense" and r["speedup"] is not None])
        wrong += _wrong_in_ours(rows)
    if "gpu-e2e" in suites:
        rows = e2e.bench_e2e(e2e.gpu_e2e_cases(device), args.sparsities or e2e.E2E_SPARSITIES, device,
                             args.reps or (5 if on_gpu else 2), report=_say,
                             autocast=dtype if dtype != torch.float32 else None, channels_last=True, graphs=use_graphs)
        print(e2e.goal_summary(rows))
        print(f"\nwrote {e2e.write_e2e_csv(rows, args.out, device)}")
    if wrong:
        print(f"\n!!! {len(wrong)} case(s) where a sparsekern backend gave a wrong result or failed:")
        for r in wrong:
            where = ", ".join(f"{k} {r[k]}" for k in ("op", "test", "model", "layer", "pass", "sparsity", "block")
                              if r.get(k) is not None)
            print(f"  {r['impl']}: {where}: {r['status']}: {r['note']}")
        return 1
    return 0


def run_static(args) -> int:
    """benchmarks/triton_static_report.py in a process without TRITON_INTERPRET (it compiles for real GPUs)."""
    if not os.path.exists(STATIC_REPORT):
        print(f"--static: {STATIC_REPORT} not found (it ships with the repository, not the installed package)")
        return 1
    command = [sys.executable, STATIC_REPORT, "--subset", args.static_subset]
    for arch in args.static_arch or []:
        command += ["--arch", str(arch)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "triton_static_report.txt")
    with open(path, "w") as log, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
    print(f"wrote {path}")
    return process.returncode


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shape is not None and (len(args.shape) != 3 or min(args.shape) <= 0):
        parser.error(f"--shape takes three positive sizes M,N,K, got {args.shape}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    suite = args.suite or (None if args.static else "default")
    status = run_static(args) if args.static else 0
    if suite == "default":
        status = max(status, run_default(args, device))
    elif suite is not None:
        suites = ["gpu-linear", "gpu-optim", "gpu-conv"] if suite == "gpu" else [suite]
        status = max(status, run_gpu_suites(args, device, suites))
    return status
