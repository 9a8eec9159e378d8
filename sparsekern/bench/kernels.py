"""The default suite's kernel tables (CPU or GPU, fp32): Linear 2048^3 forward and forward+backward, and the CIFAR
ResNet-18 convolutions forward+backward, dense vs torch BSR vs each sparsekern backend."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk

from .common import device_name, fmt, format_columns, time_interleaved, with_backend, write_rows

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
            x = torch.randn(CONV_BATCH, cin, size, size, generator=gen).to(device)
            out = (size + 2 * padding - kernel) // stride + 1
            dy = torch.randn(CONV_BATCH, cout, out, out, generator=gen).to(device)
            # Activations in both memory formats: the dense baseline is the faster of NCHW and channels_last;
            # SparseConv2d runs on channels_last, the format its own outputs have in a network of them.
            nchw = (x.requires_grad_(), dy)
            nhwc = (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),
                    dy.contiguous(memory_format=torch.channels_last))

            def step(layer, inputs):
                image, grad = inputs
                image.grad = None  # an activation's gradient is not accumulated in training
                layer(image).backward(grad)

            candidates = {"dense": lambda: step(dense, nchw), "dense_cl": lambda: step(dense, nhwc)}
            for name in backends:
                candidates[name] = with_backend(name, lambda: step(sparse, nhwc))
            ms = time_interleaved(candidates, device, reps)
            ms["dense"] = min(ms["dense"], ms.pop("dense_cl"))
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
                      fmt(row["torch_bsr_ms"], ".2f"), row["backend"], f"{row['ours_ms']:.2f}",
                      f"{row['speedup']:.2f}x", f"{row['frac_ideal']:.2f}"])
    return format_columns(header, lines)


def write_csv(rows: List[dict], out_dir: str, device: torch.device) -> str:
    return write_rows(rows, FIELDS, out_dir, f"{device_name(device)}.csv")
