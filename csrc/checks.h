// Argument checks shared by the torch glue of every op. Each message names the tensor it is about.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define SK_CHECK_DTYPE(t, dtype, dtype_name) \
  TORCH_CHECK((t).scalar_type() == (dtype), #t " must be " dtype_name ", got ", (t).scalar_type())

#define SK_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

#define SK_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must be " #n "-D, got ", (t).dim(), "-D")

#define SK_CHECK_NUMEL(t, n, what) \
  TORCH_CHECK((t).numel() == (n), #t " must have " what " = ", (n), " elements, got ", (t).numel())

#define SK_CHECK_SAME_DEVICE(t, ref)                                                                   \
  TORCH_CHECK((t).device() == (ref).device(), #t " must be on the same device as " #ref " (", (ref).device(), \
              "), got ", (t).device())

namespace sparsekern {

// The block sizes every kernel is built for.
inline bool valid_block_size(int64_t bs) { return bs == 16 || bs == 32 || bs == 64 || bs == 128; }

#define SK_CHECK_BLOCK_SIZE(bs) \
  TORCH_CHECK(valid_block_size(bs), "block_size must be 16, 32, 64 or 128, got ", (bs))

// values [nnz, bs, bs] -> bs, its shape checked (its device and dtype are the caller's to check).
inline int64_t values_block_size(const at::Tensor& values) {
  SK_CHECK_DIM(values, 3);
  const int64_t bs = values.size(1);
  TORCH_CHECK(values.size(2) == bs && valid_block_size(bs),
              "values must be [nnz, bs, bs] with bs in {16, 32, 64, 128}, got ", values.sizes());
  return bs;
}

}  // namespace sparsekern
