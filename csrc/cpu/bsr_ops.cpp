// The CPU block-sparse GEMMs and convolutions: argument checks, dtype handling, the choice of
// instruction set, and the parallel split into tasks. The kernels themselves are in bsr_gemm_*.cpp.
//
// - native_bsr_linear          Y = X Wᵀ (+ b)
// - native_bsr_linear_dx       dX = dY W                (through the block-CSC index)
// - native_bsr_sddmm           dW = (dYᵀ X) at the layout's blocks
// - native_block_grad_scores   Frobenius norms of the blocks of the dense dYᵀX, tiled
// - native_bsr_conv2d(_dgrad, _wgrad, _grad_scores): the same GEMMs on the implicit im2col of an NHWC image
//
// fp32 runs the AVX-512, AVX2+FMA or portable kernels (whichever the CPU has; SPARSEKERN_CPU_ISA=
// avx512|avx2|scalar forces one, for tests); fp64 runs the portable kernels; fp16 and bf16 are computed
// in fp32 and rounded once at the end. Tasks are split with at::parallel_for and each output element is
// computed by one task in a fixed order, so results are bit-identical for any number of threads.
#include "cpu/isa.h"
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "checks.h"
#include "conv_checks.h"
#include "cpu/bsr_gemm.h"
#include "cpu/output_pool.h"

namespace sparsekern {
namespace {

using at::Tensor;

constexpr int64_t kCacheBudget = 1 << 20;  // bytes of the dense operand that one M chunk may touch (half an L2)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Instruction set

using cpu::Isa;

Isa chosen_isa() { return cpu::chosen_isa(/*with_half_conversions=*/false); }

template <typename T>
const cpu::KernelTable<T>* kernels();

template <>
const cpu::KernelTable<float>* kernels<float>() {
  switch (chosen_isa()) {
    case Isa::kAvx512: return cpu::kernels_avx512_f32();
    case Isa::kAvx2: return cpu::kernels_avx2_f32();
    case Isa::kScalar: break;
  }
  return cpu::kernels_scalar_f32();
}

template <>
const cpu::KernelTable<double>* kernels<double>() {
  return cpu::kernels_scalar_f64();
}

// A 64-byte aligned buffer kept between calls and grown on demand: fresh pages on every call would cost
// page faults, and an op allocates nothing per call beyond its output.
struct KeptBuffer {
  char* data = nullptr;
  int64_t size = 0;
  ~KeptBuffer() { ::operator delete[](data, std::align_val_t(64)); }
  char* reserve(int64_t bytes) {
    if (bytes > size) {
      ::operator delete[](data, std::align_val_t(64));
      data = nullptr;
      size = 0;
      data = static_cast<char*>(::operator new[](bytes, std::align_val_t(64)));
      size = bytes;
    }
    return data;
  }
};

// The calling thread's scratch of at least `bytes` bytes: it holds about a cache budget of panels.
char* thread_scratch(int64_t bytes) {
  thread_local KeptBuffer buffer;
  return buffer.reserve(bytes);
}

// A workspace that the worker threads of one op share (the forward's transposed blocks); one per thread
// that calls ops, so that concurrent callers never share it.
template <typename T>
T* call_workspace(int64_t elements) {
  thread_local KeptBuffer buffer;
  return reinterpret_cast<T*>(buffer.reserve(elements * static_cast<int64_t>(sizeof(T))));
}

// Runs tasks [0, n_tasks) in parallel, each thread with its own scratch.
template <typename Args, typename Fn>
void run_tasks(int64_t n_tasks, int64_t scratch_bytes, const Args& args, Fn fn) {
  if (n_tasks <= 0) return;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) { fn(args, begin, end, thread_scratch(scratch_bytes)); });
}

// ---------------------------------------------------------------------------------------------
// Argument checks

void check_operand(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [M, features], got ", t.dim(), "-D");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_same_dtype(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has ", ref.scalar_type());
}

// The six index tensors of a layout over a block grid R x C with nnz blocks; their contents are
// validated too, because the kernels index memory with them.
struct Layout {
  const Tensor& row_ptr;
  const Tensor& col_idx;
  const Tensor& coo_row;
  const Tensor& col_ptr;
  const Tensor& row_idx;
  const Tensor& perm;
};

cpu::BsrIndex check_layout(const Layout& l, int64_t n_block_rows, int64_t n_block_cols, int64_t nnz) {
#define SK_CHECK_INDEX(t)                 \
  SK_CHECK_DTYPE(l.t, at::kInt, "int32"); \
  SK_CHECK_DIM(l.t, 1);                   \
  SK_CHECK_CONTIGUOUS(l.t);               \
  TORCH_CHECK(l.t.device().is_cpu(), #t " must be a CPU tensor, got ", l.t.device())
  SK_CHECK_INDEX(row_ptr);
  SK_CHECK_INDEX(col_idx);
  SK_CHECK_INDEX(coo_row);
  SK_CHECK_INDEX(col_ptr);
  SK_CHECK_INDEX(row_idx);
  SK_CHECK_INDEX(perm);
#undef SK_CHECK_INDEX
  TORCH_CHECK(l.row_ptr.numel() == n_block_rows + 1, "row_ptr must have block rows + 1 = ", n_block_rows + 1,
              " elements for this shape, got ", l.row_ptr.numel());
  TORCH_CHECK(l.col_ptr.numel() == n_block_cols + 1, "col_ptr must have block columns + 1 = ", n_block_cols + 1,
              " elements for this shape, got ", l.col_ptr.numel());
  TORCH_CHECK(l.col_idx.numel() == nnz, "col_idx must have one entry per stored block (", nnz, "), got ",
              l.col_idx.numel());
  SK_CHECK_NUMEL(l.coo_row, nnz, "stored blocks");
  SK_CHECK_NUMEL(l.row_idx, nnz, "stored blocks");
  SK_CHECK_NUMEL(l.perm, nnz, "stored blocks");

  cpu::BsrIndex index{l.row_ptr.data_ptr<int32_t>(), l.col_idx.data_ptr<int32_t>(), l.coo_row.data_ptr<int32_t>(),
                      l.col_ptr.data_ptr<int32_t>(), l.row_idx.data_ptr<int32_t>(), l.perm.data_ptr<int32_t>(),
                      n_block_rows, n_block_cols, nnz};
  TORCH_CHECK(index.row_ptr[0] == 0 && index.row_ptr[n_block_rows] == nnz, "row_ptr must run from 0 to ", nnz);
  for (int64_t r = 0; r < n_block_rows; ++r) {
    TORCH_CHECK(index.row_ptr[r] <= index.row_ptr[r + 1], "row_ptr must be non-decreasing (at block row ", r, ")");
    for (int64_t j = index.row_ptr[r]; j < index.row_ptr[r + 1]; ++j)
      TORCH_CHECK(index.coo_row[j] == r, "coo_row[", j, "] must be ", r, " (its block row), got ", index.coo_row[j]);
  }
  TORCH_CHECK(index.col_ptr[0] == 0 && index.col_ptr[n_block_cols] == nnz, "col_ptr must run from 0 to ", nnz);
  for (int64_t c = 0; c < n_block_cols; ++c)
    TORCH_CHECK(index.col_ptr[c] <= index.col_ptr[c + 1], "col_ptr must be non-decreasing (at block column ", c,
                ")");
  for (int64_t j = 0; j < nnz; ++j) {
    TORCH_CHECK(index.col_idx[j] >= 0 && index.col_idx[j] < n_block_cols, "col_idx[", j, "] = ", index.col_idx[j],
                " is outside the ", n_block_cols, " block columns");
    TORCH_CHECK(index.row_idx[j] >= 0 && index.row_idx[j] < n_block_rows, "row_idx[", j, "] = ", index.row_idx[j],
                " is outside the ", n_block_rows, " block rows");
    TORCH_CHECK(index.perm[j] >= 0 && index.perm[j] < nnz, "perm[", j, "] = ", index.perm[j], " is outside the ", nnz,
                " stored blocks");
  }
  // Each block-CSC entry must be a stored block of its column and row: dX walks them, and a wrong one would give
  // a silently wrong result rather than a crash.
  for (int64_t c = 0; c < n_block_cols; ++c)
    for (int64_t j = index.col_ptr[c]; j < index.col_ptr[c + 1]; ++j) {
      const int32_t p = index.perm[j];
      TORCH_CHECK(index.col_idx[p] == c && index.coo_row[p] == index.row_idx[j], "perm[", j, "] = ", p,
                  " and row_idx[", j, "] = ", index.row_idx[j], " must name a stored block of block column ", c,
                  ", but stored block ", p, " is at (", index.coo_row[p], ", ", index.col_idx[p], ")");
    }
  return index;
}

// values [nnz, bs, bs] -> bs (checked)
int64_t check_values(const Tensor& values, const Tensor& like, const char* like_name) {
  TORCH_CHECK(values.device().is_cpu(), "values must be a CPU tensor, got ", values.device());
  const int64_t bs = values_block_size(values);
  check_same_dtype(values, like, "values", like_name);
  return bs;
}

int64_t max_blocks_per_line(const int32_t* line_ptr, int64_t lines) {
  int64_t most = 0;
  for (int64_t l = 0; l < lines; ++l) most = std::max<int64_t>(most, line_ptr[l + 1] - line_ptr[l]);
  return most;
}

// How a GEMM over M rows is cut into tasks: m-chunks whose panel of the dense operand (`width` wide)
// fits the cache budget, as many chunks as a multiple of the thread count so that they balance, and
// the block-lines of W split into groups only when there are too few chunks to keep the threads busy.
// (The split changes no result: each output element is one task's fixed sequence of FMAs.)
struct GemmSplit {
  int64_t m_chunk, groups, tasks;
};

GemmSplit split_gemm(int64_t M, int64_t width, int64_t element_size, int64_t lines) {
  const int64_t threads = at::get_num_threads();
  const int64_t max_rows = std::min<int64_t>(std::max<int64_t>(kCacheBudget / std::max<int64_t>(1, width * element_size), 48), 480);
  int64_t chunks = cdiv(cdiv(M, max_rows), threads) * threads;
  chunks = std::max<int64_t>(1, std::min(chunks, cdiv(M, 12)));
  // Equal chunks matter more than whole micro-tiles (a short last tile per chunk costs a few percent).
  const int64_t m_chunk = cdiv(cdiv(M, chunks), 4) * 4;
  chunks = cdiv(M, m_chunk);
  const int64_t groups = std::max<int64_t>(1, std::min(lines, cdiv(2 * threads, chunks)));
  return {m_chunk, groups, chunks * groups};
}

// Rows per chunk of a weight-gradient reduction: the panels of dY and A for one chunk fit the cache
// budget. A function of the shapes only, so that the summation order never depends on the threads.
int64_t reduction_chunk(int64_t N, int64_t K, int64_t element_size) {
  const int64_t rows = kCacheBudget / std::max<int64_t>(1, (N + K) * element_size);
  return std::min<int64_t>(std::max<int64_t>(rows, 16), 256);
}

// Half and bfloat16 are computed in fp32.
Tensor compute_dtype(const Tensor& t) {
  const auto dtype = t.scalar_type();
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? t.to(at::kFloat).contiguous() : t.contiguous();
}

cpu::Im2col plain_matrix(int64_t M, int64_t K) {
  return {false, M, 1, 1, K, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1};
}

// ---------------------------------------------------------------------------------------------
// Typed drivers

template <typename T>
void run_forward(const Tensor& x, const Tensor& values, const c10::optional<Tensor>& bias, Tensor& y,
                 const cpu::BsrIndex& index, const cpu::Im2col& geometry, int64_t M, int64_t N, int64_t K, int64_t bs) {
  // The blocks transposed once per call (a workspace the size of the values): every m-chunk reads them.
  T* values_t = call_workspace<T>(values.numel());
  const cpu::TransposeArgs<T> transpose{values.data_ptr<T>(), values_t, static_cast<int>(bs)};
  run_tasks(index.nnz, 0, transpose, kernels<T>()->transpose_blocks);
  const GemmSplit split = split_gemm(M, K, sizeof(T), index.n_block_rows);
  cpu::ForwardArgs<T> args{x.data_ptr<T>(), values_t, bias.has_value() ? bias->data_ptr<T>() : nullptr,
                           y.data_ptr<T>(), index, geometry, M, N, K, static_cast<int>(bs), split.m_chunk, split.groups};
  run_tasks(split.tasks,
            cpu::gemm_scratch_bytes(index.n_block_cols, split.m_chunk,
                                    max_blocks_per_line(index.row_ptr, index.n_block_rows), bs, sizeof(T),
                                    geometry.is_conv),
            args, kernels<T>()->forward);
}

template <typename T>
void run_backward_input(const Tensor& dy, const Tensor& values, Tensor& dx, const cpu::BsrIndex& index,
                        const cpu::Im2col& geometry, int64_t M, int64_t N, int64_t K, int64_t bs) {
  cpu::BackwardInputArgs<T> args{dy.data_ptr<T>(), values.data_ptr<T>(), dx.data_ptr<T>(), index, geometry, M, N, K,
                                 static_cast<int>(bs), 0, 1};
  if (geometry.is_conv) {
    const int64_t tasks = geometry.batch * geometry.height * geometry.stride_w * (geometry.channels / bs);
    run_tasks(tasks, 64, args, kernels<T>()->backward_input);
    return;
  }
  const GemmSplit split = split_gemm(M, N, sizeof(T), index.n_block_cols);
  args.m_chunk = split.m_chunk;
  args.groups = split.groups;
  run_tasks(split.tasks,
            cpu::gemm_scratch_bytes(index.n_block_rows, split.m_chunk,
                                    max_blocks_per_line(index.col_ptr, index.n_block_cols), bs, sizeof(T), false),
            args, kernels<T>()->backward_input);
}

template <typename T>
void run_sddmm(const Tensor& dy, const Tensor& x, Tensor& out, const cpu::BsrIndex& index, const cpu::Im2col& geometry,
               int64_t M, int64_t N, int64_t K, int64_t bs) {
  const int64_t m_chunk = reduction_chunk(N, K, sizeof(T));
  cpu::WeightGradArgs<T> args{dy.data_ptr<T>(), x.data_ptr<T>(), out.data_ptr<T>(), nullptr, index, geometry,
                              M, N, K, static_cast<int>(bs), m_chunk, 0};
  run_tasks(index.nnz,
            cpu::weight_grad_scratch_bytes(index.n_block_rows, index.n_block_cols, m_chunk, 0, bs, sizeof(T)), args,
            kernels<T>()->sddmm);
}

// ---------------------------------------------------------------------------------------------
// Ops

Tensor bsr_linear_cpu(const Tensor& x_in, const Tensor& values_in, const Tensor& row_ptr, const Tensor& col_idx,
                      const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                      int64_t out_features, const c10::optional<Tensor>& bias_in) {
  check_operand(x_in, "x");
  const int64_t bs = check_values(values_in, x_in, "x");
  TORCH_CHECK(out_features > 0, "out_features must be positive, got ", out_features);
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->device().is_cpu(), "bias must be a CPU tensor, got ", bias_in->device());
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == out_features, "bias must have shape (", out_features,
                ",), got ", bias_in->sizes());
    check_same_dtype(*bias_in, x_in, "bias", "x");
  }
  const int64_t M = x_in.size(0), K = x_in.size(1), N = out_features;
  const auto index = check_layout({row_ptr, col_idx, coo_row, col_ptr, row_idx, perm}, cdiv(N, bs), cdiv(K, bs),
                                  values_in.size(0));
  const Tensor x = compute_dtype(x_in), values = compute_dtype(values_in);
  const c10::optional<Tensor> bias =
      bias_in.has_value() ? c10::optional<Tensor>(compute_dtype(*bias_in)) : c10::nullopt;
  Tensor y = cpu::empty_output({M, N}, x);
  if (M > 0) {
    if (x.scalar_type() == at::kDouble)
      run_forward<double>(x, values, bias, y, index, plain_matrix(M, K), M, N, K, bs);
    else
      run_forward<float>(x, values, bias, y, index, plain_matrix(M, K), M, N, K, bs);
  }
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

Tensor bsr_linear_dx_cpu(const Tensor& dy_in, const Tensor& values_in, const Tensor& row_ptr, const Tensor& col_idx,
                         const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                         int64_t in_features) {
  check_operand(dy_in, "dy");
  const int64_t bs = check_values(values_in, dy_in, "dy");
  TORCH_CHECK(in_features > 0, "in_features must be positive, got ", in_features);
  const int64_t M = dy_in.size(0), N = dy_in.size(1), K = in_features;
  const auto index = check_layout({row_ptr, col_idx, coo_row, col_ptr, row_idx, perm}, cdiv(N, bs), cdiv(K, bs),
                                  values_in.size(0));
  const Tensor dy = compute_dtype(dy_in), values = compute_dtype(values_in);
  Tensor dx = cpu::empty_output({M, K}, dy);
  if (M > 0) {
    if (dy.scalar_type() == at::kDouble)
      run_backward_input<double>(dy, values, dx, index, plain_matrix(M, K), M, N, K, bs);
    else
      run_backward_input<float>(dy, values, dx, index, plain_matrix(M, K), M, N, K, bs);
  }
  return dx.scalar_type() == dy_in.scalar_type() ? dx : dx.to(dy_in.scalar_type());
}

Tensor bsr_sddmm_cpu(const Tensor& dy_in, const Tensor& x_in, const Tensor& row_ptr, const Tensor& col_idx,
                     const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                     int64_t block_size) {
  check_operand(dy_in, "dy");
  check_operand(x_in, "x");
  check_same_dtype(x_in, dy_in, "x", "dy");
  SK_CHECK_BLOCK_SIZE(block_size);
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), "dy has ", dy_in.size(0), " rows but x has ", x_in.size(0));
  const int64_t M = dy_in.size(0), N = dy_in.size(1), K = x_in.size(1), bs = block_size;
  const auto index = check_layout({row_ptr, col_idx, coo_row, col_ptr, row_idx, perm}, cdiv(N, bs), cdiv(K, bs),
                                  col_idx.numel());
  const Tensor dy = compute_dtype(dy_in), x = compute_dtype(x_in);
  Tensor out = cpu::empty_output({index.nnz, bs, bs}, dy);
  if (dy.scalar_type() == at::kDouble)
    run_sddmm<double>(dy, x, out, index, plain_matrix(M, K), M, N, K, bs);
  else
    run_sddmm<float>(dy, x, out, index, plain_matrix(M, K), M, N, K, bs);
  return out.scalar_type() == dy_in.scalar_type() ? out : out.to(dy_in.scalar_type());
}

// Scores of every block of dYᵀ A, where A [M, K] is x or (geometry.is_conv) the implicit im2col of the image x.
template <typename T>
void run_block_scores(const Tensor& dy, const Tensor& x, Tensor& scores, const cpu::Im2col& geometry, int64_t M,
                      int64_t N, int64_t K, int64_t bs) {
  cpu::BsrIndex grid{};
  grid.n_block_rows = cdiv(N, bs);
  grid.n_block_cols = cdiv(K, bs);
  // A task keeps the tiles of its block-rows (about a cache budget's worth) until they are reduced.
  const int64_t row_bytes = grid.n_block_cols * bs * bs * static_cast<int64_t>(sizeof(T));
  const int64_t group_rows =
      std::max<int64_t>(1, std::min(kCacheBudget / row_bytes, cdiv(grid.n_block_rows, at::get_num_threads())));
  const int64_t m_chunk = reduction_chunk(N, K, sizeof(T));
  cpu::WeightGradArgs<T> args{dy.data_ptr<T>(), x.data_ptr<T>(), nullptr, scores.data_ptr<T>(), grid,
                              geometry, M, N, K, static_cast<int>(bs), m_chunk, group_rows};
  run_tasks(cdiv(grid.n_block_rows, group_rows),
            cpu::weight_grad_scratch_bytes(grid.n_block_rows, grid.n_block_cols, m_chunk,
                                           group_rows * grid.n_block_cols, bs, sizeof(T)),
            args, kernels<T>()->block_scores);
}

Tensor block_grad_scores_cpu(const Tensor& dy_in, const Tensor& x_in, int64_t block_size) {
  check_operand(dy_in, "dy");
  check_operand(x_in, "x");
  check_same_dtype(x_in, dy_in, "x", "dy");
  SK_CHECK_BLOCK_SIZE(block_size);
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), "dy has ", dy_in.size(0), " rows but x has ", x_in.size(0));
  // fp32 scores for every input dtype but fp64, as the reference accumulates.
  const Tensor dy = compute_dtype(dy_in), x = compute_dtype(x_in);
  Tensor scores = cpu::empty_output({cdiv(dy.size(1), block_size), cdiv(x.size(1), block_size)}, dy);
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  if (dy.scalar_type() == at::kDouble)
    run_block_scores<double>(dy, x, scores, plain_matrix(M, K), M, N, K, block_size);
  else
    run_block_scores<float>(dy, x, scores, plain_matrix(M, K), M, N, K, block_size);
  return scores;
}

// ---------------------------------------------------------------------------------------------
// Convolution (groups = 1, NHWC, zero padding given as top/left; the output size fixes bottom/right)

cpu::Im2col conv_geometry(int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t out_h,
                          int64_t out_w, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv_geometry(kernel_size, stride, padding, dilation);
  return {true, batch, height, width, channels, out_h, out_w, kernel_size[0], kernel_size[1], stride[0], stride[1],
          padding[0], padding[1], dilation[0], dilation[1]};
}

void check_conv_channels(int64_t channels, int64_t bs, const char* what) {
  TORCH_CHECK(channels % bs == 0, what, " (", channels, ") must be a multiple of the block size (", bs,
              ") for the native convolution");
}

void check_image(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D NHWC [batch, height, width, channels], got ", t.dim(), "-D");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", dtype);
}

Tensor bsr_conv2d_cpu(const Tensor& x_in, const Tensor& values_in, const Tensor& row_ptr, const Tensor& col_idx,
                      const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                      int64_t out_channels, const c10::optional<Tensor>& bias_in, at::IntArrayRef kernel_size,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      at::IntArrayRef output_size) {
  check_image(x_in, "x");
  const int64_t bs = check_values(values_in, x_in, "x");
  check_image_size(output_size, "output_size");
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == out_channels, "bias must have shape (", out_channels,
                ",), got ", bias_in->sizes());
    check_same_dtype(*bias_in, x_in, "bias", "x");
  }
  const int64_t B = x_in.size(0), C = x_in.size(3);
  check_conv_channels(C, bs, "in_channels");
  const auto geometry = conv_geometry(B, x_in.size(1), x_in.size(2), C, output_size[0], output_size[1], kernel_size,
                                      stride, padding, dilation);
  const int64_t M = B * output_size[0] * output_size[1], N = out_channels, K = kernel_size[0] * kernel_size[1] * C;
  const auto index = check_layout({row_ptr, col_idx, coo_row, col_ptr, row_idx, perm}, cdiv(N, bs), K / bs,
                                  values_in.size(0));
  const Tensor x = compute_dtype(x_in), values = compute_dtype(values_in);
  const c10::optional<Tensor> bias =
      bias_in.has_value() ? c10::optional<Tensor>(compute_dtype(*bias_in)) : c10::nullopt;
  Tensor y = cpu::empty_output({B, output_size[0], output_size[1], N}, x);
  if (M > 0) {
    if (x.scalar_type() == at::kDouble)
      run_forward<double>(x, values, bias, y, index, geometry, M, N, K, bs);
    else
      run_forward<float>(x, values, bias, y, index, geometry, M, N, K, bs);
  }
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

Tensor bsr_conv2d_dgrad_cpu(const Tensor& dy_in, const Tensor& values_in, const Tensor& row_ptr,
                            const Tensor& col_idx, const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx,
                            const Tensor& perm, int64_t in_channels, at::IntArrayRef input_size,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation) {
  check_image(dy_in, "dy");
  const int64_t bs = check_values(values_in, dy_in, "dy");
  check_conv_channels(in_channels, bs, "in_channels");
  check_image_size(input_size, "input_size");
  const int64_t B = dy_in.size(0), N = dy_in.size(3);
  const auto geometry = conv_geometry(B, input_size[0], input_size[1], in_channels, dy_in.size(1), dy_in.size(2),
                                      kernel_size, stride, padding, dilation);
  const int64_t M = B * dy_in.size(1) * dy_in.size(2), K = kernel_size[0] * kernel_size[1] * in_channels;
  const auto index = check_layout({row_ptr, col_idx, coo_row, col_ptr, row_idx, perm}, cdiv(N, bs), K / bs,
                                  values_in.size(0));
  const Tensor dy = compute_dtype(dy_in), values = compute_dtype(values_in);
  Tensor dx = cpu::empty_output({B, input_size[0], input_size[1], in_channels}, dy);
  if (dx.numel() > 0) {
    if (dy.scalar_type() == at::kDouble)
      run_backward_input<double>(dy, values, dx, index, geometry, M, N, K, bs);
    else
      run_backward_input<float>(dy, values, dx, index, geometry, M, N, K, bs);
  }
  return dx.scalar_type() == dy_in.scalar_type() ? dx : dx.to(dy_in.scalar_type());
}

Tensor bsr_conv2d_wgrad_cpu(const Tensor& dy_in, const Tensor& x_in, const Tensor& row_ptr, const Tensor& col_idx,
                            const Tensor& coo_row, const Tensor& col_ptr, const Tensor& row_idx, const Tensor& perm,
                            int64_t block_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_image(dy_in, "dy");
  check_image(x_in, "x");
  check_same_batch(dy_in, x_in);
  SK_CHECK_BLOCK_SIZE(block_size);
  const int64_t bs = block_size, B = x_in.size(0), C = x_in.size(3), N = dy_in.size(3);
  check_conv_channels(C, bs, "in_channels");
  const auto geometry = conv_geometry(B, x_in.size(1), x_in.size(2), C, dy_in.size(1), dy_in.size(2), kernel_size,
                                      stride, padding, dilation);
  const int64_t M = B * dy_in.size(1) * dy_in.size(2), K = kernel_size[0] * kernel_size[1] * C;
  const auto index = check_layout({row_ptr, col_idx, coo_row, col_ptr, row_idx, perm}, cdiv(N, bs), K / bs,
                                  col_idx.numel());
  const Tensor dy = compute_dtype(dy_in), x = compute_dtype(x_in);
  Tensor out = cpu::empty_output({index.nnz, bs, bs}, dy);
  if (dy.scalar_type() == at::kDouble)
    run_sddmm<double>(dy, x, out, index, geometry, M, N, K, bs);
  else
    run_sddmm<float>(dy, x, out, index, geometry, M, N, K, bs);
  return out.scalar_type() == dy_in.scalar_type() ? out : out.to(dy_in.scalar_type());
}

Tensor bsr_conv2d_grad_scores_cpu(const Tensor& dy_in, const Tensor& x_in, int64_t block_size,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation) {
  check_image(dy_in, "dy");
  check_image(x_in, "x");
  check_same_batch(dy_in, x_in);
  SK_CHECK_BLOCK_SIZE(block_size);
  const int64_t bs = block_size, B = x_in.size(0), C = x_in.size(3), N = dy_in.size(3);
  const auto geometry = conv_geometry(B, x_in.size(1), x_in.size(2), C, dy_in.size(1), dy_in.size(2), kernel_size,
                                      stride, padding, dilation);
  const int64_t M = B * dy_in.size(1) * dy_in.size(2), K = kernel_size[0] * kernel_size[1] * C;
  // fp32 scores for every input dtype but fp64, as the reference accumulates.
  const Tensor dy = compute_dtype(dy_in), x = compute_dtype(x_in);
  Tensor scores = cpu::empty_output({cdiv(N, bs), cdiv(K, bs)}, dy);
  if (dy.scalar_type() == at::kDouble)
    run_block_scores<double>(dy, x, scores, geometry, M, N, K, bs);
  else
    run_block_scores<float>(dy, x, scores, geometry, M, N, K, bs);
  return scores;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("native_bsr_linear", &sparsekern::bsr_linear_cpu);
  m.impl("native_bsr_linear_dx", &sparsekern::bsr_linear_dx_cpu);
  m.impl("native_bsr_sddmm", &sparsekern::bsr_sddmm_cpu);
  m.impl("native_block_grad_scores", &sparsekern::block_grad_scores_cpu);
  m.impl("native_bsr_conv2d", &sparsekern::bsr_conv2d_cpu);
  m.impl("native_bsr_conv2d_dgrad", &sparsekern::bsr_conv2d_dgrad_cpu);
  m.impl("native_bsr_conv2d_wgrad", &sparsekern::bsr_conv2d_wgrad_cpu);
  m.impl("native_bsr_conv2d_grad_scores", &sparsekern::bsr_conv2d_grad_scores_cpu);
}
