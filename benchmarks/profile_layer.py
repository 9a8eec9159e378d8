"""Where a layer call's time goes: one sparse layer's eager forward + backward, side by side with its dense twin.

    python benchmarks/profile_layer.py --device cuda [--out DIR]    # issue shapes, bf16, events + torch.profiler
    python benchmarks/profile_layer.py --device cpu                 # tiny tensors: host time per call

On a GPU: SparseLinear(4096, 4096) on x [8192, 4096] and SparseConv2d(256, 256, 3, padding=1) on a channels_last
[128, 256, 14, 14] batch, 90% sparse, bf16, medians of CUDA-event-timed calls (no graphs, as a user calls them),
then a torch.profiler table (CPU and CUDA activity) of a few forward + backward calls of each. On a CPU the
tensors are tiny so that the time is the host work of the call (Python, dispatch, allocation), not arithmetic.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.bench.common import time_interleaved


def _calls(fn, n: int):
    def run():
        for _ in range(n):
            fn()
    return run


def cases(device: torch.device, block: int):
    """(name, sparse layer, dense layer, input) at the issue's shapes on a GPU, tiny ones on a CPU."""
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    lin_in, lin_m = (4096, 8192) if on_gpu else (32, 8)
    conv_c, conv_b, conv_hw = (256, 128, 14) if on_gpu else (16, 1, 4)
    bs = block if on_gpu else 16
    torch.manual_seed(0)
    # 90% of the tiny 32x32 matrix's 4 blocks would leave none: 50% keeps 2
    sparse_lin = sk.SparseLinear(lin_in, lin_in, bias=False, sparsity=0.9 if on_gpu else 0.5, block_size=bs)
    dense_lin = nn.Linear(lin_in, lin_in, bias=False)
    sparse_conv = sk.SparseConv2d(conv_c, conv_c, 3, padding=1, bias=False, sparsity=0.9,
                                  block_size=32 if on_gpu else 16)
    dense_conv = nn.Conv2d(conv_c, conv_c, 3, padding=1, bias=False)
    x_lin = torch.randn(lin_m, lin_in, device=device, dtype=dtype)
    x_conv = torch.randn(conv_b, conv_c, conv_hw, conv_hw, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    out = []
    for name, sparse, dense, x in (("SparseLinear", sparse_lin, dense_lin, x_lin),
                                   ("SparseConv2d", sparse_conv, dense_conv, x_conv)):
        sparse = sparse.to(device, dtype)
        dense = dense.to(device, dtype)
        if x.dim() == 4:
            sparse = sparse.to(memory_format=torch.channels_last)
            dense = dense.to(memory_format=torch.channels_last)
        out.append((name, sparse, dense, x))
    return out


def _step(layer, x, grad):
    def run():
        xi = x.detach().requires_grad_(True)
        layer(xi).backward(grad)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/profile_layer.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--block", type=int, default=64, help="SparseLinear's block size on a GPU (default 64)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 30)")
    parser.add_argument("--out", default=None, help="write the profiler tables to DIR/profile_layer_<device>.txt")
    parser.add_argument("--no-profile", action="store_true", help="timings only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # host work, not arithmetic: one thread, as the issue measured it
    reps = args.reps or 30
    report = []
    unit = "ms" if device.type == "cuda" else "us"
    scale = 1.0 if device.type == "cuda" else 1e3
    per_round = 1 if device.type == "cuda" else 200  # on a CPU one call is microseconds: time 200 per round
    print(f"{'case':<14}{'pass':<10}{'dense ' + unit:>12}{'sparse ' + unit:>12}{'sparse/dense':>14}   "
          f"({'CUDA events' if device.type == 'cuda' else f'host time per call, {per_round} calls a round'}, "
          f"median of {reps} interleaved rounds)")
    for name, sparse, dense, x in cases(device, args.block):
        grad = torch.randn_like(dense(x))
        for label, fns in (("forward", (lambda: dense(x), lambda: sparse(x))),
                           ("fwd+bwd", (_step(dense, x, grad), _step(sparse, x, grad)))):
            with torch.no_grad() if label == "forward" else torch.enable_grad():
                ms = time_interleaved({"dense": _calls(fns[0], per_round), "sparse": _calls(fns[1], per_round)},
                                      device, reps, warmup=3)
            d, s = ms["dense"] / per_round, ms["sparse"] / per_round
            print(f"{name:<14}{label:<10}{d * scale:>12.1f}{s * scale:>12.1f}{s / d:>13.2f}x", flush=True)
        if not args.no_profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            step = _step(sparse, x, grad)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(5):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            report.append(f"## {name}, 5 forward + backward calls, sorted by {sort}\n"
                          + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    if report:
        text = "\n\n".join(report)
        print(text)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"profile_layer_{device.type}.txt"), "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
