"""The hand-written CUDA convolution kernels (csrc/cuda: native_bsr_conv2d, _dgrad, _wgrad, _grad_scores) against
the float64 F.conv2d oracle, with the problems and the accuracy rule of tests/conv_cases.py (shared with the Triton
kernels' tests), and SparseConv2d on them.

Every test here needs a GPU (marked `cuda`); registration and dispatch of these ops are checked without one in
test_cuda_kernels.py, and their compiled code (no spills, HMMA/LDSM/LDGSTS) in test_cuda_static.py. The cases
cover every ResNet/VGG geometry at small sizes (odd H/W, strides, padding, dilation, the 7x7 stem with 3 channels,
channel counts that are not multiples of the block or of the 16-byte chunk), every block size, fp16/bf16/fp32,
density 0 and 1, empty block-rows and block-columns, and ResNet-sized layers.
"""
import functools
import re

import pytest
import torch
from torch.func import functional_call

import conv_cases
from conftest import assert_layer_matches_reference
import sparsekern as sk
from conv_cases import CASES, GPU_CASES, OPS
from sparsekern import _native, ops

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _native.BUILD_INFO.get("cuda")),
                               reason="needs a CUDA GPU and the CUDA kernels")
pytestmark = [pytest.mark.cuda, needs_gpu]


class NativeOps:
    """The CUDA kernels under the ops' own names, for conv_cases.assert_close_to_oracle."""

    def __getattr__(self, op):
        return getattr(torch.ops.sparsekern, f"native_{op}")


native = NativeOps()
Conv = functools.partial(conv_cases.Conv, device="cuda")
randn = functools.partial(conv_cases.randn, device="cuda")
assert_close_to_oracle = functools.partial(conv_cases.assert_close_to_oracle, kernels=native)
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def exact_fp32_oracles(monkeypatch, matmul_flags):
    """The reference's fp32 GEMMs (the error yardstick) must not run in TF32: the kernels' fp32 path is FFMA."""
    matmul_flags("allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def check_all_ops(problem):
    exact = problem.oracle()
    for op in OPS:
        assert_close_to_oracle(problem, op, exact[op])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_conv_ops(case, dtype):
    check_all_ops(Conv(**CASES[case], dtype=dtype, seed=len(case), bias=dtype != torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_resnet_sized_layers(case, dtype):
    check_all_ops(Conv(**GPU_CASES[case], dtype=dtype, seed=30))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs,cin", [(64, 64), (128, 70), (16, 20), (32, 35)])
def test_block_sizes(bs, cin, dtype):
    """Every block size, with in_channels a multiple of the block and not (a block straddles two taps)."""
    check_all_ops(Conv(batch=2, size=(9, 7), cin=cin, cout=bs + 9, kernel=3, stride=2, padding=1, bs=bs,
                       density=0.7, dtype=dtype, seed=bs))


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("case", ["3x3_s2_p1_cin20", "7x7_s2_p3_stem"])
def test_density_extremes(case, density):
    problem = Conv(**CASES[case], density=density, dtype=torch.float16, seed=7)
    check_all_ops(problem)
    if density == 0:
        y = native.bsr_conv2d(*problem.args("bsr_conv2d"))
        assert torch.equal(y, problem.bias.expand_as(y))
        assert torch.count_nonzero(native.bsr_conv2d_dgrad(*problem.args("bsr_conv2d_dgrad"))) == 0


@pytest.mark.parametrize("cin", [32, 20], ids=["aligned", "unaligned"])
def test_empty_block_rows_and_columns(cin):
    """Block-rows with no blocks give exactly the bias; empty block-columns (a tap's channels) are skipped."""
    problem = Conv(batch=2, size=(7, 9), cin=cin, cout=60, kernel=3, stride=2, padding=1, density=1.0, seed=9,
                   empty_rows=(0, 2), empty_cols=(1, 4, 5))
    check_all_ops(problem)
    y = native.bsr_conv2d(*problem.args("bsr_conv2d"))
    for r in (0, 2):
        assert torch.equal(y[..., r * 16:(r + 1) * 16], problem.bias[r * 16:(r + 1) * 16].expand(*y.shape[:3], 16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wgrad_split_is_deterministic(dtype):
    """A long reduction (M = 8*32*32) over few blocks splits M across CTAs (fp32 partials in a fixed order)."""
    problem = Conv(batch=8, size=(32, 32), cin=16, cout=16, kernel=3, padding=1, density=0.5, dtype=dtype, seed=12)
    args = problem.args("bsr_conv2d_wgrad")
    first = native.bsr_conv2d_wgrad(*args)
    assert_close_to_oracle(problem, "bsr_conv2d_wgrad", problem.oracle()["bsr_conv2d_wgrad"], out=first)
    assert torch.equal(first, native.bsr_conv2d_wgrad(*args))


def test_non_contiguous_inputs():
    """Images given as views (an NCHW tensor permuted to NHWC, a channel slice) are read correctly."""
    problem = Conv(**CASES["3x3_s1_p1"], dtype=torch.float16, seed=3)
    exact = problem.oracle()
    x_view = problem.x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert not x_view.is_contiguous()
    args = problem.args("bsr_conv2d")
    assert_close_to_oracle(problem, "bsr_conv2d", exact["bsr_conv2d"], out=native.bsr_conv2d(x_view, *args[1:]))
    wide = torch.cat([problem.dy, problem.dy[..., :8]], dim=3)[..., :problem.cout]
    dargs = problem.args("bsr_conv2d_dgrad")
    assert_close_to_oracle(problem, "bsr_conv2d_dgrad", exact["bsr_conv2d_dgrad"],
                           out=native.bsr_conv2d_dgrad(wide, *dargs[1:]))


@pytest.mark.parametrize("case", list(conv_cases.CUDA_ERRORS))
def test_errors_name_the_tensor(case):
    """One bad argument per case (a crash names its case): the op raises a message naming it."""
    op, args, message = conv_cases.CUDA_ERRORS[case](conv_cases.error_problem("cuda"))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        getattr(native, op)(*args)


# ResNet-50's first bottleneck 1x1 convolution at training size: batch 128, 56x56, 64 -> 64 channels, block 32, bf16.
# At 90% sparsity its 2 x 2 block grid keeps round(0.4) = 0 blocks; its input gradient failed on the H200.
RESNET50_1X1 = dict(batch=128, size=(56, 56), cin=64, cout=64, kernel=1, bs=32, dtype=torch.bfloat16)


@pytest.mark.parametrize("blocks", [0, 1], ids=["no-blocks", "one-block"])
def test_resnet50_first_bottleneck_dgrad(blocks):
    """The convolution kernels' input gradient (and the other three ops) at that size."""
    layout_kw = dict(density=1.0, empty_rows=(1,), empty_cols=(1,)) if blocks else dict(density=0.0)
    problem = Conv(**RESNET50_1X1, seed=40, **layout_kw)
    assert problem.layout.nnz_blocks == blocks
    check_all_ops(problem)
    if blocks == 0:
        assert torch.count_nonzero(native.bsr_conv2d_dgrad(*problem.args("bsr_conv2d_dgrad"))) == 0


def test_resnet50_first_bottleneck_through_the_layer(backend_env):
    """SparseConv2d's forward and backward at that size with SPARSEKERN_BACKEND=cuda, as the benchmark ran it:
    the 1x1 stride-1 layer's dX is bsr_linear_dx over the [B*H*W, C] pixels, with a layout of no blocks."""
    backend_env("cuda")
    torch.manual_seed(0)
    layer = sk.SparseConv2d(64, 64, 1, bias=False, sparsity=0.9, block_size=32).to("cuda", torch.bfloat16)
    assert layer.layout.nnz_blocks == 0
    x = randn(128, 64, 56, 56, seed=42, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    assert ops.select_backend("bsr_linear_dx", x.device, x.dtype) == "cuda"
    x.requires_grad_()
    y = layer(x)
    y.backward(randn(*y.shape, seed=43, dtype=torch.bfloat16))
    assert torch.count_nonzero(y) == 0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("name", ["3x3_s2_cin20", "stem", "1x1_s2"])
def test_sparse_conv2d_through_the_public_path(name, backend_env):
    """SparseConv2d forward and backward (and the DST block scores) with SPARSEKERN_BACKEND=cuda match the
    reference backend."""
    layers = {"3x3_s2_cin20": dict(in_channels=20, out_channels=24, kernel_size=3, stride=2, padding=1),
              "stem": dict(in_channels=3, out_channels=16, kernel_size=7, stride=2, padding=3, bias=False),
              "1x1_s2": dict(in_channels=32, out_channels=48, kernel_size=1, stride=2)}
    torch.manual_seed(0)
    layer = sk.SparseConv2d(**layers[name], sparsity=0.5, block_size=16).cuda()
    layer.capture_grad_scores = True
    x = randn(2, layer.in_channels, 13, 11, seed=20)
    grad = randn(*layer(x).shape, seed=21)

    def use_backend(name):
        backend_env(name)
        assert ops.select_backend("bsr_conv2d", x.device, x.dtype) == name

    got = assert_layer_matches_reference(layer, x, grad, "cuda", use_backend,
                                         {"grad_scores": lambda m: m.grad_scores})
    dense = layer.to_dense()
    params = dict(dense.named_parameters())
    torch.testing.assert_close(got[0], functional_call(dense, params, (x,)), rtol=1e-4, atol=1e-4)
