"""The convergence study: does BiDST beat RigL and SET, and SparseOpt beat SGD, beyond the seed noise?

    .venv/bin/python benchmarks/convergence.py --preset gpu|cpu|tiny [--estimate] [--seeds N] [--steps N] ...

Configurations: dense; SET, RigL and BiDST (sparsekern.dst), each with MaskedSGD ("sgd") and SparseOpt, at every
sparsity and block size of the preset; and unstructured (per-weight) RigL at 90%, the simulated-masking reference
(dense weights times a mask): rigl-torch's RigLScheduler when it is importable, otherwise ``PerWeightRigL`` below.

Every configuration of one seed shares the initial weights (torch.manual_seed(seed) before the model is built;
sparsify keeps each layer's largest blocks of them), the data order (permutations drawn from seed + 1), the step
count, batch, cosine learning-rate schedule and the evaluation steps and test images. So two configurations are
compared seed by seed: the report gives the mean paired difference over seeds, its standard error and the 95%
interval of Student's t with n - 1 degrees of freedom; a difference "exceeds the seed noise" when that interval
excludes zero. Around every mask update the study compares each sparse layer's mask before and after it and
reports per layer how many blocks the update moved, so that a frozen topology shows.

The model is sparsekern.models.resnet18 (CIFAR-style: 3x3 stem, no max-pool; channels w to 8w, w = 64 in the
paper model) on Fashion-MNIST at 28 px or average-pooled to 14 px. The image stem stays dense, as in
``python -m sparsekern.train``, whose learning rate, momentum, weight decay, ERK densities and drop fraction
this uses.

Writes <out>/convergence_<device>.md, .json and .png (accuracy against steps and against training seconds); the
tiny preset and runs with overrides add a suffix. Each finished run is also saved in --runs-dir, and a rerun
with the same settings reuses it: an interrupted study continues where it stopped (delete the folder to start
over). The runs go to --workers processes at once, which share the one device and run the same per-run code on
every device. No run starts after --deadline seconds; the report lists the runs not done.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run as a script from a checkout

import sparsekern as sk  # noqa: E402
from sparsekern import train  # noqa: E402
from sparsekern.bench import device_name, rigl_torch_scheduler  # noqa: E402
from sparsekern.bench.plots import pyplot, save_figure  # noqa: E402
from sparsekern.data import ImageData, load_dataset  # noqa: E402
from sparsekern.dst.scheduler import drop_fraction_at, is_update_step  # noqa: E402
from sparsekern.models.resnet import resnet18  # noqa: E402
from sparsekern.nn.sparsify import layer_densities  # noqa: E402

METHODS = ("set", "rigl", "bidst")
OPTIMIZERS = ("sgd", "sparseopt")
UNSTRUCTURED = "rigl-unstructured"
UNSTRUCTURED_SPARSITY = 0.9
LR, MOMENTUM, WEIGHT_DECAY, DROP_FRACTION = 0.1, 0.9, 5e-4, 0.3  # sparsekern.train's defaults
# What the papers report, next to which the report puts each comparison.
CLAIMS = {
    "sparseopt vs sgd": "SparseOpt paper: +0.5 to +1.3 points (ImageNet ResNet-50, 90 epochs), +0.7 to +1.4 "
                        "(CIFAR-100 ResNet-20, 100 epochs) under RigL and SET at 90-97%, most at high sparsity",
    "bidst vs rigl": "BiDST paper: up to +2.6 points over RigL and SET",
    "bidst vs set": "BiDST paper: up to +2.6 points over RigL and SET",
}


@dataclass(frozen=True)
class Preset:
    width: int  # resnet18 channels: width .. 8 x width
    image_size: int  # 28, or 14 (2x2 average pooling)
    batch: int
    steps: int
    update_interval: int  # steps between mask updates (until 75% of the steps, as in sparsekern.dst)
    evals: int  # evaluations, evenly spaced, the last after the last step
    test_images: int  # the first N of the 10000
    seeds: int
    sparsities: tuple
    blocks: tuple
    workers: int  # runs at once (processes)
    threads: int  # torch threads per worker: on a loaded CPU, OpenMP with more threads than free cores crawls
    deadline: float  # seconds after the start; no run starts later
    budget: str

    def run_settings(self) -> dict:
        """The fields that change what one run computes (a saved run is reused only if they match)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("seeds", "sparsities", "blocks", "workers", "threads", "deadline", "budget")}


PRESETS = {
    "gpu": Preset(width=64, image_size=28, batch=128, steps=300, update_interval=25, evals=4, test_images=5000,
                  seeds=3, sparsities=(0.9, 0.95, 0.97), blocks=(16, 32), workers=8, threads=2, deadline=390.0,
                  budget="the whole study on one H200 in at most 8 minutes; not yet run on one, so the step "
                         "count is a guess and the deadline keeps the report within the budget"),
    "cpu": Preset(width=64, image_size=14, batch=64, steps=500, update_interval=25, evals=4, test_images=2000,
                  seeds=3, sparsities=(0.9, 0.95, 0.97), blocks=(16,), workers=2, threads=1, deadline=3300.0,
                  budget="a reduced study (block 16 only, 14 px) in at most 60 minutes on 2 CPU cores: --estimate "
                         "projected 34 minutes on a 2-core AMD EPYC shared with light load"),
    "tiny": Preset(width=16, image_size=14, batch=32, steps=8, update_interval=2, evals=2, test_images=256,
                   seeds=2, sparsities=(0.9,), blocks=(16,), workers=2, threads=1, deadline=600.0,
                   budget="CI: every code path in well under a minute on 2 CPU cores; the numbers mean nothing"),
}


def describe(preset: Preset) -> str:
    w = preset.width
    return (f"resnet18 width {w} (channels {w}-{8 * w}), Fashion-MNIST at {preset.image_size} px, batch "
            f"{preset.batch}, {preset.steps} steps, a mask update every {preset.update_interval} steps, "
            f"{preset.evals} evaluations on {preset.test_images} test images, {preset.seeds} seeds, sparsities "
            f"{', '.join(f'{s:.0%}' for s in preset.sparsities)}, blocks {', '.join(map(str, preset.blocks))}, "
            f"{preset.workers} worker(s) of {preset.threads} thread(s), deadline {preset.deadline:.0f} s")


@dataclass(frozen=True)
class RunSpec:
    method: str  # "dense", one of METHODS, or UNSTRUCTURED
    optimizer: str
    sparsity: float
    block: Optional[int]  # None: dense or unstructured
    seed: int

    @property
    def config(self) -> str:
        return config_label(self.method, self.optimizer, self.sparsity, self.block)

    @property
    def slug(self) -> str:
        return f"{self.method}-{self.optimizer}-s{round(100 * self.sparsity)}-b{self.block}-seed{self.seed}"


def config_label(method: str, optimizer: str, sparsity: float, block: Optional[int]) -> str:
    if method == "dense":
        return "dense"
    if block is None:
        return f"{method} {sparsity:.0%}"
    return f"{method}+{optimizer} {sparsity:.0%} b{block}"


def run_grid(preset: Preset) -> List[RunSpec]:
    """Seed-major (every configuration of seed 0 first), so that a study cut short still has whole seeds."""
    specs = []
    for seed in range(preset.seeds):
        specs.append(RunSpec("dense", "sgd", 0.0, None, seed))
        specs += [RunSpec(m, o, s, b, seed) for b in preset.blocks for s in preset.sparsities
                  for m in METHODS for o in OPTIMIZERS]
        specs.append(RunSpec(UNSTRUCTURED, "sgd", UNSTRUCTURED_SPARSITY, None, seed))
    return specs


# -- one run ------------------------------------------------------------------------------------------------
def load_data(preset: Preset, data_dir: Optional[str], device: str) -> ImageData:
    """Fashion-MNIST on the device (the training set whole, the first test_images test images)."""
    data = load_dataset("fashion-mnist", data_dir)
    train_x, test_x = data.train_x, data.test_x[:preset.test_images]
    if preset.image_size != 28:
        # Pooling keeps the normalisation; 14 px quarters the cost of every layer.
        train_x, test_x = (F.avg_pool2d(x, 28 // preset.image_size) for x in (train_x, test_x))
    # test_y stays on the host, where sparsekern.train.evaluate compares.
    return ImageData(train_x.to(device), data.train_y.to(device), test_x.to(device),
                     data.test_y[:preset.test_images], data.num_classes)


def data_order(n: int, steps: int, batch: int, seed: int) -> Tensor:
    """[steps, batch] sample indices: epochs of permutations drawn from seed + 1 (as sparsekern.train draws them)."""
    generator = torch.Generator().manual_seed(seed + 1)
    epochs = [torch.randperm(n, generator=generator) for _ in range(math.ceil(steps * batch / n))]
    return torch.cat(epochs)[:steps * batch].view(steps, batch)


def weighted_layers(model: nn.Module) -> List[tuple]:
    """(name, module) of the dense Conv2d/Linear layers, in module order (rigl-torch's order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class PerWeightRigL:
    """Unstructured RigL on dense weights times a mask, with rigl-torch's interface: call it after the backward
    and step the optimizer only if it returns True (it updates the mask instead on update steps); ``backward_masks``
    holds each weighted layer's mask (None where the layer stays dense).

    The reference when rigl-torch is not importable: sparsekern.dst.RigL at the granularity of one weight, so
    that only the granularity differs. ERK densities over the same layers (the stem stays dense), each layer
    starting from its largest weights; on the same update steps it drops the cosine-decayed fraction of its
    smallest active weights and grows as many inactive ones with the largest dense gradient (they start at
    zero, and the momentum of dropped weights is cleared). Gradients are masked on every step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float, update_interval: int,
                 t_end: int):
        self.optimizer, self.update_interval, self.t_end, self.step = optimizer, update_interval, t_end, 0
        layers = weighted_layers(model)
        chosen = [m for n, m in layers if train._stem_filter(m, n)]
        density = dict(zip(map(id, chosen), layer_densities(chosen, sparsity, "erk")))
        self.weights = [m.weight for _, m in layers]
        self.backward_masks: List[Optional[Tensor]] = []
        self.active: List[int] = []  # fixed per layer, as in block DST
        with torch.no_grad():
            for _, module in layers:
                weight, mask = module.weight, None
                k = min(max(1, round(density.get(id(module), 1.0) * weight.numel())), weight.numel())
                if k < weight.numel():
                    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
                    mask[weight.abs().flatten().topk(k).indices] = True
                    mask = mask.view_as(weight)
                    weight.mul_(mask)
                self.backward_masks.append(mask)
                self.active.append(k)

    def __call__(self) -> bool:
        self.step += 1
        update = is_update_step(self.step, self.update_interval, self.t_end)
        fraction = drop_fraction_at(self.step, DROP_FRACTION, self.t_end)
        with torch.no_grad():
            for weight, mask, k in zip(self.weights, self.backward_masks, self.active):
                if mask is None:
                    continue
                if update:
                    self._update(weight, mask, k, min(round(fraction * k), mask.numel() - k))
                weight.grad.mul_(mask)
        return not update

    def _update(self, weight: Tensor, mask: Tensor, k: int, n_swap: int) -> None:
        if n_swap == 0:
            return
        keep = weight.abs().masked_fill(~mask, -math.inf).flatten().topk(k - n_swap).indices
        new = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        new[keep] = True
        # The weights are dense, so their gradient is the dense gradient RigL grows by.
        new[weight.grad.abs().flatten().masked_fill(new, -math.inf).topk(n_swap).indices] = True
        mask.copy_(new.view_as(mask))
        weight.mul_(mask)
        state = self.optimizer.state.get(weight, {})
        if "momentum_buffer" in state:
            state["momentum_buffer"].mul_(mask)


def unstructured_rigl(model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float, interval: int,
                      t_end: int) -> tuple:
    """(scheduler, what it is): rigl-torch's RigLScheduler if importable (its own rules: uniform sparsity with
    the first layer dense, a random initial mask), else PerWeightRigL."""
    scheduler_cls = rigl_torch_scheduler()
    if scheduler_cls is None:
        return (PerWeightRigL(model, optimizer, sparsity, interval, t_end),
                "PerWeightRigL (convergence.py; rigl-torch is not importable): sparsekern's RigL rules per weight")
    scheduler = scheduler_cls(model, optimizer, dense_allocation=1.0 - sparsity, T_end=t_end, delta=interval,
                              alpha=DROP_FRACTION, ignore_linear_layers=False)
    return scheduler, ("rigl-torch RigLScheduler: uniform sparsity, first layer dense, random initial mask, "
                       "same update steps and drop fraction")


def _masks(dst, unstructured, names: List[str]) -> Dict[str, Tensor]:
    if dst is not None:
        return {name: layer.layout.to_block_mask() for name, layer in dst.layers.items()}
    return {name: mask.clone() for name, mask in zip(names, unstructured.backward_masks) if mask is not None}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_one(spec: RunSpec, preset: Preset, data: ImageData, device: str) -> dict:
    """Train one configuration for one seed; the same code on every device."""
    started = time.perf_counter()
    steps, t_end = preset.steps, int(0.75 * preset.steps)  # t_end: sparsekern.dst's default
    torch.manual_seed(spec.seed)
    model = resnet18(data.num_classes, data.in_channels, width=preset.width)
    if spec.method in METHODS:
        sk.sparsify(model, spec.sparsity, spec.block, "erk", filter_fn=train._stem_filter)
    model.to(device)
    if spec.method == UNSTRUCTURED:  # torch's SGD: rigl-torch clears its momentum_buffer
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    else:
        optimizer_cls = sk.optim.SparseOpt if spec.optimizer == "sparseopt" else sk.optim.MaskedSGD
        optimizer = optimizer_cls(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    dst = unstructured = implementation = None
    if spec.method in METHODS:
        dst = train.METHODS[spec.method](model, optimizer, update_interval=preset.update_interval,
                                         drop_fraction=DROP_FRACTION, total_steps=steps, seed=spec.seed)
    elif spec.method == UNSTRUCTURED:
        unstructured, implementation = unstructured_rigl(model, optimizer, spec.sparsity, preset.update_interval,
                                                         t_end)
    names = [n for n, _ in weighted_layers(model)]
    order = data_order(len(data.train_y), steps, preset.batch, spec.seed).to(device)
    eval_steps = {round(steps * (i + 1) / preset.evals) for i in range(preset.evals)}
    evaluate_args = SimpleNamespace(device=device, channels_last=False)
    moved: Dict[str, List[Tensor]] = {}
    curve, train_seconds, eval_seconds = [], 0.0, 0.0
    setup_seconds = time.perf_counter() - started
    tick = time.perf_counter()
    for step in range(1, steps + 1):
        batch = order[step - 1]
        loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        update = (dst.is_update_step(dst.step_count + 1) if dst is not None else
                  unstructured is not None and is_update_step(step, preset.update_interval, t_end))
        before = _masks(dst, unstructured, names) if update else None
        if unstructured is None or unstructured():
            optimizer.step()
        schedule.step()
        if dst is not None:
            dst.step()
        if before is not None:
            after = _masks(dst, unstructured, names)
            for name, mask in before.items():  # counts stay on the device: no host sync per update
                moved.setdefault(name, []).append((after[name] & ~mask).sum())
        if step in eval_steps:
            _sync(device)
            train_seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            accuracy = train.evaluate(model, data.test_x, data.test_y, evaluate_args, contextlib.nullcontext)
            curve.append({"step": step, "seconds": train_seconds, "test_accuracy": accuracy})
            eval_seconds += time.perf_counter() - tick
            tick = time.perf_counter()

    if dst is not None:
        layers = {name: {"active": layer.layout.nnz_blocks, "total": math.prod(layer.layout.block_grid)}
                  for name, layer in dst.layers.items()}
    elif unstructured is not None:
        layers = {name: {"active": int(mask.sum()), "total": mask.numel()}
                  for name, mask in zip(names, unstructured.backward_masks) if mask is not None}
    else:
        layers = {}
    for name, layer in layers.items():
        layer["moved"] = torch.stack(moved[name]).tolist() if name in moved else []
    return {**asdict(spec), "config": spec.config, "test_accuracy": curve[-1]["test_accuracy"], "curve": curve,
            "train_seconds": train_seconds, "eval_seconds": eval_seconds, "setup_seconds": setup_seconds,
            "images_per_second": steps * preset.batch / train_seconds,
            "update_seconds": dst.update_seconds if dst is not None else None,
            "unit": "weights" if unstructured is not None else "blocks", "layers": layers,
            "implementation": implementation}


# -- running many -------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(preset: Preset, data_dir: Optional[str], device: str, deadline: float) -> None:
    torch.set_num_threads(preset.threads)
    _WORKER.update(preset=preset, device=device, deadline=deadline, data=load_data(preset, data_dir, device))


def _worker_run(spec: RunSpec) -> Optional[dict]:
    if time.time() > _WORKER["deadline"]:
        return None
    return run_one(spec, _WORKER["preset"], _WORKER["data"], _WORKER["device"])


def run_study(specs: Sequence[RunSpec], preset: Preset, device: str, data_dir: Optional[str],
              runs_dir: Optional[str], workers: int, deadline: float) -> tuple:
    """(results of the finished runs in spec order, {slug: why not} for the others, how many were reused). Runs
    saved in runs_dir with the same settings are reused; ``deadline`` is a time.time() after which no run starts."""
    settings = {**preset.run_settings(), "device": device_name(torch.device(device))}
    results: Dict[RunSpec, dict] = {}
    if runs_dir:
        os.makedirs(runs_dir, exist_ok=True)
        for spec in specs:
            path = os.path.join(runs_dir, spec.slug + ".json")
            if os.path.exists(path):
                with open(path) as f:
                    saved = json.load(f)
                if saved["settings"] == settings:
                    results[spec] = saved["result"]
        if results:
            print(f"reusing {len(results)} finished runs from {runs_dir}", flush=True)
    todo, reused = [s for s in specs if s not in results], len(results)
    failed: Dict[str, str] = {}

    def finished(spec: RunSpec, result: Optional[dict], error: Optional[BaseException] = None) -> None:
        if error is not None or result is None:
            failed[spec.slug] = f"failed: {error!r}" if error is not None else "not started before the deadline"
            print(f"  {spec.slug}: {failed[spec.slug]}", flush=True)
            return
        results[spec] = result
        if runs_dir:
            with open(os.path.join(runs_dir, spec.slug + ".json"), "w") as f:
                json.dump({"settings": settings, "result": result}, f)
        print(f"  [{len(results)}/{len(specs)}] {spec.slug}: {result['test_accuracy']:.2%}, "
              f"{result['train_seconds']:.1f} s training", flush=True)

    print(f"{len(todo)} runs to do on {device} with {workers} worker(s)", flush=True)
    if todo and workers == 1:
        data, threads = load_data(preset, data_dir, device), torch.get_num_threads()
        torch.set_num_threads(preset.threads)
        try:
            for spec in todo:
                if time.time() > deadline:
                    finished(spec, None)
                    continue
                try:
                    finished(spec, run_one(spec, preset, data, device))
                except Exception as error:  # one broken configuration must not lose the others
                    finished(spec, None, error)
        finally:
            torch.set_num_threads(threads)
    elif todo:
        # spawn: CUDA cannot be initialised again in a forked child.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(preset, data_dir, device, deadline)) as pool:
            futures = {pool.submit(_worker_run, spec): spec for spec in todo}
            for future in as_completed(futures):
                try:
                    finished(futures[future], future.result())
                except Exception as error:
                    finished(futures[future], None, error)
    return [results[s] for s in specs if s in results], failed, reused


# -- statistics ---------------------------------------------------------------------------------------------
# Two-sided 95% quantiles of Student's t for 1-10 degrees of freedom; beyond that the Cornish-Fisher expansion
# around the normal quantile (Abramowitz & Stegun 26.7.5, three terms) is within 0.001 of the tables.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_critical(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (no scipy here)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2) +
            (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample standard deviation or None for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """a - b paired by seed: the mean difference, its standard error, the half-width of its 95% t interval and
    whether that interval excludes zero (None with one seed: no noise estimate)."""
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"n": len(d), "mean": mean, "se": None, "half_width": None, "exceeds_noise": None}
    se = statistics.stdev(d) / math.sqrt(len(d))
    half = t_critical(len(d) - 1) * se
    return {"n": len(d), "mean": mean, "se": se, "half_width": half, "exceeds_noise": abs(mean) > half}


def by_config(results: List[dict]) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = {}
    for r in results:
        groups.setdefault(r["config"], []).append(r)
    return groups


def comparisons(results: List[dict]) -> List[dict]:
    """Every paired comparison the study answers, over the seeds both configurations finished."""
    accuracy = {c: {r["seed"]: r["test_accuracy"] for r in runs} for c, runs in by_config(results).items()}
    pairs = []
    for s, b in sorted({(r["sparsity"], r["block"]) for r in results if r["method"] in METHODS}):
        pairs += [("sparseopt vs sgd", config_label(m, "sparseopt", s, b), config_label(m, "sgd", s, b))
                  for m in METHODS]
        pairs += [(f"{m1} vs {m2}", config_label(m1, o, s, b), config_label(m2, o, s, b)) for o in OPTIMIZERS
                  for m1, m2 in (("bidst", "rigl"), ("bidst", "set"), ("rigl", "set"))]
        if abs(s - UNSTRUCTURED_SPARSITY) < 1e-9:
            pairs.append(("block vs unstructured", config_label("rigl", "sgd", s, b),
                          config_label(UNSTRUCTURED, "sgd", s, None)))
    out = []
    for kind, a, b in pairs:
        seeds = sorted(accuracy.get(a, {}).keys() & accuracy.get(b, {}).keys())
        if seeds:
            out.append({"kind": kind, "a": a, "b": b, **paired_difference([accuracy[a][k] for k in seeds],
                                                                            [accuracy[b][k] for k in seeds])})
    return out


# -- the report ---------------------------------------------------------------------------------------------
def _pts(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def accuracy_table(results: List[dict]) -> List[str]:
    lines = ["| configuration | seeds | final test accuracy, mean | std | training s | images/s | "
             "mask-update share |", "|---|---|---|---|---|---|---|"]
    for config, runs in by_config(results).items():
        mean, std = mean_std([r["test_accuracy"] for r in runs])
        train_s = statistics.fmean(r["train_seconds"] for r in runs)
        share = "-" if runs[0]["update_seconds"] is None else \
            f"{statistics.fmean(r['update_seconds'] / r['train_seconds'] for r in runs):.2%}"
        lines.append(f"| {config} | {len(runs)} | {mean:.2%} | {'-' if std is None else f'{100 * std:.2f} pts'} | "
                     f"{train_s:.1f} | {statistics.fmean(r['images_per_second'] for r in runs):.0f} | {share} |")
    return lines


def comparison_table(rows: List[dict]) -> List[str]:
    lines = ["| comparison | a | b | seeds | mean a - b (pts) | SE (pts) | 95% interval (pts) | beyond seed noise |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        interval = "-" if c["half_width"] is None else \
            f"{_pts(c['mean'] - c['half_width'])} to {_pts(c['mean'] + c['half_width'])}"
        verdict = {None: "n/a (one seed)", True: "**yes**", False: "no"}[c["exceeds_noise"]]
        se = "-" if c["se"] is None else f"{100 * c['se']:.2f}"
        lines.append(f"| {c['kind']} | {c['a']} | {c['b']} | {c['n']} | {_pts(c['mean'])} | {se} | {interval} | "
                     f"{verdict} |")
    return lines


def findings(rows: List[dict]) -> List[str]:
    """One line per kind of comparison: how often the first beat the second beyond the noise, and what the
    papers claim."""
    out = []
    for kind in dict.fromkeys(c["kind"] for c in rows):
        same = [c for c in rows if c["kind"] == kind]
        higher = sum(c["exceeds_noise"] is True and c["mean"] > 0 for c in same)
        lower = sum(c["exceeds_noise"] is True and c["mean"] < 0 for c in same)
        means = [100 * c["mean"] for c in same]
        line = (f"{kind}: the first higher beyond the seed noise in {higher} of {len(same)} settings, lower beyond "
                f"it in {lower}, within it (or one seed) in {len(same) - higher - lower}; mean differences "
                f"{min(means):+.2f} to {max(means):+.2f} points.")
        if kind in CLAIMS:
            line += f" Claimed: {CLAIMS[kind]}."
        out.append(line)
    return out


def never_moved(results: List[dict]) -> Dict[str, List[str]]:
    """{configuration: layers that no update of any seed moved}, for the configurations with mask updates."""
    out = {}
    for config, runs in by_config(results).items():
        layers = runs[0]["layers"]
        frozen = [n for n in layers if all(sum(r["layers"][n]["moved"]) == 0 for r in runs)]
        if layers and frozen:
            out[config] = frozen
    return out


def moves_table(runs: List[dict]) -> List[str]:
    """Per layer of one seed's runs of one (sparsity, block): what each mask update moved, per configuration."""
    unit = runs[0]["unit"]
    lines = [f"| layer | active / all {unit} | " + " | ".join(r["config"] for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for name, layer in runs[0]["layers"].items():
        cells = [" ".join(map(str, r["layers"][name]["moved"])) or "(no update)" for r in runs]
        lines.append(f"| {name} | {layer['active']} / {layer['total']} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: List[dict], failed: Dict[str, str], settings: dict, path: str,
                 plot_name: Optional[str] = None) -> str:
    rows = comparisons(results)
    seed0 = min((r["seed"] for r in results), default=0)
    took = f"{settings['wall_minutes']} minutes of wall time"
    if settings["reused_runs"]:
        took += f" in its last invocation, which reused {settings['reused_runs']} runs saved by earlier ones"
    text = [f"# Convergence study ({settings['device']}, preset {settings['preset']})", "",
            f"Settings: {settings['description']}; device {settings['device']}; the study took {took}. Learning "
            f"rate {LR} with a cosine decay to 0 over the steps, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}; "
            f"ERK layer densities with the image stem dense; mask updates until 75% of the steps, replacing a "
            f"cosine-decayed fraction (from {DROP_FRACTION}) of each layer's blocks. Every configuration of one seed "
            f"starts from the same weights and sees the same batches in the same order.", "",
            "`training s` and `images/s` exclude evaluation; with several workers, runs shared the device, so "
            "seconds compare only within one report. `mask-update share`: host time in sparsekern.dst's updates "
            "over training time (on a GPU that misses the asynchronous device work).", "",
            f"Unstructured reference: {settings['unstructured']}.", "",
            "## Final test accuracy over seeds", "", *accuracy_table(results), "",
            "## Paired comparisons", "",
            "Each row pairs the two configurations seed by seed: mean of (a - b) over the seeds, its standard error "
            "and the 95% Student-t interval (n - 1 degrees of freedom); *beyond seed noise* when that interval "
            "excludes zero.", "", *comparison_table(rows), "", "## What the numbers say", ""]
    text += [f"- {line}" for line in findings(rows)]
    if failed:
        text.append(f"- Not done ({len(failed)} runs): " + "; ".join(f"{k} ({v})" for k, v in failed.items()) + ".")

    text += ["", "## Topology: what each mask update moved", ""]
    frozen = never_moved(results)
    if frozen:
        text += ["Layers whose topology never moved (no update of any seed changed their mask):", ""]
        text += [f"- {config}: {len(names)} of {len(by_config(results)[config][0]['layers'])} layers: "
                 f"{', '.join(names)}" for config, names in frozen.items()]
    else:
        text.append("Every sparse layer moved in every configuration.")
    text += ["", f"Per layer, the number of blocks (weights for the unstructured run) each update made active, in "
                 f"update order, seed {seed0}:", ""]
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        if r["layers"] and r["seed"] == seed0:
            groups.setdefault((r["sparsity"], r["block"] or 0), []).append(r)
    for (sparsity, block), runs in sorted(groups.items()):
        text += [f"### {sparsity:.0%}, " + (f"block {block}" if block else "unstructured"), "", *moves_table(runs), ""]
    if plot_name:
        text += [f"![test accuracy against steps and against training seconds]({plot_name})"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")
    return path


def plot_curves(results: List[dict], path: str, title: str = "") -> Optional[str]:
    """Mean test accuracy (band: one std over seeds) against steps and against training seconds, one row per
    (sparsity, block), dense (and the unstructured reference at its sparsity) in every row."""
    plt = pyplot()
    if plt is None:
        return None
    rows = sorted({(r["sparsity"], r["block"]) for r in results if r["method"] in METHODS}) or [(0.0, None)]
    colors = {"dense": "black", "set": "tab:blue", "rigl": "tab:orange", "bidst": "tab:green", UNSTRUCTURED: "grey"}
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for row, (s, b) in enumerate(rows):
        for config, runs in by_config(results).items():
            r0 = runs[0]
            if not (r0["method"] == "dense" or (r0["sparsity"], r0["block"]) == (s, b) or
                    (r0["method"] == UNSTRUCTURED and abs(r0["sparsity"] - s) < 1e-9)):
                continue
            acc = torch.tensor([[100 * p["test_accuracy"] for p in r["curve"]] for r in runs])
            mean, std = acc.mean(0), (acc.std(0) if len(runs) > 1 else torch.zeros_like(acc[0]))
            for col, key in enumerate(("step", "seconds")):
                x = torch.tensor([[p[key] for p in r["curve"]] for r in runs], dtype=torch.float64).mean(0)
                ax = axes[row][col]
                ax.plot(x, mean, marker="o", markersize=3, color=colors.get(r0["method"], "grey"),
                        linestyle="--" if r0["optimizer"] == "sparseopt" else "-", label=config)
                ax.fill_between(x, mean - std, mean + std, color=colors.get(r0["method"], "grey"), alpha=0.12)
        for col, xlabel in enumerate(("step", "training seconds")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{s:.0%} sparse, block {b}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=6, loc="lower right")
    return save_figure(plt, fig, path, title, dpi=110)


def write_outputs(saved: dict, stem: str) -> int:
    """``stem``.md and .png from a study's saved JSON (``stem``.json)."""
    settings = saved["settings"]
    title = textwrap.fill(f"{settings['preset']} preset on {settings['device']}: {settings['description']}", 140)
    png = plot_curves(saved["results"], stem + ".png", title)
    md = write_report(saved["results"], saved["failed"], settings, stem + ".md",
                      os.path.basename(png) if png else None)
    print(open(md).read())
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


# -- command line -------------------------------------------------------------------------------------------
def estimate(preset: Preset, args: argparse.Namespace) -> int:
    """Time one short run of each configuration (seed 0) and project the preset's duration from it (no mask
    update falls within 8 steps: they are left out, and the first steps' warm-up is counted in)."""
    short = replace(preset, steps=min(preset.steps, 8), evals=1, seeds=1)
    results, failed, _ = run_study(run_grid(short), short, args.device, args.data_dir, None, 1, math.inf)
    total = 0.0
    print(f"\nprojected for the {args.preset} preset ({describe(preset)}):")
    for r in results:
        per_run = (r["setup_seconds"] + preset.steps * r["train_seconds"] / short.steps +
                   preset.evals * r["eval_seconds"])
        total += preset.seeds * per_run
        print(f"  {r['config']:<32} {r['train_seconds'] / short.steps:6.3f} s/step, "
              f"{r['eval_seconds']:5.1f} s/evaluation, {per_run:6.0f} s per run")
    print(f"total: {total / 60:.1f} minutes with one worker; about {total / 60 / preset.workers:.1f} with "
          f"{preset.workers} if the device keeps up" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


def parse_args(argv=None) -> argparse.Namespace:
    epilog = "presets:\n" + "\n".join(f"  {name}: {p.budget}.\n    {describe(p)}" for name, p in PRESETS.items())
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--preset", choices=list(PRESETS), default="gpu" if on_gpu else "cpu",
                   help="see below (default: gpu where CUDA is available, else cpu)")
    p.add_argument("--seeds", type=int, default=None, help="override the preset's number of seeds")
    p.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--workers", type=int, default=None, help="override the preset's parallel runs")
    p.add_argument("--threads", type=int, default=None, help="override the preset's torch threads per worker")
    p.add_argument("--deadline", type=float, default=None, help="override the preset's deadline (seconds)")
    p.add_argument("--device", default="cuda" if on_gpu else "cpu", help="default: cuda where available, else cpu")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: sparsekern.data's)")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="folder for the .md, .json and .png (default: benchmarks/results)")
    p.add_argument("--runs-dir", default=None,
                   help="finished runs are saved and reused here (default: runs/convergence-<preset>-<device> in the "
                        "checkout)")
    p.add_argument("--estimate", action="store_true",
                   help="time an 8-step run of every configuration (seed 0) and print the preset's projected "
                        "duration; writes nothing")
    p.add_argument("--report-from", default=None, metavar="JSON",
                   help="train nothing: rewrite the .md and .png from a .json this script wrote")
    return p.parse_args(argv)


def main(argv=None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.report_from:
        with open(args.report_from) as f:
            saved = json.load(f)
        return write_outputs(saved, os.path.splitext(args.report_from)[0])
    overrides = {k: getattr(args, k) for k in ("seeds", "steps", "workers", "threads", "deadline") if getattr(args, k)}
    preset = replace(PRESETS[args.preset], **overrides)
    if args.estimate:
        return estimate(preset, args)
    device = device_name(torch.device(args.device))
    # Overrides that change the numbers (not only how fast they come) keep the preset's report from being replaced.
    suffix = ("_tiny" if args.preset == "tiny" else "") + ("_custom" if overrides.keys() & {"seeds", "steps"} else "")
    stem = os.path.join(args.out, f"convergence_{device}{suffix}")
    runs_dir = args.runs_dir or os.path.join(os.path.dirname(HERE), "runs", f"convergence-{args.preset}-{device}")
    results, failed, reused = run_study(run_grid(preset), preset, args.device, args.data_dir, runs_dir,
                                        preset.workers, started + preset.deadline)
    unstructured = next((r["implementation"] for r in results if r["method"] == UNSTRUCTURED), "not run")
    settings = {"preset": args.preset, "description": describe(preset), "device": device, "unstructured": unstructured,
                "wall_minutes": round((time.time() - started) / 60, 1), "reused_runs": reused}
    os.makedirs(args.out, exist_ok=True)
    saved = {"settings": settings, "failed": failed, "comparisons": comparisons(results), "results": results}
    with open(stem + ".json", "w") as f:
        json.dump(saved, f, indent=1)
    write_outputs(saved, stem)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
