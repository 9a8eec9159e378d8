"""The Hopper TMA kernels (triton_kernels/linear_tma.py, wgrad_tma.py, conv_tma.py), run through the Triton launchers
under SPARSEKERN_TRITON_TMA=1, against the references with the same tolerance rules as test_triton_kernels.py and
test_triton_conv.py. Every case that TMA can take also asserts that the TMA kernel ran (its descriptors were made),
and every case it cannot that the pointer kernel did. Without a GPU they run in the interpreter, whose tensor
descriptors zero-fill and clip at the edges as TMA does; on a GPU the `cuda` cases run them at realistic sizes
(compute capability 9.0+).
"""
import functools

import pytest
import torch

# Before sparsekern.triton_kernels (which needs triton): skips this module where the kernels cannot run.
from triton_setup import DEVICE, HAS_CUDA, INTERPRET, small

from sparsekern import triton_kernels as tk
from sparsekern.triton_kernels import _tma, conv_tma, linear_tma, wgrad_tma
from sparsekern.triton_kernels.sddmm import sddmm_splits

import conv_cases
import gemm_cases

if _tma.TensorDescriptor is None:
    pytest.skip("this triton has no host tensor descriptors", allow_module_level=True)

linear_args = functools.partial(gemm_cases.linear_args, device=DEVICE)
dx_args = functools.partial(gemm_cases.dx_args, device=DEVICE)
sddmm_args = functools.partial(gemm_cases.sddmm_args, device=DEVICE)
on_hopper = pytest.mark.skipif(INTERPRET or not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9,
                               reason="needs a GPU of compute capability 9.0+")

# (M, N, K): rows of 16 bytes (TMA's alignment) but no dimension a multiple of the block, so the boxes reach past
# every edge; M = 300 makes more output tiles than the interpreter's 4 persistent programs.
SHAPES = [(37, 72, 56), (300, 104, 40)]


@pytest.fixture
def tma(monkeypatch):
    """Switches the TMA kernels on; returns the list of tensors their descriptors were made of (by any kernel)."""
    monkeypatch.setenv(tk.TMA_ENV, "1")
    made = []
    for module in (linear_tma, wgrad_tma, conv_tma):
        original = module.descriptor
        monkeypatch.setattr(module, "descriptor", lambda t, box, original=original: made.append(t) or original(t, box))
    return made


def _check(op, args, tma_made, expect_tma=True):
    gemm_cases.assert_close_to_reference(op, args, getattr(tk, op)(*args))
    assert bool(tma_made) == expect_tma, f"{op}: the {'TMA' if expect_tma else 'pointer'} kernel should have run"
    tma_made.clear()


@small
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_sparse_gemms_match_the_reference(tma, shape, bs, density, dtype):
    ran = density > 0  # density 0 launches nothing
    _, args = linear_args(shape, bs, density, dtype, seed=1, bias=True)
    _check("bsr_linear", args, tma, ran)
    _, args = linear_args(shape, bs, density, dtype, seed=4, bias=False)
    _check("bsr_linear", args, tma, ran)
    _, args = dx_args(shape, bs, density, dtype, seed=2)
    _check("bsr_linear_dx", args, tma, ran)
    _, args = sddmm_args(shape, bs, density, dtype, seed=3)
    _check("bsr_sddmm", args, tma, ran)


@small
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bs", [16, 32, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_block_grad_scores_match_the_reference(tma, shape, bs, dtype):
    m, n, k = shape
    dy = gemm_cases.randn(m, n, seed=11, dtype=dtype, device=DEVICE)
    x = gemm_cases.randn(m, k, seed=12, dtype=dtype, device=DEVICE)
    _check("block_grad_scores", (dy, x, bs), tma)


@small
def test_sddmm_split_over_m_sums_its_partials(tma):
    shape, bs = (300, 64, 64), 16
    layout, args = sddmm_args(shape, bs, 0.25, torch.float32, seed=13)
    assert sddmm_splits(shape[0], layout.nnz_blocks, torch.device(DEVICE))[0] > 1  # the fp32-partials path
    _check("bsr_sddmm", args, tma)


@small
def test_empty_rows_and_columns_of_blocks(tma):
    _, args = linear_args((70, 96, 96), 32, 0.7, torch.float32, seed=5, empty_rows=(1,), empty_cols=(0, 2))
    _check("bsr_linear", args, tma)
    _, args = dx_args((70, 96, 96), 32, 0.7, torch.float32, seed=6, empty_rows=(1,), empty_cols=(0, 2))
    _check("bsr_linear_dx", args, tma)


@small
def test_operands_tma_cannot_take_run_the_pointer_kernels(tma):
    _, args = linear_args((40, 64, 66), 16, 0.5, torch.float32, seed=7)  # rows of 66 fp32: 264 bytes
    assert "16-byte aligned rows" in _tma.tma_unsupported(args[0])
    _check("bsr_linear", args, tma, expect_tma=False)
    _, args = dx_args((40, 64, 64), 16, 0.5, torch.float16, seed=8)
    dy = torch.zeros(40, 72, dtype=torch.float16, device=DEVICE)[:, 1:65]  # a base address 2 bytes off
    dy.copy_(args[0])
    assert "aligned" in _tma.tma_unsupported(dy)
    _check("bsr_linear_dx", (dy, *args[1:]), tma, expect_tma=False)


@small
def test_the_switch_is_off_by_default(monkeypatch):
    monkeypatch.delenv(tk.TMA_ENV, raising=False)
    assert not tk.tma_enabled()
    monkeypatch.setenv(tk.TMA_ENV, "1")
    assert tk.tma_enabled()


# Stride-1 convolutions TMA takes (in_channels a multiple of the block, aligned channel rows), odd image sizes so
# that the 8 x 8 patches reach past every edge; each pass against the float64 oracle as in test_triton_conv.py.
CONV_CASES = {
    "3x3_p1": dict(batch=2, size=(9, 11), cin=32, cout=40, kernel=3, padding=1),
    "3x3_d2_p2": dict(batch=1, size=(7, 13), cin=32, cout=48, kernel=3, padding=2, dilation=2),
    "3x4_p(1,2)": dict(batch=2, size=(10, 9), cin=16, cout=24, kernel=(3, 4), padding=(1, 2)),
    "3x3_p0": dict(batch=1, size=(12, 10), cin=32, cout=32, kernel=3, bs=32),
    "1x1": dict(batch=1, size=(5, 6), cin=32, cout=32, kernel=1, bs=32, density=1.0),
    "empty_rows": dict(batch=1, size=(9, 9), cin=32, cout=48, kernel=3, padding=1, empty_rows=(1,), density=0.6),
    "split_over_patches": dict(batch=4, size=(12, 12), cin=16, cout=16, kernel=3, padding=1),
}
CONV_OPS = ("bsr_conv2d", "bsr_conv2d_dgrad", "bsr_conv2d_wgrad")


def _check_conv(problem, op, oracle, tma_made, expect_tma=True):
    conv_cases.assert_close_to_oracle(problem, op, oracle[op], tk)
    assert bool(tma_made) == expect_tma, f"{op}: the {'TMA' if expect_tma else 'pointer'} kernel should have run"
    tma_made.clear()


@small
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_passes_match_the_oracle(tma, case, dtype):
    problem = conv_cases.Conv(**CONV_CASES[case], dtype=dtype, seed=30, device=DEVICE)
    if case == "split_over_patches":  # the wgrad's fp32 partials
        m = problem.dy.shape[0] * problem.dy.shape[1] * problem.dy.shape[2]
        assert sddmm_splits(m, problem.layout.nnz_blocks, torch.device(DEVICE))[0] > 1
    oracle = problem.oracle()
    for op in CONV_OPS:
        _check_conv(problem, op, oracle, tma)


# Strided convolutions with H and W multiples of the stride: every pass goes through the stride-phase view.
STRIDED_CASES = {
    "3x3_s2_p1": dict(batch=2, size=(10, 12), cin=32, cout=40, kernel=3, stride=2, padding=1),
    "1x1_s2": dict(batch=2, size=(8, 6), cin=32, cout=32, kernel=1, stride=2, bs=32),
    "3x3_s2_d2_p2": dict(batch=1, size=(12, 12), cin=16, cout=24, kernel=3, stride=2, padding=2, dilation=2),
    "3x4_s(2,3)_p(1,2)": dict(batch=1, size=(8, 9), cin=16, cout=16, kernel=(3, 4), stride=(2, 3), padding=(1, 2)),
}


@small
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", STRIDED_CASES, ids=str)
def test_strided_conv_passes_match_the_oracle(tma, case, dtype):
    problem = conv_cases.Conv(**STRIDED_CASES[case], dtype=dtype, seed=35, device=DEVICE)
    oracle = problem.oracle()
    for op in CONV_OPS:
        _check_conv(problem, op, oracle, tma)


@small
@pytest.mark.parametrize("case", ["3x3_s2_p1_cin20", "3x3_d2_p2_cin35", "1x1_s2_downsample"])
def test_convs_tma_cannot_take_run_the_pointer_kernels(tma, case):
    problem = conv_cases.Conv(**conv_cases.CASES[case], seed=31, device=DEVICE)
    oracle = problem.oracle()
    for op in CONV_OPS:
        _check_conv(problem, op, oracle, tma, expect_tma=False)


def test_phase_chunk_blocks_groups_blocks_by_the_phase_and_chunk_they_reach():
    col_idx = torch.tensor([4, 0, 5, 3, 1, 2], dtype=torch.int32)  # 3 chunks: block-column c = tap * 3 + chunk
    coo_row = torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.int32)
    # Stride 1: one phase, the chunk's blocks at every tap.
    ptr, order, rows, taps = conv_tma.phase_chunk_blocks(col_idx, coo_row, 3, 1, 1, 1, 0, 0, 1, 1)
    assert ptr.tolist() == [0, 2, 4, 6]
    assert order.tolist() == [1, 3, 0, 4, 2, 5]  # chunk 0: columns 0 and 3, chunk 1: 4 and 1, chunk 2: 5 and 2
    assert rows.tolist() == [0, 1, 0, 2, 1, 2] and taps.tolist() == [0, 1, 1, 0, 1, 0]
    assert all(t.dtype == torch.int32 for t in (ptr, order, rows, taps))
    # A 2x1 kernel (kh = tap), stride (2, 1), padding 1 on top: tap 0 reaches dX rows of phase 1, tap 1 phase 0.
    ptr, order, rows, taps = conv_tma.phase_chunk_blocks(col_idx, coo_row, 3, 1, 2, 1, 1, 0, 1, 1)
    assert ptr.tolist() == [0, 1, 2, 3, 4, 5, 6]  # (phase 0: chunks 0, 1, 2), (phase 1: chunks 0, 1, 2)
    assert order.tolist() == [3, 0, 2, 1, 4, 5] and taps.tolist() == [1, 1, 1, 0, 0, 0]


@on_hopper
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(1024, 512, 512, 32, 0.1), (1024, 1024, 512, 64, 0.5),
                                  (1000, 1000, 1024, 128, 0.25), (4096, 768, 768, 16, 0.2)], ids=str)
def test_gpu_realistic(tma, case, dtype):
    m, n, k, bs, density = case
    _, args = linear_args((m, n, k), bs, density, dtype, seed=20)
    _check("bsr_linear", args, tma)
    _, args = dx_args((m, n, k), bs, density, dtype, seed=21)
    _check("bsr_linear_dx", args, tma)
    _, args = sddmm_args((m, n, k), bs, density, dtype, seed=22)
    _check("bsr_sddmm", args, tma)
    _check("block_grad_scores", (args[0], args[1], bs), tma)


@on_hopper
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["resnet_3x3_64", "resnet_3x3_256"])
def test_gpu_conv_passes_realistic(tma, case, dtype):
    problem = conv_cases.Conv(**conv_cases.GPU_CASES[case], dtype=dtype, seed=32, device="cuda")
    oracle = problem.oracle()
    for op in CONV_OPS:
        _check_conv(problem, op, oracle, tma)


@pytest.mark.skipif(INTERPRET or not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_gpu_without_tma_runs_the_pointer_kernels(tma):
    if torch.cuda.get_device_capability()[0] >= 9:
        pytest.skip("this GPU has TMA")
    assert "compute capability 9.0" in _tma.tma_unsupported(torch.zeros(64, 64, device="cuda"))
    _, args = linear_args((64, 64, 64), 16, 0.5, torch.float16, seed=10)
    _check("bsr_linear", args, tma, expect_tma=False)
