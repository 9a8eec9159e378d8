"""End-to-end training throughput: whole training steps of dense, simulated-masking DST and sparsekern, on random
batches (the default suite's second table)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk

from .common import device_name, time_interleaved, write_rows

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
        from ..models import build_model
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
    from ..train import _stem_filter
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
    return write_rows(rows, E2E_FIELDS, out_dir, f"{device_name(device)}_e2e.csv")
