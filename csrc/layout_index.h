// native_build_layout_index_: argument checks shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>
#include <limits>

#include "checks.h"

namespace sparsekern {

inline void check_layout_index_args(const at::Tensor& block_mask, const at::Tensor& row_ptr,
                                    const at::Tensor& col_idx, const at::Tensor& coo_row,
                                    const at::Tensor& col_ptr, const at::Tensor& row_idx,
                                    const at::Tensor& perm) {
  SK_CHECK_DIM(block_mask, 2);
  SK_CHECK_DTYPE(block_mask, at::kBool, "bool");
  SK_CHECK_CONTIGUOUS(block_mask);
  // Block indices and positions are int32, so every one of them must fit.
  TORCH_CHECK(block_mask.numel() <= std::numeric_limits<int32_t>::max(),
              "block_mask has ", block_mask.numel(), " blocks; int32 layout indices allow at most ",
              std::numeric_limits<int32_t>::max());

#define SK_CHECK_INDEX_TENSOR(t)      \
  SK_CHECK_DTYPE(t, at::kInt, "int32"); \
  SK_CHECK_DIM(t, 1);                 \
  SK_CHECK_CONTIGUOUS(t);             \
  SK_CHECK_SAME_DEVICE(t, block_mask)
  SK_CHECK_INDEX_TENSOR(row_ptr);
  SK_CHECK_INDEX_TENSOR(col_idx);
  SK_CHECK_INDEX_TENSOR(coo_row);
  SK_CHECK_INDEX_TENSOR(col_ptr);
  SK_CHECK_INDEX_TENSOR(row_idx);
  SK_CHECK_INDEX_TENSOR(perm);
#undef SK_CHECK_INDEX_TENSOR

  const int64_t capacity = col_idx.numel();
  SK_CHECK_NUMEL(row_ptr, block_mask.size(0) + 1, "block rows + 1");
  SK_CHECK_NUMEL(col_ptr, block_mask.size(1) + 1, "block columns + 1");
  SK_CHECK_NUMEL(coo_row, capacity, "the capacity of col_idx");
  SK_CHECK_NUMEL(row_idx, capacity, "the capacity of col_idx");
  SK_CHECK_NUMEL(perm, capacity, "the capacity of col_idx");
}

}  // namespace sparsekern
