"""The Triton kernels (sparsekern.triton_kernels) against sparsekern.reference.

Tolerance is flash-attention's rule: the kernel's error against a float64 reference may be at most twice
the error of the same computation done by plain PyTorch in the kernel's precision (plus one ulp of the
result's magnitude, so that exact cases compare cleanly).

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (which must be set before
sparsekern.triton_kernels is first imported); with a GPU, the same small cases run on CUDA and the
`cuda`-marked cases add bf16 and realistic sizes.
"""
import functools

import pytest
import torch

# Before sparsekern.triton_kernels (which needs triton): skips this module where the kernels cannot run.
from triton_setup import DEVICE, on_gpu, small

import sparsekern as sk
from sparsekern import triton_kernels as tk
from sparsekern.triton_kernels import conv, conv_dgrad, conv_wgrad, grad_scores, linear, linear_dx, sddmm
from sparsekern.triton_kernels._common import dot_precision
from sparsekern.triton_kernels.sddmm import sddmm_splits

import conv_cases
import gemm_cases
from conftest import assert_layer_matches_reference

# (M, N, K): odd sizes, none a multiple of the block; the second makes sddmm split M (see test_sddmm_split).
SHAPES = [(37, 75, 53), (300, 98, 67)]
DENSITIES = [0.0, 0.4, 1.0]


# ----------------------------------------------------------------------------------------------
# Helpers: the shared cases (tests/gemm_cases.py) on this file's device, checking the Triton kernels.

randn = functools.partial(gemm_cases.randn, device=DEVICE)
make_layout = functools.partial(gemm_cases.make_layout, device=DEVICE)
linear_args = functools.partial(gemm_cases.linear_args, device=DEVICE)
dx_args = functools.partial(gemm_cases.dx_args, device=DEVICE)
sddmm_args = functools.partial(gemm_cases.sddmm_args, device=DEVICE)


def assert_close_to_reference(op, args, out=None):
    return gemm_cases.assert_close_to_reference(op, args, getattr(tk, op)(*args) if out is None else out)


DTYPES = [torch.float32, torch.float16]
# The op tests' grids: every dtype, block size and shape, and every density for the sparse GEMMs.
every_shape = gemm_cases.stacked(
    small, pytest.mark.parametrize("dtype", DTYPES, ids=str), pytest.mark.parametrize("bs", [16, 32]),
    pytest.mark.parametrize("shape", SHAPES, ids=str))
every_density = gemm_cases.stacked(every_shape, pytest.mark.parametrize("density", DENSITIES))


# ----------------------------------------------------------------------------------------------
# Each op against the reference

@every_density
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bsr_linear(shape, bs, density, dtype, bias):
    _, args = linear_args(shape, bs, density, dtype, seed=1, bias=bias)
    assert_close_to_reference("bsr_linear", args)


@every_density
def test_bsr_linear_dx(shape, bs, density, dtype):
    _, args = dx_args(shape, bs, density, dtype, seed=2)
    assert_close_to_reference("bsr_linear_dx", args)


@every_density
def test_bsr_sddmm(shape, bs, density, dtype):
    _, args = sddmm_args(shape, bs, density, dtype, seed=3)
    assert_close_to_reference("bsr_sddmm", args)


@every_shape
def test_block_grad_scores(shape, bs, dtype):
    m, n, k = shape
    dy, x = randn(m, n, seed=4, dtype=dtype), randn(m, k, seed=5, dtype=dtype)
    out = tk.block_grad_scores(dy, x, bs)
    assert out.dtype == torch.float32
    assert_close_to_reference("block_grad_scores", (dy, x, bs), out=out)


@small
@pytest.mark.parametrize("bs", [64, 128])
def test_large_blocks_all_ops(bs):
    """The larger block sizes once each, fp32, odd sizes that leave the last block mostly padding."""
    shape = (70, 2 * bs + 5, bs + 9)
    _, args = linear_args(shape, bs, 0.7, torch.float32, seed=6)
    assert_close_to_reference("bsr_linear", args)
    _, args = dx_args(shape, bs, 0.7, torch.float32, seed=7)
    assert_close_to_reference("bsr_linear_dx", args)
    _, args = sddmm_args(shape, bs, 0.7, torch.float32, seed=8)
    assert_close_to_reference("bsr_sddmm", args)
    dy, x = args[0], args[1]
    assert_close_to_reference("block_grad_scores", (dy, x, bs))


@small
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_block_rows_and_columns(dtype):
    """Block-rows with no blocks get exactly the bias (or zeros); empty block-columns get zero dX."""
    shape, bs = (45, 100, 90), 16  # 7 x 6 block grid
    empty = dict(empty_rows=(0, 3, 6), empty_cols=(1, 5))
    layout, args = linear_args(shape, bs, 1.0, dtype, seed=9, **empty)
    y = tk.bsr_linear(*args)
    assert_close_to_reference("bsr_linear", args, out=y)
    bias = args[-1]
    for r in (0, 3):
        assert torch.equal(y[:, r * bs:(r + 1) * bs], bias[r * bs:(r + 1) * bs].expand(shape[0], bs))
    assert torch.equal(y[:, 96:], bias[96:].expand(shape[0], 4))  # last block-row is partial and empty
    args = args[:-1] + (None,)
    assert torch.count_nonzero(tk.bsr_linear(*args)[:, :bs]) == 0

    layout, args = dx_args(shape, bs, 1.0, dtype, seed=10, **empty)
    dx = tk.bsr_linear_dx(*args)
    assert_close_to_reference("bsr_linear_dx", args, out=dx)
    assert torch.count_nonzero(dx[:, bs:2 * bs]) == 0 and torch.count_nonzero(dx[:, 80:]) == 0

    layout, args = sddmm_args(shape, bs, 1.0, dtype, seed=11, **empty)
    assert_close_to_reference("bsr_sddmm", args)


@small
def test_sddmm_split():
    """M = 300 with few blocks takes the split-M path (fp32 partials summed in order) and is deterministic."""
    layout, args = sddmm_args((300, 40, 50), 32, 1.0, torch.float32, seed=12)
    splits, chunk = sddmm_splits(300, layout.nnz_blocks, torch.device(DEVICE))
    assert splits > 1 and splits * chunk >= 300
    first = tk.bsr_sddmm(*args)
    assert_close_to_reference("bsr_sddmm", args, out=first)
    assert torch.equal(first, tk.bsr_sddmm(*args))
    # The padding region of each block (rows past N = 40, columns past K = 50) is exactly zero.
    for i, (r, c) in enumerate(zip(layout.coo_row.tolist(), layout.col_idx.tolist())):
        assert torch.count_nonzero(first[i, max(0, 40 - 32 * r):, :]) == 0
        assert torch.count_nonzero(first[i, :, max(0, 50 - 32 * c):]) == 0


@small
def test_block_grad_scores_single_row_of_m():
    """M smaller than one BLOCK_M step, one block-row of output."""
    dy, x = randn(3, 10, seed=13), randn(3, 70, seed=14)
    assert_close_to_reference("block_grad_scores", (dy, x, 32))


# ----------------------------------------------------------------------------------------------
# Through the public path: ops dispatch and SparseLinear under SPARSEKERN_BACKEND=triton

@small
def test_public_bsr_linear(monkeypatch):
    layout, args = linear_args((33, 70, 50), 16, 0.5, torch.float32, seed=15)
    x, values, bias = args[0], args[1], args[-1]
    monkeypatch.setenv("SPARSEKERN_BACKEND", "triton")
    assert sk.ops.select_backend("bsr_linear", x.device) == "triton"
    y = sk.ops.bsr_linear(x, layout, values, bias)
    assert_close_to_reference("bsr_linear", args, out=y)


@small
def test_sparse_linear_forward_backward(backend_env):
    torch.manual_seed(0)
    layer = sk.SparseLinear(45, 70, bias=True, sparsity=0.5, block_size=16).to(DEVICE)
    x = randn(2, 19, 45, seed=16)
    grad = randn(2, 19, 70, seed=17)

    assert_layer_matches_reference(layer, x, grad, "triton", backend_env, {"dbias": lambda m: m.bias.grad})


# ----------------------------------------------------------------------------------------------
# Argument errors

@small
def test_errors():
    layout, args = linear_args((20, 40, 30), 16, 0.5, torch.float32, seed=18)
    x, values = args[0], args[1]
    with pytest.raises(TypeError, match="float64"):
        tk.bsr_linear(*gemm_cases.as_float64(args))
    with pytest.raises(TypeError, match="float64"):
        tk.block_grad_scores(x.double(), x.double(), 16)
    with pytest.raises(ValueError, match="values have dtype"):
        tk.bsr_linear(x, values.half(), *args[2:])
    with pytest.raises(ValueError, match="block-rows"):
        tk.bsr_linear(x, values, *layout.index_tensors(), 80, None)
    with pytest.raises(ValueError, match="features"):
        tk.bsr_linear(x[:, :10], values, *layout.index_tensors(), 40, None)
    with pytest.raises(ValueError, match="int32"):
        tk.bsr_linear(x, values, layout.row_ptr.long(), *layout.index_tensors()[1:], 40, None)
    with pytest.raises(ValueError, match="block_size"):
        tk.block_grad_scores(x, x, 24)
    with pytest.raises(ValueError, match="rows"):
        tk.bsr_sddmm(x[:5], x, *layout.index_tensors(), 16)


# ----------------------------------------------------------------------------------------------
# fp32 means fp32: tl.dot takes TF32 only where torch's own fp32 matmuls would (the interpreter ignores the
# precision, so these check the choice and that every launcher passes it on)

@pytest.mark.parametrize("flag,value,expected", [
    (None, None, "ieee"),
    ("allow_tf32", True, "tf32"),
    ("fp32_precision", "tf32", "tf32"),  # the API of torch >= 2.9, under which reading allow_tf32 raises
    ("fp32_precision", "ieee", "ieee"),
], ids=["default", "allow_tf32", "fp32_precision_tf32", "fp32_precision_ieee"])
def test_dot_precision_follows_torch(flag, value, expected, matmul_flags):
    if flag is not None:
        matmul_flags(flag, value)
    assert dot_precision(torch.float32) == expected
    # 16-bit inputs ignore the precision: one variant, whatever the flag
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"


GEMM_KERNELS = (linear._bsr_linear_kernel, linear_dx._bsr_linear_dx_kernel, sddmm._bsr_sddmm_kernel,
                grad_scores._block_grad_scores_kernel, conv._bsr_conv2d_kernel, conv_dgrad._bsr_conv2d_dgrad_kernel,
                conv_wgrad._bsr_conv2d_wgrad_kernel, conv_wgrad._conv_grad_scores_kernel)


@pytest.mark.interpreter
@pytest.mark.skipif(DEVICE != "cpu", reason="records the launches instead of running them, which would leave wrong "
                                            "timings in the autotuner; on a GPU test_gpu_fp32_precision checks this")
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_every_launcher_passes_the_precision(allow_tf32, matmul_flags, monkeypatch):
    matmul_flags("allow_tf32", allow_tf32)
    launched = {}
    for kernel in GEMM_KERNELS:  # record the launch instead of running it
        monkeypatch.setattr(kernel, "run", lambda *args, _name=kernel.fn.__name__, **kwargs: launched.setdefault(
            _name, set()).add(kwargs["INPUT_PRECISION"]))
    shape = (40, 50, 60)
    tk.bsr_linear(*linear_args(shape, 16, 0.5, torch.float32, seed=25)[1])
    tk.bsr_linear_dx(*dx_args(shape, 16, 0.5, torch.float32, seed=26)[1])
    args = sddmm_args(shape, 16, 0.5, torch.float32, seed=27)[1]
    tk.bsr_sddmm(*args)
    tk.block_grad_scores(args[0], args[1], 16)
    problem = conv_cases.Conv(**conv_cases.CASES["3x3_s1_p1"], device=DEVICE)
    for op in conv_cases.OPS:
        getattr(tk, op)(*problem.args(op))
    assert launched == {kernel.fn.__name__: {"tf32" if allow_tf32 else "ieee"} for kernel in GEMM_KERNELS}
    # and the autotuner keeps a config per precision (TF32 runs on MMAs, IEEE on FMAs)
    assert "INPUT_PRECISION" in linear._tuned(16, torch.float32, torch.device(DEVICE)).keys


# ----------------------------------------------------------------------------------------------
# On a GPU: bf16/fp16 at realistic sizes, and TF32 on and off for fp32

GPU_CASES = [(1024, 512, 512, 32, 0.1), (1024, 1024, 512, 64, 0.5), (1000, 1000, 1020, 128, 0.25),
             (4096, 768, 768, 16, 0.2)]


@on_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_realistic(case, dtype):
    m, n, k, bs, density = case
    _, args = linear_args((m, n, k), bs, density, dtype, seed=20)
    assert_close_to_reference("bsr_linear", args)
    _, args = dx_args((m, n, k), bs, density, dtype, seed=21)
    assert_close_to_reference("bsr_linear_dx", args)
    _, args = sddmm_args((m, n, k), bs, density, dtype, seed=22)
    assert_close_to_reference("bsr_sddmm", args)
    assert_close_to_reference("block_grad_scores", (args[0], args[1], bs))


@on_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32", "ieee"])
def test_gpu_fp32_precision(allow_tf32, matmul_flags):
    matmul_flags("allow_tf32", allow_tf32)
    _, args = linear_args((512, 512, 384), 64, 0.5, torch.float32, seed=23)
    assert_close_to_reference("bsr_linear", args)
    _, args = sddmm_args((2048, 256, 256), 32, 0.5, torch.float32, seed=24)
    assert_close_to_reference("bsr_sddmm", args)
