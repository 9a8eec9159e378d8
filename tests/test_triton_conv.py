"""The Triton convolution kernels (bsr_conv2d, _dgrad, _wgrad, _grad_scores) and SparseConv2d on them.

Problems, oracle and accuracy rule: tests/conv_cases.py (shared with the CUDA kernels' tests).

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 with small shapes; with one, the same cases run
on CUDA and the `cuda`-marked cases add bf16 and ResNet-sized layers.
"""
import functools

import pytest
import torch
from torch.func import functional_call

import conv_cases
from conftest import block_frobenius_norms
from conv_cases import CASES, GPU_CASES, OPS
# Before sparsekern.triton_kernels (which needs triton): skips this module where the kernels cannot run.
from triton_setup import DEVICE, on_gpu, small

import sparsekern as sk
from sparsekern import reference
from sparsekern import triton_kernels as tk
from sparsekern.triton_kernels.sddmm import sddmm_splits

randn = functools.partial(conv_cases.randn, device=DEVICE)
Conv = functools.partial(conv_cases.Conv, device=DEVICE)
assert_close_to_oracle = functools.partial(conv_cases.assert_close_to_oracle, kernels=tk)


@pytest.fixture(autouse=True)
def exact_fp32_oracles(monkeypatch):
    """nn.Conv2d oracles in fp32 must not run in TF32 on a GPU (cuDNN allows it by default)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


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
def test_gpu_fp32_precision(allow_tf32, matmul_flags, monkeypatch):
    matmul_flags("allow_tf32", allow_tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    problem = Conv(**GPU_CASES["resnet_3x3_s2_128"], dtype=torch.float32, seed=31)
    exact = problem.oracle()
    for op in OPS:
        assert_close_to_oracle(problem, op, exact[op])
