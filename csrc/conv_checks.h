// Argument checks of the convolution ops (groups = 1, NHWC), shared by their CPU and CUDA glue. Each backend adds
// its own device and dtype checks.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace sparsekern {

// kernel_size, stride and dilation positive, padding (top, left) non-negative, two entries each.
inline void check_conv_geometry(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "kernel_size, stride, padding and dilation must each have 2 entries");
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0, "kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "padding must be non-negative, got ", padding);
}

// output_size / input_size: two positive sizes.
inline void check_image_size(at::IntArrayRef size, const char* name) {
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, name, " must be two positive sizes, got ", size);
}

// dy and x of the filter-gradient ops: the same batch and dtype.
inline void check_same_batch(const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "x has dtype ", x.scalar_type(), " but dy has ",
              dy.scalar_type());
  TORCH_CHECK(dy.size(0) == x.size(0), "dy has batch ", dy.size(0), " but x has ", x.size(0));
}

}  // namespace sparsekern
