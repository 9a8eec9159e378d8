"""Triton kernels for sparsekern's ops, installed as ``sparsekern.triton_kernels``.

Each public function has the name and signature of the op it implements in ``sparsekern.reference``;
``sparsekern/ops.py`` dispatches to it on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1).

The four GEMMs and the stride-1 convolution's three passes have Hopper variants with TMA tile loads (``linear_tma.py``,
``wgrad_tma.py``, ``conv_tma.py``) that have not run on a GPU yet: they are used only with SPARSEKERN_TRITON_TMA=1,
and then only where TMA can take the operands.
"""
import functools

from . import conv, conv_dgrad, conv_wgrad, grad_scores, linear, linear_dx, sddmm
from ._common import DTYPES
from ._tma import TMA_ENV, tma_enabled
from .conv_tma import bsr_conv2d_dgrad_tma, bsr_conv2d_tma, bsr_conv2d_wgrad_tma
from .conv_wgrad import bsr_conv2d_grad_scores
from .linear_tma import bsr_linear_dx_tma, bsr_linear_tma
from .masked_sgd import masked_sgd_
from .wgrad_tma import block_grad_scores_tma, bsr_sddmm_tma


def _tma_when_enabled(pointer, tma):
    """``pointer``, or under SPARSEKERN_TRITON_TMA=1 ``tma`` with ``pointer`` as its fallback."""
    @functools.wraps(pointer)
    def launch(*args):
        return tma(*args, fallback=pointer) if tma_enabled() else pointer(*args)
    return launch


bsr_linear = _tma_when_enabled(linear.bsr_linear, bsr_linear_tma)
bsr_linear_dx = _tma_when_enabled(linear_dx.bsr_linear_dx, bsr_linear_dx_tma)
bsr_sddmm = _tma_when_enabled(sddmm.bsr_sddmm, bsr_sddmm_tma)
block_grad_scores = _tma_when_enabled(grad_scores.block_grad_scores, block_grad_scores_tma)
bsr_conv2d = _tma_when_enabled(conv.bsr_conv2d, bsr_conv2d_tma)
bsr_conv2d_dgrad = _tma_when_enabled(conv_dgrad.bsr_conv2d_dgrad, bsr_conv2d_dgrad_tma)
bsr_conv2d_wgrad = _tma_when_enabled(conv_wgrad.bsr_conv2d_wgrad, bsr_conv2d_wgrad_tma)

__all__ = ["DTYPES", "TMA_ENV", "block_grad_scores", "bsr_conv2d", "bsr_conv2d_dgrad", "bsr_conv2d_grad_scores",
           "bsr_conv2d_wgrad", "bsr_linear", "bsr_linear_dx", "bsr_sddmm", "masked_sgd_", "tma_enabled"]
