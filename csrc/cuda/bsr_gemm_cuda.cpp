// The block-sparse GEMMs on CUDA (native_bsr_linear, native_bsr_linear_dx, native_bsr_sddmm,
// native_block_grad_scores): argument checks, dtypes and dispatch registration around the kernels in
// bsr_gemm_linear.cu and bsr_gemm_wgrad.cu (shared checks: gemm_glue.h). Everything runs on the current stream
// with no host synchronisation. float16 and bfloat16 run on tensor cores with fp32
// accumulation, float32 on FFMA; float64 is refused (sparsekern.ops sends it to the cpu/reference backends).
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "cuda/gemm_glue.h"

namespace sparsekern {
namespace {

using at::Tensor;
using namespace cuda_glue;

// ---------------------------------------------------------------------------------------------
// Ops (argument lists of sparsekern.reference)

Tensor bsr_linear_cuda(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                       const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                       int64_t out_features, const c10::optional<Tensor>& bias) {
  check_operand(x, "x");
  const int64_t bs = check_values(values, x, "x");
  TORCH_CHECK(out_features > 0 && out_features <= INT32_MAX, "out_features must be in [1, 2^31), got ", out_features);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias must have shape (", out_features, ",), got ",
                bias->sizes());
    check_like(*bias, x, "bias", "x");
  }
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const int64_t n_block_rows = cdiv(N, bs);
  check_layout(row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, n_block_rows, cdiv(K, bs), values.size(0), x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_capability(x);

  Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const Tensor a = rows_contiguous(x);
  const Tensor w = aligned_values(values);
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  cuda::BsrGemmArgs args{};
  args.type = gemm_type(x, "x");
  args.block_size = static_cast<int>(bs);
  args.transposed = false;
  args.a = a.data_ptr();
  args.lda = a.stride(0);
  args.values = w.data_ptr();
  args.bias = b.defined() ? b.data_ptr() : nullptr;
  args.out = y.data_ptr();
  args.line_ptr = row_ptr.data_ptr<int32_t>();
  args.line_idx = col_idx.data_ptr<int32_t>();
  args.perm = nullptr;
  args.M = M;
  args.a_cols = K;
  args.out_cols = N;
  args.n_lines = n_block_rows;
  args.nnz = values.size(0);
  check_launch(launch_bsr_gemm(args, x), "native_bsr_linear",
               {args.type, M, N, K, bs, values.size(0)});
  return y;
}

Tensor bsr_linear_dx_cuda(const Tensor& dy, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                          const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                          int64_t in_features) {
  check_operand(dy, "dy");
  const int64_t bs = check_values(values, dy, "dy");
  TORCH_CHECK(in_features > 0 && in_features <= INT32_MAX, "in_features must be in [1, 2^31), got ", in_features);
  const int64_t M = dy.size(0), N = dy.size(1), K = in_features;
  const int64_t n_block_cols = cdiv(K, bs);
  check_layout(row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, cdiv(N, bs), n_block_cols, values.size(0), dy);
  const c10::cuda::CUDAGuard device_guard(dy.device());
  check_capability(dy);

  Tensor dx = at::empty({M, K}, dy.options());
  if (M == 0) return dx;
  const Tensor a = rows_contiguous(dy);
  const Tensor w = aligned_values(values);
  cuda::BsrGemmArgs args{};
  args.type = gemm_type(dy, "dy");
  args.block_size = static_cast<int>(bs);
  args.transposed = true;
  args.a = a.data_ptr();
  args.lda = a.stride(0);
  args.values = w.data_ptr();
  args.bias = nullptr;
  args.out = dx.data_ptr();
  args.line_ptr = col_ptr.data_ptr<int32_t>();
  args.line_idx = row_idx.data_ptr<int32_t>();
  args.perm = perm.data_ptr<int32_t>();  // null without blocks (a zero-byte allocation): then never read
  args.M = M;
  args.a_cols = N;
  args.out_cols = K;
  args.n_lines = n_block_cols;
  args.nnz = values.size(0);
  check_launch(launch_bsr_gemm(args, dy), "native_bsr_linear_dx",
               {args.type, M, N, K, bs, values.size(0)});
  return dx;
}

void check_weight_grad_operands(const Tensor& dy, const Tensor& x, int64_t block_size) {
  check_operand(dy, "dy");
  check_operand(x, "x");
  check_like(x, dy, "x", "dy");
  SK_CHECK_BLOCK_SIZE(block_size);
  TORCH_CHECK(dy.size(0) == x.size(0), "dy has ", dy.size(0), " rows but x has ", x.size(0));
  TORCH_CHECK(dy.size(0) <= INT32_MAX, "dy and x may have at most 2^31 - 1 rows, got ", dy.size(0));
}

Tensor bsr_sddmm_cuda(const Tensor& dy, const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                      const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                      int64_t block_size) {
  check_weight_grad_operands(dy, x, block_size);
  const int64_t bs = block_size, M = dy.size(0), N = dy.size(1), K = x.size(1), nnz = col_idx.numel();
  check_layout(row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, cdiv(N, bs), cdiv(K, bs), nnz, dy);
  const c10::cuda::CUDAGuard device_guard(dy.device());
  check_capability(dy);

  Tensor out = at::empty({nnz, bs, bs}, dy.options());
  if (nnz == 0) return out;
  if (M == 0) return out.zero_();
  const Tensor dy_rows = rows_contiguous(dy);
  const Tensor x_rows = rows_contiguous(x);
  launch_sddmm(weight_grad_operands(dy_rows, dy_rows.stride(0), x_rows, x_rows.stride(0), bs, M, N, K, nullptr),
               coo_row, col_idx, out, "native_bsr_sddmm");
  return out;
}

Tensor block_grad_scores_cuda(const Tensor& dy, const Tensor& x, int64_t block_size) {
  check_weight_grad_operands(dy, x, block_size);
  const int64_t bs = block_size, M = dy.size(0), N = dy.size(1), K = x.size(1);
  const c10::cuda::CUDAGuard device_guard(dy.device());
  check_capability(dy);

  Tensor scores = at::empty({cdiv(N, bs), cdiv(K, bs)}, dy.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  if (M == 0) return scores.zero_();
  const Tensor dy_rows = rows_contiguous(dy);
  const Tensor x_rows = rows_contiguous(x);
  launch_block_scores(weight_grad_operands(dy_rows, dy_rows.stride(0), x_rows, x_rows.stride(0), bs, M, N, K,
                                           nullptr),
                      scores, "native_block_grad_scores");
  return scores;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("native_bsr_linear", &sparsekern::bsr_linear_cuda);
  m.impl("native_bsr_linear_dx", &sparsekern::bsr_linear_dx_cuda);
  m.impl("native_bsr_sddmm", &sparsekern::bsr_sddmm_cuda);
  m.impl("native_block_grad_scores", &sparsekern::block_grad_scores_cuda);
}
