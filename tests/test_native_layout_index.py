"""The native kernel torch.ops.sparsekern.native_build_layout_index_ against a plain-Python oracle."""
import os
import re

import pytest
import torch

from sparsekern import _native
from conftest import index_oracle as oracle

OP_NAME = "native_build_layout_index_"
INDEX_NAMES = ("row_ptr", "col_idx", "coo_row", "col_ptr", "row_idx", "perm")
SHAPES = [(1, 1), (3, 5), (7, 40), (40, 3), (33, 70), (1100, 3), (3, 1100)]
DENSITIES = [0.0, 0.3, 1.0]

pytestmark = pytest.mark.skipif(not _native.LOADED, reason=f"sparsekern._C not loaded: {_native.LOAD_ERROR}")


def empty_index(n_rows, n_cols, capacity, device):
    # -1 everywhere, so that an entry the kernel forgot to write shows up
    sizes = dict(row_ptr=n_rows + 1, col_idx=capacity, coo_row=capacity, col_ptr=n_cols + 1,
                 row_idx=capacity, perm=capacity)
    return {name: torch.full((sizes[name],), -1, dtype=torch.int32, device=device) for name in INDEX_NAMES}


def native_index(block_mask, capacity=None):
    n_rows, n_cols = block_mask.shape
    capacity = int(block_mask.sum()) if capacity is None else capacity
    index = empty_index(n_rows, n_cols, capacity, block_mask.device)
    torch.ops.sparsekern.native_build_layout_index_(block_mask, *(index[name] for name in INDEX_NAMES))
    return {name: t.cpu().tolist() for name, t in index.items()}


def random_mask(shape, density, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < density).to(device)


def masks_with_empty_lines():
    """Masks with empty block-rows and block-columns (including the first and the last ones)."""
    for seed, shape in enumerate([(6, 9), (33, 70), (64, 5)]):
        mask = random_mask(shape, 0.5, 100 + seed)
        mask[0::2] = False
        mask[:, -1] = False
        mask[:, 0] = False
        yield mask


def check_against_oracle(device):
    cases = [random_mask(shape, density, seed=i)
             for i, (shape, density) in enumerate((s, d) for s in SHAPES for d in DENSITIES)]
    cases += list(masks_with_empty_lines())
    for mask in cases:
        got = native_index(mask.to(device))
        want = oracle(mask)
        for name in INDEX_NAMES:
            assert got[name] == want[name], f"{name} differs for a {tuple(mask.shape)} mask with {int(mask.sum())} blocks"


def test_cpu_matches_oracle():
    check_against_oracle("cpu")


def test_cpu_empty_grid():
    for shape in [(0, 4), (4, 0), (0, 0)]:
        got = native_index(torch.zeros(shape, dtype=torch.bool))
        assert got == oracle(torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("capacity_delta", [-5, 5])
def test_cpu_capacity_mismatch_is_memory_safe(capacity_delta):
    # The content is unspecified when the mask's count differs from the capacity; the op must not write
    # out of bounds (guard slots after each index tensor would catch that).
    mask = random_mask((33, 70), 0.3, seed=7)
    capacity = int(mask.sum()) + capacity_delta
    index = empty_index(33, 70, capacity + 8, "cpu")
    views = {name: t[:-8] if name not in ("row_ptr", "col_ptr") else t for name, t in index.items()}
    torch.ops.sparsekern.native_build_layout_index_(mask, *(views[name] for name in INDEX_NAMES))
    for name in ("col_idx", "coo_row", "row_idx", "perm"):
        assert index[name][-8:].eq(-1).all(), f"{name} was written past its capacity"
    assert index["row_ptr"].tolist() == oracle(mask)["row_ptr"]


def _valid_args(n_rows=3, n_cols=5, capacity=4):
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    mask.view(-1)[:capacity] = True
    return {"block_mask": mask, **empty_index(n_rows, n_cols, capacity, "cpu")}


def _call(args):
    torch.ops.sparsekern.native_build_layout_index_(args["block_mask"], *(args[name] for name in INDEX_NAMES))


@pytest.mark.parametrize("name, bad, message", [
    ("block_mask", lambda t: t.to(torch.uint8), "block_mask must be bool"),
    ("block_mask", lambda t: t.reshape(-1), "block_mask must be 2-D"),
    ("block_mask", lambda t: t.t(), "block_mask must be contiguous"),
    ("row_ptr", lambda t: t.long(), "row_ptr must be int32"),
    ("row_ptr", lambda t: t[:-1], "row_ptr must have block rows + 1"),
    ("col_ptr", lambda t: torch.cat([t, t[:1]]), "col_ptr must have block columns + 1"),
    ("col_idx", lambda t: t.float(), "col_idx must be int32"),
    ("coo_row", lambda t: t[:-1], "coo_row must have the capacity of col_idx"),
    ("row_idx", lambda t: t.view(2, 2), "row_idx must be 1-D"),
    ("perm", lambda t: torch.cat([t, t]), "perm must have the capacity of col_idx"),
    ("perm", lambda t: torch.cat([t, t])[::2], "perm must be contiguous"),
])
def test_argument_errors_name_the_tensor(name, bad, message):
    args = _valid_args()
    _call(dict(args))  # the valid arguments pass
    args[name] = bad(args[name])
    with pytest.raises(RuntimeError, match=re.escape(message)) as err:
        _call(args)
    assert name in str(err.value)


def test_build_info():
    info = _native.BUILD_INFO
    assert set(info) >= {"torch_version", "cuda", "cuda_version", "cuda_archs", "native_ops"}
    assert info["native_ops"][OP_NAME][0] == "cpu"
    assert _native.has_kernel(OP_NAME, "cpu")
    assert not _native.has_kernel("no_such_op", "cpu")
    assert (info["cuda_version"] is None) == (not info["cuda"]) == (not info["cuda_archs"])


@pytest.mark.skipif(not _native.BUILD_INFO.get("cuda"), reason="sparsekern._C was built without CUDA kernels")
def test_cuda_kernel_registered():
    assert _native.has_kernel(OP_NAME, "cuda")
    assert "cuda" in _native.BUILD_INFO["native_ops"][OP_NAME]


needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.has_kernel(OP_NAME, "cuda")),
    reason="needs a CUDA GPU and sparsekern._C built with CUDA kernels")


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_matches_oracle():
    check_against_oracle("cuda")
    # Long lines: more than one scan chunk (1024) and many 32-wide ballot steps.
    for shape in [(2500, 1), (1, 2500), (1500, 70)]:
        mask = random_mask(shape, 0.3, seed=11)
        assert native_index(mask.cuda()) == oracle(mask)


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_empty_grid_and_capacity_mismatch():
    for shape in [(0, 4), (4, 0)]:
        mask = torch.zeros(shape, dtype=torch.bool)
        assert native_index(mask.cuda()) == oracle(mask)
    mask = random_mask((1500, 70), 0.3, seed=12)
    count = int(mask.sum())
    for capacity in (0, count - 5, count + 5):
        index = empty_index(1500, 70, capacity + 8, "cuda")
        views = {name: t[:-8] if name not in ("row_ptr", "col_ptr") else t for name, t in index.items()}
        torch.ops.sparsekern.native_build_layout_index_(mask.cuda(), *(views[name] for name in INDEX_NAMES))
        torch.cuda.synchronize()
        for name in ("col_idx", "coo_row", "row_idx", "perm"):
            assert index[name][-8:].eq(-1).all(), f"{name} was written past its capacity {capacity}"
        assert index["row_ptr"].tolist() == oracle(mask)["row_ptr"]


def test_cuda_kernels_are_built_where_a_toolkit_is():
    """CI has nvcc but no GPU: the CUDA sources must still have been compiled into sparsekern._C."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if torch.version.cuda is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        pytest.skip("no CUDA build of torch or no CUDA toolkit here")
    if os.environ.get("SPARSEKERN_NO_CUDA") == "1":
        pytest.skip("SPARSEKERN_NO_CUDA=1 asked for a CPU-only build")
    assert _native.BUILD_INFO["cuda"], _native.BUILD_INFO
    assert "cuda" in _native.BUILD_INFO["native_ops"]["native_build_layout_index_"]
