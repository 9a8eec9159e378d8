// Outputs of the CPU ops come from a small pool of reused buffers: a fresh buffer costs a page fault per 4 KB
// page on first touch, measured at about 1 us each on the 2-core CI VM (4 ms for the 16 MB output of a
// 2048 x 2048 GEMM that itself takes 6 ms), and whether malloc hands back touched pages or fresh ones changes
// from call to call. A training loop asks for the same sizes every step, so freed outputs are kept for reuse.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace sparsekern {
namespace cpu {

// Like at::empty(sizes, like.options()) (contiguous), from the pool when the tensor is large.
at::Tensor empty_output(c10::IntArrayRef sizes, const at::Tensor& like);

}  // namespace cpu
}  // namespace sparsekern
