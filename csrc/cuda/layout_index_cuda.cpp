// native_build_layout_index_ on CUDA: argument checks and dispatch registration around the kernels in
// layout_index.cu. Runs entirely on the current stream, with no host synchronisation.
#include <cstdint>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/layout_index.cuh"
#include "layout_index.h"

namespace sparsekern {
namespace {

void build_layout_index_cuda(const at::Tensor& block_mask, at::Tensor& row_ptr, at::Tensor& col_idx,
                             at::Tensor& coo_row, at::Tensor& col_ptr, at::Tensor& row_idx, at::Tensor& perm) {
  check_layout_index_args(block_mask, row_ptr, col_idx, coo_row, col_ptr, row_idx, perm);
  TORCH_CHECK(block_mask.is_cuda(), "block_mask must be a CUDA tensor, got ", block_mask.device());
  const c10::cuda::CUDAGuard device_guard(block_mask.device());

  const int64_t n_rows = block_mask.size(0);
  const int64_t n_cols = block_mask.size(1);
  const int64_t capacity = col_idx.numel();
  // CSR position of every present block, indexed like the mask: the CSC pass reads perm from it.
  at::Tensor csr_pos;
  if (capacity > 0 && n_rows * n_cols > 0) {
    csr_pos = at::empty({n_rows * n_cols}, block_mask.options().dtype(at::kInt));
  }
  const cudaError_t err = cuda::build_layout_index(
      reinterpret_cast<const uint8_t*>(block_mask.data_ptr<bool>()), n_rows, n_cols, capacity,
      row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), coo_row.data_ptr<int32_t>(),
      col_ptr.data_ptr<int32_t>(), row_idx.data_ptr<int32_t>(), perm.data_ptr<int32_t>(),
      csr_pos.defined() ? csr_pos.data_ptr<int32_t>() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("native_build_layout_index_", &sparsekern::build_layout_index_cuda);
}
