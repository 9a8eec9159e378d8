// The implicit-GEMM convolutions on CUDA (native_bsr_conv2d, _dgrad, _wgrad, _grad_scores), groups = 1, NHWC,
// any channel count: argument checks and dispatch registration around the kernels. The forward pass is bsr_gemm over
// the image's implicit im2col (bsr_gemm_linear.cu), the filter gradient and its block scores are the weight-gradient
// kernels over it (bsr_gemm_wgrad.cu), the input gradient is bsr_conv_dgrad.cu. Nothing im2col-shaped is ever
// allocated. float16 and bfloat16 run on tensor cores with fp32 accumulation, float32 on FFMA; everything runs on
// the current stream with no host synchronisation.
#include <cstdint>
#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "conv_checks.h"
#include "cuda/gemm_glue.h"

namespace sparsekern {
namespace {

using at::Tensor;
using namespace cuda_glue;

void check_image(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D NHWC [batch, height, width, channels], got ", t.dim(), "-D");
  gemm_type(t, name);
}

// Whether the product of non-negative factors is below `limit`, without overflowing on the way (the sizes may be
// anything a caller passed).
bool product_below(int64_t limit, std::initializer_list<int64_t> factors) {
  for (const int64_t f : factors)
    if (f == 0) return true;
  int64_t product = 1;
  for (const int64_t f : factors) {
    if (product > (limit - 1) / f) return false;
    product *= f;
  }
  return true;
}

// The kernels' view of the convolution, checked (every size non-negative: tensor sizes, or checked positive). They
// compute pixel and im2col indices in int32 (offsets into the images in int64), with room for a tile hanging over
// the end. The geometry's four pairs are read only after check_conv_geometry proved they have two entries.
cuda::ConvShape conv_shape(int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t out_h,
                           int64_t out_w, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  check_conv_geometry(kernel_size, stride, padding, dilation);
  constexpr int64_t kIndexLimit = INT32_MAX - 1024;
  constexpr int64_t kGeometryLimit = 1 << 16;
  for (const auto& pair : {kernel_size, stride, padding, dilation})
    TORCH_CHECK(pair[0] < kGeometryLimit && pair[1] < kGeometryLimit,
                "kernel_size, stride, padding and dilation must be under 65536, got ", pair);
  TORCH_CHECK(product_below(kIndexLimit, {batch, out_h, out_w}) && product_below(kIndexLimit, {batch, height, width}) &&
                  product_below(kIndexLimit, {kernel_size[0], kernel_size[1], channels}),
              "the CUDA convolution kernels take fewer than 2^31 pixels per image batch and kh*kw*in_channels < 2^31");
  const auto narrow = [](int64_t v) { return static_cast<int>(v); };
  return {batch,
          height,
          width,
          channels,
          out_h,
          out_w,
          narrow(kernel_size[0]),
          narrow(kernel_size[1]),
          narrow(stride[0]),
          narrow(stride[1]),
          narrow(padding[0]),
          narrow(padding[1]),
          narrow(dilation[0]),
          narrow(dilation[1])};
}

// The filter-gradient ops: dy [B, OH, OW, N] and x [B, H, W, C].
cuda::ConvShape check_weight_grad_images(const Tensor& dy, const Tensor& x, int64_t block_size,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation) {
  check_image(dy, "dy");
  check_image(x, "x");
  check_same_batch(dy, x);
  TORCH_CHECK(x.device() == dy.device(), "x is on ", x.device(), " but dy is on ", dy.device());
  SK_CHECK_BLOCK_SIZE(block_size);
  return conv_shape(x.size(0), x.size(1), x.size(2), x.size(3), dy.size(1), dy.size(2), kernel_size, stride, padding,
                    dilation);
}

Tensor bsr_conv2d_cuda(const Tensor& x_in, const Tensor& values_in, const Tensor& row_ptr, const Tensor& col_idx,
                       const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                       int64_t out_channels, const c10::optional<Tensor>& bias_in, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       at::IntArrayRef output_size) {
  check_image(x_in, "x");
  const int64_t bs = check_values(values_in, x_in, "x");
  check_image_size(output_size, "output_size");
  TORCH_CHECK(out_channels > 0, "out_channels must be positive, got ", out_channels);
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == out_channels, "bias must have shape (", out_channels,
                ",), got ", bias_in->sizes());
    check_like(*bias_in, x_in, "bias", "x");
  }
  const cuda::ConvShape shape = conv_shape(x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), output_size[0],
                                           output_size[1], kernel_size, stride, padding, dilation);
  const int64_t M = shape.batch * shape.out_h * shape.out_w, N = out_channels;
  const int64_t K = shape.kernel_h * shape.kernel_w * shape.channels;
  check_layout(row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, cdiv(N, bs), cdiv(K, bs), values_in.size(0), x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  check_capability(x_in);

  Tensor y = at::empty({shape.batch, shape.out_h, shape.out_w, N}, x_in.options());
  if (M == 0) return y;
  if (K == 0) return bias_in.has_value() ? y.copy_(bias_in->expand_as(y)) : y.zero_();  // no input channels
  const Tensor x = x_in.contiguous();
  const Tensor values = aligned_values(values_in);
  const Tensor bias = bias_in.has_value() ? bias_in->contiguous() : Tensor();
  cuda::BsrGemmArgs args{};
  args.type = gemm_type(x, "x");
  args.block_size = static_cast<int>(bs);
  args.transposed = false;
  args.a = x.data_ptr();
  args.values = values.data_ptr();
  args.bias = bias.defined() ? bias.data_ptr() : nullptr;
  args.out = y.data_ptr();
  args.line_ptr = row_ptr.data_ptr<int32_t>();
  args.line_idx = col_idx.data_ptr<int32_t>();
  args.M = M;
  args.a_cols = K;
  args.out_cols = N;
  args.n_lines = cdiv(N, bs);
  args.nnz = values.size(0);
  args.conv = &shape;
  check_launch(launch_bsr_gemm(args, x), "native_bsr_conv2d",
               {args.type, M, N, K, bs, values.size(0)});
  return y;
}

Tensor bsr_conv2d_dgrad_cuda(const Tensor& dy_in, const Tensor& values_in, const Tensor& row_ptr,
                             const Tensor& col_idx, const Tensor& coo_row, const Tensor& col_ptr,
                             const Tensor& row_idx, const Tensor& perm, int64_t in_channels,
                             at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_image(dy_in, "dy");
  const int64_t bs = check_values(values_in, dy_in, "dy");
  check_image_size(input_size, "input_size");
  TORCH_CHECK(in_channels > 0, "in_channels must be positive, got ", in_channels);
  const cuda::ConvShape shape = conv_shape(dy_in.size(0), input_size[0], input_size[1], in_channels, dy_in.size(1),
                                           dy_in.size(2), kernel_size, stride, padding, dilation);
  const int64_t M = shape.batch * shape.out_h * shape.out_w, N = dy_in.size(3);
  const int64_t K = shape.kernel_h * shape.kernel_w * in_channels;
  check_layout(row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, cdiv(N, bs), cdiv(K, bs), values_in.size(0),
               dy_in);
  const c10::cuda::CUDAGuard device_guard(dy_in.device());
  check_capability(dy_in);

  Tensor dx = at::empty({shape.batch, shape.height, shape.width, in_channels}, dy_in.options());
  if (dx.numel() == 0) return dx;
  if (M == 0 || N == 0) return dx.zero_();
  const Tensor dy = dy_in.contiguous();
  const Tensor values = aligned_values(values_in);
  cuda::ConvDgradArgs args{};
  args.type = gemm_type(dy, "dy");
  args.block_size = static_cast<int>(bs);
  args.dy = dy.data_ptr();
  args.values = values.data_ptr();
  args.dx = dx.data_ptr();
  args.col_ptr = col_ptr.data_ptr<int32_t>();
  args.row_idx = row_idx.data_ptr<int32_t>();
  args.perm = perm.data_ptr<int32_t>();
  args.out_channels = N;
  args.nnz = values.size(0);
  args.shape = shape;
  cuda::LaunchStatus status;
#ifdef SPARSEKERN_WITH_CUTE
  // The Hopper kernel where it was asked for and takes the call, else the mma.sync one.
  if (!(hopper_gemms_requested(dy) && cuda::bsr_conv2d_dgrad_sm90(args, current_stream(), &status)))
#endif
    status = cuda::bsr_conv2d_dgrad(args, current_stream());
  check_launch(status, "native_bsr_conv2d_dgrad", {args.type, M, N, K, bs, values.size(0)});
  return dx;
}

Tensor bsr_conv2d_wgrad_cuda(const Tensor& dy_in, const Tensor& x_in, const Tensor& row_ptr, const Tensor& col_idx,
                             const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                             int64_t block_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  const cuda::ConvShape shape =
      check_weight_grad_images(dy_in, x_in, block_size, kernel_size, stride, padding, dilation);
  const int64_t bs = block_size, M = shape.batch * shape.out_h * shape.out_w, N = dy_in.size(3);
  const int64_t K = shape.kernel_h * shape.kernel_w * shape.channels, nnz = col_idx.numel();
  check_layout(row_ptr, col_idx, coo_row, col_ptr, row_idx, perm, cdiv(N, bs), cdiv(K, bs), nnz, dy_in);
  const c10::cuda::CUDAGuard device_guard(dy_in.device());
  check_capability(dy_in);

  Tensor out = at::empty({nnz, bs, bs}, dy_in.options());
  if (nnz == 0) return out;
  if (M == 0) return out.zero_();
  const Tensor dy = dy_in.contiguous();
  const Tensor x = x_in.contiguous();
  launch_sddmm(weight_grad_operands(dy, N, x, 0, bs, M, N, K, &shape), coo_row, col_idx, out,
               "native_bsr_conv2d_wgrad");
  return out;
}

Tensor bsr_conv2d_grad_scores_cuda(const Tensor& dy_in, const Tensor& x_in, int64_t block_size,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation) {
  const cuda::ConvShape shape =
      check_weight_grad_images(dy_in, x_in, block_size, kernel_size, stride, padding, dilation);
  const int64_t bs = block_size, M = shape.batch * shape.out_h * shape.out_w, N = dy_in.size(3);
  const int64_t K = shape.kernel_h * shape.kernel_w * shape.channels;
  const c10::cuda::CUDAGuard device_guard(dy_in.device());
  check_capability(dy_in);

  Tensor scores = at::empty({cdiv(N, bs), cdiv(K, bs)}, dy_in.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  if (M == 0) return scores.zero_();
  const Tensor dy = dy_in.contiguous();
  const Tensor x = x_in.contiguous();
  launch_block_scores(weight_grad_operands(dy, N, x, 0, bs, M, N, K, &shape), scores,
                      "native_bsr_conv2d_grad_scores");
  return scores;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("native_bsr_conv2d", &sparsekern::bsr_conv2d_cuda);
  m.impl("native_bsr_conv2d_dgrad", &sparsekern::bsr_conv2d_dgrad_cuda);
  m.impl("native_bsr_conv2d_wgrad", &sparsekern::bsr_conv2d_wgrad_cuda);
  m.impl("native_bsr_conv2d_grad_scores", &sparsekern::bsr_conv2d_grad_scores_cuda);
}
