"""BlockSparseLayout: which bs x bs blocks of an [N, K] weight matrix exist.

Block-CSR over block-rows (``row_ptr``, ``col_idx``, plus ``coo_row``, the block-row of each stored
block) and the transposed index for dX (block-CSC: ``col_ptr``, ``row_idx``, ``perm`` into the
values), all int32 on the values' device. The capacity (number of blocks) is fixed at construction:
dynamic sparse training keeps it constant, so ``update_`` rewrites the tensors in place with no
reallocation and no host synchronisation. Dimensions that are not multiples of the block size are
padded inside the layout (the last block-row/column is partly outside the matrix).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops
from .ops import LAYOUT_ARGS, check_block_size


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def blocks_for_density(density: float, n_blocks: int) -> int:
    """How many blocks a layer of ``n_blocks`` keeps at ``density``."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return min(n_blocks, max(0, round(density * n_blocks)))


def top_blocks_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of a [R, C] score grid (on the device, no host sync)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[scores.flatten().topk(k).indices] = True
    return mask.view(scores.shape)


class BlockSparseLayout(nn.Module):
    """Fixed-capacity block-sparse structure of an [N, K] matrix; its index tensors are buffers.

    Build one with :meth:`from_block_mask` (or :meth:`random`); it is an ``nn.Module`` so that
    ``.to()``, ``state_dict`` and ``torch.compile`` treat the index like any other layer buffer.
    """

    def __init__(self, shape: Sequence[int], block_size: int, capacity: int, device=None):
        super().__init__()
        check_block_size(block_size)
        if len(shape) != 2 or any(int(d) <= 0 for d in shape):
            raise ValueError(f"shape must be two positive sizes (N, K), got {tuple(shape)}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_size = block_size
        # Counts in-place rewrites, so that what is derived from the index (e.g. SparseOpt's factors)
        # knows when to recompute without looking at the device.
        self.version = 0
        n_rows, n_cols = self.block_grid
        if not 0 <= capacity <= n_rows * n_cols:
            raise ValueError(f"capacity must be in [0, {n_rows * n_cols}] for a {n_rows}x{n_cols} block grid, "
                             f"got {capacity}")
        index = dict(dtype=torch.int32, device=device)
        self.register_buffer("row_ptr", torch.zeros(n_rows + 1, **index))
        self.register_buffer("col_idx", torch.zeros(capacity, **index))
        self.register_buffer("coo_row", torch.zeros(capacity, **index))
        self.register_buffer("col_ptr", torch.zeros(n_cols + 1, **index))
        self.register_buffer("row_idx", torch.zeros(capacity, **index))
        self.register_buffer("perm", torch.zeros(capacity, **index))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_block_mask(cls, block_mask: Tensor, block_size: int, shape: Optional[Sequence[int]] = None):
        """Layout of the True blocks of a bool [N/bs, K/bs] mask (``shape`` defaults to the full grid)."""
        if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 2:
            raise ValueError(f"block_mask must be a 2-D bool tensor, got "
                             f"{getattr(block_mask, 'dtype', type(block_mask))} of shape "
                             f"{tuple(getattr(block_mask, 'shape', ()))}")
        check_block_size(block_size)
        if shape is None:
            shape = (block_mask.shape[0] * block_size, block_mask.shape[1] * block_size)
        layout = cls(shape, block_size, int(block_mask.sum()), device=block_mask.device)
        layout.update_(block_mask, check=False)
        return layout

    @classmethod
    def random(cls, shape: Sequence[int], block_size: int, density: float, device=None,
               generator: Optional[torch.Generator] = None):
        """Uniformly random layout keeping ``round(density * blocks)`` blocks."""
        check_block_size(block_size)
        n_rows, n_cols = _cdiv(int(shape[0]), block_size), _cdiv(int(shape[1]), block_size)
        k = blocks_for_density(density, n_rows * n_cols)
        chosen = torch.randperm(n_rows * n_cols, generator=generator)[:k]
        mask = torch.zeros(n_rows * n_cols, dtype=torch.bool)
        mask[chosen] = True
        return cls.from_block_mask(mask.view(n_rows, n_cols).to(device), block_size, shape)

    # -- properties -----------------------------------------------------------------------------
    @property
    def block_grid(self) -> tuple:
        """(block-rows, block-columns), padding included."""
        return _cdiv(self.shape[0], self.block_size), _cdiv(self.shape[1], self.block_size)

    @property
    def nnz_blocks(self) -> int:
        return self.index_tensors()[1].numel()

    @property
    def density(self) -> float:
        n_rows, n_cols = self.block_grid
        return self.nnz_blocks / (n_rows * n_cols)

    @property
    def device(self) -> torch.device:
        return self.index_tensors()[0].device

    # The index tuple is read on every op call; building it through nn.Module's attribute lookup cost ~5 us a call.
    # It is cached and dropped whenever a buffer object is replaced (.to(), assignment); update_ and
    # load_state_dict rewrite the same tensors in place.
    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_index", None)
        return super()._apply(fn, recurse)

    def __setattr__(self, name, value):
        if name in LAYOUT_ARGS:
            self.__dict__.pop("_index", None)
        super().__setattr__(name, value)

    def register_buffer(self, name, tensor, persistent=True):
        self.__dict__.pop("_index", None)
        super().register_buffer(name, tensor, persistent)

    def index_tensors(self) -> tuple:
        """(row_ptr, col_idx, coo_row, col_ptr, row_idx, perm): the order every op takes them in."""
        index = self.__dict__.get("_index")
        if index is None:
            index = self.__dict__["_index"] = tuple(self._buffers[name] for name in LAYOUT_ARGS)
        return index

    def to_block_mask(self) -> Tensor:
        mask = torch.zeros(self.block_grid, dtype=torch.bool, device=self.device)
        mask[self.coo_row.long(), self.col_idx.long()] = True
        return mask

    def row_densities(self) -> Tensor:
        """[R] fraction of the K columns that each block-row stores (padding excluded), fp32, on the device."""
        bs = self.block_size
        inside_cols = (self.shape[1] - self.col_idx.to(torch.float32) * bs).clamp(max=bs)
        stored = torch.zeros(self.block_grid[0], dtype=torch.float32, device=self.device)
        return stored.index_add_(0, self.coo_row.long(), inside_cols) / self.shape[1]

    def padding_mask(self, dtype=torch.float32) -> Tensor:
        """[nnz, bs, bs] ones where a stored block's entry lies inside the N x K matrix, zeros in the padding."""
        bs = self.block_size
        inside_rows = (self.coo_row[:, None] * bs + torch.arange(bs, device=self.device)) < self.shape[0]
        inside_cols = (self.col_idx[:, None] * bs + torch.arange(bs, device=self.device)) < self.shape[1]
        return (inside_rows[:, :, None] & inside_cols[:, None, :]).to(dtype)

    # -- mutation -------------------------------------------------------------------------------
    def update_(self, block_mask: Tensor, check: bool = True, block_tensors: Sequence[Tensor] = ()) -> "BlockSparseLayout":
        """Rewrite the index in place for a new mask with exactly ``nnz_blocks`` blocks.

        ``block_tensors`` ([nnz, ...], e.g. values and momentum) are permuted along: kept blocks keep
        their contents, new blocks become zero. ``check=True`` verifies the count (one host read); pass
        ``check=False`` on a hot path whose masks have the right count by construction (e.g. a top-k),
        to keep it free of host syncs.
        """
        if block_mask.dtype != torch.bool or tuple(block_mask.shape) != self.block_grid:
            raise ValueError(f"block_mask must be bool of shape {self.block_grid}, "
                             f"got {block_mask.dtype} of shape {tuple(block_mask.shape)}")
        if block_mask.device != self.device:
            raise ValueError(f"block_mask is on {block_mask.device} but the layout is on {self.device}")
        if check:
            count = int(block_mask.sum())
            if count != self.nnz_blocks:
                raise ValueError(f"block_mask has {count} blocks but the layout's fixed capacity is "
                                 f"{self.nnz_blocks}")
        ops.layout_update_(self, block_mask.contiguous(), block_tensors)
        self.version += 1
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.version += 1  # the index was overwritten in place, like an update_

    def extra_repr(self) -> str:
        n_rows, n_cols = self.block_grid
        return (f"shape={self.shape}, block_size={self.block_size}, nnz_blocks={self.nnz_blocks}/"
                f"{n_rows * n_cols}, density={self.density:.3f}")
