"""SparseConv2d: a drop-in nn.Conv2d whose filter is block-sparse.

The filter [out, in/groups, kh, kw] is stored as the matrix [out, kh*kw*in/groups] with K ordered
(kh, kw, cin), so that a block is up to ``block_size`` input channels at one filter tap (the order an
NHWC implicit GEMM reads). With groups=1, where the selected backend has a ``bsr_conv2d`` kernel for the call
(Triton, native CUDA: fp16/bf16/fp32, any in_channels; native CPU: fp32/fp64, in_channels a multiple of the
block), forward,
data gradient, filter gradient and, on DST update steps, the gradient's block norms are implicit GEMMs over the
NHWC image with no unfold buffer (``bsr_conv2d`` / ``_dgrad`` / ``_wgrad`` / ``_grad_scores``). 1x1 stride-1
convolutions are the block-sparse GEMM on the [B*H*W, C] pixels. Otherwise the convolution runs as unfold + the
block-sparse GEMM. Grouped convolutions fall back to a dense convolution with the densified filter, because
their per-group matrices are too narrow for block sparsity to pay off.

Memory format: the kernels read NHWC. A channels_last input is used in place; an NCHW input is copied to NHWC
once per call (and its gradient once more in backward). The output is NCHW-shaped and channels_last in memory,
so stacked sparse convolutions convert only at the first one.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .. import ops, reference
from ._sparse_weight import BlockSparseWeight, blocks_kept

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
IntPair = Union[int, Tuple[int, int]]


@torch.compiler.assume_constant_result
def _conv_backend(x: Tensor, dtype: torch.dtype) -> str:
    """The backend bsr_conv2d runs on; a constant under torch.compile, whose tracer cannot read the dispatcher."""
    return ops.select_backend_for("bsr_conv2d", x, dtype)


class SparseConv2d(BlockSparseWeight):
    """Same constructor and semantics as nn.Conv2d, plus ``sparsity`` and ``block_size``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Union[str, IntPair] = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", sparsity: float = 0.9, block_size: int = 32, device=None, dtype=None):
        super().__init__()
        if in_channels <= 0 or out_channels <= 0 or groups <= 0:
            raise ValueError("in_channels, out_channels and groups must be positive")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                             f"by groups ({groups})")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.dilation) <= 0:
            raise ValueError("kernel_size, stride and dilation must be positive")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or integers, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding)
            if min(self.padding) < 0:
                raise ValueError(f"padding must be non-negative, got {padding}")
        self.padding_mode = padding_mode
        # Explicit (left, right, top, bottom) padding, as nn.Conv2d computes it ('same' puts the odd one right).
        self._pad_lrtb = self._explicit_padding()

        kh, kw = self.kernel_size
        cin = in_channels // groups
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
                                if bias else None)
        self._init_sparse_weight((out_channels, kh * kw * cin), sparsity, block_size, cin * kh * kw, device, dtype)

    def _explicit_padding(self) -> Tuple[int, int, int, int]:
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    @property
    def dense_weight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _weight_to_matrix(self, weight: Tensor) -> Tensor:
        return weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)

    def _matrix_to_weight(self, matrix: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        return matrix.reshape(self.out_channels, kh, kw, self.in_channels // self.groups).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d expects input [N, {self.in_channels}, H, W] (or unbatched), "
                             f"got {tuple(x.shape)}")
        left, right, top, bottom = self._pad_lrtb
        if self.padding_mode != "zeros" and any(self._pad_lrtb):
            x = F.pad(x, self._pad_lrtb, mode=self.padding_mode)
            left = right = top = bottom = 0
        kh, kw = self.kernel_size
        height, width = x.shape[2:]
        out_h = (height + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (width + left + right - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"input of size {tuple(x.shape[2:])} (padding included) is smaller than the kernel")
        if self.groups != 1:
            y = self._dense_grouped_conv(F.pad(x, (left, right, top, bottom)))
        else:
            y = self._block_sparse_conv(x, (top, left), (out_h, out_w))
        return y.squeeze(0) if unbatched else y

    def _block_sparse_conv(self, x: Tensor, padding, output_size) -> Tensor:
        """groups=1. A 1x1 stride-1 conv is the block-sparse GEMM on the [B*H*W, C] pixels; otherwise the
        implicit-GEMM op where the selected backend has a kernel for the call, else im2col + the GEMM."""
        # NHWC view: free for a channels_last input; an NCHW one is copied once, here or by the op.
        x_nhwc = x.permute(0, 2, 3, 1)
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and tuple(padding) == (0, 0) \
                and tuple(output_size) == tuple(x.shape[2:]):
            y = self._gemm(x_nhwc.reshape(-1, self.in_channels))
        elif self._implicit_gemm_applies(x):
            y = ops.bsr_conv2d(x_nhwc, *self._weights(), self.kernel_size, self.stride, padding, self.dilation,
                               output_size)
            if self.capture_grad_scores and y.requires_grad:
                self._capture_conv_grad_scores(y, x_nhwc.detach(), padding)
            return y.permute(0, 3, 1, 2)  # [B, OH, OW, out] -> NCHW-shaped channels_last, no copy
        else:
            cols = reference.unfold_nhwc(x_nhwc, self.kernel_size, self.stride, padding, self.dilation, output_size)
            y = self._gemm(cols)
        return y.view(x.shape[0], *output_size, self.out_channels).permute(0, 3, 1, 2)  # channels_last, no copy

    def _implicit_gemm_applies(self, x: Tensor) -> bool:
        """Whether the backend that bsr_conv2d selects for this call has a kernel for it: Triton and the native
        CUDA kernels take fp16/bf16/fp32 (autocast included) and any in_channels; the native CPU kernel fp32/fp64
        and in_channels a multiple of the block. Otherwise im2col + bsr_linear, which may still have a native
        kernel (any width)."""
        dtype = ops.compute_dtype(x)
        backend = _conv_backend(x, dtype)
        if backend == "cpu":
            block_size = self._modules["layout"].block_size  # not the property: nn.Module's lookup costs 0.5 us
            return dtype in (torch.float32, torch.float64) and self.in_channels % block_size == 0
        return backend != "reference"

    def _capture_conv_grad_scores(self, y: Tensor, x_nhwc: Tensor, padding) -> None:
        """Leave the block norms of the dense filter gradient in grad_scores when y's gradient arrives (DST
        update steps), from dY and the image: no im2col on the backends with a bsr_conv2d_grad_scores kernel."""
        def record(grad: Tensor) -> None:
            # Under autocast the gradient comes in the autocast dtype while the saved image is the layer's input.
            scores = ops.bsr_conv2d_grad_scores(grad, x_nhwc.to(grad.dtype), self.block_size, self.kernel_size,
                                                self.stride, padding, self.dilation)
            self._record_grad_scores(scores)
        y.register_hook(record)

    def _dense_grouped_conv(self, x: Tensor) -> Tensor:
        """Grouped convolutions: a dense conv with the densified filter (per-group matrices are too narrow
        for block sparsity to pay off)."""
        weight = self.dense_weight()
        if self.capture_grad_scores and weight.requires_grad:
            # The dense fallback has the exact dense weight gradient at hand.
            weight.register_hook(lambda grad: self._record_grad_scores(
                reference.block_norms(self._weight_to_matrix(grad).float(), self.block_size)))
        return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, sparsity: float = 0.9, block_size: int = 32) -> "SparseConv2d":
        """Keep the largest-norm blocks of ``conv.weight`` (magnitude pruning at block granularity)."""
        weight = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, sparsity, block_size,
                    device=weight.device, dtype=weight.dtype)
        matrix = layer._weight_to_matrix(weight)
        layer._adopt_matrix(matrix, blocks_kept(matrix.shape, sparsity, block_size))
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An nn.Conv2d with the same function (zeros outside the stored blocks)."""
        weight = self.dense_weight().detach()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", block_size={self.block_size}, density={self.density:.3f}"
