"""Triton kernels for sparsekern's ops, installed as ``sparsekern.triton_kernels``.

Each public function has the name and signature of the op it implements in ``sparsekern.reference``;
``sparsekern/ops.py`` dispatches to it on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1).
"""
from ._common import DTYPES
from .conv import bsr_conv2d
from .conv_dgrad import bsr_conv2d_dgrad
from .conv_wgrad import bsr_conv2d_grad_scores, bsr_conv2d_wgrad
from .grad_scores import block_grad_scores
from .linear import bsr_linear
from .linear_dx import bsr_linear_dx
from .masked_sgd import masked_sgd_
from .sddmm import bsr_sddmm

__all__ = ["DTYPES", "block_grad_scores", "bsr_conv2d", "bsr_conv2d_dgrad", "bsr_conv2d_grad_scores",
           "bsr_conv2d_wgrad", "bsr_linear", "bsr_linear_dx", "bsr_sddmm", "masked_sgd_"]
