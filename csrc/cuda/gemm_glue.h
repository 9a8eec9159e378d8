// Argument checks and launch plumbing shared by the torch glue of the CUDA GEMMs (bsr_gemm_cuda.cpp) and
// convolutions (bsr_conv_cuda.cpp). The layout's index *contents* are trusted (reading them would cost a
// device-to-host copy): they come from build_layout_index_, and the kernels index memory with them.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "cuda/bsr_gemm.cuh"

namespace sparsekern {
namespace cuda_glue {

using at::Tensor;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cuda::ElementType gemm_type(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::ElementType::kFloat32;
    case at::kHalf: return cuda::ElementType::kFloat16;
    case at::kBFloat16: return cuda::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " has dtype ", t.scalar_type(), ": the CUDA GEMM kernels take float16, bfloat16 or ",
                  "float32 (float64 runs on the cpu and reference backends)");
  }
}

inline void check_operand(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [M, features], got ", t.dim(), "-D");
  gemm_type(t, name);
}

inline void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name, " has ",
              ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

// values [nnz, bs, bs] -> bs (checked)
inline int64_t check_values(const Tensor& values, const Tensor& like, const char* like_name) {
  const int64_t bs = values_block_size(values);
  check_like(values, like, "values", like_name);
  return bs;
}

inline void check_index(const Tensor& t, const char* name, int64_t numel, const char* what, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the operands are on ", like.device());
  TORCH_CHECK(t.numel() == numel, name, " must have ", what, " = ", numel, " elements, got ", t.numel());
}

// The six index tensors of a layout over an R x C block grid with nnz blocks (shapes only, see above).
inline void check_layout(const Tensor& row_ptr, const Tensor& col_idx, const Tensor& coo_row,
                         const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm, int64_t n_block_rows,
                         int64_t n_block_cols, int64_t nnz, const Tensor& like) {
  check_index(row_ptr, "row_ptr", n_block_rows + 1, "block rows + 1", like);
  check_index(col_ptr, "col_ptr", n_block_cols + 1, "block columns + 1", like);
  check_index(col_idx, "col_idx", nnz, "stored blocks", like);
  check_index(coo_row, "coo_row", nnz, "stored blocks", like);
  check_index(row_idx, "row_idx", nnz, "stored blocks", like);
  check_index(perm, "perm", nnz, "stored blocks", like);
  TORCH_CHECK(nnz <= INT32_MAX, "at most 2^31 - 1 stored blocks, got ", nnz);
}

// `on` is a CUDA tensor (checked): a CPU tensor's get_device() is -1, which no CUDA call may see.
inline int device_attribute(cudaDeviceAttr attribute, const Tensor& on) {
  TORCH_CHECK(on.is_cuda(), "device_attribute needs a CUDA tensor, got one on ", on.device());
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, on.get_device()));
  return value;
}

inline void check_capability(const Tensor& t) {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, t);
  TORCH_CHECK(major >= 8, "the CUDA GEMM kernels need compute capability 8.0 or newer (cp.async, bf16 tensor cores); ",
              t.device(), " is ", major, ".x");
}

// values [nnz, bs, bs] as the kernels read them: contiguous and 16-byte aligned (a view at an odd storage offset is
// copied), so that every block loads in 16-byte copies.
inline Tensor aligned_values(const Tensor& values) {
  const Tensor v = values.contiguous();
  return reinterpret_cast<uintptr_t>(v.data_ptr()) % 16 == 0 ? v : v.clone();
}

// The kernels take a row stride but need unit stride along the features.
inline Tensor rows_contiguous(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline const char* type_name(cuda::ElementType type) {
  switch (type) {
    case cuda::ElementType::kFloat32: return "float32";
    case cuda::ElementType::kFloat64: return "float64";
    case cuda::ElementType::kBFloat16: return "bfloat16";
    case cuda::ElementType::kFloat16: return "float16";
  }
  return "an unknown type";
}

// The GEMM a launch computed (for a convolution, its implicit GEMM), named in launch errors. blocks: the stored
// blocks, or (block scores) the blocks of the grid.
struct GemmProblem {
  cuda::ElementType type;
  int64_t M, N, K, block_size, blocks;
};

// Every launcher's status (cudaGetLastError right after the launch) reaches here. The message gives the CUDA error
// itself and the launch's configuration: cudaErrorInvalidValue, for one, comes from a grid dimension over its limit
// or too much dynamic shared memory as well as from a bad argument. A refusal by the launcher before any launch
// means arguments that the glue's checks should have stopped.
inline void check_launch(const cuda::LaunchStatus& status, const char* op, const GemmProblem& problem) {
  if (C10_LIKELY(status.error == cudaSuccess)) return;
  std::ostringstream where;
  if (status.launched) {
    where << "launching grid (" << status.grid.x << ", " << status.grid.y << ", " << status.grid.z << ") x "
          << status.block.x << " threads with " << status.smem_bytes << " bytes of dynamic shared memory (an error "
          << "left by earlier asynchronous work surfaces here too; CUDA_LAUNCH_BLOCKING=1 pins it down)";
  } else {
    where << "before any launch: the launcher refused arguments that the checks let through";
  }
  TORCH_CHECK(false, op, ": CUDA error ", cudaGetErrorName(status.error), " (", cudaGetErrorString(status.error),
              ") for M = ", problem.M, ", N = ", problem.N, ", K = ", problem.K, ", block size ", problem.block_size,
              ", ", problem.blocks, " blocks, ", type_name(problem.type), ", ", where.str());
}

// The Hopper GEMMs (bsr_gemm_sm90.cu: bsr_linear, bsr_linear_dx, bsr_sddmm, block_grad_scores; built where CUTLASS's
// headers were found) have not run on a GPU yet: they run only when SPARSEKERN_CUDA_SM90=1 asks for them (read at
// every call, like the Triton kernels' switch), on a compute capability 9.0 device (their sm_90a code runs on no
// other).
inline bool hopper_gemms_requested(const Tensor& on) {
#ifdef SPARSEKERN_WITH_CUTE
  const char* flag = std::getenv("SPARSEKERN_CUDA_SM90");
  return flag != nullptr && std::strcmp(flag, "1") == 0 &&
         device_attribute(cudaDevAttrComputeCapabilityMajor, on) == 9 &&
         device_attribute(cudaDevAttrComputeCapabilityMinor, on) == 0;
#else
  (void)on;
  return false;
#endif
}

// bsr_linear, bsr_linear_dx and the convolution's forward pass: the Hopper kernel where it was asked for and takes
// the call, else the mma.sync one.
inline cuda::LaunchStatus launch_bsr_gemm(const cuda::BsrGemmArgs& args, const Tensor& on) {
#ifdef SPARSEKERN_WITH_CUTE
  cuda::LaunchStatus status;
  if (hopper_gemms_requested(on) &&
      (args.conv != nullptr ? cuda::bsr_conv2d_sm90(args, current_stream(), &status)
                            : cuda::bsr_gemm_sm90(args, current_stream(), &status))) {
    return status;
  }
#endif
  return cuda::bsr_gemm(args, current_stream());
}

// The weight-gradient GEMMs' launches, shared by the linear and convolution ops: their operands (see
// cuda::WeightGradOperands; conv null for the linear ops).
inline cuda::WeightGradOperands weight_grad_operands(const Tensor& dy, int64_t ld_dy, const Tensor& x, int64_t ld_x,
                                                     int64_t block_size, int64_t M, int64_t N, int64_t K,
                                                     const cuda::ConvShape* conv) {
  return {gemm_type(dy, "dy"), static_cast<int>(block_size), dy.data_ptr(), ld_dy, x.data_ptr(), ld_x, M, N, K, conv};
}

// out [nnz, bs, bs] = (dYᵀ X) at the blocks (coo_row, col_idx); M > 0, nnz > 0; `out` on the current device.
inline void launch_sddmm(const cuda::WeightGradOperands& in, const Tensor& coo_row, const Tensor& col_idx,
                         Tensor& out, const char* op) {
  const int64_t nnz = out.size(0), bs = out.size(1);
  const cuda::SddmmPlan plan = cuda::sddmm_plan(in.M, nnz, device_attribute(cudaDevAttrMultiProcessorCount, out));
  // fp32 partial blocks per M-chunk, when the blocks alone are too few to fill the GPU.
  const Tensor partial =
      plan.splits > 1 ? at::empty({plan.splits, nnz, bs, bs}, out.options().dtype(at::kFloat)) : Tensor();
  cuda::SddmmArgs args{};
  args.in = in;
  args.coo_row = coo_row.data_ptr<int32_t>();
  args.col_idx = col_idx.data_ptr<int32_t>();
  args.nnz = nnz;
  args.splits = plan.splits;
  args.chunk = plan.chunk;
  args.partial = partial.defined() ? partial.data_ptr<float>() : nullptr;
  args.out = out.data_ptr();
  cuda::LaunchStatus status;
#ifdef SPARSEKERN_WITH_CUTE
  // The Hopper kernel where it was asked for and takes the call, else the mma.sync one.
  const auto hopper = in.conv != nullptr ? cuda::bsr_conv2d_wgrad_sm90 : cuda::bsr_sddmm_sm90;
  if (!(hopper_gemms_requested(out) && hopper(args, current_stream(), &status)))
#endif
    status = cuda::bsr_sddmm(args, current_stream());
  check_launch(status, op, {in.type, in.M, in.N, in.K, bs, nnz});
}

// scores [ceil(N/bs), ceil(K/bs)] fp32 = block norms of the dense dYᵀX; M > 0.
inline void launch_block_scores(const cuda::WeightGradOperands& in, Tensor& scores, const char* op) {
  cuda::BlockScoresArgs args{in, scores.data_ptr<float>()};
  cuda::LaunchStatus status;
#ifdef SPARSEKERN_WITH_CUTE
  if (!(hopper_gemms_requested(scores) && cuda::block_grad_scores_sm90(args, current_stream(), &status)))
#endif
    status = cuda::block_grad_scores(args, current_stream());
  check_launch(status, op, {in.type, in.M, in.N, in.K, in.block_size, scores.numel()});
}

}  // namespace cuda_glue
}  // namespace sparsekern
