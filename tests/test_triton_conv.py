"""The Triton convolution kernels (bsr_conv2d, _dgrad, _wgrad, _grad_scores) and SparseConv2d on them.

Oracle: F.conv2d in float64 with the dense filter built from the compact blocks by plain loops (conftest), its
autograd for dX and dW, and plain-loop block norms for the scores. Tolerance is flash-attention's rule (as in
test_triton_kernels.py): the kernel's error against that oracle may be at most twice the error of
``sparsekern.reference`` (im2col + dense GEMM) computed in the kernel's precision, plus one ulp of the result.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 with small shapes; with one, the same cases run
on CUDA and the `cuda`-marked cases add bf16 and ResNet-sized layers.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import block_frobenius_norms, conv_weight_from_matrix, dense_matrix

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
if not (INTERPRET or HAS_CUDA):
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

import sparsekern as sk  # noqa: E402
from sparsekern import reference  # noqa: E402
from sparsekern import triton_kernels as tk  # noqa: E402
from sparsekern.triton_kernels.sddmm import sddmm_splits  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
small = pytest.mark.interpreter if DEVICE == "cpu" else pytest.mark.cuda
on_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@pytest.fixture(autouse=True)
def exact_fp32_oracles(monkeypatch):
    """nn.Conv2d oracles in fp32 must not run in TF32 on a GPU (cuDNN allows it by default)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# ----------------------------------------------------------------------------------------------
# Helpers

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype=dtype, device=device)


class Conv:
    """One convolution problem: NHWC image, block-sparse filter, geometry, and the float64 F.conv2d oracle."""

    def __init__(self, batch, size, cin, cout, kernel, stride=1, padding=0, dilation=1, bs=16, density=0.5,
                 dtype=torch.float32, seed=0, bias=True, empty_rows=(), empty_cols=()):
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.cin, self.cout, self.bs, self.dtype = cin, cout, bs, dtype
        height, width = size
        self.output_size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                            zip(size, self.padding, self.dilation, self.kernel, self.stride)]
        shape = (cout, self.kernel[0] * self.kernel[1] * cin)
        grid = (-(-shape[0] // bs), -(-shape[1] // bs))
        mask = torch.ones(grid, dtype=torch.bool) if density >= 1 else torch.rand(grid, generator=_gen(seed)) < density
        for r in empty_rows:
            mask[r] = False
        for c in empty_cols:
            mask[:, c] = False
        self.layout = sk.BlockSparseLayout.from_block_mask(mask.to(DEVICE), bs, shape)
        # Values are random in the blocks' padding too: the kernels must ignore it.
        self.values = randn(self.layout.nnz_blocks, bs, bs, seed=seed + 1, dtype=dtype)
        self.x = randn(batch, height, width, cin, seed=seed + 2, dtype=dtype)
        self.dy = randn(batch, *self.output_size, cout, seed=seed + 3, dtype=dtype)
        self.bias = randn(cout, seed=seed + 4, dtype=dtype) if bias else None
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


def assert_close_to_oracle(problem, op, exact, out=None):
    """Flash-attention rule: |kernel - oracle64| <= 2 |reference in the kernel's dtype - oracle64| + one ulp."""
    args = problem.args(op)
    if out is None:
        out = getattr(tk, op)(*args)
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


# ----------------------------------------------------------------------------------------------
# Each op against the oracle

@small
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_conv_ops(case, dtype):
    problem = Conv(**CASES[case], dtype=dtype, seed=len(case), bias=dtype == torch.float32)
    exact = problem.oracle()
    for op in OPS:
        assert_close_to_oracle(problem, op, exact[op])


@small
@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("case", ["3x3_s2_p1_cin20", "7x7_s2_p3_stem"])
def test_density_extremes(case, density):
    problem = Conv(**CASES[case], density=density, seed=7)
    exact = problem.oracle()
    for op in OPS:
        assert_close_to_oracle(problem, op, exact[op])
    if density == 0:
        y = tk.bsr_conv2d(*problem.args("bsr_conv2d"))
        assert torch.equal(y, problem.bias.expand_as(y))
        assert torch.count_nonzero(tk.bsr_conv2d_dgrad(*problem.args("bsr_conv2d_dgrad"))) == 0


@small
@pytest.mark.parametrize("cin", [32, 20], ids=["aligned", "unaligned"])
def test_empty_block_rows_and_columns(cin):
    """Block-rows with no blocks give exactly the bias; empty block-columns (a tap's channels) are skipped."""
    problem = Conv(batch=2, size=(7, 9), cin=cin, cout=60, kernel=3, stride=2, padding=1, density=1.0, seed=9,
                   empty_rows=(0, 2), empty_cols=(1, 4, 5))
    exact = problem.oracle()
    for op in OPS:
        assert_close_to_oracle(problem, op, exact[op])
    y = tk.bsr_conv2d(*problem.args("bsr_conv2d"))
    for r in (0, 2):
        assert torch.equal(y[..., r * 16:(r + 1) * 16], problem.bias[r * 16:(r + 1) * 16].expand(*y.shape[:3], 16))


@small
def test_large_blocks():
    """Blocks of 64 and 128 once each, with in_channels a multiple of the block and not."""
    for bs, cin in ((64, 64), (128, 70)):
        problem = Conv(batch=1, size=(5, 7), cin=cin, cout=bs + 9, kernel=3, padding=1, bs=bs, density=0.7, seed=bs)
        exact = problem.oracle()
        for op in OPS:
            assert_close_to_oracle(problem, op, exact[op])


@small
def test_wgrad_split():
    """A long reduction (M = 2*13*11 = 286) over few blocks takes the split-M path and stays deterministic."""
    problem = Conv(batch=2, size=(13, 11), cin=16, cout=16, kernel=3, padding=1, density=0.5, seed=12)
    splits, _ = sddmm_splits(2 * 13 * 11, problem.layout.nnz_blocks, torch.device(DEVICE))
    assert splits > 1
    first = tk.bsr_conv2d_wgrad(*problem.args("bsr_conv2d_wgrad"))
    assert_close_to_oracle(problem, "bsr_conv2d_wgrad", problem.oracle()["bsr_conv2d_wgrad"], out=first)
    assert torch.equal(first, tk.bsr_conv2d_wgrad(*problem.args("bsr_conv2d_wgrad")))


@small
def test_errors():
    problem = Conv(**CASES["3x3_s1_p1"])
    args = problem.args("bsr_conv2d")
    with pytest.raises(TypeError, match="float64"):
        tk.bsr_conv2d(*problem.args("bsr_conv2d", torch.float64))
    with pytest.raises(ValueError, match="4-D NHWC"):
        tk.bsr_conv2d(args[0][0], *args[1:])
    with pytest.raises(ValueError, match="block-columns"):
        tk.bsr_conv2d(args[0][..., :16], *args[1:])
    with pytest.raises(ValueError, match="stride"):
        tk.bsr_conv2d(*args[:11], [0, 1], *args[12:])
    with pytest.raises(ValueError, match="block-rows"):
        tk.bsr_conv2d_dgrad(problem.dy[..., :8], *problem.args("bsr_conv2d_dgrad")[1:])
    with pytest.raises(ValueError, match="batch"):
        tk.bsr_conv2d_grad_scores(problem.dy[:1], problem.x, 16, *problem.geometry)
    with pytest.raises(ValueError, match="block_size"):
        tk.bsr_conv2d_wgrad(problem.dy, problem.x, *problem.index, 24, *problem.geometry)


# ----------------------------------------------------------------------------------------------
# SparseConv2d under SPARSEKERN_BACKEND=triton, against nn.Conv2d on the dense weight

LAYERS = {
    "3x3_s1_p1": dict(in_channels=32, out_channels=40, kernel_size=3, padding=1),
    "3x3_s2_cin20_nobias": dict(in_channels=20, out_channels=24, kernel_size=3, stride=2, padding=1, bias=False),
    "1x1_s1_gemm": dict(in_channels=24, out_channels=33, kernel_size=1),
    "1x1_s2": dict(in_channels=32, out_channels=48, kernel_size=1, stride=2),
    "stem": dict(in_channels=3, out_channels=16, kernel_size=7, stride=2, padding=3, bias=False),
    "same_dilated_reflect": dict(in_channels=16, out_channels=20, kernel_size=3, padding="same", dilation=2,
                                 padding_mode="reflect"),
}


def _layer(name, seed=0):
    torch.manual_seed(seed)
    return sk.SparseConv2d(**LAYERS[name], sparsity=0.5, block_size=16).to(DEVICE)


@small
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_sparse_conv2d_matches_conv2d(name, memory_format, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "triton")
    layer = _layer(name)
    x = randn(2, layer.in_channels, 11, 9, seed=20).contiguous(memory_format=memory_format).requires_grad_()
    if layer.kernel_size != (1, 1) or layer.stride != (1, 1):
        assert layer._implicit_gemm_applies(x)  # any in_channels: Triton decodes the taps per column
    # No im2col anywhere on the Triton path.
    monkeypatch.setattr(reference, "unfold_nhwc", _no_im2col)
    y = layer(x)
    dense = layer.to_dense()
    weight = dense.weight.detach().requires_grad_()
    params = {"weight": weight} if layer.bias is None else {"weight": weight, "bias": layer.bias}
    expected = functional_call(dense, params, (x,))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    dy = randn(*y.shape, seed=21)
    inputs = [x, layer.values] + ([layer.bias] if layer.bias is not None else [])
    got = torch.autograd.grad(y, inputs, dy)
    want = torch.autograd.grad(expected, [x, weight] + inputs[2:], dy)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4, msg="dx")
    matrix = layer._weight_to_matrix(want[1])
    blocks = reference.dense_to_blocks(matrix, layer.layout.coo_row, layer.layout.col_idx, 16)
    torch.testing.assert_close(got[1], blocks, rtol=1e-4, atol=1e-4, msg="dvalues")
    if layer.bias is not None:
        torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4, msg="dbias")


def _no_im2col(*args, **kwargs):
    raise AssertionError("the Triton path must not build im2col")


@small
@pytest.mark.parametrize("name", ["3x3_s2_cin20_nobias", "stem", "1x1_s1_gemm"])
def test_sparse_conv2d_captures_grad_scores(name, monkeypatch):
    """DST update steps keep the implicit path and record the dense filter gradient's block norms."""
    monkeypatch.setenv("SPARSEKERN_BACKEND", "triton")
    layer = _layer(name, seed=1)
    layer.capture_grad_scores = True
    x = randn(2, layer.in_channels, 9, 11, seed=22)
    assert layer._implicit_gemm_applies(x)
    monkeypatch.setattr(reference, "unfold_nhwc", _no_im2col)
    y = layer(x)
    dy = randn(*y.shape, seed=23)
    y.backward(dy)
    dense = layer.to_dense()
    dense(x).backward(dy)
    expected = block_frobenius_norms(layer._weight_to_matrix(dense.weight.grad).double(), 16)
    assert layer.grad_scores.dtype == torch.float32
    torch.testing.assert_close(layer.grad_scores.double(), expected.to(DEVICE), rtol=1e-4, atol=1e-4)


@small
def test_sparse_conv2d_autocast(monkeypatch):
    """Under autocast the implicit path runs in the autocast dtype with the fp32 values as master weights."""
    monkeypatch.setenv("SPARSEKERN_BACKEND", "triton")
    layer = _layer("3x3_s2_cin20_nobias", seed=2)
    x = randn(2, 20, 9, 11, seed=24)
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert layer._implicit_gemm_applies(x)
        y = layer(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32
    expected = layer.to_dense()(x)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------
# On a GPU: bf16/fp16 at ResNet sizes (batch 8), TF32 on and off for fp32

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


@on_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_realistic(case, dtype):
    problem = Conv(**GPU_CASES[case], dtype=dtype, seed=30)
    exact = problem.oracle()
    for op in OPS:
        assert_close_to_oracle(problem, op, exact[op])


@on_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32", "ieee"])
def test_gpu_fp32_precision(allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    problem = Conv(**GPU_CASES["resnet_3x3_s2_128"], dtype=torch.float32, seed=31)
    exact = problem.oracle()
    for op in OPS:
        assert_close_to_oracle(problem, op, exact[op])
