"""Triton kernels for sparsekern's ops, installed as ``sparsekern.triton_kernels``.

Each public function has the name and signature of the op it implements in ``sparsekern.reference``;
``sparsekern/ops.py`` dispatches to it on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1).

The four GEMMs and the convolution's three passes have Hopper variants with TMA tile loads
(``linear_tma.py``, ``wgrad_tma.py``, ``conv_tma.py``) that have not run on a GPU yet: the launchers call them only
with SPARSEKERN_TRITON_TMA=1, and then only where TMA can take the operands.
"""
from ._common import DTYPES
from ._tma import TMA_ENV, tma_enabled
from .conv import bsr_conv2d
from .conv_dgrad import bsr_conv2d_dgrad
from .conv_wgrad import bsr_conv2d_grad_scores, bsr_conv2d_wgrad
from .grad_scores import block_grad_scores
from .linear import bsr_linear
from .linear_dx import bsr_linear_dx
from .masked_sgd import masked_sgd_
from .sddmm import bsr_sddmm

__all__ = ["DTYPES", "TMA_ENV", "block_grad_scores", "bsr_conv2d", "bsr_conv2d_dgrad", "bsr_conv2d_grad_scores",
           "bsr_conv2d_wgrad", "bsr_linear", "bsr_linear_dx", "bsr_sddmm", "masked_sgd_", "tma_enabled"]
