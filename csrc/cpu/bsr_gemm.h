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

// The forward's blocks, transposed once per call: out[j] = values[j]ᵀ. Tasks: blocks.
template <typename T>
struct TransposeArgs {
  const T* values;  // [nnz, bs, bs]
  T* out;           // [nnz, bs, bs]
  int bs;
};

// Y [M, N] = A [M, K] Wᵀ (+ bias). Tasks: (m-chunk, group of block-rows), m-chunk major; the block-rows
// are split into `groups` equal groups (1 when there are enough m-chunks to keep the threads busy).
template <typename T>
struct ForwardArgs {
  const T* x;         // Linear: [M, K]; convolution: the NHWC image
  const T* values_t;  // [nnz, bs, bs], each block transposed (TransposeArgs)
  const T* bias;      // [N] or nullptr
  T* y;               // [M, N]
  BsrIndex index;
  Im2col geometry;
  int64_t M, N, K;
  int bs;
  int64_t m_chunk;  // rows per task
  int64_t groups;
};

// Linear: dX [M, K] = dY [M, N] W through the block-CSC index. Tasks: (m-chunk, group of block-columns).
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
  int64_t m_chunk;  // Linear only, as in ForwardArgs
  int64_t groups;
};

// dW blocks [nnz, bs, bs] = (dYᵀ A) at the layout's blocks, zero in the padding past N or K.
// Tasks: stored blocks in CSR order. Also the dense variant for block_grad_scores: every block of
// the R x C grid, each reduced to its Frobenius norm in `scores` [R, C]; tasks are groups of
// `group_rows` block-rows. The reduction over M runs in chunks of m_chunk rows (a constant of the
// shapes, never of the thread count).
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
  int64_t m_chunk;
  int64_t group_rows;  // block_grad_scores: block-rows per task
};

// Each function runs the tasks [task_begin, task_end) in order; `scratch` is the calling thread's
// scratch of scratch_bytes() bytes.
template <typename T>
struct KernelTable {
  const char* isa;
  void (*transpose_blocks)(const TransposeArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
  void (*forward)(const ForwardArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
  void (*backward_input)(const BackwardInputArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
  void (*sddmm)(const WeightGradArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
  void (*block_scores)(const WeightGradArgs<T>& args, int64_t task_begin, int64_t task_end, void* scratch);
};

// Per-thread scratch. The kernels copy the m-chunk of the dense operand they work on into panels,
// block-column by block-column ([column block][row][bs], see bsr_gemm_impl.h; except where
// reads_operand_in_place below says otherwise); a panel set for
// `columns` column blocks of `rows` rows takes panel_bytes(). `static`: every unit keeps its own copy
// (see above).
static inline int64_t panel_bytes(int64_t columns, int64_t rows, int64_t block_size, int64_t element_size) {
  return columns * (rows * block_size * element_size + 128) + 192;
}

// Whether the forward / linear input gradient reads its dense operand where it is instead of packing panels.
// A plain matrix's rows are then K elements apart, so a micro-tile's rows share L1 sets; measured on a 2-core
// Xeon (AVX-512, 2048^3, 90% sparse), that still beats the copy by 4-7% with blocks of 32 and more, while
// blocks of 16 (one cache line per row) are 7% faster from panels. Convolutions always pack (im2col).
static constexpr bool reads_operand_in_place(bool is_conv, int64_t block_size) {
  return !is_conv && block_size >= 32;
}

// Forward / linear input gradient: the operand's panels (unless read in place), plus a panel pointer, block
// pointer and depth per block of one block-line of W.
static inline int64_t gemm_scratch_bytes(int64_t panel_columns, int64_t m_chunk, int64_t max_blocks_per_line,
                                         int64_t block_size, int64_t element_size, bool is_conv) {
  const int64_t panels =
      reads_operand_in_place(is_conv, block_size) ? 0 : panel_bytes(panel_columns, m_chunk, block_size, element_size);
  return panels + max_blocks_per_line * 24 + 128;
}

// Weight gradient: panels of dY and of A, plus (block_grad_scores) the tiles of a group of block-rows.
static inline int64_t weight_grad_scratch_bytes(int64_t dy_columns, int64_t a_columns, int64_t m_chunk,
                                                int64_t score_tiles, int64_t block_size, int64_t element_size) {
  return panel_bytes(dy_columns, m_chunk, block_size, element_size) +
         panel_bytes(a_columns, m_chunk, block_size, element_size) +
         score_tiles * block_size * block_size * element_size + 128;
}

// nullptr when the kernels of that instruction set were not compiled in.
const KernelTable<float>* kernels_avx512_f32();
const KernelTable<float>* kernels_avx2_f32();
const KernelTable<float>* kernels_scalar_f32();
const KernelTable<double>* kernels_scalar_f64();

}  // namespace cpu
}  // namespace sparsekern
