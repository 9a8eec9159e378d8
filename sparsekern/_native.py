"""Loads the compiled extension ``sparsekern._C`` and says what it holds.

Importing it never fails: when the extension is missing, fails to load, or was built against another
torch release, it warns once, ``LOADED`` is False, ``LOAD_ERROR`` says why, and every op falls back to
the reference backend.

- ``LOADED``: the native kernels are usable.
- ``LOAD_ERROR``: why they are not (None when loaded).
- ``BUILD_INFO``: ``sparsekern._C.build_info()`` (torch_version, cuda, cuda_version, cuda_archs,
  native_ops); ``{}`` when not loaded.
- ``has_kernel(op_name, device_type, dtype=None)``: whether ``sparsekern::<op_name>`` has a kernel for that
  device (that takes ``dtype``, when given).
"""
import importlib
import warnings

import torch

_REBUILD_HINT = "Rebuild with `pip install --no-build-isolation --no-deps -e .`"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# Kernels that take only some dtypes, by (op, device type); the others take every dtype their op does. The CUDA
# GEMMs and convolutions have no float64 path, so sparsekern.ops runs float64 CUDA tensors on the reference instead.
_KERNEL_DTYPES = {(f"native_{op}", "cuda"): (torch.float16, torch.bfloat16, torch.float32)
                  for op in ("bsr_linear", "bsr_linear_dx", "bsr_sddmm", "block_grad_scores", "bsr_conv2d",
                             "bsr_conv2d_dgrad", "bsr_conv2d_wgrad", "bsr_conv2d_grad_scores")}

LOADED = False
LOAD_ERROR = None
BUILD_INFO = {}


def _major_minor(version):
    # "2.14.1+cu130" -> (2, 14); None when it does not parse
    try:
        major, minor = str(version).split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def _load():
    """(build_info, None) when the extension is usable, else (None, reason)."""
    try:
        module = importlib.import_module("sparsekern._C")
    except (ImportError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    try:
        info = dict(module.build_info())
    except Exception as exc:  # a stale .so from another layout of the package
        return None, f"sparsekern._C.build_info() failed: {type(exc).__name__}: {exc}"
    built, running = info.get("torch_version"), torch.__version__
    if _major_minor(built) != _major_minor(running):
        # C++ ABI differs across torch minor releases: don't call into the kernels.
        return None, f"it was built against torch {built} but torch {running} is running"
    return info, None


def has_kernel(op_name: str, device_type: str, dtype: torch.dtype = None) -> bool:
    """Whether the native op ``sparsekern::<op_name>`` has a kernel for ``device_type`` ("cpu" or "cuda") that
    takes operands of ``dtype`` (any dtype of the op when None)."""
    device_type = str(device_type).lower()
    key = _DISPATCH_KEYS.get(device_type)
    if not LOADED or key is None:
        return False
    try:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op_name}", key)
    except RuntimeError:  # no such op
        return False
    dtypes = _KERNEL_DTYPES.get((op_name, device_type))
    return registered and (dtype is None or dtypes is None or dtype in dtypes)


_info, LOAD_ERROR = _load()
if _info is None:
    warnings.warn(
        f"sparsekern._C could not be loaded ({LOAD_ERROR}); native CPU/CUDA kernels are disabled and ops fall "
        f"back to the reference backend. {_REBUILD_HINT} against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    LOADED, BUILD_INFO = True, _info
del _info
