"""End-to-end training throughput: whole training steps of dense, simulated-masking DST and sparsekern, on random
batches (the default suite's second table)."""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk

from .common import device_name, time_interleaved, warm_up_on_side_stream, write_rows

E2E_UPDATE_INTERVAL = 100
E2E_BLOCK = 32
E2E_SPARSITIES = [0.8, 0.9, 0.95]
E2E_FIELDS = ["model", "input", "batch", "dtype", "mode", "sparsity", "block", "method", "implementation", "step_ms",
              "update_step_ms", "images_per_s", "vs_dense", "vs_simulated", "state_mb", "state_vs_dense",
              "step_peak_mb"]


@dataclass
class E2ECase:
    """A model (a name of ``sparsekern.models.MODELS`` or a factory) trained on [batch, C, size, size] images, or,
    with ``image_size`` None, on [batch, C] tokens (the transformer MLP stack)."""
    model: object
    image_size: Optional[int]
    batch: int
    num_classes: int
    in_channels: int = 3

    @property
    def name(self) -> str:
        return self.model if isinstance(self.model, str) else getattr(self.model, "__name__", "model")

    @property
    def input_shape(self) -> tuple:
        if self.image_size is None:
            return (self.batch, self.in_channels)
        return (self.batch, self.in_channels, self.image_size, self.image_size)

    @property
    def input_label(self) -> str:
        if self.image_size is None:
            return f"{self.in_channels} features"
        return f"{self.in_channels}x{self.image_size}x{self.image_size}"

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


class MLPBlock(nn.Module):
    """A transformer's MLP block, pre-norm with a residual: x + W2 gelu(W1 layernorm(x))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def mlp_stack(num_classes: int, in_channels: int, blocks: int = 8, hidden_ratio: int = 4) -> nn.Module:
    """``blocks`` MLP blocks of width ``in_channels`` (ViT-B/16's: 768 -> 3072 -> 768); its output is read as
    ``num_classes`` = width logits per token, so that the loss adds no layer of its own."""
    return nn.Sequential(*[MLPBlock(in_channels, hidden_ratio * in_channels) for _ in range(blocks)])


def gpu_e2e_cases(device: torch.device) -> List[E2ECase]:
    """The issue's GPU cases (ResNet-50 at 224 px, batch 128; ViT-B/16's MLP blocks on 8192 tokens), or tiny ones
    of the same models on a CPU (how the tests run them)."""
    if device.type == "cuda":
        return [E2ECase("resnet50", 224, 128, 1000), E2ECase(mlp_stack, None, 8192, 768, in_channels=768)]
    tiny_mlp = functools.partial(mlp_stack, blocks=2)
    tiny_mlp.__name__ = "mlp_stack"
    return [E2ECase("resnet18", 16, 4, 10), E2ECase(tiny_mlp, None, 64, 64, in_channels=64)]


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
    moves_masks = False  # whether update_step moves the mask (DST), which a CUDA graph cannot capture
    capturable = True  # whether train_step can be captured as a CUDA graph (no host work inside)

    autocast: Optional[torch.dtype] = None  # the forward's torch.autocast dtype (None: the tensors' own)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y

    def _forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.x.device.type, self.autocast or torch.float32, enabled=self.autocast is not None):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()

    def train_step(self) -> None:
        """Forward, backward and the optimizer step: what a CUDA graph of the loop captures."""
        self._forward_backward()
        self.optimizer.step()

    def step(self) -> None:
        self.train_step()

    def extra_state(self) -> List[torch.Tensor]:
        """Tensors the method keeps besides the model and optimizer (masks)."""
        return []

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

    def train_step(self) -> None:
        self._forward_backward()
        with torch.no_grad():
            for weight, mask in self.masked:
                weight.grad.mul_(mask)
        self.optimizer.step()
        with torch.no_grad():
            for weight, mask in self.masked:
                weight.mul_(mask)

    def extra_state(self) -> List[torch.Tensor]:
        return list(self.masks.values())


class GraphedLoop(TrainLoop):
    """A loop's train_step captured once as a CUDA graph and replayed. The mask update step of a DST loop runs
    eagerly, outside the graph: it rewrites the layout, values and optimizer state in place, which the graph reads
    at its next replay (fixed capacity: nothing is captured again)."""

    def __init__(self, loop: TrainLoop):
        super().__init__(loop.model, loop.optimizer, loop.x, loop.y)
        self.loop = loop
        self.method, self.implementation = loop.method, f"{loop.implementation}, CUDA graph"
        self.autocast = loop.autocast
        warm_up_on_side_stream(loop.train_step, loop.x.device, calls=3)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loop.train_step()

    def step(self) -> None:
        self.graph.replay()

    def update_step(self) -> None:
        if self.loop.moves_masks:
            self.loop.update_step()
        else:
            self.step()

    def extra_state(self) -> List[torch.Tensor]:
        return self.loop.extra_state()


class RigLTorchLoop(TrainLoop):
    """The rigl-torch package: dense weights masked through gradient hooks and a wrapped optimizer step."""

    method = "simulated"
    implementation = "rigl-torch RigLScheduler (dense x mask)"
    moves_masks = True
    capturable = False  # its scheduler decides on the host, step by step

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
    moves_masks = True

    def __init__(self, model, optimizer, x, y, update_interval: int = E2E_UPDATE_INTERVAL):
        super().__init__(model, optimizer, x, y)
        self.dst = sk.dst.RigL(model, optimizer, update_interval=update_interval, t_end=10 ** 9)

    def step(self) -> None:
        self.train_step()
        self.dst.step()

    def update_step(self) -> None:
        # Jump the schedule to just before the next update, so that this step captures scores and updates.
        state = self.dst.state_dict()
        interval = self.dst.update_interval
        state["step_count"] = (state["step_count"] // interval + 1) * interval - 1
        self.dst.load_state_dict(state)
        self.step()


def build_e2e_loops(case: E2ECase, sparsity: float, block: int, device: torch.device,
                    dense_loop: Optional[TrainLoop] = None, use_rigl_torch: bool = True,
                    autocast: Optional[torch.dtype] = None, channels_last: bool = False) -> Dict[str, TrainLoop]:
    """The dense, simulated and ours training loops for one case, from the same initial weights and batch;
    ``autocast``: the forward's autocast dtype; ``channels_last``: images and models in that memory format."""
    from ..train import _stem_filter
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*case.input_shape, generator=gen).to(device)
    y = torch.randint(0, case.num_classes, (case.batch,), generator=gen).to(device)
    memory_format = torch.channels_last if channels_last and x.dim() == 4 else torch.preserve_format
    x = x.contiguous(memory_format=memory_format)
    torch.manual_seed(0)
    base = case.build().to(memory_format=memory_format)  # copies keep it; layers made anew below are converted
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
        simulated.to(device, memory_format=memory_format)
        loops["simulated"] = MaskedDenseLoop(simulated, sgd_for(simulated), x, y, masks)

    loops["ours"] = SparsekernLoop(ours, sk.optim.MaskedSGD(ours.parameters(), **sgd), x, y)
    for loop in loops.values():
        loop.autocast = autocast
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


def state_bytes(loop: TrainLoop) -> int:
    """Bytes of what training keeps between steps: weights and buffers (a layout's index included), gradients,
    optimizer state and the method's own tensors (the simulated method's masks)."""
    params = list(loop.model.parameters())
    tensors = params + list(loop.model.buffers()) + [p.grad for p in params if p.grad is not None]
    tensors += [t for state in loop.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += loop.extra_state()
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def step_peak_bytes(loop: TrainLoop, device: torch.device) -> Optional[int]:
    """The allocator's peak during one ordinary step above what was allocated before it (activations,
    workspaces); None off a GPU and for graphed loops, whose memory the graph's pool holds from the capture."""
    if device.type != "cuda" or isinstance(loop, GraphedLoop):
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loop.step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def e2e_rows(case: E2ECase, sparsity: float, block: int, loops: Dict[str, TrainLoop],
             timings: Dict[str, dict], mode: str = "eager") -> List[dict]:
    dense_rate = timings["dense"]["images_per_s"]
    simulated_rate = timings["simulated"]["images_per_s"] if "simulated" in timings else None
    states = {name: state_bytes(loop) for name, loop in loops.items()}
    device = next(iter(loops.values())).x.device
    rows = []
    for name, loop in loops.items():
        t = timings[name]
        peak = step_peak_bytes(loop, device)
        rows.append({"model": case.name, "input": case.input_label, "batch": case.batch,
                     "dtype": str(loop.autocast or loop.x.dtype).replace("torch.", ""), "mode": mode,
                     "sparsity": sparsity, "block": block if name != "dense" else "-",
                     "method": loop.method, "implementation": loop.implementation, "step_ms": t["step_ms"],
                     "update_step_ms": t["update_step_ms"], "images_per_s": t["images_per_s"],
                     "vs_dense": t["images_per_s"] / dense_rate,
                     "vs_simulated": t["images_per_s"] / simulated_rate if simulated_rate else None,
                     "state_mb": states[name] / 2 ** 20, "state_vs_dense": states[name] / states["dense"],
                     "step_peak_mb": peak / 2 ** 20 if peak is not None else None})
    return rows


def bench_e2e(cases: Sequence[E2ECase], sparsities: Sequence[float], device: torch.device, reps: int,
              update_reps: int = 1, block: int = E2E_BLOCK, use_rigl_torch: bool = True,
              report: Callable[[str], None] = print, autocast: Optional[torch.dtype] = None,
              channels_last: bool = False, graphs: bool = False) -> List[dict]:
    """Images/s of dense, simulated and ours training, one interleaved group per (case, sparsity); with
    ``graphs`` (CUDA tensors), a second group of the same loops replayed as CUDA graphs."""
    rows = []
    for case in cases:
        dense_loop = None
        for sparsity in sparsities:
            loops = build_e2e_loops(case, sparsity, block, device, dense_loop, use_rigl_torch, autocast,
                                    channels_last)
            dense_loop = loops["dense"]  # one dense model per case, timed again next to every sparsity
            groups = [("eager", loops)]
            if graphs and device.type == "cuda":
                groups.append(("graph", {name: GraphedLoop(loop) for name, loop in loops.items() if loop.capturable}))
            for mode, timed in groups:
                timings = time_e2e_loops(timed, device, reps, update_reps)
                group = e2e_rows(case, sparsity, block, timed, timings, mode)
                report(format_e2e_table(group, header=not rows))
                rows += group
            del loops, groups
    return rows


# The GPU training goals at 90% (model -> images or tokens per second over dense), and the state's size goal.
GPU_E2E_GOALS = {"mlp_stack": 2.0, "resnet50": 1.3}
STATE_GOAL = 0.15


def goal_summary(rows: List[dict], sparsity: float = 0.9) -> str:
    """One line per (model, mode) of ours at ``sparsity``: its speedup and state size against the goals."""
    lines = [f"goals at {sparsity:.0%} (ours vs dense): speed {GPU_E2E_GOALS}, state <= {STATE_GOAL}x"]
    for row in rows:
        if row["method"] != "ours" or row["sparsity"] != sparsity:
            continue
        goal = GPU_E2E_GOALS.get(row["model"])
        speed = f"{row['vs_dense']:.2f}x" + (f" ({'met' if row['vs_dense'] >= goal else 'missed'})" if goal else "")
        state = f"{row['state_vs_dense']:.3f}x ({'met' if row['state_vs_dense'] <= STATE_GOAL else 'missed'})"
        lines.append(f"  {row['model']} {row['mode']}: speed {speed}, state {state}")
    return "\n".join(lines)


def format_e2e_table(rows: List[dict], header: bool = True) -> str:
    titles = ["model", "input", "batch", "mode", "sparsity", "method", "step ms", "update step ms", "images/s",
              "vs dense", "vs simulated", "state MB", "state vs dense", "step peak MB"]
    widths = [9, 12, 5, 5, 8, 9, 8, 14, 9, 8, 12, 8, 14, 12]
    lines = []
    if header:
        lines += ["  ".join(t.ljust(w) for t, w in zip(titles, widths)), "  ".join("-" * w for w in widths)]
    for row in rows:
        ratio = lambda v: f"{v:.2f}x" if v is not None else "-"
        cells = [row["model"], row["input"], str(row["batch"]), row["mode"], f"{row['sparsity']:.2f}",
                 row["method"], f"{row['step_ms']:.1f}", f"{row['update_step_ms']:.1f}", f"{row['images_per_s']:.1f}",
                 ratio(row["vs_dense"]), ratio(row["vs_simulated"]), f"{row['state_mb']:.1f}",
                 ratio(row["state_vs_dense"]),
                 f"{row['step_peak_mb']:.0f}" if row["step_peak_mb"] is not None else "-"]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def write_e2e_csv(rows: List[dict], out_dir: str, device: torch.device) -> str:
    return write_rows(rows, E2E_FIELDS, out_dir, f"{device_name(device)}_e2e.csv")
