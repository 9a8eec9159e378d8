// Argument checks shared by the torch glue of every op. Each message names the tensor it is about.
#pragma once

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
