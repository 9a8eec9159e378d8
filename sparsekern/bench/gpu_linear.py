"""``--suite gpu-linear``: the three training GEMMs of a block-sparse Linear and ``block_grad_scores``, dense vs
torch's sparse formats vs stk vs every sparsekern backend, side by side (issues #4 and #5).

On x [M, K], dy [M, N] and a random block layout of W [N, K] (default M, N, K = 8192, 4096, 4096, bf16), for
each block size and sparsity:

| op | dense (cuBLAS; MKL/oneDNN on CPU) | torch | stk (128x128 blocks only) | ours |
| --- | --- | --- | --- | --- |
| linear_fwd | ``x @ W.t()`` | ``F.linear(x, W.to_sparse_bsr)`` | ``stk.ops.dds(x, W.t())`` | ``bsr_linear`` |
| linear_dx | ``dy @ W`` | ``F.linear(dy, Wᵀ.to_sparse_bsr)`` | ``stk.ops.dds(dy, W)`` | ``bsr_linear_dx`` |
| linear_sddmm | ``dy.t() @ x`` | ``sampled_addmm`` (BSR, else CSR) | ``stk.ops.sdd(dy.t(), x, W)`` | ``bsr_sddmm`` |
| block_grad_scores | ``dy.t() @ x`` (one dW GEMM) | ``dy.t() @ x``, block norms | - | ``block_grad_scores`` |

``block_grad_scores`` does not depend on the layout: it runs once per block size (sparsity left empty).

Every implementation's result is first compared with a float64 reference; the limit is twice the error of the
dense computation in the same dtype (``common.error_limit``). A wrong result is printed loudly, marked MISMATCH
and not timed. Columns: ``speedup`` = dense ms / ms; ``frac_ideal`` = density x dense ms / ms (for
block_grad_scores the ideal is the dense GEMM itself); ``tflops`` = useful FLOPs (2 M x stored weights; 2MNK for
dense and block_grad_scores) / time; ``roofline_frac`` = max(FLOPs / measured GEMM rate, bytes / measured copy
bandwidth) / time, where bytes count each operand read once and the result written once.
"""
from __future__ import annotations

import math
import statistics
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import reference

from .common import (Ceilings, Impl, backend_choices, check_and_time, copy_bandwidth_gbps, first_line, fmt,
                     format_columns, gemm_tflops, rel_err, with_backend)

SHAPE = (8192, 4096, 4096)  # M, N, K
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
BLOCKS = (32, 64, 128)
STK_BLOCK = 128
OP_KERNELS = {"linear_fwd": "bsr_linear", "linear_dx": "bsr_linear_dx", "linear_sddmm": "bsr_sddmm",
              "block_grad_scores": "block_grad_scores"}
FIELDS = ["op", "shape", "dtype", "sparsity", "block", "density", "impl", "call", "timing", "ms", "dense_ms",
          "speedup", "frac_ideal", "tflops", "roofline_frac", "rel_err", "err_limit", "status", "first_call_s", "note"]
# The Hopper-GEMM issue's goals on an H200 at M, N, K = 8192, 4096, 4096, bf16, 90% sparse: (op, sparsity, block) ->
# speedup over cuBLAS.
GOALS = {("linear_fwd", 0.9, 32): 3.5, ("linear_fwd", 0.9, 64): 5.0, ("linear_fwd", 0.9, 128): 5.0,
         ("linear_dx", 0.9, 64): 5.0, ("linear_dx", 0.9, 128): 5.0,
         ("linear_sddmm", 0.9, 32): 2.5, ("linear_sddmm", 0.9, 64): 5.0, ("linear_sddmm", 0.9, 128): 5.5}
FIXED_COST_GOAL = 0.10  # the time a GEMM takes at density 0 (fit below), at most this fraction of dense's
GRAD_SCORES_GOAL = 1.0  # block_grad_scores no slower than one dense dW GEMM


def dense_library(device: torch.device) -> str:
    return "cuBLAS" if device.type == "cuda" else "MKL/oneDNN"


def measure_ceilings(device: torch.device, dtype: torch.dtype, shape, reps: int) -> Ceilings:
    """The GEMM rate (a large square GEMM on a GPU, the suite's own shape on a CPU) and the copy bandwidth
    (1 GiB on a GPU, 64 MiB on a CPU), measured here."""
    if device.type == "cuda":
        size, copy_bytes = 8192, 1 << 30
        tflops = gemm_tflops(device, dtype, size, size, size, reps)
        what = f"{dense_library(device)} {size}^3"
    else:
        copy_bytes = 64 << 20
        tflops = gemm_tflops(device, dtype, *shape, reps)
        what = f"{dense_library(device)} {'x'.join(map(str, shape))}"
    return Ceilings(tflops, copy_bandwidth_gbps(device, copy_bytes, reps), what)


def _stk_module():
    """(the stk package, None) or (None, why not)."""
    try:
        import stk
    except ImportError as error:
        return None, f"stk is not importable ({error}; pip install stanford-stk)"
    return stk, None


class Case:
    """The operands of one (block, sparsity) case. Without a layout (block_grad_scores) only the block size
    matters."""

    def __init__(self, x, dy, dwt64, block_size: int, layout=None, values=None):
        self.x, self.dy, self.dwt64, self.block_size = x, dy, dwt64, block_size
        self.shape = (dy.shape[1], x.shape[1])  # N, K
        self.layout, self.values = layout, values
        if layout is not None:
            n, k = self.shape
            self.weight = reference.blocks_to_dense(values, layout.coo_row, layout.col_idx,
                                                    *layout.block_grid)[:n, :k].contiguous()
            self.inside = int(layout.padding_mask().sum())  # stored weights inside the N x K matrix
            self.density = self.inside / (n * k)

    def blocks(self, matrix: torch.Tensor) -> torch.Tensor:
        """The layout's blocks of a dense [N, K] matrix: [nnz, bs, bs]."""
        return reference.dense_to_blocks(matrix, self.layout.coo_row, self.layout.col_idx, self.block_size)

    def pattern(self) -> torch.Tensor:
        """The layout as a dense 0/1 matrix in the data dtype (every stored weight is a sampled position)."""
        n, k = self.shape
        return reference.blocks_to_dense(torch.ones_like(self.values), self.layout.coo_row, self.layout.col_idx,
                                         *self.layout.block_grid)[:n, :k].contiguous()


def _errors(ref: torch.Tensor, convert: Callable[[object], torch.Tensor] = lambda out: out):
    return lambda out: {"out": rel_err(convert(out), ref)}


TORCH_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


def _torch_bsr(op: str, case: Case, check) -> Impl:
    """F.linear with torch's own BSR weight (Wᵀ for dX); n/a, with torch's message, where torch cannot run it."""
    bs = case.block_size
    if op == "linear_fwd":
        call, matrix, activations = "F.linear(x, W.to_sparse_bsr)", case.weight, case.x
    else:
        call, matrix, activations = "F.linear(dy, W.t().to_sparse_bsr)", case.weight.t().contiguous(), case.dy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse BSR support is in beta": once per run is enough
            sparse = matrix.to_sparse_bsr((bs, bs))
        fn = lambda: F.linear(activations, sparse)
        fn()
    except TORCH_ERRORS as error:
        return Impl("torch", call, why=first_line(error))
    return Impl("torch", call, fn, check)


def _sampled_addmm(case: Case, check) -> Impl:
    """torch.sparse.sampled_addmm(pattern, dy.t(), x): on the BSR pattern where torch supports it, else CSR."""
    bs = case.block_size
    pattern = case.pattern()
    reasons = []
    for layout_name, convert in (("BSR", lambda p: p.to_sparse_bsr((bs, bs))), ("CSR", lambda p: p.to_sparse_csr())):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sparse = convert(pattern)
            fn = lambda sparse=sparse: torch.sparse.sampled_addmm(sparse, case.dy.t(), case.x, beta=0.0)
            fn()
        except TORCH_ERRORS as error:
            reasons.append(f"{layout_name}: {first_line(error)}")
            continue
        return Impl("torch", f"torch.sparse.sampled_addmm ({layout_name})", fn, check, why="; ".join(reasons))
    return Impl("torch", "torch.sparse.sampled_addmm", why="; ".join(reasons))


def _stk(op: str, case: Case, stk, stk_why: Optional[str], check) -> Impl:
    call = {"linear_fwd": "stk.ops.dds(x, W.t())", "linear_dx": "stk.ops.dds(dy, W)",
            "linear_sddmm": "stk.ops.sdd(dy.t(), x, W)"}[op]
    m, (n, k) = case.x.shape[0], case.shape
    if stk is None:
        return Impl("stk", call, why=stk_why)
    if case.block_size != STK_BLOCK:
        return Impl("stk", call, why=f"stk supports {STK_BLOCK}x{STK_BLOCK} blocks only")
    if m % 128 or n % 128 or k % 128:
        return Impl("stk", call, why="stk needs M, N and K to be multiples of 128")
    layout = case.layout
    # Our block-CSR order with stk's int16 indices; stk builds its transposed index itself.
    w = stk.Matrix(torch.Size((n, k)), case.values, layout.coo_row.to(torch.int16), layout.col_idx.to(torch.int16),
                   layout.row_ptr)
    x, dy = case.x, case.dy
    if op == "linear_fwd":
        return Impl("stk", call, lambda: stk.ops.dds(x, w.t()), check)
    if op == "linear_dx":
        return Impl("stk", call, lambda: stk.ops.dds(dy, w), check)
    return Impl("stk", call, lambda: stk.ops.sdd(dy.t(), x, w), lambda out: check(out.data))


def _ours(op: str, case: Case, dtype: torch.dtype, requested, check) -> List[Impl]:
    """One Impl per sparsekern backend; n/a for a backend without the kernel (it would run the reference)."""
    kernel = OP_KERNELS[op]
    x, dy, layout, values = case.x, case.dy, case.layout, case.values
    call = {"linear_fwd": lambda: sk.ops.bsr_linear(x, layout, values),
            "linear_dx": lambda: sk.ops.bsr_linear_dx(dy, layout, values),
            "linear_sddmm": lambda: sk.ops.bsr_sddmm(dy, x, layout),
            "block_grad_scores": lambda: sk.ops.block_grad_scores(dy, x, case.block_size)}[op]
    return [Impl(name, f"sk.ops.{kernel}", None if why else with_backend(name, call), check, why or "")
            for name, why in backend_choices(kernel, x.device, dtype, requested)]


def group_impls(op: str, case: Case, dtype: torch.dtype, requested, stk, stk_why) -> tuple:
    """(dense Impl, [other Impls]) for one op of one case, each checked against the float64 reference."""
    x, dy, bs = case.x, case.dy, case.block_size
    library = dense_library(x.device)
    if op == "linear_fwd":
        check = _errors(x.double() @ case.weight.double().t())
        weight = case.weight
        dense = Impl("dense", f"x @ W.t() ({library})", lambda: F.linear(x, weight), check)
        torch_impl = _torch_bsr(op, case, check)
    elif op == "linear_dx":
        check = _errors(dy.double() @ case.weight.double())
        weight = case.weight
        dense = Impl("dense", f"dy @ W ({library})", lambda: dy @ weight, check)
        torch_impl = _torch_bsr(op, case, check)
    elif op == "linear_sddmm":
        ref = case.blocks(case.dwt64)
        check = _errors(ref)
        dense = Impl("dense", f"dy.t() @ x ({library})", lambda: dy.t() @ x, _errors(ref, case.blocks))
        torch_impl = _sampled_addmm(case, _errors(ref, lambda out: case.blocks(out.to_dense())))
    else:
        ref = reference.block_norms(case.dwt64, bs)
        check = _errors(ref)
        norms = lambda out: reference.block_norms(out.float(), bs)
        dense = Impl("dense", f"dy.t() @ x ({library}): one dense dW GEMM", lambda: dy.t() @ x, _errors(ref, norms))
        torch_impl = Impl("torch", "dy.t() @ x, then block norms", lambda: norms(dy.t() @ x), check)
    others = [torch_impl]
    if op != "block_grad_scores":
        others.append(_stk(op, case, stk, stk_why, check))
    return dense, others + _ours(op, case, dtype, requested, check)


def _work(op: str, case: Case, elem: int) -> tuple:
    """((useful FLOPs, bytes) of the sparse op, (FLOPs, bytes) of the dense one): each operand read once, the
    result written once."""
    m, (n, k), bs = case.x.shape[0], case.shape, case.block_size
    dense = (2 * m * n * k, (m * k + n * k + m * n) * elem)
    if op == "block_grad_scores":
        scores = -(-n // bs) * -(-k // bs) * 4  # fp32 per block
        return (2 * m * n * k, (m * n + m * k) * elem + scores), dense
    stored_bytes = case.layout.nnz_blocks * bs * bs * elem
    return (2 * m * case.inside, (m * k + m * n) * elem + stored_bytes), dense


def group_rows(op: str, case: Case, sparsity, dtype, outcomes, ceilings: Ceilings) -> List[dict]:
    elem = torch.empty((), dtype=dtype).element_size()
    (flops, nbytes), (dense_flops, dense_bytes) = _work(op, case, elem)
    ideal = 1.0 if op == "block_grad_scores" else case.density
    dense_ms = outcomes["dense"].ms
    m, (n, k) = case.x.shape[0], case.shape
    rows = []
    for name, outcome in outcomes.items():
        ms = outcome.ms
        f, b = (dense_flops, dense_bytes) if name == "dense" else (flops, nbytes)
        err, limit = outcome.worst()
        timed = ms is not None and dense_ms is not None
        rows.append({
            "op": op, "shape": f"{m}x{n}x{k}", "dtype": str(dtype).replace("torch.", ""),
            "sparsity": sparsity, "block": case.block_size,
            "density": round(case.density, 4) if op != "block_grad_scores" else None,
            "impl": name, "call": outcome.impl.call, "timing": outcome.timing, "ms": ms, "dense_ms": dense_ms,
            "speedup": dense_ms / ms if timed else None, "frac_ideal": ideal * dense_ms / ms if timed else None,
            "tflops": f / (ms * 1e-3) / 1e12 if ms else None,
            "roofline_frac": ceilings.floor_ms(f, b) / ms if ms else None,
            "rel_err": err, "err_limit": limit, "status": outcome.status, "first_call_s": outcome.first_call_s,
            "note": outcome.note})
    return rows


def format_rows(rows: List[dict]) -> str:
    header = ["op", "sparsity", "block", "impl", "ms", "speedup", "frac ideal", "TFLOP/s", "roofline", "rel err",
              "status", "timing / note"]
    lines = [[r["op"], fmt(r["sparsity"], ".2f"), str(r["block"]), r["impl"], fmt(r["ms"], ".4f"),
              fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""), fmt(r["frac_ideal"], ".2f"),
              fmt(r["tflops"], ".1f"), fmt(r["roofline_frac"], ".2f"), fmt(r["rel_err"], ".1e"), r["status"],
              " ".join(t for t in (r["timing"], r["call"] if r["impl"] == "torch" else "", r["note"]) if t)]
             for r in rows]
    return format_columns(header, lines)


def goal_summary(rows: List[dict], ours: Sequence[str]) -> str:
    """The issues' targets against the measured speedups of our backends (stated for an H100 at the default
    shape in bf16; elsewhere they are for orientation only)."""
    lines = []
    score_blocks = sorted({r["block"] for r in rows if r["op"] == "block_grad_scores"})
    goals = list(GOALS.items()) + [(("block_grad_scores", None, b), GRAD_SCORES_GOAL) for b in score_blocks]
    for (op, sparsity, block), target in goals:
        found = [r for r in rows if r["op"] == op and r["block"] == block and r["impl"] in ours
                 and (sparsity is None or (r["sparsity"] is not None and math.isclose(r["sparsity"], sparsity)))]
        if not found:
            continue
        cells = []
        for r in found:
            if r["speedup"] is None:
                cells.append(f"{r['impl']} {r['status']}")
            else:
                cells.append(f"{r['impl']} {r['speedup']:.2f}x ({'met' if r['speedup'] >= target else 'MISSED'})")
        where = f"{sparsity:.0%} sparse, " if sparsity is not None else ""
        lines.append(f"  {op:<18} {where}block {block}: goal >= {target:g}x: " + ", ".join(cells))
    return "\n".join(["goals (Hopper-GEMM issue, H200, 8192x4096x4096 bf16):"] + lines) if lines else ""


def density_fit(rows: List[dict], ours: Sequence[str]) -> str:
    """time = a + b x density per (op, backend, block), least squares over the sparsities measured: a is the fixed
    cost (index walks, launch, tiles of zeros), b the cost of the stored blocks; a over dense's time against
    FIXED_COST_GOAL."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["impl"] in ours and r["ms"] is not None and r["density"] is not None:
            groups.setdefault((r["op"], r["impl"], r["block"]), []).append(r)
    lines = []
    for (op, impl, block), found in sorted(groups.items()):
        xs, ys = [r["density"] for r in found], [r["ms"] for r in found]
        if len(set(xs)) < 2:
            continue
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
                 / sum((x - mean_x) ** 2 for x in xs))
        fixed = mean_y - slope * mean_x
        share = fixed / statistics.median(r["dense_ms"] for r in found)
        lines.append(f"  {op:<13} {impl:<7} block {block:<3}: {fixed:.3f} ms + {slope:.3f} ms x density; fixed cost "
                     f"{share:.1%} of dense ({'met' if share <= FIXED_COST_GOAL else 'MISSED'})")
    header = f"time = a + b x density (goal: a <= {FIXED_COST_GOAL:.0%} of dense's time):"
    return "\n".join([header] + lines) if lines else ""


def bench_gpu_linear(device: torch.device, dtype: torch.dtype, shape: Sequence[int] = SHAPE,
                     sparsities: Sequence[float] = SPARSITIES, blocks: Sequence[int] = BLOCKS, reps: int = 20,
                     backends: Optional[Sequence[str]] = None, use_graphs: bool = True,
                     report: Callable[[str], None] = print) -> List[dict]:
    m, n, k = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    dy = torch.randn(m, n, device=device, generator=gen).to(dtype)
    dwt64 = dy.double().t() @ x.double()  # the exact dense weight gradient [N, K], shared by every case
    ceilings = measure_ceilings(device, dtype, shape, reps)
    stk, stk_why = _stk_module()
    report(f"gpu-linear: M, N, K = {m}, {n}, {k}, {str(dtype)[6:]}; ceilings measured here: "
           f"{ceilings.tflops:.1f} TFLOP/s ({ceilings.what}), copy {ceilings.copy_gbps:.0f} GB/s; "
           f"stk: {'available' if stk is not None else stk_why}; {reps} rounds (medians)")
    layout_gen = torch.Generator().manual_seed(1)
    rows: List[dict] = []

    def run(op, case, sparsity):
        label = f"{op} block {case.block_size}" + (f" sparsity {sparsity:.2f}" if sparsity is not None else "")
        dense, others = group_impls(op, case, dtype, backends, stk, stk_why)
        outcomes = check_and_time(label, [dense, *others], device, reps, dtype=dtype, use_graphs=use_graphs,
                                  report=report)
        group = group_rows(op, case, sparsity, dtype, outcomes, ceilings)
        report(format_rows(group))
        rows.extend(group)

    for block in blocks:
        run("block_grad_scores", Case(x, dy, dwt64, block), None)
        for sparsity in sparsities:
            layout = sk.BlockSparseLayout.random((n, k), block, 1.0 - sparsity, generator=layout_gen).to(device)
            values = torch.randn(layout.nnz_blocks, block, block, device=device, generator=gen).to(dtype)
            case = Case(x, dy, dwt64, block, layout, values)
            for op in ("linear_fwd", "linear_dx", "linear_sddmm"):
                run(op, case, sparsity)
    return rows
