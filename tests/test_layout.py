"""sk.BlockSparseLayout: the index against a plain-loop oracle, in-place updates, validation, buffers."""
import pytest
import torch

import sparsekern as sk
from conftest import generator, index_oracle, random_block_mask

INDEX_NAMES = ("row_ptr", "col_idx", "coo_row", "col_ptr", "row_idx", "perm")
GRIDS = [(1, 1), (3, 5), (7, 40), (40, 3)]
DENSITIES = [0.0, 0.3, 1.0]


def assert_index(layout, block_mask):
    expected = index_oracle(block_mask)
    for name in INDEX_NAMES:
        tensor = getattr(layout, name)
        assert tensor.dtype == torch.int32, name
        assert tensor.tolist() == expected[name], name


def mask_with_empty_lines(grid, seed):
    """A dense-ish mask whose first, last and one middle block-row and block-column are empty."""
    mask = random_block_mask(grid, 0.7, seed)
    for line in {0, grid[0] // 2, grid[0] - 1}:
        mask[line, :] = False
    for line in {0, grid[1] // 2, grid[1] - 1}:
        mask[:, line] = False
    return mask


# ----------------------------------------------------------------------------------------------
# The index

@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("grid", GRIDS)
def test_from_block_mask_matches_oracle(grid, density, block_size):
    mask = random_block_mask(grid, density, seed=sum(grid))
    layout = sk.BlockSparseLayout.from_block_mask(mask, block_size)
    assert_index(layout, mask)
    assert torch.equal(layout.to_block_mask(), mask)
    assert layout.nnz_blocks == int(mask.sum())
    assert layout.density == pytest.approx(mask.sum().item() / mask.numel())
    assert layout.shape == (grid[0] * block_size, grid[1] * block_size)
    assert layout.block_grid == grid


@pytest.mark.parametrize("grid", [(3, 5), (7, 40), (40, 3), (9, 9)])
def test_empty_block_rows_and_columns(grid):
    mask = mask_with_empty_lines(grid, seed=grid[0] * 100 + grid[1])
    layout = sk.BlockSparseLayout.from_block_mask(mask, 16)
    assert_index(layout, mask)
    assert torch.equal(layout.to_block_mask(), mask)
    # row_ptr must repeat across an empty block-row
    assert layout.row_ptr[0] == layout.row_ptr[1] and layout.row_ptr[-2] == layout.row_ptr[-1]


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_density_extremes(density):
    mask = random_block_mask((6, 4), density, seed=1)
    layout = sk.BlockSparseLayout.from_block_mask(mask, 32)
    assert layout.nnz_blocks == (0 if density == 0 else 24)
    assert layout.density == density
    assert_index(layout, mask)


def test_block_grid_with_padding():
    mask = torch.ones(3, 5, dtype=torch.bool)
    layout = sk.BlockSparseLayout.from_block_mask(mask, 16, shape=(37, 70))
    assert layout.shape == (37, 70)
    assert layout.block_grid == (3, 5)
    assert layout.nnz_blocks == 15 and layout.density == 1.0


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("shape", [(37, 70), (16, 16), (5, 130), (130, 1)])
def test_padding_mask(shape, block_size):
    grid = (-(-shape[0] // block_size), -(-shape[1] // block_size))
    mask = random_block_mask(grid, 0.6, seed=shape[0] + shape[1])
    mask[-1, -1] = True  # the corner block has padding on both sides whenever the shape is ragged
    layout = sk.BlockSparseLayout.from_block_mask(mask, block_size, shape)
    padding = layout.padding_mask(torch.float64)
    assert padding.shape == (layout.nnz_blocks, block_size, block_size) and padding.dtype == torch.float64
    expected = torch.zeros_like(padding)
    for i, (r, c) in enumerate(zip(layout.coo_row.tolist(), layout.col_idx.tolist())):
        for a in range(block_size):
            for b in range(block_size):
                expected[i, a, b] = float(r * block_size + a < shape[0] and c * block_size + b < shape[1])
    assert torch.equal(padding, expected)
    # every stored entry inside the matrix is counted once
    inside = sum(min(block_size, shape[0] - r * block_size) * min(block_size, shape[1] - c * block_size)
                 for r, c in zip(layout.coo_row.tolist(), layout.col_idx.tolist()))
    assert padding.sum().item() == inside


@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(37, 70), (16, 16), (200, 33)])
def test_random_count_and_reproducibility(shape, density):
    bs = 16
    n_blocks = (-(-shape[0] // bs)) * (-(-shape[1] // bs))
    a = sk.BlockSparseLayout.random(shape, bs, density, generator=generator(7))
    b = sk.BlockSparseLayout.random(shape, bs, density, generator=generator(7))
    assert a.shape == shape
    assert a.nnz_blocks == round(density * n_blocks)
    assert int(a.to_block_mask().sum()) == a.nnz_blocks
    assert_index(a, a.to_block_mask())
    for name in INDEX_NAMES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_random_seeds_differ():
    masks = {tuple(sk.BlockSparseLayout.random((128, 128), 16, 0.5, generator=generator(seed))
                   .to_block_mask().flatten().tolist()) for seed in range(4)}
    assert len(masks) == 4


# ----------------------------------------------------------------------------------------------
# In-place update

@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (7, 40), (40, 3)])
def test_update_in_place(grid):
    first = random_block_mask(grid, 0.5, seed=3)
    if not first.any():
        first[0, 0] = True
    # a different mask with the same count: a random permutation of the first one
    order = torch.randperm(first.numel(), generator=generator(4))
    second = first.flatten()[order].view(grid)
    layout = sk.BlockSparseLayout.from_block_mask(first, 16)
    before = {name: (getattr(layout, name), getattr(layout, name).data_ptr()) for name in INDEX_NAMES}
    returned = layout.update_(second)
    assert returned is layout
    for name in INDEX_NAMES:
        tensor, ptr = before[name]
        assert getattr(layout, name) is tensor, name
        assert getattr(layout, name).data_ptr() == ptr, name
    assert_index(layout, second)
    assert torch.equal(layout.to_block_mask(), second)


def test_update_on_empty_rows_after_dense_mask():
    """Shrinking rows to empty must not leave stale entries from the previous mask."""
    first = torch.zeros(4, 4, dtype=torch.bool)
    first[0] = True  # 4 blocks in the first block-row
    second = torch.zeros(4, 4, dtype=torch.bool)
    second[:, 3] = True  # 4 blocks in the last block-column
    layout = sk.BlockSparseLayout.from_block_mask(first, 32)
    layout.update_(second)
    assert_index(layout, second)


def test_update_count_mismatch_raises():
    layout = sk.BlockSparseLayout.from_block_mask(random_block_mask((3, 5), 0.5, seed=2), 16)
    mask = layout.to_block_mask().clone()
    mask[~mask] = True  # now the full grid, more than the capacity
    with pytest.raises(ValueError, match="capacity"):
        layout.update_(mask)
    with pytest.raises(ValueError, match="capacity"):
        layout.update_(torch.zeros(3, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Validation

@pytest.mark.parametrize("bad_mask", [
    torch.ones(3, 5, dtype=torch.int32),
    torch.ones(3, 5, dtype=torch.float32),
    torch.ones(5, dtype=torch.bool),
    torch.ones(2, 3, 5, dtype=torch.bool),
], ids=["int32", "float32", "1d", "3d"])
def test_from_block_mask_rejects_bad_masks(bad_mask):
    with pytest.raises(ValueError, match="block_mask"):
        sk.BlockSparseLayout.from_block_mask(bad_mask, 16)


@pytest.mark.parametrize("block_size", [8, 24, 48, 0, 256])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        sk.BlockSparseLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool), block_size)
    with pytest.raises(ValueError, match="block_size"):
        sk.BlockSparseLayout((32, 32), block_size, 1)
    with pytest.raises(ValueError, match="block_size"):
        sk.BlockSparseLayout.random((32, 32), block_size, 0.5)


@pytest.mark.parametrize("bad_mask", [
    torch.ones(5, 3, dtype=torch.bool),
    torch.ones(3, 6, dtype=torch.bool),
    torch.ones(15, dtype=torch.bool),
    torch.ones(3, 5, dtype=torch.uint8),
], ids=["transposed", "wide", "flat", "uint8"])
def test_update_rejects_wrong_grid(bad_mask):
    layout = sk.BlockSparseLayout.from_block_mask(torch.ones(3, 5, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="block_mask"):
        layout.update_(bad_mask)


@pytest.mark.parametrize("shape, capacity", [
    ((0, 32), 0), ((32, -1), 0), ((32,), 0), ((32, 32, 32), 0),  # bad shapes
    ((32, 32), -1), ((32, 32), 5), ((33, 16), 4),  # capacity outside [0, blocks]
])
def test_constructor_rejects_bad_shape_or_capacity(shape, capacity):
    with pytest.raises(ValueError, match="shape|capacity"):
        sk.BlockSparseLayout(shape, 16, capacity)


def test_constructor_accepts_full_capacity():
    layout = sk.BlockSparseLayout((33, 16), 16, 2)
    assert layout.block_grid == (3, 1) and layout.nnz_blocks == 2
    assert [getattr(layout, name).numel() for name in INDEX_NAMES] == [4, 2, 2, 2, 2, 2]


# ----------------------------------------------------------------------------------------------
# Module behaviour

def test_to_dtype_leaves_index_int32():
    mask = random_block_mask((3, 5), 0.5, seed=5)
    layout = sk.BlockSparseLayout.from_block_mask(mask, 16)
    layout.to(torch.float64)
    for name in INDEX_NAMES:
        assert getattr(layout, name).dtype == torch.int32, name
    assert_index(layout, mask)


def test_state_dict_holds_the_index():
    mask = random_block_mask((3, 5), 0.5, seed=6)
    layout = sk.BlockSparseLayout.from_block_mask(mask, 16)
    state = layout.state_dict()
    assert set(state) == set(INDEX_NAMES)
    for name in INDEX_NAMES:
        assert torch.equal(state[name], getattr(layout, name))
    # loading into another layout of the same capacity reproduces it
    other = sk.BlockSparseLayout.random((48, 80), 16, layout.density, generator=generator(11))
    assert other.nnz_blocks == layout.nnz_blocks
    other.load_state_dict(state)
    assert torch.equal(other.to_block_mask(), mask)
    assert_index(other, mask)


@pytest.mark.parametrize("grid, density", [((1, 1), 1.0), ((7, 40), 0.3), ((40, 3), 0.6), ((33, 70), 0.5),
                                           ((3, 5), 0.0)])
def test_backend_reference_and_auto_agree(grid, density, backend_env):
    mask = random_block_mask(grid, density, seed=grid[0] + 7 * grid[1])
    layouts = {}
    for backend in ("reference", "auto"):
        backend_env(backend)
        layouts[backend] = sk.BlockSparseLayout.from_block_mask(mask, 16)
        # update to a second mask too, so the in-place path is compared as well
        layouts[backend].update_(mask.flatten().flip(0).view(grid))
    for name in INDEX_NAMES:
        assert torch.equal(getattr(layouts["reference"], name), getattr(layouts["auto"], name)), name
    assert_index(layouts["auto"], mask.flatten().flip(0).view(grid))


def test_auto_picks_native_index_kernel_when_built(backend_env):
    backend_env("auto")
    expected = "cpu" if sk.ops.backend_has_op("cpu", "build_layout_index_") else "reference"
    assert sk.ops.select_backend("build_layout_index_", torch.device("cpu")) == expected
    backend_env("reference")
    assert sk.ops.select_backend("build_layout_index_", torch.device("cpu")) == "reference"
