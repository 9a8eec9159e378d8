"""Where the build finds CUTLASS's headers; shared by setup.py (loaded by path: it runs before the package is
installed) and the static tests, which compile the kernels themselves. Imports nothing of the package."""
import importlib.util
import os


def cutlass_include():
    """CUTLASS's include folder (cute/tensor.hpp inside), or None: CUTLASS_INCLUDE, else nvidia-cutlass's copy."""
    candidates = [os.environ.get("CUTLASS_INCLUDE", "")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "source", "include"))
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "cute", "tensor.hpp")):
            return path
    return None
