"""Per-layer floors of the block-sparse convolution's three passes, beside the times the gpu-conv suite measured.

    python3 benchmarks/conv_floors.py [--csv PATH] [--model resnet50] [--sparsity 0.9] [--block 32]
                                      [--tflops 781] [--tbps 4.3] [--full-reads]

Standard library only (no torch, no sparsekern): the layer shapes are parsed from the CSV's ``layer`` labels
(``"64->256 k1 s1 56x56"`` = in -> out channels, square kernel, stride, input size, as
``sparsekern.bench.gpu_conv.ConvShape.label`` writes them), with padding kernel // 2 (ResNet's convolutions).

For each layer, and with M = batch * out_h * out_w, N = out channels, K = kh * kw * in channels:

* FLOP floor: 2 * M * nnz * bs * bs = 2 * M * N * K * density for each pass (forward Y = conv(X, W); dgrad dX;
  wgrad dW at the stored blocks only), over the bf16 tensor-core rate ``--tflops``;
* byte floor: every operand read once and every result written once, over ``--tbps`` (bytes read + written):
  forward X + values + row_ptr/col_idx -> Y; dgrad dY + values + col_ptr/row_idx/perm -> dX; wgrad dY + X +
  coo_row/col_idx -> dW values. Activations in the CSV's dtype (2 bytes for bf16), index int32. X counts the
  input pixels the convolution reads (all of them, except 1x1 stride-2 layers, which read one in four); Y and
  dX are written in full. A sparse pass needs only the bs-wide channel chunks of X (of dY) that some stored block
  touches: by default X and dY reads are scaled by the expected touched fraction for a uniformly random layout
  (the suite's layout is the largest-norm blocks of an i.i.d. random filter), shown in the column 'X, dY read';
  ``--full-reads`` reads them whole (then a narrow layer's kernel can beat its "floor");
* floor = the larger of the two, and the pass is compute- (c) or memory-bound (m) accordingly.

Dense cuDNN gets the same floors with density 1 and a dense [N, K] filter (no index, whole reads). The sparse
layer keeps nnz = round(density * blocks) blocks (``sparsekern.layout.blocks_for_density``); the CSV's own
``density`` column is checked against it.

The CSV has two timed passes per layer: ``forward`` (no grad) and ``forward+backward``. The backward is taken
as their difference; dgrad and wgrad are not timed separately, so the backward is compared with the sum of the
dgrad and wgrad floors. A layer's furthest pass is the one whose measured/floor ratio is largest. Totals weigh
each layer by its ``count`` (how often it occurs in the model), as the suite's own ``total`` rows do. Then: the
same per layer family, where the time above the floors is, and the whole model's floor (also for a what-if
backward that reads dY once for dgrad and wgrad together).

Rows of other sparsities or blocks are ignored; if the CSV has none at ``--sparsity``/``--block``, only the
floors are printed. Defaults: the H200 run of 2026-12-04 (shared/gpu-runs/2026-12-04-h200): cuBLAS bf16
781 TFLOP/s measured there, and 4.3 TB/s, the device-to-device copy measured on the same kind of machine (the
HBM3e datasheet says 4.8 TB/s).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CSV = os.path.join(os.path.dirname(ROOT), "shared", "gpu-runs", "2026-12-04-h200", "nvidia-h200_gpu_conv.csv")
DEFAULT_TFLOPS = 781.0  # cuBLAS bf16 8192^3 on the H200 (README of the 2026-12-04 run)
DEFAULT_TBPS = 4.3  # device-to-device copy, bytes read + written (device KINDS notes); datasheet 4.8
INDEX_BYTES = 4  # int32 row_ptr, col_idx, col_ptr, row_idx, perm, coo_row
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PASSES = ("forward", "dgrad", "wgrad")
IMPLS = ("triton", "cuda", "dense")
IMPL_NAMES = {"triton": "triton", "cuda": "cuda", "dense": "cuDNN"}

_LABEL = re.compile(r"^\s*(\d+)->(\d+) k(\d+) s(\d+) (\d+)x(\d+)\s*$")


@dataclass(frozen=True)
class ConvShape:
    """One convolution: square kernel and stride, padding kernel // 2 unless given, no dilation, groups 1."""
    cin: int
    cout: int
    kernel: int
    stride: int
    height: int
    width: int
    padding: Optional[int] = None

    @classmethod
    def from_label(cls, label: str) -> "ConvShape":
        match = _LABEL.match(label)
        if not match:
            raise ValueError(f"not a layer label like '64->256 k1 s1 56x56': {label!r}")
        cin, cout, k, s, h, w = (int(v) for v in match.groups())
        return cls(cin, cout, k, s, h, w)

    @property
    def label(self) -> str:
        return f"{self.cin}->{self.cout} k{self.kernel} s{self.stride} {self.height}x{self.width}"

    @property
    def pad(self) -> int:
        return self.kernel // 2 if self.padding is None else self.padding

    def out_size(self, size: int) -> int:
        return (size + 2 * self.pad - self.kernel) // self.stride + 1

    @property
    def out_hw(self) -> Tuple[int, int]:
        return self.out_size(self.height), self.out_size(self.width)

    def _touched(self, size: int) -> int:
        """How many input rows (or columns) of ``size`` some output pixel's window reads."""
        rows = {o * self.stride - self.pad + i for o in range(self.out_size(size)) for i in range(self.kernel)}
        return sum(1 for r in rows if 0 <= r < size)

    @property
    def input_pixels_read(self) -> int:
        return self._touched(self.height) * self._touched(self.width)

    @property
    def family(self) -> str:
        k = f"{self.kernel}x{self.kernel}"
        if self.stride > 1:
            return f"{k} s{self.stride}" + (" (downsample)" if self.kernel == 1 else "")
        if self.kernel > 1:
            return f"{k} s1"
        if self.cout > self.cin:
            return "1x1 expansion"
        if self.cout < self.cin:
            return "1x1 reduction"
        return "1x1 square"


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    def floor(self, tflops: float, tbps: float) -> Tuple[float, str]:
        """(seconds, 'c' or 'm'): the larger of the compute time and the memory time."""
        t_flop = self.flops / (tflops * 1e12)
        t_byte = self.bytes / (tbps * 1e12)
        if t_flop == t_byte == 0:
            return 0.0, "-"
        return (t_flop, "c") if t_flop >= t_byte else (t_byte, "m")


def blocks_for_density(density: float, n_blocks: int) -> int:
    """sparsekern.layout.blocks_for_density: how many blocks a layer of ``n_blocks`` keeps at ``density``."""
    return min(n_blocks, max(0, round(density * n_blocks)))


def block_grid(shape: ConvShape, block: int) -> Tuple[int, int]:
    """(block-rows, block-columns) of the filter matrix [N = cout, K = kh*kw*cin]."""
    return math.ceil(shape.cout / block), math.ceil(shape.kernel * shape.kernel * shape.cin / block)


def touched_fraction(n_blocks: int, nnz: int, group: int) -> float:
    """Expected fraction of groups of ``group`` blocks (out of ``n_blocks``, in disjoint groups) that hold at least
    one of ``nnz`` blocks drawn uniformly at random: 1 - C(n_blocks - group, nnz) / C(n_blocks, nnz)."""
    if nnz <= 0:
        return 0.0
    if group >= n_blocks or nnz > n_blocks - group:
        return 1.0
    return 1.0 - math.comb(n_blocks - group, nnz) / math.comb(n_blocks, nnz)


def read_fractions(shape: ConvShape, block: int, nnz: int) -> Tuple[float, float]:
    """(X, dY): the expected fraction of the input's channels and of the output gradient's channels that a
    block-sparse kernel must read at all. A bs-wide chunk of input channels is read only if one of the
    kh*kw*(block-rows) blocks covering it is stored (whole chunks only when in_channels is a multiple of bs, else
    1); a bs-wide chunk of dY only if its block-row holds a block. The layout is taken as uniformly random, which
    the gpu-conv suite's is: the largest-norm blocks of an i.i.d. random filter."""
    n_rows, n_cols = block_grid(shape, block)
    total = n_rows * n_cols
    fx = touched_fraction(total, nnz, shape.kernel * shape.kernel * n_rows) if shape.cin % block == 0 else \
        (1.0 if nnz else 0.0)
    return fx, touched_fraction(total, nnz, n_cols)


def pass_costs(shape: ConvShape, batch: int, block: int, nnz: Optional[int], elem_bytes: int = 2,
               index_bytes: int = INDEX_BYTES, full_reads: bool = False) -> Dict[str, Cost]:
    """FLOPs and bytes of forward, dgrad and wgrad; ``nnz`` stored bs x bs blocks, or None for the dense conv.
    Sparse reads of X and dY are scaled by ``read_fractions`` unless ``full_reads``."""
    oh, ow = shape.out_hw
    m = batch * oh * ow
    n = shape.cout
    k = shape.kernel * shape.kernel * shape.cin
    n_rows, n_cols = block_grid(shape, block)
    x_read = batch * shape.input_pixels_read * shape.cin * elem_bytes
    x_full = batch * shape.height * shape.width * shape.cin * elem_bytes  # dX is written whole
    y = m * n * elem_bytes  # Y written whole; dY read
    if nnz is None:
        flops = 2.0 * m * n * k
        weights = n * k * elem_bytes
        fwd_index = dgrad_index = wgrad_index = 0
        x_in, dy_in = x_read, y
    else:
        flops = 2.0 * m * nnz * block * block
        weights = nnz * block * block * elem_bytes
        fwd_index = (n_rows + 1 + nnz) * index_bytes  # row_ptr, col_idx
        dgrad_index = (n_cols + 1 + 2 * nnz) * index_bytes  # col_ptr, row_idx, perm
        wgrad_index = 2 * nnz * index_bytes  # coo_row, col_idx
        fx, fy = (1.0, 1.0) if full_reads else read_fractions(shape, block, nnz)
        x_in, dy_in = x_read * fx, y * fy
    costs = {"forward": Cost(flops, x_in + weights + fwd_index + y),
             "dgrad": Cost(flops, dy_in + weights + dgrad_index + x_full),
             "wgrad": Cost(flops, dy_in + x_in + wgrad_index + weights)}
    # A what-if, not a pass of its own: one backward kernel doing dgrad and wgrad, reading dY once.
    costs["backward, dY once"] = Cost(2 * flops, costs["dgrad"].bytes + costs["wgrad"].bytes - dy_in)
    return costs


# ----------------------------------------------------------------------------------------------
# The CSV

def _float(text: str) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class Layer:
    shape: ConvShape
    count: int
    nnz: int
    density: float
    measured: Dict[Tuple[str, str], Optional[float]]  # (impl, "forward" | "backward") -> ms
    notes: List[str]


def read_layers(path: str, model: str, sparsity: float, block: int) -> Tuple[List[Layer], dict]:
    """The model's layers in CSV order, with the forward and backward (fwd+bwd - fwd) ms per impl at
    (sparsity, block). Returns (layers, facts: batch, dtype, input, matched)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("model") == model and r.get("layer") != "total"]
    if not rows:
        raise SystemExit(f"{path}: no rows of model {model!r}")
    matched = [r for r in rows if _float(r["sparsity"]) is not None and abs(float(r["sparsity"]) - sparsity) < 1e-9
               and int(r["block"]) == block]
    source = matched or rows
    first = source[0]
    facts = {"batch": int(first["batch"]), "dtype": first["dtype"], "input": first["input"],
             "matched": bool(matched)}
    layers: Dict[str, Layer] = {}
    times: Dict[str, Dict[Tuple[str, str], Optional[float]]] = {}
    for r in source:
        label = r["layer"]
        if label not in layers:
            shape = ConvShape.from_label(label)
            n_rows, n_cols = block_grid(shape, block)
            nnz = blocks_for_density(1.0 - sparsity, n_rows * n_cols)
            density = nnz / (n_rows * n_cols)
            notes = []
            csv_density = _float(r["density"])
            if matched and csv_density is not None and abs(csv_density - density) > 6e-5:
                notes.append(f"CSV density {csv_density} != {density:.4f}")
            if nnz == 0:
                notes.append(f"no blocks: {n_rows * n_cols} blocks at {1 - sparsity:.0%} round to 0")
            layers[label] = Layer(shape, int(r["count"]), nnz, density, {}, notes)
            times[label] = {}
        if matched and r["impl"] in IMPLS:
            times[label][(r["impl"], r["pass"])] = _float(r["ms"]) if r["status"] == "ok" else None
    for label, layer in layers.items():
        t = times[label]
        for impl in IMPLS:
            fwd, both = t.get((impl, "forward")), t.get((impl, "forward+backward"))
            layer.measured[(impl, "forward")] = fwd
            layer.measured[(impl, "backward")] = both - fwd if fwd is not None and both is not None else None
    return list(layers.values()), facts


# ----------------------------------------------------------------------------------------------
# Report

@dataclass
class Floors:
    """Per layer: sparse and dense costs and floors (seconds) per pass; backward = dgrad + wgrad."""
    sparse: Dict[str, Cost]
    dense: Dict[str, Cost]
    sparse_s: Dict[str, Tuple[float, str]]
    dense_s: Dict[str, Tuple[float, str]]

    def floor_ms(self, impl: str, pass_name: str) -> float:
        floors = self.dense_s if impl == "dense" else self.sparse_s
        if pass_name == "backward":
            return 1e3 * (floors["dgrad"][0] + floors["wgrad"][0])
        return 1e3 * floors[pass_name][0]


def layer_floors(layer: Layer, batch: int, block: int, elem_bytes: int, tflops: float, tbps: float,
                 full_reads: bool = False) -> Floors:
    sparse = pass_costs(layer.shape, batch, block, layer.nnz, elem_bytes, full_reads=full_reads)
    dense = pass_costs(layer.shape, batch, block, None, elem_bytes)
    return Floors(sparse, dense, {p: sparse[p].floor(tflops, tbps) for p in PASSES},
                  {p: dense[p].floor(tflops, tbps) for p in PASSES})


def _us(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    us = 1e3 * ms
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def _vs(ms: Optional[float], floor_ms: float) -> str:
    if ms is None:
        return "-"
    ratio = ms / floor_ms if floor_ms > 0 else math.inf
    return f"{_us(ms)} ({ratio:.1f}x)"


def _ratio(ms: Optional[float], floor_ms: float) -> Optional[float]:
    return None if ms is None or floor_ms <= 0 else ms / floor_ms


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _sum(values: Iterable[Tuple[int, Optional[float]]]) -> Optional[float]:
    values = list(values)
    if any(v is None for _, v in values):
        return None
    return sum(c * v for c, v in values)


def report(layers: List[Layer], facts: dict, model: str, sparsity: float, block: int, tflops: float, tbps: float,
           csv_path: str, full_reads: bool = False) -> str:
    elem = DTYPE_BYTES.get(facts["dtype"], 2)
    batch = facts["batch"]
    floors = [layer_floors(layer, batch, block, elem, tflops, tbps, full_reads) for layer in layers]
    measured = facts["matched"]
    out = [f"## Block-sparse convolution floors: {model}, batch {batch}, {facts['input']}, {facts['dtype']}, "
           f"{sparsity:.0%} sparse, block {block}",
           "",
           f"Ceilings: {tflops:g} TFLOP/s, {tbps:g} TB/s (bytes read + written); ridge point "
           f"{tflops / tbps:.0f} FLOP/byte. Times in microseconds. Measured: `{csv_path}`"
           + ("" if measured else f" has no rows at sparsity {sparsity} and block {block}: floors only") + ". "
           + ("Sparse passes read X and dY whole (--full-reads)." if full_reads else
              "Sparse passes read only the expected fraction of X's and dY's channel chunks that a stored block "
              "touches (column 'X, dY read'; --full-reads reads them whole)."),
           "",
           "### Floors per pass (us; c = compute-bound, m = memory-bound; AI = FLOP/byte)",
           ""]
    rows = []
    for layer, f in zip(layers, floors):
        oh, ow = layer.shape.out_hw
        fx, fy = (1.0, 1.0) if full_reads else read_fractions(layer.shape, block, layer.nnz)
        cells = [layer.shape.label + (" (*)" if layer.notes else ""), str(layer.count),
                 str(batch * oh * ow), f"{layer.nnz} ({layer.density:.3f})", f"{fx:.2f}, {fy:.2f}"]
        for p in PASSES:
            seconds, bound = f.sparse_s[p]
            cells += [f"{f.sparse[p].intensity:.0f}", f"{1e6 * seconds:.1f} {bound}"]
        cells += [f"{1e3 * f.floor_ms('triton', 'backward'):.1f}", f"{f.dense['forward'].intensity:.0f}",
                  f"{1e3 * f.floor_ms('dense', 'forward'):.1f} {f.dense_s['forward'][1]}",
                  f"{1e3 * f.floor_ms('dense', 'backward'):.1f}"]
        rows.append(cells)
    totals = ["total", str(sum(l.count for l in layers)), "", "", ""]
    for p in PASSES:
        totals += ["", f"{1e3 * sum(l.count * f.floor_ms('triton', p) for l, f in zip(layers, floors)):.0f}"]
    totals += [f"{1e3 * sum(l.count * f.floor_ms('triton', 'backward') for l, f in zip(layers, floors)):.0f}", "",
               f"{1e3 * sum(l.count * f.floor_ms('dense', 'forward') for l, f in zip(layers, floors)):.0f}",
               f"{1e3 * sum(l.count * f.floor_ms('dense', 'backward') for l, f in zip(layers, floors)):.0f}"]
    rows.append(totals)
    out += _table(["layer", "n", "M", "nnz (density)", "X, dY read", "fwd AI", "fwd floor", "dgrad AI", "dgrad floor",
                   "wgrad AI", "wgrad floor", "bwd floor", "dense fwd AI", "dense fwd floor", "dense bwd floor"], rows)
    for layer in layers:
        if layer.notes:
            out.append(f"(*) {layer.shape.label}: " + "; ".join(layer.notes) + ".")
    if not measured:
        return "\n".join(out) + "\n"

    out += ["", "### Measured vs floor (us, and measured / floor; bwd = (forward+backward) - forward, against the "
                "dgrad + wgrad floor)", ""]
    rows = []
    for layer, f in zip(layers, floors):
        cells = [layer.shape.label + (" (*)" if layer.notes else ""), str(layer.count)]
        furthest = []
        for impl in IMPLS:
            ratios = {}
            for p in ("forward", "backward"):
                ms = layer.measured[(impl, p)]
                cells.append(_vs(ms, f.floor_ms(impl, p)))
                ratios[p] = _ratio(ms, f.floor_ms(impl, p))
            if impl != "dense":
                known = {p: r for p, r in ratios.items() if r is not None}
                if known:
                    worst = max(known, key=known.get)
                    furthest.append(f"{impl} {'fwd' if worst == 'forward' else 'bwd'} {known[worst]:.1f}x")
                else:
                    furthest.append(f"{impl} -")
        cells.append(", ".join(furthest))
        rows.append(cells)
    totals = ["total", str(sum(l.count for l in layers))]
    partial = []
    for impl in IMPLS:
        for p in ("forward", "backward"):
            ms = _sum((l.count, l.measured[(impl, p)]) for l in layers)
            floor = sum(l.count * f.floor_ms(impl, p) for l, f in zip(layers, floors))
            totals.append(_vs(ms, floor) if ms is not None else "incomplete")
            if ms is None:
                have = [(l, f) for l, f in zip(layers, floors) if l.measured[(impl, p)] is not None]
                if have:
                    ms_have = sum(l.count * l.measured[(impl, p)] for l, _ in have)
                    floor_have = sum(l.count * f.floor_ms(impl, p) for l, f in have)
                    partial.append(f"{IMPL_NAMES[impl]} {'forward' if p == 'forward' else 'backward'} over the "
                                   f"{len(have)} of {len(layers)} layers it timed: {_vs(ms_have, floor_have)}.")
    totals.append("")
    rows.append(totals)
    header = ["layer", "n"]
    for impl in IMPLS:
        header += [f"{IMPL_NAMES[impl]} fwd", f"{IMPL_NAMES[impl]} bwd"]
    out += _table(header + ["furthest pass"], rows)
    out += partial

    out += ["", "### Per family (sum of count x time, us; measured / floor)", ""]
    rows = []
    families = list(dict.fromkeys(l.shape.family for l in layers))
    for family in families:
        mine = [(l, f) for l, f in zip(layers, floors) if l.shape.family == family]
        cells = [family, str(sum(l.count for l, _ in mine))]
        for p in ("forward", "backward"):
            cells.append(f"{1e3 * sum(l.count * f.floor_ms('triton', p) for l, f in mine):.0f}")
        for impl in IMPLS:
            for p in ("forward", "backward"):
                ms = _sum((l.count, l.measured[(impl, p)]) for l, _ in mine)
                cells.append(_vs(ms, sum(l.count * f.floor_ms(impl, p) for l, f in mine)))
        dense_ms = _sum((l.count, l.measured[("dense", p)]) for l, _ in mine for p in ("forward", "backward"))
        sparse_floor = sum(l.count * (f.floor_ms("triton", "forward") + f.floor_ms("triton", "backward"))
                           for l, f in mine)
        cells.append(f"{dense_ms / sparse_floor:.1f}x" if dense_ms is not None and sparse_floor > 0 else "-")
        rows.append(cells)
    rows.append(_family_total(layers, floors))
    header = ["family", "convs", "fwd floor", "bwd floor"]
    for impl in IMPLS:
        header += [f"{IMPL_NAMES[impl]} fwd", f"{IMPL_NAMES[impl]} bwd"]
    out += _table(header + ["cuDNN fwd+bwd / sparse floor"], rows)
    out.append("")
    out.append("The last column is the largest speedup over the measured cuDNN time that a sparse kernel running "
               "exactly at its floors could show.")
    out += ["", _model_summary(layers, floors, tflops, tbps)]
    return "\n".join(out) + "\n"


def _family_total(layers: List[Layer], floors: List[Floors]) -> List[str]:
    pairs = list(zip(layers, floors))
    cells = ["all", str(sum(l.count for l in layers))]
    for p in ("forward", "backward"):
        cells.append(f"{1e3 * sum(l.count * f.floor_ms('triton', p) for l, f in pairs):.0f}")
    for impl in IMPLS:
        for p in ("forward", "backward"):
            ms = _sum((l.count, l.measured[(impl, p)]) for l in layers)
            cells.append(_vs(ms, sum(l.count * f.floor_ms(impl, p) for l, f in pairs)) if ms is not None
                         else "incomplete")
    dense_ms = _sum((l.count, l.measured[("dense", p)]) for l in layers for p in ("forward", "backward"))
    sparse_floor = sum(l.count * (f.floor_ms("triton", "forward") + f.floor_ms("triton", "backward"))
                       for l, f in pairs)
    cells.append(f"{dense_ms / sparse_floor:.1f}x" if dense_ms is not None and sparse_floor > 0 else "-")
    return cells


def _model_summary(layers: List[Layer], floors: List[Floors], tflops: float, tbps: float) -> str:
    """Where the time above the floors is (triton, count-weighted), and the whole model's floors with a backward
    that reads dY once for both dgrad and wgrad."""
    lines = []
    excess = []
    for layer, f in zip(layers, floors):
        for p in ("forward", "backward"):
            ms = layer.measured[("triton", p)]
            if ms is not None:
                excess.append((layer.count * (ms - f.floor_ms("triton", p)), layer, p))
    if excess:
        total = sum(e for e, _, _ in excess)
        top = sorted(excess, key=lambda e: -e[0])[:6]
        lines.append(f"Triton's time above its floors: {1e3 * total:.0f} us in all; the largest shares (count x "
                     f"(measured - floor)): " + "; ".join(
                         f"{l.shape.label} {'fwd' if p == 'forward' else 'bwd'} x{l.count} {1e3 * e:.0f} us "
                         f"({e / total:.0%})" for e, l, p in top) + ".")
    fused = sum(l.count * (f.floor_ms("triton", "forward") +
                           1e3 * f.sparse["backward, dY once"].floor(tflops, tbps)[0]) for l, f in zip(layers, floors))
    separate = sum(l.count * (f.floor_ms("triton", "forward") + f.floor_ms("triton", "backward"))
                   for l, f in zip(layers, floors))
    dense_ms = _sum((l.count, l.measured[("dense", p)]) for l in layers for p in ("forward", "backward"))
    text = (f"Whole model, forward + backward: sparse floor {1e3 * separate:.0f} us with dgrad and wgrad each "
            f"reading dY, {1e3 * fused:.0f} us with one backward pass reading dY once")
    if dense_ms is not None:
        text += (f"; cuDNN measured {1e3 * dense_ms:.0f} us, so at most {dense_ms / separate:.2f}x "
                 f"({dense_ms / fused:.2f}x fused) over cuDNN at these floors")
    lines.append(text + ".")
    return "\n\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Per-layer FLOP and byte floors of a block-sparse convolution's forward, dgrad and wgrad, "
                    "beside the gpu-conv suite's measured times (triton, cuda, dense cuDNN); prints markdown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--csv", default=DEFAULT_CSV, help="a gpu-conv suite CSV (python -m sparsekern.bench "
                                                           "--suite gpu-conv)")
    parser.add_argument("--model", default="resnet50", help="the CSV's model whose layers to report")
    parser.add_argument("--sparsity", type=float, default=0.9,
                        help="fraction of blocks pruned: the floors' density, and the CSV rows compared")
    parser.add_argument("--block", type=int, default=32, help="block size: the floors' blocks, and the CSV rows "
                                                              "compared")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help="tensor-core rate in TFLOP/s (cuBLAS bf16 measured on the H200)")
    parser.add_argument("--tbps", type=float, default=DEFAULT_TBPS,
                        help="memory bandwidth in TB/s, bytes read + written (H200 device copy; datasheet 4.8)")
    parser.add_argument("--full-reads", action="store_true",
                        help="sparse byte floors read all of X and dY, not only the channel chunks that stored "
                             "blocks touch")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity <= 1.0:
        parser.error(f"--sparsity must be in [0, 1], got {args.sparsity}")
    if args.block <= 0 or args.tflops <= 0 or args.tbps <= 0:
        parser.error("--block, --tflops and --tbps must be positive")
    if not os.path.exists(args.csv):
        parser.error(f"no such CSV: {args.csv}")
    layers, facts = read_layers(args.csv, args.model, args.sparsity, args.block)
    sys.stdout.write(report(layers, facts, args.model, args.sparsity, args.block, args.tflops, args.tbps, args.csv,
                            args.full_reads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
