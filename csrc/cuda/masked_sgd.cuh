// native_masked_sgd_ on CUDA: the launcher, in CUDA-only terms (raw pointers, sizes, a stream), so that the
// kernels compile without the torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "element_type.cuh"

namespace sparsekern {
namespace cuda {

// One SGD step in place over `numel` contiguous elements, with the arithmetic of
// sparsekern.reference.masked_sgd_. Supported types: weights fp32 with param fp32/bf16/fp16 and grad of the
// param's type or fp32; weights fp64 with param and grad fp64. Every pointer is a device pointer.
struct MaskedSgdArgs {
  void* weights;               // master when given, else param (weights_type)
  void* param;                 // param_type; written from the weights only when has_master
  const void* grad;            // grad_type
  void* momentum_buffer;       // weights_type; null when momentum == 0
  const void* grad_scale;      // weights_type, numel / slice factors (one per leading index), or null
  const void* inv_loss_scale;  // weights_type, one element, or null
  const float* found_inf;      // one element (non-zero skips the step), or null
  int64_t* step;               // one element: read by every thread, incremented afterwards when the step is taken
  int64_t numel;
  int64_t slice;               // elements per leading index (grad_scale granularity), >= 1
  double lr, momentum, dampening, weight_decay;
  bool nesterov, decoupled_weight_decay, has_master;
  ElementType weights_type, param_type, grad_type;
};

// Enqueues the step and the step-counter update on `stream`; no host synchronisation. Returns the first
// launch error, or cudaErrorInvalidValue for an unsupported combination of types.
cudaError_t masked_sgd(const MaskedSgdArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
