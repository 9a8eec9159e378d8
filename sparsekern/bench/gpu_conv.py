"""``--suite gpu-conv``: per-layer convolution table (issue #6): dense cuDNN (``nn.Conv2d``, channels_last) against
``SparseConv2d`` on every sparsekern backend, forward and forward+backward.

Models: ImageNet ResNet-50 (224x224) and the CIFAR ResNet-18 (32x32), batch 128 (``--batch``), bf16, channels_last.
The distinct convolutions of each model are found by running it once on the meta device (so ``--image-size``
changes them consistently); each is timed once per (sparsity, block) and counted as often as it occurs in the
model (``count``). The 3-channel stem is left out: sparse training keeps it dense. Sparsities 80/90/95%, blocks
32 and 64; the sparse filter keeps the largest-norm blocks of a random dense one (``SparseConv2d.from_dense``)
and the dense baseline is that filter, masked (``to_dense()``).

``forward`` runs under ``torch.no_grad``; ``forward+backward`` runs forward and ``backward(dy)`` with the input
requiring grad (dX and dW), gradients set to None before each call. Before timing, each implementation's output
(forward) or dX and dW (forward+backward; dW compared at the stored blocks) is compared with the same computation
in higher precision (fp32 without TF32 for bf16/fp16 runs, fp64 for fp32); the limit is twice the dense
same-precision error (``common.error_limit``). ``total`` rows sum count x ms over the layers of a model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import sparsekern as sk
from sparsekern import reference

from .common import Impl, backend_choices, check_and_time, fmt, format_columns, rel_err, with_backend

MODELS = {"resnet50": 224, "resnet18": 32}  # model name -> image size (ImageNet / CIFAR)
SPARSITIES = (0.8, 0.9, 0.95)
BLOCKS = (32, 64)
BATCH = 128
PASSES = ("forward", "forward+backward")
# The ops SparseConv2d runs (implicit GEMM, or the GEMMs for 1x1 stride-1 layers); a backend without one of them
# would silently run the reference there.
PASS_KERNELS = {"forward": ("bsr_conv2d", "bsr_linear"),
                "forward+backward": ("bsr_conv2d", "bsr_conv2d_dgrad", "bsr_conv2d_wgrad", "bsr_linear",
                                     "bsr_linear_dx", "bsr_sddmm")}
FIELDS = ["model", "layer", "count", "batch", "input", "dtype", "sparsity", "block", "density", "pass", "impl",
          "timing", "ms", "dense_ms", "speedup", "frac_ideal", "rel_err", "err_limit", "status", "first_call_s", "note"]


@dataclass(frozen=True)
class ConvShape:
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    input_size: Tuple[int, int]

    @property
    def label(self) -> str:
        return (f"{self.in_channels}->{self.out_channels} k{self.kernel_size[0]} s{self.stride[0]} "
                f"{self.input_size[0]}x{self.input_size[1]}")

    def dense(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=False)


def conv_layers(model: str, image_size: int) -> List[Tuple[ConvShape, int]]:
    """The distinct convolutions of ``model`` on [1, 3, image_size, image_size] inputs with how often each
    occurs, in order of first appearance; the image stem (which ``sparsify`` leaves dense) excluded."""
    from ..models import MODELS as MODEL_FACTORIES
    from ..train import _stem_filter
    with torch.device("meta"):
        network = MODEL_FACTORIES[model]().eval()  # eval: batch norm takes a batch of 1 at any size
    counts: Dict[ConvShape, int] = {}

    def record(module, inputs):
        shape = ConvShape(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, module.groups, tuple(inputs[0].shape[2:]))
        counts[shape] = counts.get(shape, 0) + 1

    hooks = [module.register_forward_pre_hook(record) for name, module in network.named_modules()
             if isinstance(module, nn.Conv2d) and _stem_filter(module, name)]
    network(torch.empty(1, 3, image_size, image_size, device="meta"))
    for hook in hooks:
        hook.remove()
    return list(counts.items())


@contextlib.contextmanager
def _exact_fp32():
    """fp32 convolutions and matmuls without TF32 (cuDNN uses it by default), for the reference."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()
    return run


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> Callable[[], tuple]:
    """Forward and backward from fresh gradients; returns (dX, the weight's gradient)."""
    def run():
        x.grad = weight.grad = None
        layer(x).backward(dy)
        return x.grad, weight.grad
    return run


class ConvCase:
    """One layer at one (sparsity, block): the sparse layer, its masked dense twin, inputs and references."""

    def __init__(self, shape: ConvShape, sparsity: float, block: int, batch: int, dtype: torch.dtype,
                 device: torch.device, gen: torch.Generator, device_gen: torch.Generator):
        self.shape, self.block = shape, block
        dense = shape.dense()
        with torch.no_grad():  # nn.Conv2d's init scale, drawn from the suite's generator
            fan_in = dense.weight[0].numel()
            dense.weight.copy_(torch.randn(dense.weight.shape, generator=gen) / fan_in ** 0.5)
        sparse = sk.SparseConv2d.from_dense(dense, sparsity=sparsity, block_size=block)
        self.density = sparse.density
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        channels_last = dict(memory_format=torch.channels_last)
        self.sparse = sparse.to(device=device, dtype=dtype)
        self.dense = sparse.to_dense().to(device=device, dtype=dtype, **channels_last)
        ref_layer = sparse.to_dense().to(device=device, dtype=ref_dtype, **channels_last)
        x = torch.randn(batch, shape.in_channels, *shape.input_size, device=device, generator=device_gen)
        self.x = x.to(dtype=dtype, **channels_last)
        x_ref = self.x.to(ref_dtype).requires_grad_()
        with _exact_fp32():
            y_ref = ref_layer(x_ref)
            dy = torch.randn(y_ref.shape, device=device, generator=device_gen)
            self.dy = dy.to(dtype=dtype, **channels_last)
            y_ref.backward(self.dy.to(ref_dtype))
        self.y_ref, self.dx_ref = y_ref.detach(), x_ref.grad
        self.dw_ref = self.blocks(ref_layer.weight.grad)
        self.x.requires_grad_()

    def blocks(self, weight_grad: torch.Tensor) -> torch.Tensor:
        """A dense filter gradient [out, in, kh, kw] at the sparse layer's stored blocks: [nnz, bs, bs]."""
        layout = self.sparse.layout
        return reference.dense_to_blocks(self.sparse._weight_to_matrix(weight_grad), layout.coo_row, layout.col_idx,
                                         self.block)

    def impls(self, pass_name: str, dtype: torch.dtype, backends: Optional[Sequence[str]]) -> List[Impl]:
        library = "cuDNN" if self.x.device.type == "cuda" else "oneDNN"
        if pass_name == "forward":
            x = self.x.detach()
            check = lambda out: {"out": rel_err(out, self.y_ref)}
            dense = Impl("dense", f"nn.Conv2d ({library}, channels_last)", _no_grad(lambda: self.dense(x)), check)
            call = _no_grad(lambda: self.sparse(x))
        else:
            check = lambda out: {"dx": rel_err(out[0], self.dx_ref), "dW": rel_err(out[1], self.dw_ref)}
            dense = Impl("dense", f"nn.Conv2d ({library}, channels_last)",
                         _fwd_bwd(self.dense, self.x, self.dy, self.dense.weight),
                         lambda out: check((out[0], self.blocks(out[1]))))
            call = _fwd_bwd(self.sparse, self.x, self.dy, self.sparse.values)
        impls = [dense]
        for name, why in backend_choices(PASS_KERNELS[pass_name], self.x.device, dtype, backends):
            impls.append(Impl(name, "SparseConv2d", None if why else with_backend(name, call), check, why or ""))
        return impls


def _row(model, shape_label, count, batch, image_size, dtype, sparsity, block, density, pass_name, outcome,
         dense_ms):
    ms = outcome.ms
    err, limit = outcome.worst()
    timed = ms is not None and dense_ms is not None
    return {"model": model, "layer": shape_label, "count": count, "batch": batch, "input": f"{image_size}x{image_size}",
            "dtype": str(dtype)[6:], "sparsity": sparsity, "block": block, "density": round(density, 4),
            "pass": pass_name, "impl": outcome.impl.name, "timing": outcome.timing, "ms": ms, "dense_ms": dense_ms,
            "speedup": dense_ms / ms if timed else None,
            "frac_ideal": density * dense_ms / ms if timed else None, "rel_err": err, "err_limit": limit,
            "status": outcome.status, "first_call_s": outcome.first_call_s, "note": outcome.note}


def total_rows(layer_rows: List[dict]) -> List[dict]:
    """Per (pass, impl): sum of count x ms over the layers (None where a layer has no time)."""
    totals = []
    for pass_name in dict.fromkeys(r["pass"] for r in layer_rows):
        rows = [r for r in layer_rows if r["pass"] == pass_name]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["impl"] == impl]
            complete = all(r["ms"] is not None and r["dense_ms"] is not None for r in mine)
            ms = sum(r["count"] * r["ms"] for r in mine) if complete else None
            dense_ms = sum(r["count"] * r["dense_ms"] for r in mine) if complete else None
            ideal_ms = sum(r["count"] * r["density"] * r["dense_ms"] for r in mine) if complete else None
            first = mine[0]
            totals.append({**first, "layer": "total", "count": sum(r["count"] for r in mine),
                           "density": round(sum(r["count"] * r["density"] for r in mine) /
                                            sum(r["count"] for r in mine), 4),
                           "timing": "", "ms": ms, "dense_ms": dense_ms,
                           "speedup": dense_ms / ms if complete else None,
                           "frac_ideal": ideal_ms / ms if complete else None, "rel_err": None, "err_limit": None,
                           "status": "ok" if complete else "incomplete", "first_call_s": None,
                           "note": "sum of count x ms" if complete else "a layer has no time (see its row)"})
    return totals


def format_rows(rows: List[dict]) -> str:
    header = ["model", "sparsity", "block", "layer", "count", "pass", "impl", "ms", "speedup", "frac ideal",
              "rel err", "status", "timing / note"]
    lines = [[r["model"], fmt(r["sparsity"], ".2f"), str(r["block"]), r["layer"], str(r["count"]), r["pass"],
              r["impl"], fmt(r["ms"], ".3f"), fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
              fmt(r["frac_ideal"], ".2f"), fmt(r["rel_err"], ".1e"), r["status"],
              " ".join(t for t in (r["timing"], r["note"]) if t)] for r in rows]
    return format_columns(header, lines)


def bench_gpu_conv(device: torch.device, dtype: torch.dtype, models: Sequence[str] = tuple(MODELS),
                   sparsities: Sequence[float] = SPARSITIES, blocks: Sequence[int] = BLOCKS, batch: int = BATCH,
                   image_size: Optional[int] = None, reps: int = 10, backends: Optional[Sequence[str]] = None,
                   use_graphs: bool = True, report: Callable[[str], None] = print) -> List[dict]:
    rows: List[dict] = []
    gen = torch.Generator().manual_seed(0)  # filters
    device_gen = torch.Generator(device=device).manual_seed(1)  # activations: drawn where they are used
    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # the dense baseline gets cuDNN's fastest algorithm, as training does
    try:
        for model in models:
            size = image_size or MODELS[model]
            layers = conv_layers(model, size)
            report(f"gpu-conv: {model} at {size}x{size}, batch {batch}, {str(dtype)[6:]}, channels_last: "
                   f"{len(layers)} distinct convolutions, {sum(c for _, c in layers)} in all (stem excluded); "
                   f"{reps} rounds (medians)")
            for sparsity in sparsities:
                for block in blocks:
                    group: List[dict] = []
                    for shape, count in layers:
                        case = ConvCase(shape, sparsity, block, batch, dtype, device, gen, device_gen)
                        for pass_name in PASSES:
                            label = f"{model} {shape.label} {pass_name} sparsity {sparsity:.2f} block {block}"
                            outcomes = check_and_time(label, case.impls(pass_name, dtype, backends), device, reps,
                                                      dtype=dtype, use_graphs=use_graphs, report=report)
                            dense_ms = outcomes["dense"].ms
                            group += [_row(model, shape.label, count, batch, size, dtype, sparsity, block,
                                           case.density, pass_name, outcome, dense_ms)
                                      for outcome in outcomes.values()]
                        del case
                    group += total_rows(group)
                    report(format_rows(group))
                    rows += group
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    return rows
