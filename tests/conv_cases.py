"""Convolution problems, their float64 oracle and the accuracy rule, shared by the Triton (test_triton_conv.py) and
CUDA (test_cuda_conv.py) kernel tests of the four convolution ops.

Oracle: F.conv2d in float64 with the dense filter built from the compact blocks by plain loops (conftest), its
autograd for dX and dW, and plain-loop block norms for the scores. Tolerance is flash-attention's rule (design §6):
the kernel's error against that oracle may be at most twice the error of ``sparsekern.reference`` (im2col + dense
GEMM) computed in the kernel's precision, plus one ulp of the result.
"""
import torch
import torch.nn.functional as F

from sparsekern import reference

from conftest import block_frobenius_norms, conv_weight_from_matrix, dense_matrix
from gemm_cases import make_layout, randn


class Conv:
    """One convolution problem: NHWC image, block-sparse filter, geometry, and the float64 F.conv2d oracle."""

    def __init__(self, batch, size, cin, cout, kernel, stride=1, padding=0, dilation=1, bs=16, density=0.5,
                 dtype=torch.float32, seed=0, bias=True, empty_rows=(), empty_cols=(), device="cpu"):
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.cin, self.cout, self.bs, self.dtype = cin, cout, bs, dtype
        height, width = size
        self.output_size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                            zip(size, self.padding, self.dilation, self.kernel, self.stride)]
        shape = (cout, self.kernel[0] * self.kernel[1] * cin)
        self.layout = make_layout(shape, bs, density, seed, empty_rows, empty_cols, device=device)
        # Values are random in the blocks' padding too: the kernels must ignore it.
        self.values = randn(self.layout.nnz_blocks, bs, bs, seed=seed + 1, dtype=dtype, device=device)
        self.x = randn(batch, height, width, cin, seed=seed + 2, dtype=dtype, device=device)
        self.dy = randn(batch, *self.output_size, cout, seed=seed + 3, dtype=dtype, device=device)
        self.bias = randn(cout, seed=seed + 4, dtype=dtype, device=device) if bias else None
        self.index = self.layout.index_tensors()
        self.geometry = [list(self.kernel), list(self.stride), list(self.padding), list(self.dilation)]

    def args(self, op, dtype=None):
        cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
        x, dy, values, bias = cast(self.x), cast(self.dy), cast(self.values), cast(self.bias)
        if op == "bsr_conv2d":
            return (x, values, *self.index, self.cout, bias, *self.geometry, list(self.output_size))
        if op == "bsr_conv2d_dgrad":
            return (dy, values, *self.index, self.cin, list(self.x.shape[1:3]), *self.geometry)
        if op == "bsr_conv2d_wgrad":
            return (dy, x, *self.index, self.bs, *self.geometry)
        return (dy, x, self.bs, *self.geometry)

    def oracle(self):
        """{op: float64 result} from F.conv2d and its autograd."""
        matrix = dense_matrix(self.values.double(), self.layout)
        weight = conv_weight_from_matrix(matrix, self.cout, self.cin, self.kernel).detach().requires_grad_()
        x = self.x.double().permute(0, 3, 1, 2).requires_grad_()
        bias = None if self.bias is None else self.bias.double()
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        dx, dweight = torch.autograd.grad(y, (x, weight), self.dy.double().permute(0, 3, 1, 2))
        dmatrix = dweight.permute(0, 2, 3, 1).reshape(self.cout, -1)
        bs = self.bs
        padded = F.pad(dmatrix, (0, -dmatrix.shape[1] % bs, 0, -dmatrix.shape[0] % bs))
        blocks = [padded[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs]
                  for r, c in zip(self.layout.coo_row.tolist(), self.layout.col_idx.tolist())]
        return {
            "bsr_conv2d": y.permute(0, 2, 3, 1),
            "bsr_conv2d_dgrad": dx.permute(0, 2, 3, 1),
            "bsr_conv2d_wgrad": torch.stack(blocks) if blocks else padded.new_zeros(0, bs, bs),
            "bsr_conv2d_grad_scores": block_frobenius_norms(dmatrix, bs),
        }


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def assert_close_to_oracle(problem, op, exact, kernels, out=None):
    """Flash-attention rule: |kernel - oracle64| <= 2 |reference in the kernel's dtype - oracle64| + one ulp.
    ``kernels``: where the op's implementation is found by name (a module, or torch.ops.sparsekern's native_*)."""
    args = problem.args(op)
    if out is None:
        out = getattr(kernels, op)(*args)
    same_precision = getattr(reference, op)(*args)
    assert out.shape == exact.shape, f"{op}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == same_precision.dtype and out.device == same_precision.device, op
    if exact.numel() == 0:
        return
    exact = exact.to(out.device)
    kernel_error = (out.double() - exact).abs().max().item()
    torch_error = (same_precision.double() - exact).abs().max().item()
    eps = torch.finfo(out.dtype).eps * exact.abs().max().item()
    assert kernel_error <= 2 * torch_error + eps, (
        f"{op}: kernel error {kernel_error:.3e} > 2 x torch error {torch_error:.3e} + {eps:.1e}")


OPS = ("bsr_conv2d", "bsr_conv2d_dgrad", "bsr_conv2d_wgrad", "bsr_conv2d_grad_scores")

# ResNet/VGG geometries at small sizes, odd H/W; in_channels a multiple of the block (vectorised path) or not.
CASES = {
    "3x3_s1_p1": dict(batch=2, size=(9, 11), cin=32, cout=40, kernel=3, padding=1),
    "3x3_s2_p1_cin20": dict(batch=2, size=(11, 9), cin=20, cout=24, kernel=3, stride=2, padding=1),
    "1x1_s2_downsample": dict(batch=2, size=(9, 7), cin=64, cout=48, kernel=1, stride=2, bs=32),
    "1x1_s1_cin24": dict(batch=1, size=(7, 5), cin=24, cout=33, kernel=1),
    "7x7_s2_p3_stem": dict(batch=2, size=(15, 13), cin=3, cout=16, kernel=7, stride=2, padding=3),
    "3x3_d2_p2_cin35": dict(batch=2, size=(9, 8), cin=35, cout=17, kernel=3, padding=2, dilation=2, bs=32),
    "3x3_s2_d2_p2": dict(batch=1, size=(13, 11), cin=16, cout=16, kernel=3, stride=2, padding=2, dilation=2),
    "3x3_p0": dict(batch=1, size=(7, 9), cin=16, cout=20, kernel=3),
    "3x4_s(2,1)_p(1,2)": dict(batch=1, size=(9, 7), cin=18, cout=16, kernel=(3, 4), stride=(2, 1), padding=(1, 2),
                              dilation=(1, 2)),
}

# On a GPU: ResNet/VGG-sized layers (batch 8).
GPU_CASES = {
    "resnet_3x3_64": dict(batch=8, size=(56, 56), cin=64, cout=64, kernel=3, padding=1, bs=32, density=0.1),
    "resnet_3x3_s2_128": dict(batch=8, size=(56, 56), cin=64, cout=128, kernel=3, stride=2, padding=1, bs=32,
                              density=0.2),
    "resnet_1x1_s2_512": dict(batch=8, size=(28, 28), cin=256, cout=512, kernel=1, stride=2, bs=64, density=0.1),
    "resnet_3x3_256": dict(batch=8, size=(14, 14), cin=256, cout=256, kernel=3, padding=1, bs=64, density=0.3),
    "resnet_stem": dict(batch=8, size=(111, 113), cin=3, cout=64, kernel=7, stride=2, padding=3, bs=32,
                        density=0.5),
    "vgg_3x3_cin100_bs128": dict(batch=4, size=(31, 29), cin=100, cout=200, kernel=3, padding=1, bs=128,
                                 density=0.25),
}


def error_problem(device="cpu"):
    """The valid problem the CUDA glue's error cases (CUDA_ERRORS) start from: 3x3, padding 1, 32 -> 40 channels."""
    return Conv(**CASES["3x3_s1_p1"], seed=4, device=device)


def _with(args, **bad):
    """args with entries replaced, by position: _with(args, at_11=[0, 1])."""
    args = list(args)
    for key, value in bad.items():
        args[int(key[3:])] = value
    return args


def _conv(p, **bad):
    return "bsr_conv2d", _with(p.args("bsr_conv2d"), **bad)


def _dgrad(p, **bad):
    return "bsr_conv2d_dgrad", _with(p.args("bsr_conv2d_dgrad"), **bad)


def _wgrad(p, **bad):
    return "bsr_conv2d_wgrad", _with(p.args("bsr_conv2d_wgrad"), **bad)


def _scores(p, **bad):
    return "bsr_conv2d_grad_scores", _with(p.args("bsr_conv2d_grad_scores"), **bad)


# One bad argument per call of a native CUDA convolution op: {id: p -> (op, args, a fragment of the error message)},
# p from error_problem. Argument positions: bsr_conv2d (x, values, 6 index tensors, out_channels 8, bias 9,
# kernel_size 10, stride 11, padding 12, dilation 13, output_size 14); dgrad (dy, values, index, in_channels 8,
# input_size 9, geometry 10-13); wgrad (dy, x, index, block_size 8, geometry 9-12); grad scores (dy, x,
# block_size 2, geometry 3-6). Each must raise before anything is read or launched.
CUDA_ERRORS = {
    "conv-x-float64": lambda p: (*_conv(p, at_0=p.x.double()), "float64"),
    "conv-x-3d": lambda p: (*_conv(p, at_0=p.x[0]), "x must be 4-D NHWC"),
    "conv-x-on-cpu": lambda p: (*_conv(p, at_0=p.x.cpu()), "x must be a CUDA tensor"),
    "conv-x-channels-not-the-layouts": lambda p: (*_conv(p, at_0=p.x[..., :16]), "col_ptr must have"),
    "conv-values-float16": lambda p: (*_conv(p, at_1=p.values.half()), "values has dtype"),
    "conv-out_channels-0": lambda p: (*_conv(p, at_8=0), "out_channels must be positive"),
    "conv-bias-short": lambda p: (*_conv(p, at_9=p.bias[:-1]), "bias must have shape"),
    "conv-kernel_size-one-entry": lambda p: (*_conv(p, at_10=[3]), "must each have 2 entries"),
    "conv-stride-0": lambda p: (*_conv(p, at_11=[0, 1]), "stride must be positive"),
    "conv-padding-three-entries": lambda p: (*_conv(p, at_12=[1, 1, 1]), "must each have 2 entries"),
    "conv-padding-negative": lambda p: (*_conv(p, at_12=[-1, 1]), "padding must be non-negative"),
    "conv-dilation-70000": lambda p: (*_conv(p, at_13=[70000, 1]), "under 65536"),
    "conv-output_size-one-entry": lambda p: (*_conv(p, at_14=[9]), "output_size must be two positive sizes"),
    "conv-output_size-too-many-pixels": lambda p: (*_conv(p, at_14=[2 ** 20, 2 ** 20]), "fewer than 2^31 pixels"),
    "dgrad-dy-float64": lambda p: (*_dgrad(p, at_0=p.dy.double()), "float64"),
    "dgrad-dy-channels-not-the-layouts": lambda p: (*_dgrad(p, at_0=p.dy[..., :8]), "row_ptr must have"),
    "dgrad-values-on-cpu": lambda p: (*_dgrad(p, at_1=p.values.cpu()), "values is on cpu"),
    "dgrad-in_channels-0": lambda p: (*_dgrad(p, at_8=0), "in_channels must be positive"),
    "dgrad-in_channels-huge": lambda p: (*_dgrad(p, at_8=2 ** 62), "kh*kw*in_channels < 2^31"),
    "dgrad-input_size-one-entry": lambda p: (*_dgrad(p, at_9=[9]), "input_size must be two positive sizes"),
    "dgrad-stride-one-entry": lambda p: (*_dgrad(p, at_11=[1]), "must each have 2 entries"),
    "wgrad-block_size-24": lambda p: (*_wgrad(p, at_8=24), "block_size must be"),
    "wgrad-x-on-cpu": lambda p: (*_wgrad(p, at_1=p.x.cpu()), "x must be a CUDA tensor"),
    "wgrad-x-float16": lambda p: (*_wgrad(p, at_1=p.x.half()), "x has dtype"),
    "wgrad-x-batch": lambda p: (*_wgrad(p, at_1=p.x[:1]), "dy has batch 2 but x has 1"),
    "wgrad-dilation-one-entry": lambda p: (*_wgrad(p, at_12=[1]), "must each have 2 entries"),
    "scores-dy-batch": lambda p: (*_scores(p, at_0=p.dy[:1]), "dy has batch 1 but x has 2"),
    "scores-dy-3d": lambda p: (*_scores(p, at_0=p.dy[0]), "dy must be 4-D NHWC"),
    "scores-block_size-0": lambda p: (*_scores(p, at_2=0), "block_size must be"),
    "scores-kernel_size-0": lambda p: (*_scores(p, at_3=[0, 3]), "kernel_size must be positive"),
}
