// native_build_layout_index_ on CPU: rebuild the block-CSR and block-CSC indices of a block mask in place.
#include <cstdint>
#include <vector>

#include <torch/library.h>

#include "layout_index.h"

namespace sparsekern {
namespace {

void build_layout_index_cpu(const at::Tensor& block_mask, at::Tensor& row_ptr, at::Tensor& col_idx,
                            at::Tensor& coo_row, at::Tensor& col_ptr, at::Tensor& row_idx, at::Tensor& perm) {
  check_layout_index_args(block_mask, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm);
  TORCH_CHECK(block_mask.device().is_cpu(), "block_mask must be a CPU tensor, got ", block_mask.device());

  const int64_t n_rows = block_mask.size(0);
  const int64_t n_cols = block_mask.size(1);
  const int64_t capacity = col_idx.numel();
  const bool* mask = block_mask.data_ptr<bool>();
  int32_t* row_ptr_ = row_ptr.data_ptr<int32_t>();
  int32_t* col_idx_ = col_idx.data_ptr<int32_t>();
  int32_t* coo_row_ = coo_row.data_ptr<int32_t>();
  int32_t* col_ptr_ = col_ptr.data_ptr<int32_t>();
  int32_t* row_idx_ = row_idx.data_ptr<int32_t>();
  int32_t* perm_ = perm.data_ptr<int32_t>();

  // CSR: a row-major sweep visits the blocks in CSR order. Positions past the capacity (a mask whose
  // count differs from it) are counted but never written.
  std::vector<int64_t> col_count(n_cols, 0);
  int64_t p = 0;
  row_ptr_[0] = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t c = 0; c < n_cols; ++c) {
      if (!mask[r * n_cols + c]) continue;
      if (p < capacity) {
        col_idx_[p] = static_cast<int32_t>(c);
        coo_row_[p] = static_cast<int32_t>(r);
      }
      ++col_count[c];
      ++p;
    }
    row_ptr_[r + 1] = static_cast<int32_t>(p);
  }

  // CSC: col_ptr from the column counts, then the same row-major sweep appends each block to its
  // column, so rows ascend within a column and the running CSR position is the block's perm.
  std::vector<int64_t> col_next(n_cols);
  int64_t start = 0;
  col_ptr_[0] = 0;
  for (int64_t c = 0; c < n_cols; ++c) {
    col_next[c] = start;
    start += col_count[c];
    col_ptr_[c + 1] = static_cast<int32_t>(start);
  }
  p = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t c = 0; c < n_cols; ++c) {
      if (!mask[r * n_cols + c]) continue;
      const int64_t q = col_next[c]++;
      if (q < capacity) {
        row_idx_[q] = static_cast<int32_t>(r);
        perm_[q] = static_cast<int32_t>(p);
      }
      ++p;
    }
  }
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("native_build_layout_index_", &sparsekern::build_layout_index_cpu);
}
