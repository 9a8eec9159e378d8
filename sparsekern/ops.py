"""The one dispatch point of sparsekern: op registration, backend choice, autograd and fakes.

Every op is a ``torch.library`` custom op (``sparsekern::<name>``) so that autograd, ``torch.compile``
and ``opcheck`` see it. Its implementation picks a backend per call:

- ``cuda`` / ``cpu``: native kernels compiled into ``sparsekern._C`` (ops ``sparsekern::native_<name>``,
  one kernel per dispatch key);
- ``triton``: functions of the same name in ``sparsekern.triton_kernels``, on CUDA tensors, or on CPU
  tensors under ``TRITON_INTERPRET=1`` (so that CI runs them);
- ``reference``: plain PyTorch (``sparsekern.reference``), the definition of correctness.

``SPARSEKERN_BACKEND=auto|cuda|triton|cpu|reference`` overrides the choice. ``auto`` takes, on CPU tensors, the
native kernel, then the reference. On CUDA tensors, where both Triton and the hand-written CUDA kernel have the op
for the operands' dtype, it measures: the first call of each key (op, device, dtype, every tensor argument's
shape, every other argument) times both on the caller's arguments and keeps the faster for every later call of
that key (``sparsekern.tuning``; ``tuned_choices()`` lists what was measured). Where only one of them has the op it
runs that one, else the reference. The static order Triton, CUDA, reference (``select_backend``) is used instead
of measuring with ``SPARSEKERN_AUTOTUNE=0``, for the mutating ops (``masked_sgd_``, ``build_layout_index_``: timing
would apply them several times), and under CUDA graph capture for a key not measured yet (warm up eagerly before
capturing). A forced backend applies to the tensors of its own device (``cuda``: CUDA tensors; ``cpu``: CPU
tensors; ``triton``: CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``); ops on other devices keep auto's
choice, so a model built on the CPU under a forced GPU backend still builds. A forced backend is never measured: one
that cannot run on its own device raises; one that lacks an op (or the operands' dtype, e.g. Triton and float64)
uses the reference for that op (``python -m sparsekern.info`` lists which ops each backend has).

The public functions below check their arguments, then call the custom op where torch.compile, torch.func, a
tensor subclass or a mode must see it; in plain eager mode a call that needs grad runs a ``torch.autograd.Function``
with the custom op's own setup and backward, and any other call runs its implementation directly (``_run``): eager
calls skip the custom op's Python wrappers.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _env, _native, reference, tuning

BACKENDS = ("cuda", "triton", "cpu", "reference")
# auto's static order; on CUDA tensors measuring (sparsekern.tuning) chooses among the fast backends in it.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
LAYOUT_ARGS = ("row_ptr", "col_idx", "coo_row", "col_ptr", "row_idx", "perm")
OPS = ("bsr_linear", "bsr_linear_dx", "bsr_sddmm", "block_grad_scores", "bsr_conv2d", "bsr_conv2d_dgrad",
       "bsr_conv2d_wgrad", "bsr_conv2d_grad_scores", "build_layout_index_", "masked_sgd_")
# Kernels are specialised per block size; these are the ones every backend is built for.
BLOCK_SIZES = (16, 32, 64, 128)


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")


def requested_backend(device_type: Optional[str] = None) -> str:
    """SPARSEKERN_BACKEND, or ``auto`` for tensors on ``device_type`` when the forced backend is not for that
    device: forcing ``cuda`` or ``triton`` must not break a model built on the CPU before it is moved to the GPU
    (its layout index is built by a CPU op), and forcing ``cpu`` leaves CUDA tensors to the default choice."""
    setting = _env.read("SPARSEKERN_BACKEND")
    return _request(setting, device_type, device_type is not None and _interpret_matters(setting, device_type))


def _interpret_matters(setting: str, device_type: str) -> bool:
    """TRITON_INTERPRET=1, read only where it can change a choice: whether Triton, forced or in auto's order, runs
    CPU tensors."""
    could_pick = "triton" in setting.lower() or "triton" in _auto_order(device_type)
    return device_type == "cpu" and could_pick and _env.read("TRITON_INTERPRET") == "1"


def _request(setting: str, device_type: Optional[str], triton_on_cpu: bool) -> str:
    name = setting.strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"SPARSEKERN_BACKEND={name!r} is not a backend; choose auto or one of {', '.join(BACKENDS)}")
    if device_type is not None and not _backend_is_for(name, device_type, triton_on_cpu):
        return "auto"
    return name


def _backend_is_for(backend: str, device_type: str, triton_on_cpu: bool) -> bool:
    """Whether ``backend`` is meant for tensors on ``device_type`` (whether or not it is available there)."""
    if backend in ("auto", "reference") or backend == device_type:
        return True
    return backend == "triton" and (device_type == "cuda" or (device_type == "cpu" and triton_on_cpu))


@functools.lru_cache(maxsize=None)
def _triton_module():
    """(sparsekern.triton_kernels or None, why not)."""
    try:
        return importlib.import_module("sparsekern.triton_kernels"), None
    except ImportError as error:
        return None, f"sparsekern.triton_kernels cannot be imported ({error})"


def backend_unavailable_reason(backend: str, device_type: str) -> Optional[str]:
    """Why ``backend`` cannot run on ``device_type`` at all, or None when it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
        return _triton_module()[1]
    if backend != device_type:
        return f"the {backend} backend runs on {backend} tensors, not {device_type}"
    if not _native.LOADED:
        return f"sparsekern._C is not loaded ({_native.LOAD_ERROR})"
    if backend == "cuda" and not _native.BUILD_INFO.get("cuda"):
        return "sparsekern._C was built without CUDA kernels"
    return None


def backend_has_op(backend: str, op: str, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether ``backend`` implements ``op`` (for ``dtype``, when given)."""
    if backend == "reference":
        return True
    if backend == "triton":
        module = _triton_module()[0]
        return module is not None and hasattr(module, op) and (dtype is None or dtype in module.DTYPES)
    return _native.has_kernel(f"native_{op}", backend, dtype)


# The choice is made once per key and cached: resolving it on every call cost microseconds of Python, as much as a
# small GEMM. The key holds all it reads that may change while the process runs (SPARSEKERN_BACKEND, TRITON_INTERPRET
# where it matters, auto's static order, the device type the tuner measures); the build and the importable modules
# do not change.

class _Choice(NamedTuple):
    static: str  # the backend that runs the op when nothing is measured
    measure: Tuple[str, ...]  # the fast backends auto times against each other on CUDA tensors (empty: none)


def _auto_order(device_type: str) -> Tuple[str, ...]:
    return _AUTO_ORDER.get(device_type, ("reference",))


def _auto_backends(op: str, device_type: str, dtype: Optional[torch.dtype], triton_on_cpu: bool = False
                   ) -> Tuple[str, ...]:
    """The backends ``auto`` may run ``op`` on here, in static order; never empty (every order ends with the
    reference)."""
    return _runnable(_auto_order(device_type), op, device_type, dtype, triton_on_cpu)


@functools.lru_cache(maxsize=None)
def _runnable(order: Tuple[str, ...], op: str, device_type: str, dtype: Optional[torch.dtype],
              triton_on_cpu: bool) -> Tuple[str, ...]:
    return tuple(backend for backend in order
                 if backend_unavailable_reason(backend, device_type) is None and backend_has_op(backend, op, dtype))


def _choice(op: str, device_type: str, dtype: Optional[torch.dtype]) -> _Choice:
    setting = _env.read("SPARSEKERN_BACKEND")
    return _cached_choice(setting, op, device_type, dtype,
                          device_type == "cpu" and _interpret_matters(setting, device_type),
                          _AUTO_ORDER.get(device_type), tuning.TUNER.device_type)


@functools.lru_cache(maxsize=None)  # a backend that cannot run raises every time: lru_cache keeps no exceptions
def _cached_choice(setting: str, op: str, device_type: str, dtype: Optional[torch.dtype], triton_on_cpu: bool,
                   auto_order, tuned_device_type: str) -> _Choice:
    requested = _request(setting, device_type, triton_on_cpu)
    if requested == "auto":
        backends = _auto_backends(op, device_type, dtype, triton_on_cpu)
        fast = tuple(b for b in backends if b != "reference")
        measured = len(fast) > 1 and device_type == tuned_device_type and not _mutates(op)
        return _Choice(backends[0], fast if measured else ())
    why = backend_unavailable_reason(requested, device_type)
    if why is not None:
        raise RuntimeError(f"SPARSEKERN_BACKEND={requested} cannot run {op}: {why}")
    return _Choice(requested if backend_has_op(requested, op, dtype) else "reference", ())


def _static_backend(op: str, device_type: str, dtype: Optional[torch.dtype]) -> str:
    """auto's static pick, or the forced backend (the reference where it lacks ``op``)."""
    return _choice(op, device_type, dtype).static


def select_backend(op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs ``op`` on ``device`` (for ``dtype``) under the current ``SPARSEKERN_BACKEND``. For
    ``auto`` this is the static order's pick; on CUDA tensors a call may run the other fast backend instead when
    measuring found it faster for that call's shapes (see the module docstring)."""
    return _static_backend(op, device.type, dtype)


def device_type(t: Tensor) -> str:
    """``t.device.type`` without building a device and its string (0.3 us): is_cuda and is_cpu are plain flags."""
    return "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type


def select_backend_for(op: str, operand: Tensor, dtype: Optional[torch.dtype] = None) -> str:
    """``select_backend`` for the device of ``operand`` (and its dtype, unless ``dtype`` is given)."""
    return _static_backend(op, device_type(operand), operand.dtype if dtype is None else dtype)


def _mutates(op: str) -> bool:
    # torch's in-place naming, which every op here follows (tests check it against the schemas)
    return op.endswith("_")


def _function(backend: str, op: str) -> Callable:
    if backend == "reference":
        return getattr(reference, op)
    if backend == "triton":
        return getattr(_triton_module()[0], op)
    return getattr(torch.ops.sparsekern, f"native_{op}")


def _implementation(op: str, args: Sequence) -> Callable:
    """The function that runs ``op`` on ``args`` (``args[0]`` is the operand whose device and dtype decide)."""
    operand = args[0]
    static, measure = _choice(op, device_type(operand), operand.dtype)
    if measure and tuning.enabled():
        # the fast backends are timed against each other on this call
        calls = {name: functools.partial(_function(name, op), *args) for name in measure}
        return _function(tuning.TUNER.choose(tuning.call_key(op, args), operand.device, calls, static=static), op)
    return _function(static, op)


def _call(op: str, *args):
    return _implementation(op, args)(*args)


# Where each op's floating-point operands are (the others are int32 index tensors, sizes and geometry): the first
# two, and a bias.
_BIAS_POSITION = {"bsr_linear": 9, "bsr_conv2d": 9}


def _requires_grad(op: str, args: Sequence) -> bool:
    bias = args[_BIAS_POSITION[op]] if op in _BIAS_POSITION else None
    return args[0].requires_grad or args[1].requires_grad or (bias is not None and bias.requires_grad)


def _run(op: str, *args):
    """Run the non-mutating op ``op`` for a public entry point or a backward formula. Through its custom op
    (``torch.ops.sparsekern.<op>``) where something must see the op: a torch.func transform, torch.compile and
    export, tensor subclasses, torch function and dispatch modes. In plain eager mode, when an operand requires grad,
    through the op's eager ``torch.autograd.Function`` (the custom op's formulas; ops without autograd keep the custom
    op). Otherwise straight to its implementation, as the custom op would: on the 2-core CI machine its Python
    wrappers cost about 50 us a call, and 0.1-0.3 ms right after a large op has evicted them from the caches."""
    if (torch._C._functorch.peek_interpreter_stack() is not None  # inside a torch.func transform
            or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch.overrides.has_torch_function(args)):  # non-tensors have no __torch_function__
        return getattr(torch.ops.sparsekern, op)(*args)
    if torch.is_grad_enabled() and _requires_grad(op, args):
        # Plain eager autograd: a torch.autograd.Function with the custom op's own formulas. The custom op's autograd
        # wrappers cost more host time than the rest of a small layer's forward and backward together.
        eager = _EAGER_AUTOGRAD.get(op)
        return eager.apply(*args) if eager is not None else getattr(torch.ops.sparsekern, op)(*args)
    return _implementation(op, args)(*args)


def tuned_choices() -> Dict[tuning.Key, tuning.Choice]:
    """What ``auto`` measured in this process: (op, device, dtype, argument shapes and values) ->
    (backend, median ms per backend that ran, why each dropped backend raised). A copy; read-only values."""
    return tuning.TUNER.choices()


# ----------------------------------------------------------------------------------------------
# Op definitions. Layout tensors travel as explicit arguments so that autograd can reuse them.

@torch.library.custom_op("sparsekern::bsr_linear", mutates_args=())
def _bsr_linear(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, coo_row: Tensor, col_ptr: Tensor,
                row_idx: Tensor, perm: Tensor, out_features: int, bias: Optional[Tensor]) -> Tensor:
    return _call("bsr_linear", x, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, out_features, bias)


@torch.library.custom_op("sparsekern::bsr_linear_dx", mutates_args=())
def _bsr_linear_dx(dy: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, coo_row: Tensor, col_ptr: Tensor,
                   row_idx: Tensor, perm: Tensor, in_features: int) -> Tensor:
    return _call("bsr_linear_dx", dy, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, in_features)


@torch.library.custom_op("sparsekern::bsr_sddmm", mutates_args=())
def _bsr_sddmm(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, coo_row: Tensor, col_ptr: Tensor,
               row_idx: Tensor, perm: Tensor, block_size: int) -> Tensor:
    return _call("bsr_sddmm", dy, x, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, block_size)


@torch.library.custom_op("sparsekern::block_grad_scores", mutates_args=())
def _block_grad_scores(dy: Tensor, x: Tensor, block_size: int) -> Tensor:
    return _call("block_grad_scores", dy, x, block_size)


@torch.library.custom_op("sparsekern::bsr_conv2d", mutates_args=())
def _bsr_conv2d(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, coo_row: Tensor, col_ptr: Tensor,
                row_idx: Tensor, perm: Tensor, out_channels: int, bias: Optional[Tensor], kernel_size: List[int],
                stride: List[int], padding: List[int], dilation: List[int], output_size: List[int]) -> Tensor:
    return _call("bsr_conv2d", x, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm,
                 out_channels, bias, kernel_size, stride, padding, dilation, output_size)


@torch.library.custom_op("sparsekern::bsr_conv2d_dgrad", mutates_args=())
def _bsr_conv2d_dgrad(dy: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, coo_row: Tensor,
                      col_ptr: Tensor, row_idx: Tensor, perm: Tensor, in_channels: int, input_size: List[int],
                      kernel_size: List[int], stride: List[int], padding: List[int],
                      dilation: List[int]) -> Tensor:
    return _call("bsr_conv2d_dgrad", dy, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm,
                 in_channels, input_size, kernel_size, stride, padding, dilation)


@torch.library.custom_op("sparsekern::bsr_conv2d_wgrad", mutates_args=())
def _bsr_conv2d_wgrad(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, coo_row: Tensor, col_ptr: Tensor,
                      row_idx: Tensor, perm: Tensor, block_size: int, kernel_size: List[int], stride: List[int],
                      padding: List[int], dilation: List[int]) -> Tensor:
    return _call("bsr_conv2d_wgrad", dy, x, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm,
                 block_size, kernel_size, stride, padding, dilation)


@torch.library.custom_op("sparsekern::bsr_conv2d_grad_scores", mutates_args=())
def _bsr_conv2d_grad_scores(dy: Tensor, x: Tensor, block_size: int, kernel_size: List[int], stride: List[int],
                            padding: List[int], dilation: List[int]) -> Tensor:
    return _call("bsr_conv2d_grad_scores", dy, x, block_size, kernel_size, stride, padding, dilation)


@torch.library.custom_op("sparsekern::build_layout_index_", mutates_args=LAYOUT_ARGS)
def _build_layout_index_(block_mask: Tensor, row_ptr: Tensor, col_idx: Tensor, coo_row: Tensor, col_ptr: Tensor,
                         row_idx: Tensor, perm: Tensor) -> None:
    _call("build_layout_index_", block_mask, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm)


@torch.library.custom_op("sparsekern::masked_sgd_", mutates_args=("param", "momentum_buffer", "master", "step"))
def _masked_sgd_(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], master: Optional[Tensor], step: Tensor,
                 grad_scale: Optional[Tensor], inv_loss_scale: Optional[Tensor], found_inf: Optional[Tensor],
                 lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                 decoupled_weight_decay: bool) -> None:
    _call("masked_sgd_", param, grad, momentum_buffer, master, step, grad_scale, inv_loss_scale, found_inf,
          lr, momentum, dampening, weight_decay, nesterov, decoupled_weight_decay)


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels: output shapes only.

def _cdiv(a, b):
    return (a + b - 1) // b


@_bsr_linear.register_fake
def _(x, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, out_features, bias):
    return x.new_empty(x.shape[0], out_features)


@_bsr_linear_dx.register_fake
def _(dy, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, in_features):
    return dy.new_empty(dy.shape[0], in_features)


@_bsr_sddmm.register_fake
def _(dy, x, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, block_size):
    return dy.new_empty(col_idx.shape[0], block_size, block_size)


@_block_grad_scores.register_fake
def _(dy, x, block_size):
    dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.new_empty(_cdiv(dy.shape[1], block_size), _cdiv(x.shape[1], block_size), dtype=dtype)


@_bsr_conv2d.register_fake
def _(x, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, out_channels, bias, kernel_size, stride, padding,
      dilation, output_size):
    return x.new_empty(x.shape[0], output_size[0], output_size[1], out_channels)


@_bsr_conv2d_dgrad.register_fake
def _(dy, values, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, in_channels, input_size, kernel_size, stride,
      padding, dilation):
    return dy.new_empty(dy.shape[0], input_size[0], input_size[1], in_channels)


@_bsr_conv2d_wgrad.register_fake
def _(dy, x, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, block_size, kernel_size, stride, padding, dilation):
    return dy.new_empty(col_idx.shape[0], block_size, block_size)


@_bsr_conv2d_grad_scores.register_fake
def _(dy, x, block_size, kernel_size, stride, padding, dilation):
    dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.new_empty(_cdiv(dy.shape[3], block_size), _cdiv(kernel_size[0] * kernel_size[1] * x.shape[3], block_size),
                        dtype=dtype)


@_build_layout_index_.register_fake
def _(block_mask, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm):
    return None


@_masked_sgd_.register_fake
def _(param, grad, momentum_buffer, master, step, grad_scale, inv_loss_scale, found_inf, lr, momentum, dampening,
      weight_decay, nesterov, decoupled_weight_decay):
    return None


# ----------------------------------------------------------------------------------------------
# Autograd: the three training GEMMs are each other's derivatives. The backward formulas call _run: their ops go
# through the custom ops only when they must be differentiated again (create_graph) or traced.
#   Y  = X Wᵀ        -> dX = dY W (bsr_linear_dx),  dW = (dYᵀ X)|layout (bsr_sddmm)
#   dX = dY W        -> d(dY) = G Wᵀ (bsr_linear),   dW = (dYᵀ G)|layout
#   dW = (dYᵀ X)|L   -> d(dY) = X Gᵀ (bsr_linear),   dX = dY G (bsr_linear_dx)

def _save_all(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if t is None or isinstance(t, Tensor)))
    ctx.ints = [v for v in inputs if isinstance(v, int)]


def _linear_backward(ctx, grad):
    x, values, *layout, bias = ctx.saved_tensors
    (out_features,) = ctx.ints
    dx = _run("bsr_linear_dx", grad, values, *layout, x.shape[1]) if ctx.needs_input_grad[0] else None
    dvalues = _run("bsr_sddmm", grad, x, *layout, values.shape[-1]) if ctx.needs_input_grad[1] else None
    dbias = grad.sum(0) if ctx.needs_input_grad[9] else None
    return (dx, dvalues) + (None,) * 7 + (dbias,)


def _linear_dx_backward(ctx, grad):
    dy, values, *layout = ctx.saved_tensors
    ddy = _run("bsr_linear", grad, values, *layout, dy.shape[1], None) if ctx.needs_input_grad[0] else None
    dvalues = _run("bsr_sddmm", dy, grad, *layout, values.shape[-1]) if ctx.needs_input_grad[1] else None
    return (ddy, dvalues) + (None,) * 7


def _sddmm_backward(ctx, grad):
    dy, x, *layout = ctx.saved_tensors
    ddy = _run("bsr_linear", x, grad, *layout, dy.shape[1], None) if ctx.needs_input_grad[0] else None
    dx = _run("bsr_linear_dx", dy, grad, *layout, x.shape[1]) if ctx.needs_input_grad[1] else None
    return (ddy, dx) + (None,) * 7


def _conv_setup(ctx, inputs, output):
    x, values, *layout = inputs[:8]
    ctx.save_for_backward(x, values, *layout)
    ctx.has_bias = inputs[9] is not None
    ctx.geometry = inputs[10:14]  # kernel_size, stride, padding, dilation


def _conv_backward(ctx, grad):
    x, values, *layout = ctx.saved_tensors
    grad = grad.contiguous()
    dx = (_run("bsr_conv2d_dgrad", grad, values, *layout, x.shape[3], list(x.shape[1:3]), *ctx.geometry)
          if ctx.needs_input_grad[0] else None)
    dvalues = (_run("bsr_conv2d_wgrad", grad, x, *layout, values.shape[-1], *ctx.geometry)
               if ctx.needs_input_grad[1] else None)
    dbias = grad.sum(dim=(0, 1, 2)) if ctx.has_bias and ctx.needs_input_grad[9] else None
    return (dx, dvalues) + (None,) * 7 + (dbias,) + (None,) * 5


_EAGER_AUTOGRAD: Dict[str, type] = {}  # op -> the torch.autograd.Function that _run uses in plain eager mode


def _register_autograd(custom_op, op: str, backward: Callable, setup: Callable) -> None:
    """The same setup and backward for the custom op (torch.compile, torch.func, modes) and for eager calls."""
    custom_op.register_autograd(backward, setup_context=setup)

    def forward(ctx, *args):
        output = _call(op, *args)
        setup(ctx, args, output)
        return output

    _EAGER_AUTOGRAD[op] = type(f"{op}_function", (torch.autograd.Function,),
                               {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_register_autograd(_bsr_conv2d, "bsr_conv2d", _conv_backward, _conv_setup)
_register_autograd(_bsr_linear, "bsr_linear", _linear_backward, _save_all)
_register_autograd(_bsr_linear_dx, "bsr_linear_dx", _linear_dx_backward, _save_all)
_register_autograd(_bsr_sddmm, "bsr_sddmm", _sddmm_backward, _save_all)


# ----------------------------------------------------------------------------------------------
# Public entry points: argument checks with messages that name the tensor, autocast, then the op. A message is
# formatted only when its check fails: formatting shapes, devices and dtypes on every call cost more than the checks.


def _check_matrix(name: str, t: Tensor, like: Tensor, width: Optional[int] = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, features], got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the layer values are on {like.device}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the other operand has {like.dtype}")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} has {t.shape[1]} features, expected {width}")


def _check_values(layout, values: Tensor) -> None:
    bs = layout.block_size
    row_ptr, col_idx = layout.index_tensors()[:2]
    if values.shape != (col_idx.shape[0], bs, bs):
        raise ValueError(f"values must have shape {(layout.nnz_blocks, bs, bs)} for this layout, "
                         f"got {tuple(values.shape)}")
    if values.device != row_ptr.device:
        raise ValueError(f"values are on {values.device} but the layout is on {layout.device}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")


# torch._C._is_any_autocast_enabled is private; where a torch lacks it, every call asks per device instead.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the GEMMs run in for the operand ``t``: the autocast dtype under torch.autocast, else ``t``'s."""
    if _any_autocast() and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _autocast(*tensors: Optional[Tensor]):
    """Under torch.autocast, run the GEMM in the autocast dtype (fp32 master values stay fp32). The first tensor is
    the operand (never None)."""
    if not _any_autocast():  # one C call, where the per-device query below costs a microsecond
        return tensors
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def bsr_linear(x: Tensor, layout, values: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Y = X Wᵀ (+ bias): x [M, in_features] -> [M, out_features], W given by ``layout`` and ``values``."""
    out_features, in_features = layout.shape
    _check_values(layout, values)
    x, values, bias = _autocast(x, values, bias)
    _check_matrix("x", x, values, in_features)
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != values.dtype or bias.device != values.device:
            raise ValueError(f"bias must match values ({values.dtype} on {values.device}), "
                             f"got {bias.dtype} on {bias.device}")
    return _run("bsr_linear", x, values, *layout.index_tensors(), out_features, bias)


def bsr_linear_dx(dy: Tensor, layout, values: Tensor) -> Tensor:
    """dX = dY W: dy [M, out_features] -> [M, in_features]."""
    out_features, in_features = layout.shape
    _check_values(layout, values)
    dy, values = _autocast(dy, values)
    _check_matrix("dy", dy, values, out_features)
    return _run("bsr_linear_dx", dy, values, *layout.index_tensors(), in_features)


def bsr_sddmm(dy: Tensor, x: Tensor, layout) -> Tensor:
    """dW = (dYᵀ X) at the layout's blocks: [nnz_blocks, bs, bs]."""
    out_features, in_features = layout.shape
    dy, x = _autocast(dy, x)
    _check_matrix("dy", dy, x, out_features)
    _check_matrix("x", x, dy, in_features)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy has {dy.shape[0]} rows but x has {x.shape[0]}")
    if x.device != layout.device:
        raise ValueError(f"x is on {x.device} but the layout is on {layout.device}")
    return _run("bsr_sddmm", dy, x, *layout.index_tensors(), layout.block_size)


def block_grad_scores(dy: Tensor, x: Tensor, block_size: int) -> Tensor:
    """Frobenius norm of every block of the dense dYᵀX, without storing it: [ceil(N/bs), ceil(K/bs)]."""
    check_block_size(block_size)
    dy, x = _autocast(dy, x)
    _check_matrix("dy", dy, x)
    _check_matrix("x", x, dy)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy has {dy.shape[0]} rows but x has {x.shape[0]}")
    return _run("block_grad_scores", dy, x, block_size)


def build_layout_index_(block_mask: Tensor, row_ptr: Tensor, col_idx: Tensor, coo_row: Tensor, col_ptr: Tensor,
                        row_idx: Tensor, perm: Tensor) -> None:
    """Rewrite a layout's index tensors in place from a block mask (counts checked by the caller)."""
    torch.ops.sparsekern.build_layout_index_(block_mask, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm)


def layout_update_(layout, block_mask: Tensor, block_tensors: Sequence[Tensor] = ()) -> None:
    """Rewrite ``layout`` for a new mask of the same capacity and move the blocks of each tensor in
    ``block_tensors`` ([nnz, ...]: values, momentum, ...) to their new positions in place: blocks kept by
    the new mask keep their contents, new blocks start at zero. On the device, with no host sync.
    """
    nnz = layout.nnz_blocks
    for t in block_tensors:
        if t.shape[:1] != (nnz,) or t.device != layout.device:
            raise ValueError(f"block tensors must have {nnz} blocks on {layout.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    old_position = torch.full(layout.block_grid, -1, dtype=torch.int64, device=layout.device)
    old_position[layout.coo_row.long(), layout.col_idx.long()] = torch.arange(nnz, device=layout.device)
    build_layout_index_(block_mask, *layout.index_tensors())
    source = old_position[layout.coo_row.long(), layout.col_idx.long()]
    kept = source >= 0
    source = source.clamp(min=0)
    with torch.no_grad():
        for t in block_tensors:
            moved = t[source]
            t.copy_(torch.where(kept.view(-1, *([1] * (t.dim() - 1))), moved, torch.zeros_like(moved)))


def masked_sgd_(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], master: Optional[Tensor], step: Tensor,
                *, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                nesterov: bool = False, decoupled_weight_decay: bool = False, grad_scale: Optional[Tensor] = None,
                inv_loss_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """Fused in-place SGD step on one tensor (compact block values or a dense parameter); see
    ``sparsekern.reference.masked_sgd_`` for the exact arithmetic."""
    if grad.shape != param.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but param has {tuple(param.shape)}")
    weights = master if master is not None else param
    if master is not None and weights.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"master must be fp32/fp64, got {weights.dtype}")
    if momentum_buffer is not None and (momentum_buffer.shape != param.shape or momentum_buffer.dtype != weights.dtype):
        raise ValueError(f"momentum_buffer must have shape {tuple(param.shape)} and dtype {weights.dtype}")
    if grad_scale is not None and grad_scale.shape != param.shape[:1]:
        raise ValueError(f"grad_scale must have one factor per block ({param.shape[0]}), got {tuple(grad_scale.shape)}")
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum != 0")
    torch.ops.sparsekern.masked_sgd_(param, grad, momentum_buffer, master, step, grad_scale, inv_loss_scale,
                                     found_inf, lr, momentum, dampening, weight_decay, nesterov,
                                     decoupled_weight_decay)


def bsr_conv2d(x_nhwc: Tensor, layout, values: Tensor, bias: Optional[Tensor], kernel_size, stride, padding,
               dilation, output_size) -> Tensor:
    """Convolution (groups = 1) of an NHWC image with a block-sparse filter whose matrix [out, kh*kw*cin] has
    K ordered (kh, kw, cin): [B, H, W, C] -> [B, OH, OW, out]. ``padding`` = (top, left); zero padding."""
    out_channels, k = layout.shape
    _check_values(layout, values)
    x_nhwc, values, bias = _autocast(x_nhwc, values, bias)
    if x_nhwc.dim() != 4:
        raise ValueError(f"x must be a 4-D NHWC image, got shape {tuple(x_nhwc.shape)}")
    if kernel_size[0] * kernel_size[1] * x_nhwc.shape[3] != k:
        raise ValueError(f"x has {x_nhwc.shape[3]} channels but the filter matrix expects {k} = kh*kw*cin")
    if x_nhwc.dtype != values.dtype or x_nhwc.device != values.device:
        raise ValueError(f"x ({x_nhwc.dtype} on {x_nhwc.device}) must match values "
                         f"({values.dtype} on {values.device})")
    return _run("bsr_conv2d", x_nhwc.contiguous(), values, *layout.index_tensors(), out_channels, bias,
                list(kernel_size), list(stride), list(padding), list(dilation), list(output_size))


def bsr_conv2d_grad_scores(dy_nhwc: Tensor, x_nhwc: Tensor, block_size: int, kernel_size, stride, padding,
                           dilation) -> Tensor:
    """Frobenius norm of every block of the dense filter gradient dYᵀ im2col(X) ([out, kh*kw*cin], K ordered
    (kh, kw, cin)) of ``bsr_conv2d``, without storing it or im2col: [ceil(out/bs), ceil(kh*kw*cin/bs)], fp32 (fp64
    for fp64 inputs). dy [B, OH, OW, out] and x [B, H, W, cin] are NHWC; ``padding`` = (top, left)."""
    check_block_size(block_size)
    dy_nhwc, x_nhwc = _autocast(dy_nhwc, x_nhwc)
    if dy_nhwc.dim() != 4:
        raise ValueError(f"dy must be a 4-D NHWC gradient [B, OH, OW, out], got shape {tuple(dy_nhwc.shape)}")
    if x_nhwc.dim() != 4:
        raise ValueError(f"x must be a 4-D NHWC image [B, H, W, cin], got shape {tuple(x_nhwc.shape)}")
    if dy_nhwc.shape[0] != x_nhwc.shape[0]:
        raise ValueError(f"dy has batch {dy_nhwc.shape[0]} but x has {x_nhwc.shape[0]}")
    if dy_nhwc.dtype != x_nhwc.dtype or dy_nhwc.device != x_nhwc.device:
        raise ValueError(f"dy ({dy_nhwc.dtype} on {dy_nhwc.device}) must match x "
                         f"({x_nhwc.dtype} on {x_nhwc.device})")
    return _run("bsr_conv2d_grad_scores", dy_nhwc.contiguous(), x_nhwc.contiguous(), block_size, list(kernel_size),
                list(stride), list(padding), list(dilation))
