"""``--suite gpu-optim``: the optimizer step and the mask update (issue #5).

- ``masked_sgd_``: one fused SGD step (momentum 0.9, weight decay) on compact fp32 block values standing for a
  ResNet-50's worth of sparse weights (``--sgd-numel``, default: every layer ``sparsify`` makes sparse), at
  densities 10/50/100%. A step moves 20 bytes a stored weight (param, grad and momentum read; param and momentum
  written); ``gbps`` is that over the time, ``frac_copy`` the share of the device-to-device copy bandwidth
  measured here (goal: >= 80%), ``time_vs_full`` the time over the 100% step's (ideally the density). On a GPU
  several copies of the operands, together 4x the L2 cache, are stepped in turn so that every step reads memory.
- ``layout_update_``: one mask update of every sparse layer of ResNet-50 (convolutions except the stem, and the
  classifier) at 90%, block 32: each layer's layout is rewritten for a new random mask of the same block count,
  its values and momentum moved along (``BlockSparseLayout.update_(mask, check=False, block_tensors=...)``). The
  time of updating all layers once (goal: < 1 ms), ``eager`` (as a training loop pays it, launch gaps included)
  and, on a GPU, as a replayed CUDA graph (the GPU work alone).

Correctness first: each backend's ``masked_sgd_`` against the reference op on fresh inputs (the update and the
momentum within 1e-5 relative); each backend's ``layout_update_`` against the reference backend's index tensors
(exactly) and the moved values and momentum (kept blocks keep their contents, new blocks are zero: exactly).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

import sparsekern as sk
from sparsekern import reference

from .common import (Impl, backend, backend_choices, check_and_time, copy_bandwidth_gbps, first_line, fmt,
                     format_columns, prepare_timing, rel_err, time_prepared, with_backend)

SGD_DENSITIES = (0.1, 0.5, 1.0)
SGD_ARGS = dict(lr=1e-3, momentum=0.9, weight_decay=5e-5)
SGD_CHECK_ARGS = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)  # large enough that the update is well resolved
SGD_TOLERANCE = 1e-5  # the same fp32 arithmetic; only the contraction into FMAs may differ
SGD_BYTES_PER_WEIGHT = 5 * 4
SGD_BLOCK = 32
COPY_GOAL = 0.8
UPDATE_SPARSITY, UPDATE_BLOCK = 0.9, 32
UPDATE_GOAL_MS = 1.0
FIELDS = ["test", "density", "numel", "layers", "impl", "timing", "ms", "bytes", "gbps", "frac_copy", "time_vs_full",
          "rel_err", "status", "note"]


def resnet50_sparse_shapes() -> List[Tuple[int, int]]:
    """The weight matrices [N, K] that ``sparsify`` makes sparse in ResNet-50 (with the training CLI's filter:
    every convolution but the 3-channel stem, as [out, kh*kw*in], and the classifier)."""
    from ..models import resnet50
    from ..train import _stem_filter
    with torch.device("meta"):
        model = resnet50()
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and _stem_filter(module, name):
            shapes.append((module.weight.shape[0], module.weight[0].numel()))
    return shapes


# -- masked_sgd_ ----------------------------------------------------------------------------------------------
def _sgd_operands(numel: int, device: torch.device, gen: torch.Generator):
    """(param, grad, momentum, step) of ``numel`` weights as [blocks, 32, 32] values; the step count is past
    the first step, so momentum takes its running path."""
    shape = (max(1, numel // SGD_BLOCK ** 2), SGD_BLOCK, SGD_BLOCK)
    param = torch.randn(shape, device=device, generator=gen)
    grad = torch.randn(shape, device=device, generator=gen)
    buf = torch.randn(shape, device=device, generator=gen)
    return param, grad, buf, torch.ones((), dtype=torch.int64, device=device)


def _sgd_check(name: str, numel: int, device: torch.device, gen: torch.Generator) -> float:
    """Relative error of backend ``name``'s step (the param's change and the new momentum) against the
    reference op's, on fresh random operands."""
    operands = _sgd_operands(min(numel, 1 << 20), device, gen)
    ours, expected = [t.clone() for t in operands], [t.clone() for t in operands]
    with backend("reference"):
        sk.ops.masked_sgd_(*expected[:3], None, expected[3], **SGD_CHECK_ARGS)
    with backend(name):
        sk.ops.masked_sgd_(*ours[:3], None, ours[3], **SGD_CHECK_ARGS)
    before = operands[0]
    return max(rel_err(ours[0] - before, expected[0] - before), rel_err(ours[2], expected[2]))


def bench_masked_sgd(device: torch.device, numel: int, densities: Sequence[float], copy_gbps: float, reps: int,
                     backends: Optional[Sequence[str]], use_graphs: bool, report) -> List[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) if device.type == "cuda" else 0
    rows, full_ms = [], {}
    for density in sorted(densities, reverse=True):  # 100% first: the others are compared with it
        stored = max(1, round(density * numel) // SGD_BLOCK ** 2) * SGD_BLOCK ** 2
        sets = max(1, math.ceil(4 * l2 / (3 * 4 * stored)))
        impls = []
        for name, why in backend_choices("masked_sgd_", device, torch.float32, backends):
            if why:
                impls.append(Impl(name, "sk.ops.masked_sgd_", why=why))
                continue
            operand_sets = [_sgd_operands(stored, device, gen) for _ in range(sets)]

            def step_all(operand_sets=operand_sets):
                for param, grad, buf, step in operand_sets:
                    sk.ops.masked_sgd_(param, grad, buf, None, step, **SGD_ARGS)

            check = lambda out, name=name: {"step": _sgd_check(name, stored, device, gen)}
            impls.append(Impl(name, "sk.ops.masked_sgd_", with_backend(name, step_all), check))
        outcomes = check_and_time(f"masked_sgd_ density {density:.2f}", impls, device, reps,
                                  limits={"step": SGD_TOLERANCE}, use_graphs=use_graphs, report=report)
        for name, outcome in outcomes.items():
            ms = outcome.ms / sets if outcome.ms is not None else None
            nbytes = SGD_BYTES_PER_WEIGHT * stored
            if density == 1.0 and ms is not None:
                full_ms[name] = ms
            gbps = nbytes / (ms * 1e-3) / 1e9 if ms else None
            rows.append({"test": "masked_sgd_", "density": density, "numel": stored, "layers": None, "impl": name,
                         "timing": outcome.timing, "ms": ms, "bytes": nbytes, "gbps": gbps,
                         "frac_copy": gbps / copy_gbps if gbps else None,
                         "time_vs_full": ms / full_ms[name] if ms and name in full_ms else None,
                         "rel_err": outcome.worst()[0], "status": outcome.status,
                         "note": "; ".join(t for t in (outcome.note, f"{sets} operand sets in turn" if sets > 1
                                                       else "") if t)})
    return rows


# -- layout_update_ -------------------------------------------------------------------------------------------
class UpdateLayer:
    """A layer's layout, values and momentum, and two masks of the same block count to move between."""

    def __init__(self, shape, device: torch.device, gen: torch.Generator):
        self.layout = sk.BlockSparseLayout.random(shape, UPDATE_BLOCK, 1.0 - UPDATE_SPARSITY, generator=gen)
        grid, nnz = self.layout.block_grid, self.layout.nnz_blocks
        other = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
        other[torch.randperm(other.numel(), generator=gen)[:nnz]] = True
        self.layout = self.layout.to(device)
        self.masks = (self.layout.to_block_mask(), other.view(grid).to(device))
        self.values = torch.randn(nnz, UPDATE_BLOCK, UPDATE_BLOCK, generator=gen).to(device)
        self.momentum = torch.randn(nnz, UPDATE_BLOCK, UPDATE_BLOCK, generator=gen).to(device)

    def update(self, which: int) -> None:
        self.layout.update_(self.masks[which], check=False, block_tensors=(self.values, self.momentum))

    def dense(self, blocks: torch.Tensor) -> torch.Tensor:
        return reference.blocks_to_dense(blocks, self.layout.coo_row, self.layout.col_idx, *self.layout.block_grid)


def _update_all(layers: Sequence[UpdateLayer]) -> Callable[[], None]:
    """To the second masks and back: two updates of every layer, ending where it started (so it can repeat)."""
    def run():
        for which in (1, 0):
            for layer in layers:
                layer.update(which)
    return run


def _update_check(name: str, layers: Sequence[UpdateLayer], expected_index) -> Optional[str]:
    """Update every layer to its second mask with backend ``name`` and back; what differs from the expected
    index or from the moved values (None: nothing)."""
    problems = []
    for i, layer in enumerate(layers):
        mask = layer.masks[1].to(layer.values.dtype).repeat_interleave(UPDATE_BLOCK, 0).repeat_interleave(
            UPDATE_BLOCK, 1)
        want = [layer.dense(t) * mask for t in (layer.values, layer.momentum)]
        with backend(name):
            layer.update(1)
        got_index = [t.clone() for t in layer.layout.index_tensors()]
        got = [layer.dense(t) for t in (layer.values, layer.momentum)]
        with backend(name):
            layer.update(0)
        if not all(torch.equal(a, b) for a, b in zip(got_index, expected_index[i])):
            problems.append(f"layer {i}: index differs from the reference backend's")
        if not all(torch.equal(a, b) for a, b in zip(got, want)):
            problems.append(f"layer {i}: values or momentum not moved exactly")
    return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "") or None


def bench_layout_update(device: torch.device, reps: int, backends: Optional[Sequence[str]], use_graphs: bool,
                        report) -> List[dict]:
    gen = torch.Generator().manual_seed(0)
    layers = [UpdateLayer(shape, device, gen) for shape in resnet50_sparse_shapes()]
    numel = sum(layer.values.numel() for layer in layers)
    names = [(name, why) for name, why in backend_choices("build_layout_index_", device, None, backends)]
    if all(name != "reference" for name, _ in names):
        names.append(("reference", None))  # plain torch: what runs where no kernel is built
    # The reference backend defines the expected index of every layer under its second mask.
    expected = []
    with backend("reference"):
        for layer in layers:
            layer.update(1)
            expected.append([t.clone() for t in layer.layout.index_tensors()])
            layer.update(0)
    timed, rows, notes = {}, [], {}
    for name, why in names:
        if why is not None:
            notes[name] = ("n/a", why)
            continue
        try:
            problem = _update_check(name, layers, expected)
        except Exception as error:
            report(f"!!! ERROR layout_update_ [{name}]: {first_line(error)}")
            notes[name] = ("error", first_line(error))
            continue
        if problem:
            report(f"!!! MISMATCH layout_update_ [{name}]: {problem}: not timed")
            notes[name] = ("MISMATCH", problem)
            continue
        for graphed in ([False, True] if device.type == "cuda" and use_graphs else [False]):
            label = f"{name} {'graph' if graphed else 'eager'}"
            timed[label] = (name, prepare_timing(with_backend(name, _update_all(layers)), device, use_graphs=graphed))
    ms = time_prepared({label: t for label, (_, t) in timed.items()}, device, reps)
    for label, (name, t) in timed.items():
        rows.append({"test": "layout_update_", "density": 1.0 - UPDATE_SPARSITY, "numel": numel, "layers": len(layers),
                     "impl": name, "timing": "graph" if t.mode == "graph" else "eager", "ms": ms[label] / 2,
                     "bytes": None, "gbps": None, "frac_copy": None, "time_vs_full": None, "rel_err": None,
                     "status": "ok", "note": t.note})
    for name, (status, note) in notes.items():
        rows.append({"test": "layout_update_", "density": 1.0 - UPDATE_SPARSITY, "numel": numel, "layers": len(layers),
                     "impl": name, "timing": "", "ms": None, "bytes": None, "gbps": None, "frac_copy": None,
                     "time_vs_full": None, "rel_err": None, "status": status, "note": note})
    return rows


def format_rows(rows: List[dict]) -> str:
    header = ["test", "density", "weights", "impl", "timing", "ms", "GB/s", "of copy", "time vs 100%", "status",
              "note"]
    lines = [[r["test"], fmt(r["density"], ".2f"), fmt(r["numel"], ","), r["impl"], r["timing"], fmt(r["ms"], ".4f"),
              fmt(r["gbps"], ".0f"), fmt(r["frac_copy"], ".0%"), fmt(r["time_vs_full"], ".2f"), r["status"],
              r["note"]] for r in rows]
    return format_columns(header, lines)


def goal_summary(rows: List[dict]) -> str:
    lines = ["goals (issue #5):"]
    for r in rows:
        if r["test"] == "masked_sgd_" and r["frac_copy"] is not None:
            lines.append(f"  masked_sgd_ {r['impl']:<9} density {r['density']:.2f}: {r['frac_copy']:.0%} of copy "
                         f"bandwidth (goal >= {COPY_GOAL:.0%}: {'met' if r['frac_copy'] >= COPY_GOAL else 'MISSED'})")
        if r["test"] == "layout_update_" and r["ms"] is not None:
            lines.append(f"  layout_update_ {r['impl']:<9} {r['timing']:<5}: {r['ms']:.3f} ms for {r['layers']} layers "
                         f"(goal < {UPDATE_GOAL_MS:g} ms: {'met' if r['ms'] < UPDATE_GOAL_MS else 'MISSED'})")
    return "\n".join(lines)


def bench_gpu_optim(device: torch.device, sgd_numel: Optional[int] = None, densities: Sequence[float] = SGD_DENSITIES,
                    reps: int = 20, backends: Optional[Sequence[str]] = None, use_graphs: bool = True,
                    report: Callable[[str], None] = print) -> List[dict]:
    shapes = resnet50_sparse_shapes()
    numel = sgd_numel or sum(n * k for n, k in shapes)
    copy_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    copy_gbps = copy_bandwidth_gbps(device, copy_bytes, reps)
    report(f"gpu-optim: device-to-device copy {copy_gbps:.0f} GB/s ({copy_bytes >> 20} MiB, read + write); "
           f"masked_sgd_ on {numel:,} weights at densities {', '.join(f'{d:.0%}' for d in densities)}; "
           f"layout_update_ of ResNet-50's {len(shapes)} sparse layers at {UPDATE_SPARSITY:.0%}, block "
           f"{UPDATE_BLOCK}; {reps} rounds (medians)")
    rows = bench_masked_sgd(device, numel, densities, copy_gbps, reps, backends, use_graphs, report)
    report(format_rows(rows))
    update_rows = bench_layout_update(device, reps, backends, use_graphs, report)
    report(format_rows(update_rows))
    rows += update_rows
    rows.append({"test": "copy", "density": None, "numel": copy_bytes // 4, "layers": None, "impl": "torch copy_",
                 "timing": "graph" if device.type == "cuda" else "host", "ms": 2 * copy_bytes / copy_gbps / 1e6,
                 "bytes": 2 * copy_bytes, "gbps": copy_gbps, "frac_copy": 1.0, "time_vs_full": None, "rel_err": None,
                 "status": "ok", "note": "the reference bandwidth of frac_copy"})
    return rows
