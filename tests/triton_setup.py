"""Where the Triton kernel tests (test_triton_kernels.py, test_triton_conv.py) run, and when they cannot.

Importing this from a test module skips that whole module unless the kernels can run here: under
TRITON_INTERPRET=1 (conftest sets it when there is no GPU) or on a CUDA GPU, with triton installed. Import it
before sparsekern.triton_kernels, which needs triton.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
if not (INTERPRET or HAS_CUDA):
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

# Small cases run on CPU under the interpreter, else on the GPU.
DEVICE = "cpu" if INTERPRET else "cuda"
small = pytest.mark.interpreter if DEVICE == "cpu" else pytest.mark.cuda
on_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
