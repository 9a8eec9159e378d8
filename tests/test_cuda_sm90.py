"""The Hopper kernels of the cuda backend (csrc/cuda/bsr_gemm_sm90.cu and bsr_conv_sm90.cu: TMA loads, wgmma,
CUTLASS's CuTe), which bsr_linear, bsr_linear_dx, bsr_sddmm, block_grad_scores and the convolution's three passes
run under SPARSEKERN_CUDA_SM90=1 on a compute capability 9.0 GPU.

Without a GPU (CI) only the build fact runs; tests/test_cuda_static.py checks their SASS (HGMMA, UTMALDG, no
spills). On an H100/H200 each case checks, with the profiler, which kernel ran (the Hopper one where it takes the
call, the mma.sync one where it does not) and its result against the reference by design §6's rule.
"""
import functools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sparsekern import _native
from sparsekern._build_paths import cutlass_include

import conv_cases
import gemm_cases

BUILT = bool(_native.BUILD_INFO.get("cuda_sm90_gemms"))
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not (BUILT and ON_HOPPER),
                                  reason="needs the Hopper GEMMs built and a compute capability 9.0 GPU")

linear_args = functools.partial(gemm_cases.linear_args, device="cuda")
dx_args = functools.partial(gemm_cases.dx_args, device="cuda")
sddmm_args = functools.partial(gemm_cases.sddmm_args, device="cuda")

HOPPER_KERNEL, MMA_SYNC_KERNEL = "bsr_gemm_sm90_kernel", "bsr_gemm_kernel<"
HOPPER_SDDMM, MMA_SYNC_SDDMM, SUM_PARTIALS = "bsr_sddmm_sm90_kernel", "weight_grad_kernel<", "sum_partials_kernel"
HOPPER_SCORES = "block_scores_sm90_kernel"
HOPPER_CONV, HOPPER_CONV_DGRAD, HOPPER_CONV_WGRAD = ("bsr_conv2d_sm90_kernel", "bsr_conv2d_dgrad_sm90_kernel",
                                                   "bsr_conv2d_wgrad_sm90_kernel")
MMA_SYNC_CONV_DGRAD = "conv_dgrad_kernel"


@pytest.mark.skipif(not _native.BUILD_INFO.get("cuda"), reason="sparsekern._C was built without CUDA kernels")
def test_built_wherever_cutlass_headers_are_found():
    """setup.py compiles bsr_gemm_sm90.cu exactly where it finds CUTLASS's headers (the Makefile installs them)."""
    assert BUILT == (cutlass_include() is not None)


@pytest.fixture
def hopper_switch(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CUDA_SM90", "1")


def run_and_name_kernels(op, args):
    """The op's output and the names of the CUDA kernels it launched."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = getattr(torch.ops.sparsekern, f"native_{op}")(*args)
        torch.cuda.synchronize()
    return out, [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def assert_ran(kernels, name):
    assert any(name in k for k in kernels), f"expected {name} among the launched kernels {kernels}"


# (M, N, K): N and K multiples of both block sizes (no padded blocks), M never a multiple of the 128-row tile; the
# SDDMM splits M = 1000 into chunks of 384 rows (sddmm_plan, few blocks) and M = 37 and 300 not at all.
SHAPES = [(37, 256, 384), (300, 128, 640), (1000, 384, 256)]
hopper_cases = gemm_cases.stacked(
    pytest.mark.cuda, needs_hopper, pytest.mark.parametrize("shape", SHAPES, ids=str),
    pytest.mark.parametrize("density", [0.0, 0.4, 1.0]), pytest.mark.parametrize("bs", [64, 128]),
    pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@hopper_cases
def test_bsr_linear(hopper_switch, dtype, bs, density, shape, bias):
    layout, args = linear_args(shape, bs, density, dtype, seed=31, bias=bias)
    out, kernels = run_and_name_kernels("bsr_linear", args)
    # A layout without blocks has nothing to load: the mma.sync kernel writes its zeros (or the bias).
    assert_ran(kernels, HOPPER_KERNEL if layout.nnz_blocks > 0 else MMA_SYNC_KERNEL)
    gemm_cases.assert_close_to_reference("bsr_linear", args, out)


@hopper_cases
def test_bsr_linear_dx(hopper_switch, dtype, bs, density, shape):
    layout, args = dx_args(shape, bs, density, dtype, seed=32)
    out, kernels = run_and_name_kernels("bsr_linear_dx", args)
    assert_ran(kernels, HOPPER_KERNEL if layout.nnz_blocks > 0 else MMA_SYNC_KERNEL)
    gemm_cases.assert_close_to_reference("bsr_linear_dx", args, out)


@hopper_cases
def test_bsr_sddmm(hopper_switch, dtype, bs, density, shape):
    layout, args = sddmm_args(shape, bs, density, dtype, seed=37)
    out, kernels = run_and_name_kernels("bsr_sddmm", args)
    if layout.nnz_blocks > 0:  # none: nothing to compute, no kernel
        assert_ran(kernels, HOPPER_SDDMM)
        assert not any(MMA_SYNC_SDDMM in k for k in kernels)
        assert any(SUM_PARTIALS in k for k in kernels) == (shape[0] == 1000)
    gemm_cases.assert_close_to_reference("bsr_sddmm", args, out)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("shape", SHAPES + [(2000, 128, 256)], ids=str)
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_block_grad_scores(hopper_switch, dtype, bs, shape):
    """fp32 norms of the dense gradient's blocks: the rule holds only if the sums round to nearest (M = 2000: a long
    reduction, where truncating accumulation missed it on the H200)."""
    m, n, k = shape
    dy = gemm_cases.randn(m, n, seed=40, dtype=dtype, device="cuda")
    x = gemm_cases.randn(m, k, seed=41, dtype=dtype, device="cuda")
    out, kernels = run_and_name_kernels("block_grad_scores", (dy, x, bs))
    assert_ran(kernels, HOPPER_SCORES)
    assert out.dtype == torch.float32 and out.shape == (n // bs, k // bs)
    gemm_cases.assert_close_to_reference("block_grad_scores", (dy, x, bs), out)
    again, _ = run_and_name_kernels("block_grad_scores", (dy, x, bs))
    assert torch.equal(out, again)  # a fixed summation order


# Stride-1 convolutions with channels multiples of the block: the image patches' TMA boxes overhang the image on
# every side (padding 1 and 2, dilation 2, odd sizes, 7x7 output smaller than one 8 x 16 patch), empty block-rows;
# the filter gradient splits the output pixels of the larger ones (sddmm_plan: few blocks, over 256 pixels).
CONV_CASES = {
    "3x3_p1_odd": dict(batch=2, size=(9, 19), cin=128, cout=128, kernel=3, padding=1, bs=64, density=0.5),
    "3x3_p2_d2": dict(batch=2, size=(13, 11), cin=128, cout=256, kernel=3, padding=2, dilation=2, bs=128,
                      density=0.6),
    "resnet_7x7_256": dict(batch=4, size=(7, 7), cin=256, cout=256, kernel=3, padding=1, bs=64, density=0.3),
    "3x1_p0_empty_rows": dict(batch=1, size=(20, 33), cin=64, cout=192, kernel=(3, 1), bs=64, density=1.0,
                              empty_rows=(1,)),
}


# The three passes: op -> (the Hopper kernel, the mma.sync kernel).
CONV_KERNELS = {"bsr_conv2d": (HOPPER_CONV, MMA_SYNC_KERNEL),
                "bsr_conv2d_dgrad": (HOPPER_CONV_DGRAD, MMA_SYNC_CONV_DGRAD),
                "bsr_conv2d_wgrad": (HOPPER_CONV_WGRAD, MMA_SYNC_SDDMM)}


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("op", CONV_KERNELS)
def test_convolution(hopper_switch, op, case, dtype):
    problem = conv_cases.Conv(**CONV_CASES[case], dtype=dtype, seed=42, device="cuda")
    out, kernels = run_and_name_kernels(op, problem.args(op))
    assert_ran(kernels, CONV_KERNELS[op][0])
    conv_cases.assert_close_to_oracle(problem, op, problem.oracle()[op], None, out=out)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("case", ["stride 2", "channels not a multiple of the block"])
@pytest.mark.parametrize("op", CONV_KERNELS)
def test_convolutions_it_does_not_take_run_the_mma_sync_kernel(hopper_switch, op, case):
    geometry = dict(batch=2, size=(9, 11), cin=64, cout=64, kernel=3, padding=1, bs=64, density=0.5)
    if case == "stride 2":
        geometry["stride"] = 2
    else:
        geometry["cin"] = 96
    problem = conv_cases.Conv(**geometry, dtype=torch.bfloat16, seed=43, device="cuda")
    out, kernels = run_and_name_kernels(op, problem.args(op))
    hopper, mma_sync = CONV_KERNELS[op]
    assert_ran(kernels, mma_sync)
    assert not any(hopper in k for k in kernels)
    conv_cases.assert_close_to_oracle(problem, op, problem.oracle()[op], None, out=out)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("bs", [64, 128])
def test_empty_lines_get_the_bias_or_zeros(hopper_switch, bs):
    shape = (130, 4 * bs, 3 * bs)
    layout, args = linear_args(shape, bs, 1.0, torch.bfloat16, seed=33, empty_rows=(1,), empty_cols=(2,))
    y, kernels = run_and_name_kernels("bsr_linear", args)
    assert_ran(kernels, HOPPER_KERNEL)
    bias = args[-1]
    assert torch.equal(y[:, bs:2 * bs], bias[bs:2 * bs].expand(shape[0], bs))
    _, dx_case = dx_args(shape, bs, 1.0, torch.bfloat16, seed=34, empty_rows=(1,), empty_cols=(2,))
    dx, _ = run_and_name_kernels("bsr_linear_dx", dx_case)
    assert torch.count_nonzero(dx[:, 2 * bs:3 * bs]) == 0
    gemm_cases.assert_close_to_reference("bsr_linear_dx", dx_case, dx)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("case", ["padded blocks", "fp32", "block 32", "unaligned rows"])
def test_calls_it_does_not_take_run_the_mma_sync_kernel(hopper_switch, case):
    shape, bs, dtype = (200, 256, 384), 64, torch.bfloat16
    if case == "padded blocks":
        shape = (200, 250, 380)
    elif case == "fp32":
        dtype = torch.float32
    elif case == "block 32":
        bs = 32
    layout, args = linear_args(shape, bs, 0.5, dtype, seed=35)
    if case == "unaligned rows":  # rows 3 elements apart from a 16-byte boundary: TMA cannot read them
        wide = torch.zeros(shape[0], shape[2] + 3, dtype=dtype, device="cuda")
        wide[:, :shape[2]] = args[0]
        args = (wide[:, :shape[2]], *args[1:])
    out, kernels = run_and_name_kernels("bsr_linear", args)
    assert_ran(kernels, MMA_SYNC_KERNEL)
    assert not any(HOPPER_KERNEL in k for k in kernels)
    gemm_cases.assert_close_to_reference("bsr_linear", args, out)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("case", ["padded blocks", "fp32", "unaligned rows"])
def test_sddmm_calls_it_does_not_take_run_the_mma_sync_kernel(hopper_switch, case):
    shape, dtype = ((200, 250, 380) if case == "padded blocks" else (200, 256, 384)), torch.bfloat16
    if case == "fp32":
        dtype = torch.float32
    layout, args = sddmm_args(shape, 64, 0.5, dtype, seed=38)
    if case == "unaligned rows":
        wide = torch.zeros(shape[0], shape[2] + 3, dtype=dtype, device="cuda")
        wide[:, :shape[2]] = args[1]
        args = (args[0], wide[:, :shape[2]], *args[2:])
    out, kernels = run_and_name_kernels("bsr_sddmm", args)
    assert_ran(kernels, MMA_SYNC_SDDMM)
    assert not any(HOPPER_SDDMM in k for k in kernels)
    gemm_cases.assert_close_to_reference("bsr_sddmm", args, out)


@pytest.mark.cuda
@needs_hopper
def test_off_without_the_switch(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_CUDA_SM90", raising=False)
    _, args = linear_args((200, 256, 384), 64, 0.5, torch.bfloat16, seed=36)
    _, kernels = run_and_name_kernels("bsr_linear", args)
    assert_ran(kernels, MMA_SYNC_KERNEL)
    _, args = sddmm_args((200, 256, 384), 64, 0.5, torch.bfloat16, seed=39)
    _, kernels = run_and_name_kernels("bsr_sddmm", args)
    assert_ran(kernels, MMA_SYNC_SDDMM)
    _, kernels = run_and_name_kernels("block_grad_scores", (args[0], args[1], 64))
    assert_ran(kernels, MMA_SYNC_SDDMM)
    assert not any(HOPPER_SCORES in k for k in kernels)
