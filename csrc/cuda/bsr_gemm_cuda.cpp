// The block-sparse GEMMs on CUDA (native_bsr_linear, native_bsr_linear_dx, native_bsr_sddmm,
// native_block_grad_scores): argument checks, dtypes and dispatch registration around the kernels in
// bsr_gemm_linear.cu and bsr_gemm_wgrad.cu. Everything runs on the current stream with no host synchronisation.
// The layout's index *contents* are trusted (reading them would cost a device-to-host copy): they come from
// build_layout_index_, and the kernels index memory with them. float16 and bfloat16 run on tensor cores with fp32
// accumulation, float32 on FFMA; float64 is refused (sparsekern.ops sends it to the cpu/reference backends).
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/bsr_gemm.cuh"

namespace sparsekern {
namespace {

using at::Tensor;

bool valid_block_size(int64_t bs) { return bs == 16 || bs == 32 || bs == 64 || bs == 128; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

cuda::ElementType gemm_type(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::ElementType::kFloat32;
    case at::kHalf: return cuda::ElementType::kFloat16;
    case at::kBFloat16: return cuda::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " has dtype ", t.scalar_type(), ": the CUDA GEMM kernels take float16, bfloat16 or ",
                  "float32 (float64 runs on the cpu and reference backends)");
  }
}

void check_operand(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [M, features], got ", t.dim(), "-D");
  gemm_type(t, name);
}

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name, " has ",
              ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

// values [nnz, bs, bs] -> bs (checked)
int64_t check_values(const Tensor& values, const Tensor& like, const char* like_name) {
  SK_CHECK_DIM(values, 3);
  const int64_t bs = values.size(1);
  TORCH_CHECK(values.size(2) == bs && valid_block_size(bs),
              "values must be [nnz, bs, bs] with bs in {16, 32, 64, 128}, got ", values.sizes());
  check_like(values, like, "values", like_name);
  return bs;
}

void check_index(const Tensor& t, const char* name, int64_t numel, const char* what, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the operands are on ", like.device());
  TORCH_CHECK(t.numel() == numel, name, " must have ", what, " = ", numel, " elements, got ", t.numel());
}

// The six index tensors of a layout over an R x C block grid with nnz blocks (shapes only, see above).
void check_layout(const Tensor& row_ptr, const Tensor& col_idx, const Tensor& coo_row, const Tensor& col_ptr,
                  const Tensor& row_idx, const Tensor& perm, int64_t n_block_rows, int64_t n_block_cols, int64_t nnz,
                  const Tensor& like) {
  check_index(row_ptr, "row_ptr", n_block_rows + 1, "block rows + 1", like);
  check_index(col_ptr, "col_ptr", n_block_cols + 1, "block columns + 1", like);
  check_index(col_idx, "col_idx", nnz, "stored blocks", like);
  check_index(coo_row, "coo_row", nnz, "stored blocks", like);
  check_index(row_idx, "row_idx", nnz, "stored blocks", like);
  check_index(perm, "perm", nnz, "stored blocks", like);
  TORCH_CHECK(nnz <= INT32_MAX, "at most 2^31 - 1 stored blocks, got ", nnz);
}

int device_attribute(cudaDeviceAttr attribute, const Tensor& on) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, on.get_device()));
  return value;
}

void check_capability(const Tensor& t) {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, t);
  TORCH_CHECK(major >= 8, "the CUDA GEMM kernels need compute capability 8.0 or newer (cp.async, bf16 tensor cores); ",
              t.device(), " is ", major, ".x");
}

// The kernels take a row stride but need unit stride along the features.
Tensor rows_contiguous(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every launch's error (cudaGetLastError right after it, in the launcher) reaches here.
void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err != cudaErrorInvalidValue, op, ": arguments the CUDA kernels do not support (a bug in the checks)");
  C10_CUDA_CHECK(err);
}

// ---------------------------------------------------------------------------------------------
// Ops (argument lists of sparsekern.reference)

Tensor bsr_linear_cuda(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                       const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                       int64_t out_features, const c10::optional<Tensor>& bias) {
  check_operand(x, "x");
  const int64_t bs = check_values(values, x, "x");
  TORCH_CHECK(out_features > 0, "out_features must be positive, got ", out_features);
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
  const Tensor w = values.contiguous();
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
  check_launch(cuda::bsr_gemm(args, current_stream()), "native_bsr_linear");
  return y;
}

Tensor bsr_linear_dx_cuda(const Tensor& dy, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                          const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                          int64_t in_features) {
  check_operand(dy, "dy");
  const int64_t bs = check_values(values, dy, "dy");
  TORCH_CHECK(in_features > 0, "in_features must be positive, got ", in_features);
  const int64_t M = dy.size(0), N = dy.size(1), K = in_features;
  const int64_t n_block_cols = cdiv(K, bs);
  check_layout(row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, cdiv(N, bs), n_block_cols, values.size(0), dy);
  const c10::cuda::CUDAGuard device_guard(dy.device());
  check_capability(dy);

  Tensor dx = at::empty({M, K}, dy.options());
  if (M == 0) return dx;
  const Tensor a = rows_contiguous(dy);
  const Tensor w = values.contiguous();
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
  args.perm = perm.data_ptr<int32_t>();
  args.M = M;
  args.a_cols = N;
  args.out_cols = K;
  args.n_lines = n_block_cols;
  check_launch(cuda::bsr_gemm(args, current_stream()), "native_bsr_linear_dx");
  return dx;
}

void check_weight_grad_operands(const Tensor& dy, const Tensor& x, int64_t block_size) {
  check_operand(dy, "dy");
  check_operand(x, "x");
  check_like(x, dy, "x", "dy");
  TORCH_CHECK(valid_block_size(block_size), "block_size must be 16, 32, 64 or 128, got ", block_size);
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
  const cuda::SddmmPlan plan = cuda::sddmm_plan(M, nnz, device_attribute(cudaDevAttrMultiProcessorCount, dy));
  // fp32 partial blocks per M-chunk, when the blocks alone are too few to fill the GPU.
  const Tensor partial =
      plan.splits > 1 ? at::empty({plan.splits, nnz, bs, bs}, dy.options().dtype(at::kFloat)) : Tensor();
  cuda::SddmmArgs args{};
  args.type = gemm_type(dy, "dy");
  args.block_size = static_cast<int>(bs);
  args.dy = dy_rows.data_ptr();
  args.ld_dy = dy_rows.stride(0);
  args.x = x_rows.data_ptr();
  args.ld_x = x_rows.stride(0);
  args.M = M;
  args.N = N;
  args.K = K;
  args.coo_row = coo_row.data_ptr<int32_t>();
  args.col_idx = col_idx.data_ptr<int32_t>();
  args.nnz = nnz;
  args.splits = plan.splits;
  args.chunk = plan.chunk;
  args.partial = partial.defined() ? partial.data_ptr<float>() : nullptr;
  args.out = out.data_ptr();
  check_launch(cuda::bsr_sddmm(args, current_stream()), "native_bsr_sddmm");
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
  cuda::BlockScoresArgs args{};
  args.type = gemm_type(dy, "dy");
  args.block_size = static_cast<int>(bs);
  args.dy = dy_rows.data_ptr();
  args.ld_dy = dy_rows.stride(0);
  args.x = x_rows.data_ptr();
  args.ld_x = x_rows.stride(0);
  args.M = M;
  args.N = N;
  args.K = K;
  args.scores = scores.data_ptr<float>();
  check_launch(cuda::block_grad_scores(args, current_stream()), "native_block_grad_scores");
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
