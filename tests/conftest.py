"""Helpers shared by the test files: seeded random inputs and dense oracles built without sparsekern.

The oracles here use plain loops over the layout's stored blocks, not ``sparsekern.reference``, so that
a bug in the reference cannot hide itself by agreeing with its own test.
"""
import functools
import os
import sys

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. Triton decides at decoration
# time, so this must be set before sparsekern.triton_kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparsekern as sk  # noqa: E402


def generator(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, dtype=torch.float32, requires_grad=False):
    """Normal noise from a fixed seed, in ``dtype`` (drawn in fp32 so all dtypes see the same numbers)."""
    t = torch.randn(*shape, generator=generator(seed)).to(dtype)
    return t.requires_grad_(requires_grad)


def small_model(seed=0):
    """Sparse conv (24 out channels: a padded block-row; K = 72: a padded block-column) + BN + sparse Linear +
    dense Linear, from a fixed seed: the optimizer tests' model."""
    torch.manual_seed(seed)
    return nn.Sequential(
        sk.SparseConv2d(8, 24, 3, padding=1, sparsity=0.5, block_size=16), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        sk.SparseLinear(96, 40, sparsity=0.5, block_size=16), nn.BatchNorm1d(40), nn.ReLU(),
        nn.Linear(40, 10))


def random_block_mask(grid, density, seed):
    """A bool block mask of shape ``grid`` with each block kept with probability ``density`` (0 and 1 exact)."""
    if density >= 1.0:
        return torch.ones(grid, dtype=torch.bool)
    return torch.rand(grid, generator=generator(seed)) < density


def random_layout(shape, block_size, density, seed):
    """A layout over an [N, K] matrix with a random mask on its (padded) block grid."""
    grid = (-(-shape[0] // block_size), -(-shape[1] // block_size))
    return sk.BlockSparseLayout.from_block_mask(random_block_mask(grid, density, seed), block_size, shape)


def random_values(layout, seed, dtype=torch.float32, requires_grad=False):
    """Random compact values, non-zero in the padding region too (ops must ignore it)."""
    bs = layout.block_size
    return randn(layout.nnz_blocks, bs, bs, seed=seed, dtype=dtype, requires_grad=requires_grad)


def dense_matrix(values, layout):
    """The [N, K] matrix that ``values`` stand for: each stored block written at its place, then cropped.

    Differentiable in ``values`` (slice assignment), so autograd through it is the dense-masked oracle.
    """
    bs = layout.block_size
    n_rows, n_cols = layout.block_grid
    matrix = values.new_zeros(n_rows * bs, n_cols * bs)
    for i, (r, c) in enumerate(zip(layout.coo_row.tolist(), layout.col_idx.tolist())):
        matrix[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = values[i]
    return matrix[: layout.shape[0], : layout.shape[1]]


def block_frobenius_norms(matrix, block_size):
    """[ceil(N/bs), ceil(K/bs)] Frobenius norm of each block of ``matrix`` (last blocks may be partial)."""
    n, k = matrix.shape
    grid = (-(-n // block_size), -(-k // block_size))
    norms = torch.empty(grid, dtype=matrix.dtype)
    for r in range(grid[0]):
        for c in range(grid[1]):
            norms[r, c] = matrix[r * block_size:(r + 1) * block_size, c * block_size:(c + 1) * block_size].norm()
    return norms


def conv_weight_from_matrix(matrix, out_channels, in_per_group, kernel_size):
    """[out, kh*kw*cin] with K ordered (kh, kw, cin) -> the nn.Conv2d weight [out, cin, kh, kw]."""
    kh, kw = kernel_size
    return matrix.reshape(out_channels, kh, kw, in_per_group).permute(0, 3, 1, 2)


@pytest.fixture
def backend_env(monkeypatch):
    """Set SPARSEKERN_BACKEND for one test (restored afterwards)."""
    def set_backend(name):
        monkeypatch.setenv("SPARSEKERN_BACKEND", name)
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    return set_backend


def assert_layer_matches_reference(layer, x, grad, backend, use_backend, extras):
    """One forward and backward of a sparse layer on `backend` against the reference backend: the output, dX,
    d(values) and each of `extras` ({name: layer -> tensor}, read after the backward) agree to 1e-4.
    `use_backend(name)` selects the backend. Returns the tensors of `backend`, in that order."""
    def run(name):
        use_backend(name)
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(grad)
        return (y.detach(), xi.grad, layer.values.grad.clone(), *(extra(layer).clone() for extra in extras.values()))

    expected = run("reference")
    got = run(backend)
    for name, a, b in zip(("y", "dx", "dvalues", *extras), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    return got


def index_oracle(block_mask):
    """Block-CSR in row-major order and block-CSC in column-major order, by definition (plain loops)."""
    mask = block_mask.tolist()
    n_rows, n_cols = block_mask.shape
    csr = [(r, c) for r in range(n_rows) for c in range(n_cols) if mask[r][c]]
    csc = [(r, c) for c in range(n_cols) for r in range(n_rows) if mask[r][c]]
    row_ptr, col_ptr = [0], [0]
    for r in range(n_rows):
        row_ptr.append(row_ptr[-1] + sum(mask[r]))
    for c in range(n_cols):
        col_ptr.append(col_ptr[-1] + sum(mask[r][c] for r in range(n_rows)))
    return {
        "row_ptr": row_ptr,
        "col_idx": [c for _, c in csr],
        "coo_row": [r for r, _ in csr],
        "col_ptr": col_ptr,
        "row_idx": [r for r, _ in csc],
        "perm": [csr.index(block) for block in csc],
    }


@pytest.fixture
def matmul_flags():
    """set(name, value) on torch.backends.cuda.matmul for one test. Not monkeypatch.setattr: on that module object
    (all __getattr__/__setattr__) the undo of pytest >= 9.2 deletes the attribute instead of restoring it, which
    fails and leaves the flag set for the rest of the process."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32, matmul.fp32_precision
    yield functools.partial(setattr, matmul)
    matmul.allow_tf32, matmul.fp32_precision = saved  # in this order: setting the old flag also sets the new one


@pytest.fixture(autouse=True)
def cuda_errors_stay_with_their_test(request):
    """After each `cuda` test, wait for the GPU, so that an asynchronous kernel fault (an illegal address) is reported
    at the test that launched it. Such a fault is sticky: every later CUDA call of the process fails with it (on the
    H200 a whole run of one xdist worker's tests failed in a row). So when the context is dead, the process exits
    here: pytest-xdist reports this test as crashed and carries on in a fresh worker with a fresh context, and the GPU
    check reruns the test alone to name the line."""
    yield
    if request.node.get_closest_marker("cuda") is None or not torch.cuda.is_available() \
            or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as fault:
        if _cuda_context_alive():
            raise
        sys.stderr.write(f"\n{request.node.nodeid}: the CUDA context is dead ({fault}); exiting this process\n")
        sys.stderr.flush()
        os._exit(70)


def _cuda_context_alive() -> bool:
    try:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except RuntimeError:
        return False
