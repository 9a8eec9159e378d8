"""The hand-written CUDA backend (csrc/cuda): registration, dispatch and the glue's argument checks everywhere, and
on a GPU every GEMM op against sparsekern.reference.

Without a GPU (CI) the registration and dispatch tests run (the extension is compiled with CUDA there), and every
bad-argument case of the CUDA glue on fake CUDA tensors. The `cuda`-marked tests need a GPU. Tolerance is design §6's rule (flash-attention's): the kernel's error against
a float64 reference may be at most twice the error of the same computation done by plain PyTorch in the kernel's
precision, plus one ulp of the result's magnitude. Shapes cover the kernels' two load paths: odd feature counts
(element-by-element copies) and multiples of 8 (16-byte cp.async copies), none a multiple of the block size,
M not a multiple of the 128-row tile; and every block size, fp16/bf16/fp32, densities 0, 0.4 and 1, empty
block-rows and block-columns. Then compute-sanitizer (memcheck, racecheck) over small cases of every kernel
(tests/cuda_sanitizer_cases.py).
"""
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsekern as sk
from sparsekern import _native, ops

import conv_cases
import gemm_cases
from conftest import assert_layer_matches_reference

HAS_GPU = torch.cuda.is_available()
BUILT_WITH_CUDA = bool(_native.BUILD_INFO.get("cuda"))
# Every op has a hand-written CUDA kernel; listed by name so that a new op fails here until it has one (and tests).
CUDA_OPS = ("bsr_linear", "bsr_linear_dx", "bsr_sddmm", "block_grad_scores", "bsr_conv2d", "bsr_conv2d_dgrad",
            "bsr_conv2d_wgrad", "bsr_conv2d_grad_scores", "build_layout_index_", "masked_sgd_")
# The GEMMs and convolutions: fp16/bf16/fp32 kernels, float64 on the reference.
GEMM_OPS = ("bsr_linear", "bsr_linear_dx", "bsr_sddmm", "block_grad_scores", "bsr_conv2d", "bsr_conv2d_dgrad",
            "bsr_conv2d_wgrad", "bsr_conv2d_grad_scores")

built_with_cuda = pytest.mark.skipif(not BUILT_WITH_CUDA, reason="sparsekern._C was built without CUDA kernels")
needs_gpu = pytest.mark.skipif(not (HAS_GPU and BUILT_WITH_CUDA), reason="needs a CUDA GPU and the CUDA kernels")


# ----------------------------------------------------------------------------------------------
# Registration and dispatch (no GPU needed)

@built_with_cuda
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernel_registered(op):
    assert _native.has_kernel(f"native_{op}", "cuda")
    assert "cuda" in _native.BUILD_INFO["native_ops"][f"native_{op}"]


@built_with_cuda
def test_every_op_is_listed():
    assert set(CUDA_OPS) == set(ops.OPS)


@built_with_cuda
@pytest.mark.parametrize("op", GEMM_OPS)
def test_forced_cuda_backend_routes_to_the_kernels(op, backend_env):
    """SPARSEKERN_BACKEND=cuda runs the native kernels for fp16/bf16/fp32, and the reference for fp64 (which the
    CUDA GEMMs and convolutions refuse)."""
    backend_env("cuda")
    device = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert ops.select_backend(op, device, dtype) == "cuda"
    assert ops.select_backend(op, device, torch.float64) == "reference"
    assert not _native.has_kernel(f"native_{op}", "cuda", torch.float64)
    assert _native.has_kernel(f"native_{op}", "cpu", torch.float64)


# The bad-argument cases of the CUDA glue (tests/gemm_cases.py and tests/conv_cases.py, CUDA_ERRORS): each raises
# its own message from the op's checks, before any data is read, any device is queried or any kernel launched.
ERROR_CASES = {**{f"gemm:{case}": (gemm_cases.CUDA_ERRORS[case], gemm_cases.error_problem)
                  for case in gemm_cases.CUDA_ERRORS},
               **{f"conv:{case}": (conv_cases.CUDA_ERRORS[case], conv_cases.error_problem)
                  for case in conv_cases.CUDA_ERRORS}}


def _fake_cuda(problem, mode):
    """A copy of an error problem (a dict, or a conv_cases.Conv) whose tensors are fake CUDA tensors of `mode`:
    shapes, dtypes and a device, no memory."""
    def fake(t):
        return mode.from_tensor(t).to("cuda") if isinstance(t, torch.Tensor) else t

    with mode:
        if isinstance(problem, dict):
            return {k: [fake(t) for t in v] if isinstance(v, list) else fake(v) for k, v in problem.items()}
        fake_problem = copy.copy(problem)
        for name in ("x", "dy", "values", "bias"):
            setattr(fake_problem, name, fake(getattr(problem, name)))
        fake_problem.index = tuple(fake(t) for t in problem.index)
        return fake_problem


@built_with_cuda
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_glue_checks_come_first(case):
    """Every bad-argument case through the CUDA kernel's glue, on fake CUDA tensors (no GPU needed): it must raise
    its own message. A glue that read data, queried the device or made a guard before that check would fail here
    (no GPU, no memory behind the tensors) with another error; on a GPU it could crash instead."""
    build, make_problem = ERROR_CASES[case]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    problem = _fake_cuda(make_problem(), mode)
    with mode:
        op, args, message = build(problem)
    cuda_kernel = getattr(torch.ops.sparsekern, f"native_{op}").default
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cuda_kernel.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


# ----------------------------------------------------------------------------------------------
# Helpers (GPU)

randn = functools.partial(gemm_cases.randn, device="cuda")
make_layout = functools.partial(gemm_cases.make_layout, device="cuda")
random_values = gemm_cases.random_values
linear_args = functools.partial(gemm_cases.linear_args, device="cuda")
dx_args = functools.partial(gemm_cases.dx_args, device="cuda")
sddmm_args = functools.partial(gemm_cases.sddmm_args, device="cuda")


def native(op):
    return getattr(torch.ops.sparsekern, f"native_{op}")


def assert_close_to_reference(op, args, out=None):
    """design §6's rule (tests/gemm_cases.py) on the CUDA kernel's output."""
    return gemm_cases.assert_close_to_reference(op, args, native(op)(*args) if out is None else out)


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BLOCK_SIZES = [16, 32, 64, 128]
# (M, N, K): odd features (element-wise loads) and multiples of 8 (cp.async), never multiples of the block.
SHAPES = [(37, 75, 53), (300, 98, 67), (200, 96, 136), (257, 264, 80)]
DENSITIES = [0.0, 0.4, 1.0]

# The op tests' grids, on a GPU only: every dtype, block size and shape, and every density for the sparse GEMMs.
on_gpu_every_shape = gemm_cases.stacked(
    pytest.mark.cuda, needs_gpu, pytest.mark.parametrize("shape", SHAPES, ids=str),
    pytest.mark.parametrize("bs", BLOCK_SIZES), pytest.mark.parametrize("dtype", DTYPES, ids=str))
on_gpu_every_density = gemm_cases.stacked(pytest.mark.parametrize("density", DENSITIES), on_gpu_every_shape)


# ----------------------------------------------------------------------------------------------
# Each op against the reference (GPU)

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@on_gpu_every_density
def test_bsr_linear(dtype, bs, shape, density, bias):
    _, args = linear_args(shape, bs, density, dtype, seed=1, bias=bias)
    assert_close_to_reference("bsr_linear", args)


@on_gpu_every_density
def test_bsr_linear_dx(dtype, bs, shape, density):
    _, args = dx_args(shape, bs, density, dtype, seed=2)
    assert_close_to_reference("bsr_linear_dx", args)


@on_gpu_every_density
def test_bsr_sddmm(dtype, bs, shape, density):
    layout, args = sddmm_args(shape, bs, density, dtype, seed=3)
    out = assert_close_to_reference("bsr_sddmm", args)
    # The padding of every block (rows past N, columns past K) is exactly zero.
    pad = 1.0 - layout.padding_mask()
    assert torch.count_nonzero(out.float() * pad) == 0


@on_gpu_every_shape
def test_block_grad_scores(dtype, bs, shape):
    m, n, k = shape
    dy, x = randn(m, n, seed=4, dtype=dtype), randn(m, k, seed=5, dtype=dtype)
    out = native("block_grad_scores")(dy, x, bs)
    assert out.dtype == torch.float32
    assert_close_to_reference("block_grad_scores", (dy, x, bs), out=out)


@pytest.mark.cuda
@needs_gpu
class TestOnGpu:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_empty_block_rows_and_columns(self, dtype):
        """Block-rows without blocks get exactly the bias (or zeros); empty block-columns get a zero dX."""
        shape, bs = (45, 100, 90), 16  # a 7 x 6 block grid
        empty = dict(empty_rows=(0, 3, 6), empty_cols=(1, 5))
        _, args = linear_args(shape, bs, 1.0, dtype, seed=9, **empty)
        y = assert_close_to_reference("bsr_linear", args)
        bias = args[-1]
        for r in (0, 3):
            assert torch.equal(y[:, r * bs:(r + 1) * bs], bias[r * bs:(r + 1) * bs].expand(shape[0], bs))
        assert torch.equal(y[:, 96:], bias[96:].expand(shape[0], 4))  # the last block-row: partial and empty
        assert torch.count_nonzero(native("bsr_linear")(*args[:-1], None)[:, :bs]) == 0

        _, args = dx_args(shape, bs, 1.0, dtype, seed=10, **empty)
        dx = assert_close_to_reference("bsr_linear_dx", args)
        assert torch.count_nonzero(dx[:, bs:2 * bs]) == 0 and torch.count_nonzero(dx[:, 80:]) == 0

        _, args = sddmm_args(shape, bs, 1.0, dtype, seed=11, **empty)
        assert_close_to_reference("bsr_sddmm", args)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("bs", BLOCK_SIZES)
    def test_sddmm_split_m(self, dtype, bs):
        """Few blocks and a long M: the M-chunks go to different CTAs (fp32 partials summed in a fixed order).
        With 4 blocks and M = 4096 the plan asks for min(#SMs, 4096 / 256) > 1 chunks on any multi-SM GPU."""
        layout, args = sddmm_args((4096, 2 * bs - 3, 2 * bs - 5), bs, 1.0, dtype, seed=12)
        assert layout.nnz_blocks == 4
        assert torch.cuda.get_device_properties(0).multi_processor_count > 1
        first = assert_close_to_reference("bsr_sddmm", args)
        assert torch.equal(first, native("bsr_sddmm")(*args)), "the split SDDMM is not deterministic"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_strided_operands(self, dtype):
        """Rows with a stride wider than the features (a column slice) and a transposed operand (copied)."""
        layout, args = linear_args((130, 70, 90), 32, 0.6, dtype, seed=13)
        wide = randn(130, 104, seed=14, dtype=dtype)
        x = wide[:, 8:98]
        assert x.stride(0) == 104
        assert_close_to_reference("bsr_linear", (x,) + args[1:])
        x_t = randn(90, 130, seed=15, dtype=dtype).t()
        assert_close_to_reference("bsr_linear", (x_t,) + args[1:])
        _, sargs = sddmm_args((130, 70, 90), 32, 0.6, dtype, seed=16)
        assert_close_to_reference("bsr_sddmm", (sargs[0], x) + sargs[2:])
        assert_close_to_reference("block_grad_scores", (sargs[0], x, 32))

    def test_empty_m(self):
        _, args = linear_args((0, 40, 30), 16, 0.5, torch.float16, seed=17)
        assert native("bsr_linear")(*args).shape == (0, 40)
        _, args = sddmm_args((0, 40, 30), 16, 0.5, torch.float16, seed=18)
        out = native("bsr_sddmm")(*args)
        assert out.shape[1:] == (16, 16) and torch.count_nonzero(out) == 0
        scores = native("block_grad_scores")(args[0], args[1], 16)
        assert scores.shape == (3, 2) and torch.count_nonzero(scores) == 0

    @pytest.mark.parametrize("case", list(gemm_cases.CUDA_ERRORS))
    def test_errors_name_the_tensor(self, case):
        """One bad argument per case (a crash names its case): the op raises a message naming it."""
        op, args, message = gemm_cases.CUDA_ERRORS[case](gemm_cases.error_problem("cuda"))
        with pytest.raises(RuntimeError, match=re.escape(message)):
            native(op)(*args)

    @pytest.mark.parametrize("blocks", [0, 1], ids=["no-blocks", "one-block"])
    def test_resnet50_first_bottleneck_dx(self, blocks):
        """dX of ResNet-50's first bottleneck 1x1 convolution at training size, as SparseConv2d runs it (a 1x1
        stride-1 convolution is bsr_linear_dx on the [B*H*W, C] pixels): M = 128*56*56 rows, 64 -> 64 channels,
        block 32, bf16. At 90% sparsity its 2 x 2 block grid keeps round(0.4) = 0 blocks, and the empty layout's
        perm (a zero-byte tensor, null data pointer) made the launcher refuse the call on the H200."""
        layout_kw = dict(empty_rows=(1,), empty_cols=(1,)) if blocks else {}
        layout, args = dx_args((128 * 56 * 56, 64, 64), 32, float(blocks), torch.bfloat16, seed=26, **layout_kw)
        assert layout.nnz_blocks == blocks
        dx = assert_close_to_reference("bsr_linear_dx", args)
        if blocks == 0:
            assert torch.count_nonzero(dx) == 0

    def test_sparse_linear_through_the_public_path(self, backend_env):
        """SparseLinear forward and backward with SPARSEKERN_BACKEND=cuda match the reference backend."""
        torch.manual_seed(0)
        layer = sk.SparseLinear(150, 70, bias=True, sparsity=0.5, block_size=32).cuda()
        x = randn(3, 41, 150, seed=20)
        grad = randn(3, 41, 70, seed=21)

        def use_backend(name):
            backend_env(name)
            assert ops.select_backend("bsr_linear", x.device, x.dtype) == name

        assert_layer_matches_reference(layer, x, grad, "cuda", use_backend, {"dbias": lambda m: m.bias.grad})


# ----------------------------------------------------------------------------------------------
# compute-sanitizer over small cases of every kernel (GPU)

def _compute_sanitizer():
    path = shutil.which("compute-sanitizer")
    if path:
        return path
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (os.path.join(home, "bin", "compute-sanitizer"),
                      os.path.join(home, "compute-sanitizer", "compute-sanitizer")):
        if os.path.exists(candidate):
            return candidate
    return None


@pytest.mark.cuda
@needs_gpu
@pytest.mark.skipif(_compute_sanitizer() is None, reason="needs compute-sanitizer")
@pytest.mark.parametrize("tool,subset", [("memcheck", "all"), ("racecheck", "small")])
def test_compute_sanitizer(tool, subset):
    # Without the caching allocator every tensor is its own allocation, so an access past its end is caught.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    script = Path(__file__).with_name("cuda_sanitizer_cases.py")
    proc = subprocess.run([_compute_sanitizer(), f"--tool={tool}", "--error-exitcode=1", "--print-limit=20",
                           sys.executable, str(script), subset],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, f"compute-sanitizer --tool={tool}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "cases ran" in proc.stdout, proc.stdout[-3000:]
