"""What the benchmark suites share: device names, event-timed medians of interleaved candidates (CUDA-graphed
on a GPU), forcing a sparsekern backend, the measured ceilings, the correctness rule, tables and CSVs."""
from __future__ import annotations

import contextlib
import csv
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

import sparsekern as sk


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


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on GPU, perf_counter on CPU. A ``with_backend`` call switches the
    backend outside the timed region: users do not switch it around every call (on the 2-core CPU, switching cost
    0.1 ms a call right after a large op)."""
    if isinstance(fn, BackendCall):
        with backend(fn.name):
            return time_once(fn.fn, device)
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
            samples[name].append(time_once(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def _tma_unsupported(device: torch.device) -> Optional[str]:
    from sparsekern.triton_kernels import _tma
    return _tma.device_unsupported(device)


def _hopper_gemms_unsupported(device: torch.device) -> Optional[str]:
    if not sk._native.BUILD_INFO.get("cuda_sm90_gemms"):
        return "sparsekern._C was built without the Hopper GEMMs (no CUTLASS headers at build time)"
    capability = torch.cuda.get_device_capability(device)
    if capability != (9, 0):
        return f"the Hopper GEMMs' sm_90a code runs on compute capability 9.0 only, this GPU is {capability}"
    return None


@dataclass(frozen=True)
class Variant:
    """Kernels of a backend that it uses only when ``switches`` (environment variables) are set, for ``ops`` (its
    rows of ops, or passes, with none of them are n/a: they would time the backend's usual kernels only);
    ``unsupported(device)`` says why they cannot run on a device, beyond what the backend needs."""
    backend: str
    switches: Dict[str, str]
    ops: Tuple[str, ...]
    unsupported: Callable[[torch.device], Optional[str]]


# Kernel variants measured in rows of their own beside the backends, which no backend uses by default because they
# have not run on a GPU yet.
VARIANTS = {
    "triton-tma": Variant("triton", {"SPARSEKERN_TRITON_TMA": "1"},
                          ("bsr_linear", "bsr_linear_dx", "bsr_sddmm", "block_grad_scores", "bsr_conv2d",
                           "bsr_conv2d_dgrad", "bsr_conv2d_wgrad"), _tma_unsupported),
    "cuda-sm90": Variant("cuda", {"SPARSEKERN_CUDA_SM90": "1"},
                         ("bsr_linear", "bsr_linear_dx", "bsr_sddmm", "block_grad_scores", "bsr_conv2d",
                          "bsr_conv2d_dgrad", "bsr_conv2d_wgrad"),
                         _hopper_gemms_unsupported),
}
OURS = (*sk.ops.BACKENDS, *VARIANTS)  # the row names that are sparsekern's own


def variant_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why a VARIANTS entry cannot run on ``device`` beyond what its backend needs (asked only once the backend is
    available). Without a visible GPU a CUDA device is left to the suites, as for the backends, so that the choices
    can be listed without one."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return None
    return VARIANTS[name].unsupported(device)


@contextlib.contextmanager
def backend(name: str):
    """Run sparsekern ops on backend ``name`` (SPARSEKERN_BACKEND), or on a VARIANTS entry, inside the block."""
    variant = VARIANTS.get(name)
    settings = {"SPARSEKERN_BACKEND": variant.backend, **variant.switches} if variant else {"SPARSEKERN_BACKEND": name}
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class BackendCall:
    """``fn()`` run with sparsekern's backend ``name`` (see ``with_backend``)."""
    name: str
    fn: Callable[[], object]

    def __call__(self):
        with backend(self.name):
            return self.fn()


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    return BackendCall(name, fn)


def available_backends(device: torch.device, include_reference: bool) -> List[str]:
    """sparsekern backends that can run the linear ops on ``device``, fastest first."""
    names = [b for b in sk.ops.BACKENDS
             if sk.ops.backend_unavailable_reason(b, device.type) is None and sk.ops.backend_has_op(b, "bsr_linear")]
    if not include_reference and len(names) > 1:
        names = [b for b in names if b != "reference"]
    return names



def backend_choices(ops: Union[str, Sequence[str]], device: torch.device, dtype: Optional[torch.dtype] = None,
                    requested: Optional[Sequence[str]] = None) -> List[Tuple[str, Optional[str]]]:
    """[(backend, why it cannot run ``ops`` here, or None)] for one op or the ops of one pass: the ``requested``
    backends, or by default every one that runs on the device except the reference (the reference alone where no
    other does), then ``auto`` where it chooses between several by measuring (CUDA tensors), so that its pick shows
    beside the backends it picked from. A backend that lacks one of the ops would silently run the reference for it
    (ops.py), so it is reported instead of timed; ``auto`` has every op. VARIANTS run only where requested: a kernel
    that faults on a GPU leaves a sticky error that would fail every later row of the process."""
    ops = (ops,) if isinstance(ops, str) else tuple(ops)

    def lacks(name: str) -> Optional[str]:
        variant = VARIANTS.get(name)
        if variant is not None:
            # A pass that has some of the variant's ops runs them and the backend's usual kernels for the others,
            # as the backend under the switch does; one with none of them would only time the usual kernels.
            if not any(op in variant.ops for op in ops):
                return f"no {' or '.join(ops)} kernel in {name}"
            name = variant.backend
        missing = next((op for op in ops if not sk.ops.backend_has_op(name, op, dtype)), None)
        if missing is None:
            return None
        return f"no {missing} kernel" + (f" for {str(dtype).replace('torch.', '')}" if dtype is not None else "")

    if requested:
        names = list(requested)
    else:
        names = [b for b in sk.ops.BACKENDS
                 if b != "reference" and sk.ops.backend_unavailable_reason(b, device.type) is None] or ["reference"]
        if device.type == "cuda" and len([b for b in names if lacks(b) is None]) > 1:
            names.append("auto")
    choices = []
    for name in names:
        if name == "auto":
            choices.append((name, None))
            continue
        base = VARIANTS[name].backend if name in VARIANTS else name
        why = sk.ops.backend_unavailable_reason(base, device.type) or lacks(name)
        if name in VARIANTS and why is None:
            why = variant_unavailable_reason(name, device)
        choices.append((name, why))
    return choices


# -- timing ----------------------------------------------------------------------------------------------------
@dataclass
class Timed:
    """A candidate ready to time: ``run()`` makes ``calls`` calls of the function. ``mode``: ``graph`` (a CUDA
    graph of the calls, replayed: GPU time without launch gaps), ``stream`` (the calls launched back to back
    between two events) or ``host`` (CPU, perf_counter)."""
    run: Callable[[], object]
    calls: int
    mode: str
    note: str = ""


def warm_up_on_side_stream(fn: Callable[[], object], device: torch.device, calls: int) -> None:
    """``calls`` calls of ``fn`` on a side stream, then the current stream waits for them: CUDA graph capture wants
    its warm-up (allocations, Triton's compiling and autotuning, auto's measuring, optimizer state) done so."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


def prepare_timing(fn: Callable[[], object], device: torch.device, use_graphs: bool = True,
                   target_ms: float = 1.0, max_calls: int = 20) -> Timed:
    """Warm ``fn`` up (allocations, autotuning) and wrap it for timing. On a GPU enough calls are grouped to
    last about ``target_ms``, so that a 20 us kernel is not measured as its launch overhead, and captured in
    a CUDA graph where the function allows it (no host synchronisation); otherwise they run as a stream."""
    if device.type != "cuda":
        fn()
        return Timed(fn, 1, "host")
    warm_up_on_side_stream(fn, device, calls=2)
    one = time_once(fn, device)
    calls = max(1, min(max_calls, math.ceil(target_ms / max(one, 1e-3))))

    def loop():
        for _ in range(calls):
            fn()

    note = ""
    if use_graphs:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loop()
            return Timed(graph.replay, calls, "graph")
        except Exception as error:  # e.g. a host sync inside fn: time it as a stream instead
            torch.cuda.synchronize(device)
            note = f"not graph-capturable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return Timed(loop, calls, "stream", note)


def time_prepared(timed: Dict[str, Timed], device: torch.device, reps: int) -> Dict[str, float]:
    """Median ms per call of each prepared candidate, measured in interleaved rounds."""
    per_run = time_interleaved({name: t.run for name, t in timed.items()}, device, reps, warmup=1)
    return {name: per_run[name] / timed[name].calls for name in timed}


# -- ceilings --------------------------------------------------------------------------------------------------
def copy_bandwidth_gbps(device: torch.device, nbytes: int, reps: int) -> float:
    """Device-to-device (or memory-to-memory) copy bandwidth, GB/s of bytes read plus bytes written."""
    src = torch.randn(max(1, nbytes // 4), device=device)
    dst = torch.empty_like(src)
    ms = time_prepared({"copy": prepare_timing(lambda: dst.copy_(src), device)}, device, reps)["copy"]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def gemm_tflops(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, reps: int) -> float:
    """Dense GEMM rate (TFLOP/s) of the device's library (cuBLAS, MKL/oneDNN) at [m, k] x [k, n] in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(7)
    a = torch.randn(m, k, device=device, generator=gen).to(dtype)
    b = torch.randn(k, n, device=device, generator=gen).to(dtype)
    ms = time_prepared({"gemm": prepare_timing(lambda: a @ b, device)}, device, reps)["gemm"]
    return 2 * m * n * k / (ms * 1e-3) / 1e12


@dataclass
class Ceilings:
    """Measured once per run: the floor of an op is max(FLOPs / tflops, bytes / copy bandwidth)."""
    tflops: float
    copy_gbps: float
    what: str

    def floor_ms(self, flops: float, nbytes: float) -> float:
        return max(flops / (self.tflops * 1e12), nbytes / (self.copy_gbps * 1e9)) * 1e3


# -- correctness -----------------------------------------------------------------------------------------------
# The least error a kernel is allowed, per dtype: two unit roundoffs for 16-bit types (a result rounded to them is
# that far off by itself); for fp32 and fp64, whose rounding noise grows with the length of a reduction summed in
# another order than the library's (~sqrt(length) unit roundoffs), a floor above that noise for reductions of up to
# 1e5 terms and still far below what a wrong index or a lost block gives (1e-2 and up).
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2 * 2.0 ** -11, torch.bfloat16: 2 * 2.0 ** -8}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN or inf in ``out`` give inf)."""
    out, ref = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"result has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def error_limit(dense_err: float, dtype: torch.dtype) -> float:
    """design §6 (flash-attention's rule): a kernel may be at most 2x as far from the high-precision reference as
    the dense PyTorch computation in the same precision, and at least ``ERROR_FLOOR`` of the dtype."""
    return max(2.0 * dense_err, ERROR_FLOOR[dtype])


# -- tables and CSVs -------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".3f", missing: str = "-") -> str:
    """A number for a table cell; ``missing`` for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_columns(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A plain-text table: every column as wide as its widest cell."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def write_rows(rows: List[dict], fields: Sequence[str], out_dir: str, file_name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, file_name)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- one group: check every implementation against the reference, then time the correct ones together --------
@dataclass
class Impl:
    """One implementation in a group. ``fn`` is what is timed; ``check(fn())`` gives its relative errors per
    checked quantity ({"out": 1e-3} or {"dx": ..., "dW": ...}). ``fn`` None: not applicable, ``why`` says why."""
    name: str
    call: str
    fn: Optional[Callable[[], object]] = None
    check: Optional[Callable[[object], Dict[str, float]]] = None
    why: str = ""  # with fn: a caveat for the note column


@dataclass
class Outcome:
    impl: Impl
    status: str  # ok, MISMATCH (wrong result: not timed), n/a (does not apply), error (raised)
    ms: Optional[float] = None
    timing: str = ""
    errors: Optional[Dict[str, float]] = None
    limits: Optional[Dict[str, float]] = None
    note: str = ""
    first_call_s: Optional[float] = None  # the first call's wall time: compiling, autotuning and auto's measuring

    def worst(self):
        """(error, limit) of the quantity closest to (or furthest past) its limit, or (None, None)."""
        if not self.errors:
            return None, None
        q = max(self.errors, key=lambda name: self.errors[name] / self.limits[name])
        return self.errors[q], self.limits[q]


def first_line(error: BaseException, width: int = 160) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:width] if text else ''}"


def check_and_time(label: str, impls: Sequence[Impl], device: torch.device, reps: int, *,
                   dtype: Optional[torch.dtype] = None, limits: Optional[Dict[str, float]] = None,
                   use_graphs: bool = True, report: Callable[[str], None] = print) -> Dict[str, Outcome]:
    """Correctness first, then time. Without explicit ``limits``, ``impls[0]`` is the dense baseline: its errors
    against the high-precision reference set each quantity's limit (``error_limit`` for ``dtype``). Any
    implementation past a limit is reported loudly, marked MISMATCH and not timed; the correct ones are then
    timed together, interleaved."""
    outcomes: Dict[str, Outcome] = {}
    timed: Dict[str, Timed] = {}
    baseline = impls[0] if limits is None else None
    limits = dict(limits or {})
    for impl in impls:
        if impl.fn is None:
            outcomes[impl.name] = Outcome(impl, "n/a", note=impl.why)
            continue
        try:
            start = time.perf_counter()
            out = impl.fn()
            _synchronize(device)
            first_call_s = time.perf_counter() - start
            errors = impl.check(out) if impl.check is not None else {}
            if impl is baseline:
                limits = {q: error_limit(e, dtype) for q, e in errors.items()}
            bad = {q: e for q, e in errors.items() if not e <= limits[q]}  # NaN/inf fail too
            if bad:
                text = ", ".join(f"{q} rel err {e:.2e} > limit {limits[q]:.2e}" for q, e in bad.items())
                report(f"!!! MISMATCH {label} [{impl.name}]: {text}: not timed")
                outcomes[impl.name] = Outcome(impl, "MISMATCH", errors=errors, limits=limits, note=text,
                                              first_call_s=first_call_s)
                continue
            timed[impl.name] = prepare_timing(impl.fn, device, use_graphs)
            outcomes[impl.name] = Outcome(impl, "ok", timing=timed[impl.name].mode, errors=errors, limits=limits,
                                          note="; ".join(t for t in (impl.why, timed[impl.name].note) if t),
                                          first_call_s=first_call_s)
        except Exception as error:  # a baseline that cannot run this case (dtype, layout, memory) is a row, not a crash
            report(f"!!! ERROR {label} [{impl.name}]: {first_line(error)}")
            outcomes[impl.name] = Outcome(impl, "error", note=first_line(error))
            if impl is baseline:  # without the dense result there are no limits to check against
                for other in impls[1:]:
                    outcomes[other.name] = Outcome(other, "error", note="the dense baseline failed")
                return outcomes
    for name, ms in time_prepared(timed, device, reps).items():
        outcomes[name].ms = ms
    return outcomes
