// The CPU block-sparse GEMM kernels, seen from the torch glue (bsr_ops.cpp): plain structs of raw
// pointers and sizes, and one table of task functions per instruction set and dtype.
//
// This header must stay free of torch (and of any inline function with external linkage): it is
// included by translation units compiled for AVX-512 or AVX2 (`#pragma GCC target`), and an inline
// function compiled there could be picked by the linker for the baseline code and crash a CPU that
// lacks those instructions. Everything ISA-specific lives in an anonymous namespace in those units.
#pragma once

#include <cstdint>

namespace sparsekern {
namespace cpu {

// The block-sparse weight W [N, K] in blocks of bs x bs: block-CSR and the transposed block-CSC.
struct BsrIndex {
  const int32_t* row_ptr;  // [R + 1]
  const int32_t* col_idx;  // [nnz]
  const int32_t* coo_row;  // [nnz]
  const int32_t* col_ptr;  // [C + 1]
  const int32_t* row_idx;  // [nnz]
  const int32_t* perm;     // [nnz], CSC position -> CSR position (index into the values)
  int64_t n_block_rows;    // R = ceil(N / bs)
  int64_t n_block_cols;    // C = ceil(K / bs)
  int64_t nnz;
};

// How the GEMM's dense [M, K] operand is read. A plain row-major matrix (Linear) is the 1x1
// convolution of an image of height = width = 1, so one description serves both; `is_conv` picks
// the cheap addressing of the plain case. For a convolution the operand is the implicit im2col of
// an NHWC image, M = batch * out_h * out_w and K = kernel_h * kernel_w * channels in (kh, kw, cin)
// order, with channels a multiple of bs (a block is bs channels at one filter tap).
struct Im2col {
  bool is_conv;
  int64_t batch, height, width, channels;  // the NHWC image (Linear: M, 1, 1, K)
  int64_t out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// Y [M, N] = A [M, K] Wᵀ (+ bias). Tasks: (m-chunk, block-row), m-chunk major.
template <typename T>
struct ForwardArgs {
  const T* x;       // Linear: [M, K]; convolution: the NHWC image
  const T* values;  // [nnz, bs, bs]
  const T* bias;    // [N] or nullptr
  T* y;             // [M, N]
  BsrIndex index;
  Im2col geometry;
  int64_t M, N, K;
  int bs;
  int64_t m_chunk;  // rows per task, a multiple of 12
};

// Linear: dX [M, K] = dY [M, N] W through the block-CSC index. Tasks: (m-chunk, block-column).
// Convolution (data gradient, a transposed convolution written directly into the NHWC dX):
// tasks are (image b, input row ih, column phase pw < stride_w, channel group g).
template <typename T>
struct BackwardInputArgs {
  const T* dy;      // [M, N]
  const T* values;  // [nnz, bs, bs]
  T* dx;            // Linear: [M, K]; convolution: the NHWC image gradient
  BsrIndex index;
  Im2col geometry;
  int64_t M, N, K;
  int bs;
  int64_t m_chunk;
};

// dW blocks [nnz, bs, bs] = (dYᵀ A) at the layout's blocks, zero in the padding past N or K.
// Tasks: stored blocks in CSR order. Also the dense variant for block_grad_scores: every block of
// the R x C grid (row-major), each reduced to its Frobenius norm in `scores` [R, C].
template <typename T>
struct WeightGradArgs {
  const T* dy;  // [M, N]
  const T* x;   // Linear: [M, K]; convolution: the NHWC image
  T* out;       // [nnz, bs, bs] (sddmm) or unused (scores)
  T* scores;    // [R, C] (block_grad_scores) or unused
  BsrIndex index;
  Im2col geometry;
  int64_t M, N, K;
  int bs;
};

// Each function runs the tasks [task_begin, task_end) in order; `scratch` is the calling thread's
// scratch of scratch_bytes() bytes.
template <typename T>
struct KernelTable {
  const char* isa;
  void (*forward)(const ForwardArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
  void (*backward_input)(const BackwardInputArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
  void (*sddmm)(const WeightGradArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
  void (*block_scores)(const WeightGradArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
};

// Per-thread scratch for any of the kernels: the forward's packed block-row (and its block
// references), or the weight gradient's row pointers for one M chunk and its run of score tiles.
// `static`: every unit keeps its own copy (see above).
static inline int64_t scratch_bytes(int64_t max_blocks_per_row, int64_t block_size, int64_t element_size) {
  const int64_t forward = max_blocks_per_row * (block_size * block_size * element_size + 64);
  const int64_t weight_grad = 8 * block_size * block_size * element_size + 256 * sizeof(void*);
  return (forward > weight_grad ? forward : weight_grad) + 64;
}

// nullptr when the kernels of that instruction set were not compiled in.
const KernelTable<float>* kernels_avx512_f32();
const KernelTable<float>* kernels_avx2_f32();
const KernelTable<float>* kernels_scalar_f32();
const KernelTable<double>* kernels_scalar_f64();

}  // namespace cpu
}  // namespace sparsekern
