"""Speedup tables: sparsekern's block-sparse ops against the dense baseline, side by side in one process.

    python -m sparsekern.bench --device cpu [--quick] [--out benchmarks/results]

For each case the dense op (oneDNN/MKL on CPU, cuBLAS/cuDNN on GPU), torch's own BSR where it applies, and
every sparsekern backend available on the device (chosen with SPARSEKERN_BACKEND) run interleaved, one call
each per round, so that load from other processes hits all of them alike; the table shows medians.

- ``speedup`` = dense ms / ours ms
- ``frac_ideal`` = (density x dense ms) / ours ms: 1.0 means the sparse op is exactly as efficient per
  stored weight as the dense one.

Cases: Linear M = N = K = 2048, forward and forward+backward (dX and dW); the convolution layers of a
CIFAR ResNet-18 (batch 64; the 3-channel stem is left out, as sparse training keeps it dense), forward+
backward, SparseConv2d against nn.Conv2d, per layer and in total. The rows also go to
``<out>/<device-name>.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk

LINEAR_SHAPE = (2048, 2048, 2048)  # M, N, K
# CIFAR ResNet-18 convolutions: (in, out, kernel, stride, input size, how many in the network)
RESNET18_CIFAR_CONVS = [
    (64, 64, 3, 1, 32, 4),
    (64, 128, 3, 2, 32, 1),
    (128, 128, 3, 1, 16, 3),
    (64, 128, 1, 2, 32, 1),
    (128, 256, 3, 2, 16, 1),
    (256, 256, 3, 1, 8, 3),
    (128, 256, 1, 2, 16, 1),
    (256, 512, 3, 2, 8, 1),
    (512, 512, 3, 1, 4, 3),
    (256, 512, 1, 2, 8, 1),
]
CONV_BATCH = 64
FIELDS = ["op", "shape", "sparsity", "block", "dense_ms", "torch_bsr_ms", "backend", "ours_ms", "speedup",
          "frac_ideal"]


def device_name(device: torch.device) -> str:
    """The CPU model or GPU name, as a file name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as info:
                for line in info:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1]
                        break
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_interleaved(candidates: Dict[str, Callable[[], object]], device: torch.device, reps: int,
                     warmup: int = 2) -> Dict[str, float]:
    """Median ms of each candidate, measured in rounds that call every candidate once."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _synchronize(device)
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            samples[name].append(_time_once(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def backend(name: str):
    """Run sparsekern ops on backend ``name`` (SPARSEKERN_BACKEND) inside the block."""
    previous = os.environ.get("SPARSEKERN_BACKEND")
    os.environ["SPARSEKERN_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SPARSEKERN_BACKEND", None)
        else:
            os.environ["SPARSEKERN_BACKEND"] = previous


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with backend(name):
            return fn()
    return run


def available_backends(device: torch.device, include_reference: bool) -> List[str]:
    """sparsekern backends that can run the linear ops on ``device``, fastest first."""
    names = [b for b in sk.ops.BACKENDS
             if sk.ops.backend_unavailable_reason(b, device.type) is None and sk.ops.backend_has_op(b, "bsr_linear")]
    if not include_reference and len(names) > 1:
        names = [b for b in names if b != "reference"]
    return names


def _row(op, shape, sparsity, block, dense_ms, torch_bsr_ms, backend_name, ours_ms):
    density = 1.0 - sparsity
    return {"op": op, "shape": shape, "sparsity": sparsity, "block": block, "dense_ms": dense_ms,
            "torch_bsr_ms": torch_bsr_ms, "backend": backend_name, "ours_ms": ours_ms,
            "speedup": dense_ms / ours_ms, "frac_ideal": density * dense_ms / ours_ms}


def _torch_bsr_linear(x: torch.Tensor, weight: torch.Tensor, block: int) -> Optional[Callable[[], object]]:
    """torch's own BSR forward, or None where torch cannot run it on this device."""
    try:
        w_bsr = weight.to_sparse_bsr((block, block))
        F.linear(x[:2], w_bsr)
        return lambda: F.linear(x, w_bsr)
    except (RuntimeError, NotImplementedError):
        return None


def bench_linear(device, sparsities, blocks, backends, reps) -> List[dict]:
    m, n, k = LINEAR_SHAPE
    shape = f"{m}x{n}x{k}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device)
    dy = torch.randn(m, n, generator=gen).to(device)
    rows = []
    for block in blocks:
        for sparsity in sparsities:
            layout = sk.BlockSparseLayout.random((n, k), block, 1.0 - sparsity, generator=gen).to(device)
            values = torch.randn(layout.nnz_blocks, block, block, generator=gen).to(device)
            weight = sk.reference.blocks_to_dense(values, layout.coo_row, layout.col_idx,
                                                  *layout.block_grid)[:n, :k].contiguous()

            # forward
            candidates = {"dense": lambda: F.linear(x, weight)}
            bsr = _torch_bsr_linear(x, weight, block)
            if bsr is not None:
                candidates["torch_bsr"] = bsr
            for name in backends:
                candidates[name] = with_backend(name, lambda: sk.ops.bsr_linear(x, layout, values))
            ms = time_interleaved(candidates, device, reps)
            for name in backends:
                rows.append(_row("linear_fwd", shape, sparsity, block, ms["dense"], ms.get("torch_bsr", float("nan")),
                                 name, ms[name]))

            # forward + backward: dense forward + 2 GEMMs against forward + dX + SDDMM, through autograd
            x_grad = x.clone().requires_grad_()
            weight_grad = weight.clone().requires_grad_()
            values_grad = values.clone().requires_grad_()

            def dense_step():
                F.linear(x_grad, weight_grad).backward(dy)

            def sparse_step():
                sk.ops.bsr_linear(x_grad, layout, values_grad).backward(dy)

            candidates = {"dense": dense_step}
            for name in backends:
                candidates[name] = with_backend(name, sparse_step)
            ms = time_interleaved(candidates, device, reps)
            for name in backends:
                rows.append(_row("linear_fwd_bwd", shape, sparsity, block, ms["dense"], float("nan"), name, ms[name]))
    return rows


def bench_resnet18_convs(device, sparsities, block, backends, reps) -> List[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    for sparsity in sparsities:
        totals = {name: 0.0 for name in ["dense"] + backends}
        for cin, cout, kernel, stride, size, count in RESNET18_CIFAR_CONVS:
            padding = kernel // 2
            dense = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False).to(device)
            sparse = sk.SparseConv2d.from_dense(dense, sparsity=sparsity, block_size=block).to(device)
            x = torch.randn(CONV_BATCH, cin, size, size, generator=gen).to(device).requires_grad_()
            out = (size + 2 * padding - kernel) // stride + 1
            dy = torch.randn(CONV_BATCH, cout, out, out, generator=gen).to(device)

            def step(layer=None):
                layer(x).backward(dy)

            candidates = {"dense": lambda: step(dense)}
            for name in backends:
                candidates[name] = with_backend(name, lambda: step(sparse))
            ms = time_interleaved(candidates, device, reps)
            shape = f"{cin}->{cout} k{kernel} s{stride} {size}x{size} x{count}"
            for name in backends:
                rows.append(_row("conv_fwd_bwd", shape, sparsity, block, ms["dense"], float("nan"), name, ms[name]))
            for name in totals:
                totals[name] += count * ms[name]
        for name in backends:
            rows.append(_row("resnet18_convs_fwd_bwd", f"batch {CONV_BATCH}, 19 convs", sparsity, block,
                             totals["dense"], float("nan"), name, totals[name]))
    return rows


def format_table(rows: List[dict]) -> str:
    header = ["op", "shape", "sparsity", "block", "dense ms", "torch BSR ms", "backend", "ours ms", "speedup",
              "frac ideal"]
    lines = []
    for row in rows:
        lines.append([row["op"], row["shape"], f"{row['sparsity']:.2f}", str(row["block"]), f"{row['dense_ms']:.2f}",
                      "-" if row["torch_bsr_ms"] != row["torch_bsr_ms"] else f"{row['torch_bsr_ms']:.2f}",
                      row["backend"], f"{row['ours_ms']:.2f}", f"{row['speedup']:.2f}x", f"{row['frac_ideal']:.2f}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def write_csv(rows: List[dict], out_dir: str, device: torch.device) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{device_name(device)}.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsekern.bench",
        description="Block-sparse vs dense timings (Linear 2048^3 and CIFAR ResNet-18 convolutions) with a "
                    "speedup column; writes <out>/<device-name>.csv.")
    parser.add_argument("--device", default="cpu", help="torch device to run on: cpu (default) or cuda[:i]")
    parser.add_argument("--quick", action="store_true",
                        help="sparsities 50/90 and block 32 only, fewer repetitions, no reference backend "
                             "(about a minute on 2 CPU cores)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for the CSV (default: benchmarks/results)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per case (default 5 quick, 10 full)")
    parser.add_argument("--skip-conv", action="store_true", help="only the Linear cases")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    sparsities = [0.5, 0.9] if args.quick else [0.5, 0.75, 0.9, 0.95]
    blocks = [32] if args.quick else [16, 32, 64]
    reps = args.reps or (5 if args.quick else 10)
    backends = available_backends(device, include_reference=not args.quick)

    print(f"device: {device_name(device)} ({device}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"backends {', '.join(backends)}, {reps} rounds (medians)")
    rows = bench_linear(device, sparsities, blocks, backends, reps)
    print(format_table(rows), flush=True)
    if not args.skip_conv:
        conv_rows = bench_resnet18_convs(device, sparsities, 32, backends, reps)
        print()
        print(format_table(conv_rows))
        rows += conv_rows
    path = write_csv(rows, args.out, device)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
