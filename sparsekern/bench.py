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

End-to-end training throughput (images/s of whole training steps: forward, backward, optimizer step and the
DST bookkeeping), on random batches of the right shape, for the same model, batch and sparsity:

- ``dense``: the torch model and torch.optim.SGD;
- ``simulated``: what users of DST run today, dense weights times a mask: the ``rigl-torch`` package's
  RigLScheduler when it is importable, otherwise a loop written here that multiplies the gradients and the
  weights of dense nn.Conv2d/nn.Linear layers by a fixed mask (same block mask as ours) on every step;
- ``ours``: ``sparsekern.sparsify`` + ``MaskedSGD`` + ``sparsekern.dst.RigL``.

Both DST loops update the mask every 100 steps; the reported rate is amortised over one such interval
(99 ordinary steps and one update step, each a median). The image stem stays dense, as in training.
Cases: CIFAR ResNet-18 (32x32, batch 64 on CPU, 256 on GPU) at 80/90/95% and ImageNet ResNet-50 (224x224,
batch 8 on CPU, 64 on GPU) at the same sparsities; ``--quick`` runs ResNet-18 at 90% only. The rows go to
``<out>/<device-name>_e2e.csv``; with matplotlib, ``<device-name>_speedup.png`` (kernel speedup vs
sparsity per block size) and ``<device-name>_e2e.png`` (images/s) are written next to the CSVs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

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


# -- end-to-end training throughput -----------------------------------------------------------------------
E2E_UPDATE_INTERVAL = 100
E2E_BLOCK = 32
E2E_SPARSITIES = [0.8, 0.9, 0.95]
E2E_FIELDS = ["model", "input", "batch", "sparsity", "block", "method", "implementation", "step_ms",
              "update_step_ms", "images_per_s", "vs_dense", "vs_simulated"]


@dataclass
class E2ECase:
    """A model (a name of ``sparsekern.models.MODELS`` or a factory) trained on [batch, C, size, size] images."""
    model: object
    image_size: int
    batch: int
    num_classes: int
    in_channels: int = 3

    @property
    def name(self) -> str:
        return self.model if isinstance(self.model, str) else getattr(self.model, "__name__", "model")

    def build(self) -> nn.Module:
        from .models import build_model
        if isinstance(self.model, str):
            return build_model(self.model, self.num_classes, self.in_channels)
        return self.model(num_classes=self.num_classes, in_channels=self.in_channels)


def e2e_cases(device: torch.device, quick: bool) -> List[E2ECase]:
    on_gpu = device.type == "cuda"
    cases = [E2ECase("resnet18", 32, 256 if on_gpu else 64, 10)]
    if not quick:
        cases.append(E2ECase("resnet50", 224, 64 if on_gpu else 8, 1000))
    return cases


def rigl_torch_scheduler():
    """The ``rigl_torch.RigL.RigLScheduler`` class, or None when the package is not importable."""
    try:
        from rigl_torch.RigL import RigLScheduler
    except ImportError:
        return None
    return RigLScheduler


class TrainLoop:
    """Full training steps of one model on one fixed batch; subclasses add their DST bookkeeping.

    ``step()`` runs an ordinary step; ``update_step()`` runs the step on which the mask is updated (for loops
    without mask updates, an ordinary one).
    """

    method = "dense"
    implementation = "torch.optim.SGD"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y

    def _forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()

    def step(self) -> None:
        self._forward_backward()
        self.optimizer.step()

    def update_step(self) -> None:
        self.step()


class MaskedDenseLoop(TrainLoop):
    """Simulated sparsity: dense layers whose gradients and weights are multiplied by a fixed mask every step."""

    method = "simulated"
    implementation = "dense x fixed mask (grad and weight masked each step; no mask updates)"

    def __init__(self, model, optimizer, x, y, masks: Dict[str, torch.Tensor]):
        super().__init__(model, optimizer, x, y)
        self.masks = dict(masks)  # layer name -> mask of its weight
        self.masked = [(model.get_submodule(name).weight, mask) for name, mask in self.masks.items()]

    def step(self) -> None:
        self._forward_backward()
        with torch.no_grad():
            for weight, mask in self.masked:
                weight.grad.mul_(mask)
        self.optimizer.step()
        with torch.no_grad():
            for weight, mask in self.masked:
                weight.mul_(mask)


class RigLTorchLoop(TrainLoop):
    """The rigl-torch package: dense weights masked through gradient hooks and a wrapped optimizer step."""

    method = "simulated"
    implementation = "rigl-torch RigLScheduler (dense x mask)"

    def __init__(self, model, optimizer, x, y, sparsity: float, scheduler_cls):
        super().__init__(model, optimizer, x, y)
        # Its first weighted layer (the image stem) stays dense, like ours; t_end far away keeps updates on.
        self.scheduler = scheduler_cls(model, optimizer, dense_allocation=1.0 - sparsity, T_end=10 ** 9,
                                       delta=E2E_UPDATE_INTERVAL, alpha=0.3, ignore_linear_layers=False)

    def step(self) -> None:
        self._forward_backward()
        if self.scheduler():  # False on an update step: rigl-torch then skips the optimizer step
            self.optimizer.step()

    def update_step(self) -> None:
        interval = self.scheduler.delta_T
        self.scheduler.step = (self.scheduler.step // interval + 1) * interval - 1
        self.step()


class SparsekernLoop(TrainLoop):
    """Ours: compact block values, MaskedSGD, and sparsekern.dst.RigL moving blocks every 100 steps."""

    method = "ours"
    implementation = "sparsekern.sparsify + MaskedSGD + dst.RigL"

    def __init__(self, model, optimizer, x, y, update_interval: int = E2E_UPDATE_INTERVAL):
        super().__init__(model, optimizer, x, y)
        self.dst = sk.dst.RigL(model, optimizer, update_interval=update_interval, t_end=10 ** 9)

    def step(self) -> None:
        super().step()
        self.dst.step()

    def update_step(self) -> None:
        # Jump the schedule to just before the next update, so that this step captures scores and updates.
        state = self.dst.state_dict()
        interval = self.dst.update_interval
        state["step_count"] = (state["step_count"] // interval + 1) * interval - 1
        self.dst.load_state_dict(state)
        self.step()


def build_e2e_loops(case: E2ECase, sparsity: float, block: int, device: torch.device,
                    dense_loop: Optional[TrainLoop] = None, use_rigl_torch: bool = True) -> Dict[str, TrainLoop]:
    """The dense, simulated and ours training loops for one case, from the same initial weights and batch."""
    from .train import _stem_filter
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, case.in_channels, case.image_size, case.image_size, generator=gen).to(device)
    y = torch.randint(0, case.num_classes, (case.batch,), generator=gen).to(device)
    torch.manual_seed(0)
    base = case.build()
    sgd = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)

    def sgd_for(model):
        return torch.optim.SGD(model.parameters(), **sgd)

    loops: Dict[str, TrainLoop] = {}
    if dense_loop is None:
        dense = copy.deepcopy(base).to(device)
        dense_loop = TrainLoop(dense, sgd_for(dense), x, y)
    loops["dense"] = dense_loop

    ours = sk.sparsify(copy.deepcopy(base), sparsity, block, filter_fn=_stem_filter).to(device)

    scheduler_cls = rigl_torch_scheduler() if use_rigl_torch else None
    if scheduler_cls is not None:
        simulated = copy.deepcopy(base).to(device)
        loops["simulated"] = RigLTorchLoop(simulated, sgd_for(simulated), x, y, sparsity, scheduler_cls)
    else:
        # The same block masks as ours, on dense layers.
        simulated = copy.deepcopy(ours)
        masks = {}
        for name, module in list(simulated.named_modules()):
            if isinstance(module, (sk.SparseLinear, sk.SparseConv2d)):
                layer = module.to_dense()
                masks[name] = (layer.weight != 0).to(layer.weight.dtype)
                simulated.set_submodule(name, layer)
        simulated.to(device)
        loops["simulated"] = MaskedDenseLoop(simulated, sgd_for(simulated), x, y, masks)

    loops["ours"] = SparsekernLoop(ours, sk.optim.MaskedSGD(ours.parameters(), **sgd), x, y)
    return loops


def time_e2e_loops(loops: Dict[str, TrainLoop], device: torch.device, reps: int, update_reps: int = 1,
                   interval: int = E2E_UPDATE_INTERVAL) -> Dict[str, dict]:
    """Median ms of ordinary and of update steps (interleaved rounds), and images/s amortised over
    ``interval`` steps (interval - 1 ordinary steps and one update step)."""
    # Two warm-up steps: the first allocates gradients and optimizer state, the second still pays for it.
    ordinary = time_interleaved({name: loop.step for name, loop in loops.items()}, device, reps, warmup=2)
    update = time_interleaved({name: loop.update_step for name, loop in loops.items()}, device, update_reps,
                              warmup=0)
    out = {}
    for name, loop in loops.items():
        amortised_ms = ((interval - 1) * ordinary[name] + update[name]) / interval
        out[name] = {"step_ms": ordinary[name], "update_step_ms": update[name],
                     "images_per_s": loop.x.shape[0] * 1e3 / amortised_ms}
    return out


def e2e_rows(case: E2ECase, sparsity: float, block: int, loops: Dict[str, TrainLoop],
             timings: Dict[str, dict]) -> List[dict]:
    dense_rate = timings["dense"]["images_per_s"]
    simulated_rate = timings["simulated"]["images_per_s"]
    rows = []
    for name, loop in loops.items():
        t = timings[name]
        rows.append({"model": case.name, "input": f"{case.in_channels}x{case.image_size}x{case.image_size}",
                     "batch": case.batch, "sparsity": sparsity, "block": block if name != "dense" else "-",
                     "method": loop.method, "implementation": loop.implementation, "step_ms": t["step_ms"],
                     "update_step_ms": t["update_step_ms"], "images_per_s": t["images_per_s"],
                     "vs_dense": t["images_per_s"] / dense_rate, "vs_simulated": t["images_per_s"] / simulated_rate})
    return rows


def bench_e2e(cases: Sequence[E2ECase], sparsities: Sequence[float], device: torch.device, reps: int,
              update_reps: int = 1, block: int = E2E_BLOCK, use_rigl_torch: bool = True,
              report: Callable[[str], None] = print) -> List[dict]:
    """Images/s of dense, simulated and ours training, one interleaved group per (case, sparsity)."""
    rows = []
    for case in cases:
        dense_loop = None
        for sparsity in sparsities:
            loops = build_e2e_loops(case, sparsity, block, device, dense_loop, use_rigl_torch)
            dense_loop = loops["dense"]  # one dense model per case, timed again next to every sparsity
            timings = time_e2e_loops(loops, device, reps, update_reps)
            group = e2e_rows(case, sparsity, block, loops, timings)
            report(format_e2e_table(group, header=not rows))
            rows += group
            del loops
    return rows


def format_e2e_table(rows: List[dict], header: bool = True) -> str:
    titles = ["model", "input", "batch", "sparsity", "method", "step ms", "update step ms", "images/s",
              "vs dense", "vs simulated"]
    widths = [9, 9, 5, 8, 9, 8, 14, 8, 8, 12]
    lines = []
    if header:
        lines += ["  ".join(t.ljust(w) for t, w in zip(titles, widths)), "  ".join("-" * w for w in widths)]
    for row in rows:
        cells = [row["model"], row["input"], str(row["batch"]), f"{row['sparsity']:.2f}", row["method"],
                 f"{row['step_ms']:.0f}", f"{row['update_step_ms']:.0f}", f"{row['images_per_s']:.1f}",
                 f"{row['vs_dense']:.2f}x", f"{row['vs_simulated']:.2f}x"]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def write_e2e_csv(rows: List[dict], out_dir: str, device: torch.device) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{device_name(device)}_e2e.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=E2E_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- plots ---------------------------------------------------------------------------------------------------
def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a one-line note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_kernel_speedup(rows: List[dict], path: str, title: str = "") -> Optional[str]:
    """Speedup vs sparsity, one line per block size (and backend), one panel per op; per-layer conv rows
    are left out (their total is a panel)."""
    ops_shown = [op for op in dict.fromkeys(r["op"] for r in rows) if op != "conv_fwd_bwd"]
    if not ops_shown:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    backends = {r["backend"] for r in rows}
    fig, axes = plt.subplots(1, len(ops_shown), figsize=(4.5 * len(ops_shown), 3.8), squeeze=False)
    for ax, op in zip(axes[0], ops_shown):
        series: Dict[str, List[tuple]] = {}
        for r in rows:
            if r["op"] == op:
                label = f"block {r['block']}" + (f" ({r['backend']})" if len(backends) > 1 else "")
                series.setdefault(label, []).append((float(r["sparsity"]), float(r["speedup"])))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup over dense (x)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_e2e(rows: List[dict], path: str, title: str = "") -> Optional[str]:
    """Images/s of dense, simulated and ours, grouped by sparsity, one panel per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    methods = ["dense", "simulated", "ours"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        sparsities = sorted({float(r["sparsity"]) for r in mine})
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            rate = {float(r["sparsity"]): float(r["images_per_s"]) for r in mine if r["method"] == method}
            xs = [j + (i - 1) * width for j in range(len(sparsities))]
            ax.bar(xs, [rate.get(s, 0.0) for s in sparsities], width, label=method)
        ax.set_xticks(range(len(sparsities)), [f"{s:.0%}" for s in sparsities])
        ax.set_xlabel("sparsity")
        ax.set_ylabel("training images/s")
        first = mine[0]
        ax.set_title(f"{model}, {first['input']}, batch {first['batch']}", fontsize=10)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
                    "speedup column, then end-to-end training images/s of dense vs simulated-masking DST vs "
                    "sparsekern (ResNet-18 32x32 and ResNet-50 224x224); writes <out>/<device-name>.csv, "
                    "<device-name>_e2e.csv and, with matplotlib, PNG plots next to them.")
    parser.add_argument("--device", default="cpu", help="torch device to run on: cpu (default) or cuda[:i]")
    parser.add_argument("--quick", action="store_true",
                        help="kernels: sparsities 50/90 and block 32 only, fewer repetitions, no reference "
                             "backend; end to end: ResNet-18 at 90%% only, no ResNet-50 (a minute or two on 2 "
                             "CPU cores)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for the CSVs and plots (default: benchmarks/results)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds per kernel case (default 5 quick, 10 full)")
    parser.add_argument("--e2e-reps", type=int, default=None,
                        help="timed ordinary training steps per end-to-end case (default 3 quick, 5 full; "
                             "plus 1 or 2 mask-update steps)")
    parser.add_argument("--skip-conv", action="store_true", help="no per-layer convolution table")
    parser.add_argument("--skip-kernels", action="store_true",
                        help="no Linear/convolution tables (end to end only; the kernel CSV is left as it is)")
    parser.add_argument("--skip-e2e", action="store_true", help="no end-to-end training-throughput table")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    sparsities = [0.5, 0.9] if args.quick else [0.5, 0.75, 0.9, 0.95]
    blocks = [32] if args.quick else [16, 32, 64]
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
        e2e_sparsities = [0.9] if args.quick else E2E_SPARSITIES
        simulated = ("rigl-torch's RigLScheduler" if rigl_torch_scheduler() is not None else
                     "rigl-torch is not importable, so a dense x fixed-mask loop written here (gradients and "
                     "weights masked every step, no mask updates: a lower bound on the cost of simulated DST)")
        print(f"\nend-to-end training throughput (random data, block {E2E_BLOCK}, mask update every "
              f"{E2E_UPDATE_INTERVAL} steps, amortised; {e2e_reps} ordinary steps per case, medians)")
        print(f"simulated-masking DST: {simulated}", flush=True)
        e2e = bench_e2e(e2e_cases(device, args.quick), e2e_sparsities, device, e2e_reps,
                        update_reps=1 if args.quick else 2, report=lambda text: print(text, flush=True))
        path = write_e2e_csv(e2e, args.out, device)
        print(f"\nwrote {path}")
        if not args.no_plots:
            plot = plot_e2e(e2e, os.path.join(args.out, f"{name}_e2e.png"), f"{name}: training throughput")
            if plot:
                print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
