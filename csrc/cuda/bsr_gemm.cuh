// The block-sparse GEMMs on CUDA: launchers in CUDA-only terms (raw pointers, sizes, a stream), so that the
// kernels (bsr_gemm_linear.cu, bsr_gemm_wgrad.cu) compile without the torch headers. The torch glue is
// bsr_gemm_cuda.cpp.
//
// W [N, K] is block-sparse: values [nnz, bs, bs] (row-major blocks, block i at block-row coo_row[i], block-column
// col_idx[i], in block-CSR order) plus the transposed index (col_ptr, row_idx, perm: CSC position -> CSR block).
// Blocks past N or K are partly padding; padding entries of `values` are never used. Every pointer is a device
// pointer; every function only enqueues work on `stream` (no host synchronisation) and returns the first error.
// Element types: float16, bfloat16 (tensor cores, fp32 accumulation) and float32 (FFMA); block sizes 16, 32,
// 64, 128; anything else returns cudaErrorInvalidValue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "element_type.cuh"

namespace sparsekern {
namespace cuda {

// out [M, out_cols] (contiguous) = A [M, a_cols] (row stride lda) times W walked by lines:
// - forward (transposed = false):  Y = X Wᵀ (+ bias). Lines are block-rows (line_ptr = row_ptr, line_idx =
//   col_idx, the block of position j is values[j]); a_cols = K, out_cols = N.
// - input gradient (transposed = true): dX = dY W. Lines are block-columns (line_ptr = col_ptr, line_idx =
//   row_idx, the block of position q is values[perm[q]]); a_cols = N, out_cols = K.
struct BsrGemmArgs {
  ElementType type;
  int block_size;
  bool transposed;
  const void* a;
  int64_t lda;
  const void* values;
  const void* bias;  // [out_cols] of `type`, or null (forward only)
  void* out;
  const int32_t* line_ptr;  // [n_lines + 1]
  const int32_t* line_idx;  // [nnz]
  const int32_t* perm;      // [nnz] (transposed) or null
  int64_t M, a_cols, out_cols, n_lines;
};

cudaError_t bsr_gemm(const BsrGemmArgs& args, cudaStream_t stream);

// dW blocks [nnz, bs, bs] = (dYᵀ X) at the layout's blocks, zero in the padding. M is split into `splits`
// chunks of `chunk` rows (sddmm_plan): with one split the blocks go straight to `out`; with several, each
// (block, chunk) writes an fp32 partial to `partial` [splits, nnz, bs, bs] and a second pass sums them in a
// fixed order (deterministic) into `out`.
struct SddmmArgs {
  ElementType type;
  int block_size;
  const void* dy;  // [M, N], row stride ld_dy
  int64_t ld_dy;
  const void* x;  // [M, K], row stride ld_x
  int64_t ld_x;
  int64_t M, N, K;
  const int32_t* coo_row;  // [nnz]
  const int32_t* col_idx;  // [nnz]
  int64_t nnz;
  int64_t splits, chunk;
  float* partial;  // [splits, nnz, bs, bs], or null when splits == 1
  void* out;       // [nnz, bs, bs] of `type`
};

struct SddmmPlan {
  int64_t splits, chunk;
};

// How many M-chunks to split the SDDMM into so that `nnz` blocks fill `sm_count` SMs a few times over (chunks
// of at least 256 rows). Requires M > 0.
SddmmPlan sddmm_plan(int64_t M, int64_t nnz, int sm_count);

cudaError_t bsr_sddmm(const SddmmArgs& args, cudaStream_t stream);

// scores [ceil(N/bs), ceil(K/bs)] fp32 = Frobenius norm of every block of the dense dYᵀX, computed tile by tile
// in registers; the dense gradient never reaches memory. Requires M > 0.
struct BlockScoresArgs {
  ElementType type;
  int block_size;
  const void* dy;
  int64_t ld_dy;
  const void* x;
  int64_t ld_x;
  int64_t M, N, K;
  float* scores;
};

cudaError_t block_grad_scores(const BlockScoresArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
