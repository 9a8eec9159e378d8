// The block-sparse GEMMs and implicit-GEMM convolutions on CUDA: launchers in CUDA-only terms (raw pointers,
// sizes, a stream), so that the kernels (bsr_gemm_linear.cu, bsr_gemm_wgrad.cu, bsr_conv_dgrad.cu) compile without
// the torch headers. The torch glue is bsr_gemm_cuda.cpp and bsr_conv_cuda.cpp.
//
// W [N, K] is block-sparse: values [nnz, bs, bs] (row-major blocks, block i at block-row coo_row[i], block-column
// col_idx[i], in block-CSR order) plus the transposed index (col_ptr, row_idx, perm: CSC position -> CSR block).
// Blocks past N or K are partly padding; padding entries of `values` are never used. Every pointer is a device
// pointer (`values` 16-byte aligned, so that blocks load in 16-byte copies); the pointers of empty tensors may be
// null (a layout with no blocks: torch gives a zero-byte allocation no address), and nothing is read through them.
// Every function only enqueues work on `stream` (no host synchronisation) and returns a LaunchStatus.
// Element types: float16, bfloat16 (tensor cores, fp32 accumulation) and float32 (FFMA); block sizes 16, 32,
// 64, 128; anything else is refused with cudaErrorInvalidValue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "element_type.cuh"

namespace sparsekern {
namespace cuda {

// What a launcher did, for the glue's error message: the first error (cudaSuccess if none) and the configuration
// of the launch that gave it, or launched = false when the launcher refused the arguments before launching.
// cudaErrorInvalidValue from a launch does not mean a bad argument: a grid dimension over its limit or too much
// dynamic shared memory give it too.
struct LaunchStatus {
  cudaError_t error = cudaSuccess;
  bool launched = false;
  dim3 grid, block;
  int smem_bytes = 0;
};

// A convolution (groups = 1) of an NHWC image x [batch, height, width, channels] with a filter matrix
// [out_channels, kernel_h * kernel_w * channels] (K ordered (kh, kw, c)) giving y [batch, out_h, out_w, N]; zero
// padding given top/left (out_h, out_w fix the bottom/right). The GEMM view: M = batch * out_h * out_w output
// pixels, K = kernel_h * kernel_w * channels. The glue guarantees M, K and every image's element count < 2^31.
struct ConvShape {
  int64_t batch, height, width, channels, out_h, out_w;
  int kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
};

// out [M, out_cols] (contiguous) = A [M, a_cols] (row stride lda) times W walked by lines:
// - forward (transposed = false):  Y = X Wᵀ (+ bias). Lines are block-rows (line_ptr = row_ptr, line_idx =
//   col_idx, the block of position j is values[j]); a_cols = K, out_cols = N.
// - input gradient (transposed = true): dX = dY W. Lines are block-columns (line_ptr = col_ptr, line_idx =
//   row_idx, the block of position q is values[perm[q]]); a_cols = N, out_cols = K.
// - convolution (conv != null, forward only): A is the implicit im2col [M, K] of the NHWC image `a` (lda unused),
//   so out [M, N] is the NHWC output.
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
  const int32_t* perm;      // [nnz] (transposed; read only then)
  int64_t M, a_cols, out_cols, n_lines;
  int64_t nnz;            // stored blocks (values.size(0))
  const ConvShape* conv;  // or null
};

LaunchStatus bsr_gemm(const BsrGemmArgs& args, cudaStream_t stream);

// The same GEMMs on Hopper (bsr_gemm_sm90.cu: TMA loads, wgmma, CUTLASS's CuTe; built where CUTLASS's headers are
// found, SPARSEKERN_WITH_CUTE). bsr_gemm_sm90_takes: whether the kernels take these arguments (16-bit types,
// bs 64 or 128, no padded blocks, no convolution, TMA-friendly addresses). bsr_gemm_sm90 launches them and fills
// *status, or returns false without launching where they do not take the call or the binary has no sm_90a code for
// the device; the caller then runs bsr_gemm. Call it on compute capability 9.0 devices only.
bool bsr_gemm_sm90_takes(const BsrGemmArgs& args);
bool bsr_gemm_sm90(const BsrGemmArgs& args, cudaStream_t stream, LaunchStatus* status);

// The convolution's forward pass (args.conv set) on Hopper (bsr_conv_sm90.cu, as bsr_gemm_sm90): takes stride 1,
// in_channels and out_channels multiples of bs, 16-bit types, bs 64 or 128.
bool bsr_conv2d_sm90(const BsrGemmArgs& args, cudaStream_t stream, LaunchStatus* status);

// The operands of the weight-gradient GEMMs (dYᵀX [N, K], reduced over M): dy [M, N] with row stride ld_dy, and
// x a plain [M, K] matrix with row stride ld_x, or (conv != null) the NHWC image whose implicit im2col is X
// (ld_x unused; dY is then the NHWC output gradient [M, N] and dYᵀX the filter gradient).
struct WeightGradOperands {
  ElementType type;
  int block_size;
  const void* dy;
  int64_t ld_dy;
  const void* x;
  int64_t ld_x;
  int64_t M, N, K;
  const ConvShape* conv;  // or null
};

// dW blocks [nnz, bs, bs] = (dYᵀ X) at the layout's blocks, zero in the padding. M is split into `splits`
// chunks of `chunk` rows (sddmm_plan): with one split the blocks go straight to `out`; with several, each
// (block, chunk) writes an fp32 partial to `partial` [splits, nnz, bs, bs] and a second pass sums them in a
// fixed order (deterministic) into `out`.
struct SddmmArgs {
  WeightGradOperands in;
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

LaunchStatus bsr_sddmm(const SddmmArgs& args, cudaStream_t stream);

// The split SDDMM's second pass: out = the sum of the `splits` fp32 partials, in order (bsr_sddmm runs it; so does
// bsr_sddmm_sm90).
LaunchStatus sum_sddmm_partials(const SddmmArgs& args, cudaStream_t stream);

// bsr_sddmm on Hopper (bsr_gemm_sm90.cu, as bsr_gemm_sm90 above): the same plan, partials and second pass; takes
// 16-bit types, bs 64 or 128, N and K multiples of bs, no convolution, TMA-friendly addresses, chunks of whole
// 64-row steps.
bool bsr_sddmm_sm90(const SddmmArgs& args, cudaStream_t stream, LaunchStatus* status);

// The convolution's filter gradient (args.in.conv set) on Hopper (bsr_conv_sm90.cu): the same plan, partials and
// second pass; takes stride 1, in_channels and out_channels multiples of bs, 16-bit types, bs 64 or 128.
bool bsr_conv2d_wgrad_sm90(const SddmmArgs& args, cudaStream_t stream, LaunchStatus* status);

// scores [ceil(N/bs), ceil(K/bs)] fp32 = Frobenius norm of every block of the dense dYᵀX, computed tile by tile
// in registers; the dense gradient never reaches memory. Requires M > 0.
struct BlockScoresArgs {
  WeightGradOperands in;
  float* scores;
};

LaunchStatus block_grad_scores(const BlockScoresArgs& args, cudaStream_t stream);

// block_grad_scores on Hopper (bsr_gemm_sm90.cu, as bsr_gemm_sm90 above): one CTA per block of the grid; takes
// 16-bit types, bs 64 or 128, N and K multiples of bs, no convolution, TMA-friendly addresses.
bool block_grad_scores_sm90(const BlockScoresArgs& args, cudaStream_t stream, LaunchStatus* status);

// The convolution's input gradient dx [batch, height, width, channels] from dy [batch, out_h, out_w, N] (both NHWC,
// contiguous) and the filter walked through its transposed index (col_ptr, row_idx, perm, as in BsrGemmArgs).
// Every element of dx is written once (no atomics, deterministic). Any channel count.
struct ConvDgradArgs {
  ElementType type;
  int block_size;
  const void* dy;
  const void* values;
  void* dx;
  const int32_t* col_ptr;  // [ceil(K / bs) + 1]
  const int32_t* row_idx;
  const int32_t* perm;
  int64_t out_channels;  // N
  int64_t nnz;           // stored blocks
  ConvShape shape;
};

LaunchStatus bsr_conv2d_dgrad(const ConvDgradArgs& args, cudaStream_t stream);

// The same on Hopper (bsr_conv_sm90.cu, as bsr_gemm_sm90): takes stride 1, in_channels and out_channels multiples
// of bs, 16-bit types, bs 64 or 128, at least one block.
bool bsr_conv2d_dgrad_sm90(const ConvDgradArgs& args, cudaStream_t stream, LaunchStatus* status);

}  // namespace cuda
}  // namespace sparsekern
