"""What the TMA kernels (linear_tma.py, wgrad_tma.py, conv_tma.py) share: the opt-in switch, host tensor
descriptors, the devices and operands the tensor-memory accelerator can take, autotune pre-hooks that size the
descriptors' boxes, and the persistent grid."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from ._common import INTERPRET, sm_count

try:  # host-side tensor descriptors: triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

TMA_ALIGN = 16  # bytes: base addresses and every stride but the last

# The TMA kernels have not run on a GPU yet: the Triton launchers use them only when this is "1" (and the pointer
# kernels where TMA cannot take the call). Read on each call, so benchmarks can switch it.
TMA_ENV = "SPARSEKERN_TRITON_TMA"


def tma_enabled() -> bool:
    return os.environ.get(TMA_ENV) == "1"


def device_unsupported(device: torch.device) -> Optional[str]:
    """Why the TMA kernels cannot run on ``device``, or None: a triton with host tensor descriptors, and a GPU of
    compute capability 9.0+ (or the interpreter, which emulates TMA on CPU tensors)."""
    if TensorDescriptor is None:
        return f"triton {triton.__version__} has no host tensor descriptors (triton >= 3.4)"
    if INTERPRET:
        return None
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "TMA needs a GPU of compute capability 9.0 or newer"
    return None


def tma_unsupported(*tensors: torch.Tensor) -> Optional[str]:
    """Why these 2-D tensors cannot be TMA operands, or None: a device the TMA kernels run on, unit stride along
    features, 16-byte aligned base addresses and row strides, and rows that 32-bit coordinates reach."""
    why = device_unsupported(tensors[0].device)
    if why:
        return why
    for t in tensors:
        if t.shape[0] >= 2 ** 31:
            return f"an operand has {t.shape[0]} rows: TMA coordinates are 32-bit"
        elem = t.element_size()
        if t.stride(-1) != 1 or (t.stride(0) * elem) % TMA_ALIGN or t.data_ptr() % TMA_ALIGN:
            return (f"a [{t.shape[0]}, {t.shape[1]}] {t.dtype} operand has row stride {t.stride(0)}: TMA needs unit "
                    f"stride along features and {TMA_ALIGN}-byte aligned rows ({TMA_ALIGN // elem} features)")
    return None


def descriptor(t: torch.Tensor, box):
    """A host descriptor of ``t`` with the given box (a placeholder where a config's pre-hook resets it)."""
    return TensorDescriptor.from_tensor(t, list(box))


def box_hook(boxes: dict):
    """An autotune pre-hook that sets each named descriptor's box from the chosen config: ``boxes`` maps a descriptor
    argument to one entry per dimension, a meta-parameter name or None for "keep" (the descriptors are made before a
    config is chosen). Names the kernel does not take are skipped, so that kernels can share a config list."""
    def set_boxes(nargs) -> None:
        for name, dims in boxes.items():
            if name not in nargs:
                continue
            old = nargs[name].block_shape
            nargs[name].block_shape = [old[i] if dim is None else nargs[dim] for i, dim in enumerate(dims)]
    return set_boxes


def with_hook(configs, hook):
    for config in configs:
        config.pre_hook = hook
    return configs


def persistent_grid(tiles, device: torch.device):
    """One program per multiprocessor, or per output tile where there are fewer; ``tiles(meta)`` counts them."""
    programs = sm_count(device)
    return lambda meta: (max(1, min(programs, tiles(meta))),)
