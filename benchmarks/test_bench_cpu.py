"""pytest-benchmark cases for the native CPU kernels (not part of the test run: testpaths is tests/).

    .venv/bin/python -m pytest benchmarks/test_bench_cpu.py --benchmark-columns=median,iqr,rounds

Each op is benchmarked next to the dense torch op it replaces, on Linear 2048^3 with 32x32 blocks.
"""
import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import _native

pytestmark = pytest.mark.skipif(not _native.LOADED, reason=f"sparsekern._C not loaded: {_native.LOAD_ERROR}")

M = N = K = 2048
BLOCK = 32


@pytest.fixture(scope="module")
def dense():
    g = torch.Generator().manual_seed(0)
    return torch.randn(M, K, generator=g), torch.randn(M, N, generator=g), torch.randn(N, K, generator=g)


def _sparse(sparsity):
    g = torch.Generator().manual_seed(1)
    layout = sk.BlockSparseLayout.random((N, K), BLOCK, 1.0 - sparsity, generator=g)
    return layout, torch.randn(layout.nnz_blocks, BLOCK, BLOCK, generator=g)


@pytest.mark.benchmark(group="linear_fwd")
def test_dense_linear(benchmark, dense):
    x, _, w = dense
    benchmark(F.linear, x, w)


@pytest.mark.benchmark(group="linear_fwd")
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_bsr_linear(benchmark, dense, sparsity):
    x, _, _ = dense
    layout, values = _sparse(sparsity)
    benchmark(torch.ops.sparsekern.native_bsr_linear, x, values, *layout.index_tensors(), N, None)


@pytest.mark.benchmark(group="linear_dx")
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_bsr_linear_dx(benchmark, dense, sparsity):
    _, dy, _ = dense
    layout, values = _sparse(sparsity)
    benchmark(torch.ops.sparsekern.native_bsr_linear_dx, dy, values, *layout.index_tensors(), K)


@pytest.mark.benchmark(group="sddmm")
def test_dense_weight_grad(benchmark, dense):
    x, dy, _ = dense
    benchmark(torch.mm, dy.t(), x)


@pytest.mark.benchmark(group="sddmm")
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_bsr_sddmm(benchmark, dense, sparsity):
    x, dy, _ = dense
    layout, _ = _sparse(sparsity)
    benchmark(torch.ops.sparsekern.native_bsr_sddmm, dy, x, *layout.index_tensors(), BLOCK)


@pytest.mark.benchmark(group="conv_fwd_bwd")
@pytest.mark.parametrize("kind", ["dense", "sparse90"])
def test_resnet_conv(benchmark, kind):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False)
    layer = conv if kind == "dense" else sk.SparseConv2d.from_dense(conv, sparsity=0.9, block_size=BLOCK)
    x = torch.randn(64, 128, 16, 16, requires_grad=True)
    dy = torch.randn(64, 128, 16, 16)
    benchmark(lambda: layer(x).backward(dy))
