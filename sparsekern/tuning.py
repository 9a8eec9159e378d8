"""``auto`` on CUDA tensors: which fast backend is quicker, measured per call shape and cached.

The Triton and hand-written CUDA kernels tile differently, so neither wins every shape. When more than one fast
backend can run a pure op, ``sparsekern.ops`` asks the tuner here. On the first call of a key (op, device,
dtype, the shape of every tensor argument with the activations' rows rounded up to a power of two, as Triton's
autotune keys do, and the value of every other argument: block size, geometry...) it
runs each candidate on the caller's own arguments, once to warm up (Triton compiles and autotunes there) and
then ``REPS`` times timed with CUDA events, and keeps the lowest median; later calls with that key reuse it.

It does not measure:
- under CUDA graph capture (timing would launch and wait inside the capture): the cached choice for the key,
  else the static order. Run a step or two eagerly before capturing so that the graph holds measured choices.
- with ``SPARSEKERN_AUTOTUNE=0`` (``enabled()`` is False; ops.py then keeps the static order).
- for mutating ops (ops.py never asks): timing an optimizer step would apply it several times.
"""
from __future__ import annotations

import statistics
from types import MappingProxyType
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _env

REPS = 5


def enabled() -> bool:
    """Whether ``auto`` may measure (``SPARSEKERN_AUTOTUNE``, default 1)."""
    value = _env.read("SPARSEKERN_AUTOTUNE", "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"SPARSEKERN_AUTOTUNE={value!r}: use 1 (measure, the default) or 0 (static order)")
    return value == "1"


class Key(NamedTuple):
    op: str
    device: str
    dtype: torch.dtype
    args: tuple  # each tensor argument's shape, each other argument's value


class Choice(NamedTuple):
    backend: str
    times_ms: Mapping[str, float]  # median per candidate that ran
    failures: Mapping[str, str]  # why each dropped candidate raised


def rows_bucket(rows: int) -> int:
    """The power of two at or above ``rows``: the Triton kernels' autotune key for the activation rows, so that a
    new batch size in a seen bucket is neither re-tuned by Triton nor re-measured here."""
    return 1 << max(int(rows) - 1, 0).bit_length()


def _signature(value, operand: Tensor):
    """What a call's speed depends on in one argument; hashable. The leading (row or batch) size of the activations
    (tensors shaped like the operand) is bucketed."""
    if isinstance(value, Tensor):
        if value.dim() == operand.dim() and value.dim() > 0 and value.shape[0] == operand.shape[0]:
            return (rows_bucket(value.shape[0]), *value.shape[1:])
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v, operand) for v in value)
    return value


def call_key(op: str, args: Sequence) -> Key:
    """The cache key of ``op`` called on ``args``; ``args[0]`` is the operand whose device and dtype decide."""
    operand = args[0]
    return Key(op, str(operand.device), operand.dtype, tuple(_signature(a, operand) for a in args))


def cuda_event_timer(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``REPS`` calls of ``fn``, timed by events on the device's current stream, the one
    the kernels run on; waits for that stream only, not the whole device."""
    stream = torch.cuda.current_stream(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPS)]
    for start, end in events:
        start.record(stream)
        fn()
        end.record(stream)
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


class Tuner:
    """The fastest backend per call key. ``timer(fn, device) -> ms`` times an already warmed-up candidate on
    tensors of ``device_type``; tests inject a fake one."""

    def __init__(self, timer: Callable[[Callable[[], object], torch.device], float] = cuda_event_timer,
                 device_type: str = "cuda"):
        self.timer = timer
        self.device_type = device_type
        self._choices: Dict[Key, Choice] = {}

    def measures(self, device: torch.device) -> bool:
        return device.type == self.device_type

    def choose(self, key: Key, device: torch.device, candidates: Mapping[str, Callable[[], object]],
               static: str) -> str:
        """The backend for ``key``: cached, else measured among ``candidates`` (name -> the call on the caller's
        arguments) and cached, else ``static`` (under graph capture, or when every candidate raised: the real
        call then raises its error to the caller)."""
        choice = self._choices.get(key)
        if choice is not None:
            return choice.backend
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return static
        choice = self._measure(candidates, device)
        if choice is None:
            return static
        self._choices[key] = choice
        return choice.backend

    def _measure(self, candidates: Mapping[str, Callable[[], object]], device: torch.device) -> Optional[Choice]:
        times, failures = {}, {}
        for name, call in candidates.items():
            try:
                call()  # warm-up: Triton compiles and autotunes on its first call of a shape
                times[name] = self.timer(call, device)
            except Exception as error:  # a backend that cannot run this call is no choice for it
                failures[name] = f"{type(error).__name__}: {error}"
        if not times:
            return None
        best = min(times, key=times.get)  # ties keep the static order (candidates come in that order)
        return Choice(best, MappingProxyType(times), MappingProxyType(failures))

    def choices(self) -> Dict[Key, Choice]:
        """A copy of the cache: key -> (backend, times_ms, failures)."""
        return dict(self._choices)


TUNER = Tuner()
