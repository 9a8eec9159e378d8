// native_build_layout_index_ on CUDA: the launcher, in CUDA-only terms (raw pointers, sizes, a stream),
// so that the kernels compile without the torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace sparsekern {
namespace cuda {

// Rebuilds the block-CSR and block-CSC indices of a row-major [n_rows, n_cols] block mask (one byte per
// block, non-zero = present) into preallocated device arrays, with no host synchronisation:
//   row_ptr [n_rows + 1], col_ptr [n_cols + 1]       exclusive prefix sums of the row / column counts
//   col_idx, coo_row [capacity]                       column and row of each block in CSR order
//   row_idx, perm [capacity]                          row and CSR position of each block in CSC order
//   csr_pos [n_rows * n_cols]                         scratch; may be null when capacity or the mask is empty
// Positions at or past `capacity` (a mask whose count differs from it) are never written.
// n_rows * n_cols must fit in int32. Returns the first launch error, or cudaSuccess.
cudaError_t build_layout_index(const uint8_t* block_mask, int64_t n_rows, int64_t n_cols, int64_t capacity,
                               int32_t* row_ptr, int32_t* col_idx, int32_t* coo_row, int32_t* col_ptr,
                               int32_t* row_idx, int32_t* perm, int32_t* csr_pos, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
