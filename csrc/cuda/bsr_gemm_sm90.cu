// The block-sparse GEMMs on Hopper (sm_90a), built on CUTLASS's CuTe:
//   bsr_linear     Y [M, N]  = X [M, K] Wᵀ (+ bias), walking the block-rows of W;
//   bsr_linear_dx  dX [M, K] = dY [M, N] W, walking the block-columns of W through perm;
//   bsr_sddmm      dW blocks = (dYᵀ X) at the stored blocks, M split into chunks as bsr_sddmm plans it;
//   block_grad_scores  the Frobenius norm of every block of the dense dYᵀ X, its sums rounded as fp32's.
// The mma.sync kernels (bsr_gemm_linear.cu, bsr_gemm_wgrad.cu) compute the same tiles with cp.async and ldmatrix;
// here the tensor-memory accelerator loads the tiles and wgmma reads them from shared memory, in a warp-specialised
// CTA (run_mainloop):
//   - warp group 0, the producer, gives up registers; one thread issues the TMA copies of every pipeline step into
//     a ring of stages that CUTLASS's PipelineTmaAsync guards with transaction barriers;
//   - warp groups 1 and 2, the consumers, run the step's wgmmas, keeping one stage's MMAs in flight while they wait
//     for the next stage, and then write the accumulators.
// A step of the linear GEMMs is one stored block: the dense operand's [128, bs] tile at the block's reduction
// coordinate (the block-sparse gather along the reduction is just a TMA box at a block-aligned column) and the
// block's [bs, bs] values. A step of the SDDMM is 64 rows of M: the [64, bs] tiles of dY and X at the block's
// row and column. The block values are read in their storage order: W[n][k] is the MMA's B K-major in the forward
// pass and MN-major in the input gradient, never transposed in memory.
// Taken only where no block has padding (N and K multiples of bs), the rows' addresses suit TMA, the type is
// 16-bit and bs is 64 or 128 (the *_takes functions); every other call runs the mma.sync kernels.
#include "sm90_mainloop.cuh"

#include <atomic>

namespace sparsekern {
namespace cuda {

// 1 in the sm_90a image of this file, 0 in every other: which image the device loaded, asked before any launch.
__device__ int sm90a_image =
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    1;
#else
    0;
#endif

namespace sm90 {

// Whether the device loaded this file's sm_90a image: a build without 9.0a in TORCH_CUDA_ARCH_LIST (or with plain
// 9.0, or PTX to JIT) has only bodies that trap. Asked once, on a stream of its own and in relaxed capture mode, so
// that neither a capture on the caller's stream nor one in another thread is disturbed; until it was answered the
// mma.sync kernels run. The glue calls here on compute capability 9.0 devices only, which all load the same image.
bool device_runs_sm90a() {
  static std::atomic<int> known{-1};
  const int answer = known.load();
  if (answer >= 0) return answer == 1;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  int flag = -1;
  cudaStream_t probe = nullptr;
  if (cudaStreamCreateWithFlags(&probe, cudaStreamNonBlocking) == cudaSuccess) {
    if (cudaMemcpyFromSymbolAsync(&flag, sm90a_image, sizeof(flag), 0, cudaMemcpyDeviceToHost, probe) != cudaSuccess ||
        cudaStreamSynchronize(probe) != cudaSuccess) {
      flag = -1;
    }
    cudaStreamDestroy(probe);
  }
  cudaThreadExchangeStreamCaptureMode(&mode);  // the caller's mode back
  if (flag < 0) {
    cudaGetLastError();
    return false;
  }
  known.store(flag);
  return flag == 1;
}

}  // namespace sm90

namespace {

using namespace cute;
using namespace sm90;

// The dense operand A [M, a_cols] and the blocks' values, as TMA atoms; out [M, out_cols].
template <typename T, class TmaA, class TmaB>
struct LinearParams {
  TmaA tma_a;
  TmaB tma_b;
  const T* bias;
  T* out;
  const int32_t* line_ptr;
  const int32_t* line_idx;
  const int32_t* perm;
  int M, a_cols, out_cols, n_lines, nnz;
};

template <typename T, int BS, bool TRANS, class Params>
__global__ void __launch_bounds__(kThreads, 1) bsr_gemm_sm90_kernel(CUTE_GRID_CONSTANT const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = LinearConfig<T, BS, TRANS>;
  extern __shared__ unsigned char smem_raw[];
  // Line fastest: consecutive CTAs share the dense operand's M-tile while it is in L2.
  const int line = static_cast<int>(blockIdx.x % p.n_lines);
  const int m_tile = static_cast<int>(blockIdx.x / p.n_lines);
  const int first = p.line_ptr[line];
  const int n_blocks = p.line_ptr[line + 1] - first;

  const auto make_loader = [&](auto& sA, auto& sB) {
    prefetch_tma_descriptor(p.tma_a.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_b.get_tma_descriptor());
    Tensor gA = local_tile(p.tma_a.get_tma_tensor(make_shape(p.M, p.a_cols)), typename C::ATile{},
                           make_coord(m_tile, _));  // (BM, bs, block-column)
    Tensor gB = block_tiles<BS, TRANS>(p.tma_b.get_tma_tensor(values_matrix_shape<BS, TRANS>(p.nnz)));
    auto a_parts = tma_partition(p.tma_a, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA), group_modes<0, 2>(gA));
    auto b_parts = tma_partition(p.tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
    // p by reference: a TMA copy names its descriptor by address, which must stay in the kernel's parameter space.
    return [&p, first, a_parts, b_parts](int step, int stage, uint64_t& barrier) {
      const int j = first + step;
      copy(p.tma_a.with(barrier), get<0>(a_parts)(_, p.line_idx[j]), get<1>(a_parts)(_, stage));
      copy(p.tma_b.with(barrier), get<0>(b_parts)(_, TRANS ? p.perm[j] : j), get<1>(b_parts)(_, stage));
    };
  };

  // Bias in fp32 before the one rounding; rows past M are not written (N and K have no padding here). An empty
  // line writes zeros or the bias.
  const auto epilogue = [&](const auto& acc, const auto& coords) {
    const int rows = min(kBM, p.M - m_tile * kBM);
    const int64_t col0 = static_cast<int64_t>(line) * BS;
    T* out = p.out + static_cast<int64_t>(m_tile) * kBM * p.out_cols + col0;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      const int row = get<0>(coords(i));
      const int col = get<1>(coords(i));
      if (row < rows) {
        float v0 = acc(i), v1 = acc(i + 1);
        if (p.bias != nullptr) {
          v0 += static_cast<float>(p.bias[col0 + col]);
          v1 += static_cast<float>(p.bias[col0 + col + 1]);
        }
        store_pair(out + static_cast<int64_t>(row) * p.out_cols + col, v0, v1);
      }
    }
  };
  run_mainloop<C>(smem_raw, n_blocks, make_loader, epilogue);
#else
  __trap();  // never launched: the launchers check that the device loaded the sm_90a image (sm90a_image)
#endif
}

// ---------------------------------------------------------------------------------------------
// bsr_sddmm

template <typename T, class TmaA, class TmaB>
struct SddmmParams {
  TmaA tma_dy;  // dY as (N, M)
  TmaB tma_x;   // X as (K, M)
  const int32_t* coo_row;
  const int32_t* col_idx;
  T* out;         // [nnz, bs, bs] (one split)
  float* partial;  // [splits, nnz, bs, bs] (several)
  int M, N, K, chunk;
  int64_t nnz;
};

// The weight-gradient kernels' loader (SDDMM, block scores): step s copies rows first_step + s (of 64) of dY's
// columns of block-row `block_row` and of X's of block-column `block_col`. p by reference: a TMA copy names its
// descriptor by address, which must stay in the kernel's parameter space.
template <class C, class Params, class SmemA, class SmemB>
__device__ __forceinline__ auto weight_grad_loader(const Params& p, SmemA& sA, SmemB& sB, int block_row,
                                                   int block_col, int first_step) {
  prefetch_tma_descriptor(p.tma_dy.get_tma_descriptor());
  prefetch_tma_descriptor(p.tma_x.get_tma_descriptor());
  Tensor gA = local_tile(p.tma_dy.get_tma_tensor(make_shape(p.N, p.M)), typename C::ATile{},
                         make_coord(block_row, _));  // (bs, 64, step)
  Tensor gB = local_tile(p.tma_x.get_tma_tensor(make_shape(p.K, p.M)), typename C::BTile{},
                         make_coord(block_col, _));
  auto a_parts = tma_partition(p.tma_dy, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA), group_modes<0, 2>(gA));
  auto b_parts = tma_partition(p.tma_x, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
  return [&p, first_step, a_parts, b_parts](int step, int stage, uint64_t& barrier) {
    copy(p.tma_dy.with(barrier), get<0>(a_parts)(_, first_step + step), get<1>(a_parts)(_, stage));
    copy(p.tma_x.with(barrier), get<0>(b_parts)(_, first_step + step), get<1>(b_parts)(_, stage));
  };
}

template <typename T, int BS, class Params>
__global__ void __launch_bounds__(kThreads, 1) bsr_sddmm_sm90_kernel(CUTE_GRID_CONSTANT const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = SddmmConfig<T, BS>;
  extern __shared__ unsigned char smem_raw[];
  const int64_t block = blockIdx.x;
  const int split = blockIdx.y;
  const int m_begin = split * p.chunk;  // chunks are whole steps (bsr_sddmm_sm90_takes)
  const int m_end = min(p.M, m_begin + p.chunk);
  const int n_steps = (m_end - m_begin + kStepRows - 1) / kStepRows;

  const auto make_loader = [&](auto& sA, auto& sB) {
    return weight_grad_loader<C>(p, sA, sB, p.coo_row[block], p.col_idx[block], m_begin / kStepRows);
  };

  // The block (no padding here), or this chunk's fp32 partial of it.
  const auto epilogue = [&](const auto& acc, const auto& coords) {
    store_block_tile<BS>(acc, coords, p.out, p.partial, block, split, p.nnz);
  };
  run_mainloop<C>(smem_raw, n_steps, make_loader, epilogue);
#else
  __trap();  // never launched: the launchers check that the device loaded the sm_90a image (sm90a_image)
#endif
}

// ---------------------------------------------------------------------------------------------
// block_grad_scores

template <typename T, class TmaA, class TmaB>
struct ScoresParams {
  TmaA tma_dy;  // dY as (N, M)
  TmaB tma_x;   // X as (K, M)
  float* scores;  // [N / bs, K / bs]
  int M, N, K, n_block_cols;
};

// The Frobenius norm of one block of the dense dYᵀX per CTA, over all of M: the SDDMM's tile and loads at every
// block of the grid, its sums rounded to nearest (Accumulation::kNearest), squared and reduced in a fixed order
// (each thread's values in order, a butterfly in each warp, then the 8 warps' sums in order: deterministic).
template <typename T, int BS, class Params>
__global__ void __launch_bounds__(kThreads, 1) block_scores_sm90_kernel(CUTE_GRID_CONSTANT const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = SddmmConfig<T, BS>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ float warp_sums[kConsumerThreads / 32];
  const int block_row = static_cast<int>(blockIdx.x / p.n_block_cols);
  const int block_col = static_cast<int>(blockIdx.x % p.n_block_cols);
  const int n_steps = (p.M + kStepRows - 1) / kStepRows;

  const auto make_loader = [&](auto& sA, auto& sB) {
    return weight_grad_loader<C>(p, sA, sB, block_row, block_col, 0);
  };

  const auto epilogue = [&](const auto& acc, const auto&) {
    float sum = 0.0f;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) sum = fmaf(acc(i), acc(i), sum);
    CUTE_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    const int consumer = threadIdx.x - cutlass::NumThreadsPerWarpGroup;
    if (consumer % 32 == 0) warp_sums[consumer / 32] = sum;
    // The consumers only: the producer warp group has left.
    asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");
    if (consumer == 0) {
      float total = 0.0f;
      CUTE_UNROLL
      for (int w = 0; w < kConsumerThreads / 32; ++w) total += warp_sums[w];
      p.scores[blockIdx.x] = sqrtf(total);
    }
  };
  run_mainloop<C, Accumulation::kNearest>(smem_raw, n_steps, make_loader, epilogue);
#else
  __trap();  // never launched: the launchers check that the device loaded the sm_90a image (sm90a_image)
#endif
}

// ---------------------------------------------------------------------------------------------
// Launchers

template <typename T, int BS, bool TRANS>
LaunchStatus launch_linear(const BsrGemmArgs& a, cudaStream_t stream) {
  using C = LinearConfig<T, BS, TRANS>;
  const int M = static_cast<int>(a.M), a_cols = static_cast<int>(a.a_cols), nnz = static_cast<int>(a.nnz);
  Tensor dense = make_tensor(make_gmem_ptr(static_cast<const T*>(a.a)), make_shape(M, a_cols),
                             make_stride(a.lda, Int<1>{}));
  Tensor values = make_tensor(make_gmem_ptr(static_cast<const T*>(a.values)), values_matrix_shape<BS, TRANS>(nnz),
                              values_matrix_stride<BS, TRANS>());
  auto tma_a = make_tma_atom(SM90_TMA_LOAD{}, dense, typename C::SmemLayoutA{}(_, _, 0), typename C::ATile{});
  auto tma_b = make_tma_atom(SM90_TMA_LOAD{}, values, typename C::SmemLayoutB{}(_, _, 0), typename C::BTile{});
  using Params = LinearParams<T, decltype(tma_a), decltype(tma_b)>;
  const Params p{tma_a, tma_b, static_cast<const T*>(a.bias), static_cast<T*>(a.out), a.line_ptr, a.line_idx,
                 a.perm, M, a_cols, static_cast<int>(a.out_cols), static_cast<int>(a.n_lines), nnz};
  // One CTA per (M-tile, line), all in grid.x (the line fastest); bsr_gemm_sm90_takes keeps it under 2^31.
  const int64_t ctas = (a.M + kBM - 1) / kBM * a.n_lines;
  return launch(bsr_gemm_sm90_kernel<T, BS, TRANS, Params>, dim3(static_cast<unsigned>(ctas)), C::kSmemBytes,
                stream, p);
}

template <typename T, int BS>
LaunchStatus launch_sddmm(const SddmmArgs& a, cudaStream_t stream) {
  using C = SddmmConfig<T, BS>;
  const WeightGradOperands& in = a.in;
  const int M = static_cast<int>(in.M), N = static_cast<int>(in.N), K = static_cast<int>(in.K);
  Tensor dy = make_tensor(make_gmem_ptr(static_cast<const T*>(in.dy)), make_shape(N, M),
                          make_stride(Int<1>{}, in.ld_dy));
  Tensor x = make_tensor(make_gmem_ptr(static_cast<const T*>(in.x)), make_shape(K, M), make_stride(Int<1>{}, in.ld_x));
  auto tma_dy = make_tma_atom(SM90_TMA_LOAD{}, dy, typename C::SmemLayoutA{}(_, _, 0), typename C::ATile{});
  auto tma_x = make_tma_atom(SM90_TMA_LOAD{}, x, typename C::SmemLayoutB{}(_, _, 0), typename C::BTile{});
  using Params = SddmmParams<T, decltype(tma_dy), decltype(tma_x)>;
  const Params p{tma_dy, tma_x, a.coo_row, a.col_idx, static_cast<T*>(a.out), a.splits > 1 ? a.partial : nullptr,
                 M, N, K, static_cast<int>(a.chunk), a.nnz};
  const LaunchStatus status = launch(bsr_sddmm_sm90_kernel<T, BS, Params>,
                                     dim3(static_cast<unsigned>(a.nnz), static_cast<unsigned>(a.splits)),
                                     C::kSmemBytes, stream, p);
  if (status.error != cudaSuccess || a.splits == 1) return status;
  return sum_sddmm_partials(a, stream);
}

template <typename T, int BS>
LaunchStatus launch_scores(const BlockScoresArgs& a, cudaStream_t stream) {
  using C = SddmmConfig<T, BS>;
  const WeightGradOperands& in = a.in;
  const int M = static_cast<int>(in.M), N = static_cast<int>(in.N), K = static_cast<int>(in.K);
  Tensor dy = make_tensor(make_gmem_ptr(static_cast<const T*>(in.dy)), make_shape(N, M),
                          make_stride(Int<1>{}, in.ld_dy));
  Tensor x = make_tensor(make_gmem_ptr(static_cast<const T*>(in.x)), make_shape(K, M), make_stride(Int<1>{}, in.ld_x));
  auto tma_dy = make_tma_atom(SM90_TMA_LOAD{}, dy, typename C::SmemLayoutA{}(_, _, 0), typename C::ATile{});
  auto tma_x = make_tma_atom(SM90_TMA_LOAD{}, x, typename C::SmemLayoutB{}(_, _, 0), typename C::BTile{});
  using Params = ScoresParams<T, decltype(tma_dy), decltype(tma_x)>;
  const Params p{tma_dy, tma_x, a.scores, M, N, K, K / BS};
  // One CTA per block of the grid, the block-column fastest (bsr_block_scores_sm90 keeps them under 2^31).
  const int64_t ctas = static_cast<int64_t>(N / BS) * (K / BS);
  return launch(block_scores_sm90_kernel<T, BS, Params>, dim3(static_cast<unsigned>(ctas)), C::kSmemBytes, stream,
                p);
}

}  // namespace

bool bsr_gemm_sm90_takes(const BsrGemmArgs& a) {
  return a.conv == nullptr && tensor_core_case(a.type, a.block_size) && a.nnz > 0 && a.M > 0 &&
         a.M <= INT32_MAX && a.a_cols <= INT32_MAX && a.nnz * a.block_size <= INT32_MAX &&
         a.a_cols % a.block_size == 0 && a.out_cols % a.block_size == 0 &&
         (a.M + kBM - 1) / kBM * a.n_lines <= INT32_MAX && tma_rows(a.a, a.lda, a.a_cols) &&
         aligned16(a.values);
}

bool bsr_gemm_sm90(const BsrGemmArgs& a, cudaStream_t stream, LaunchStatus* status) {
  if (!bsr_gemm_sm90_takes(a) || !device_runs_sm90a()) return false;
  *status = dispatch(a.type, a.block_size, [&](auto tag, auto block_size) {
    using T = typename decltype(tag)::type;
    constexpr int BS = decltype(block_size)::value;
    return a.transposed ? launch_linear<T, BS, true>(a, stream) : launch_linear<T, BS, false>(a, stream);
  });
  return true;
}

// The weight-gradient operands the Hopper kernels take: 16-bit, bs 64 or 128, no padded blocks, plain TMA-friendly
// matrices, 32-bit sizes.
bool weight_grad_takes(const WeightGradOperands& in) {
  return in.conv == nullptr && tensor_core_case(in.type, in.block_size) && in.M > 0 && in.M <= INT32_MAX &&
         in.N <= INT32_MAX && in.K <= INT32_MAX && in.N % in.block_size == 0 && in.K % in.block_size == 0 &&
         tma_rows(in.dy, in.ld_dy, in.N) && tma_rows(in.x, in.ld_x, in.K);
}

bool block_grad_scores_sm90(const BlockScoresArgs& a, cudaStream_t stream, LaunchStatus* status) {
  const WeightGradOperands& in = a.in;
  const int64_t blocks = in.block_size > 0 ? (in.N / in.block_size) * (in.K / in.block_size) : 0;
  if (!weight_grad_takes(in) || blocks == 0 || blocks > INT32_MAX || !device_runs_sm90a()) return false;
  *status = dispatch(in.type, in.block_size, [&](auto tag, auto block_size) {
    return launch_scores<typename decltype(tag)::type, decltype(block_size)::value>(a, stream);
  });
  return true;
}

bool bsr_sddmm_sm90(const SddmmArgs& a, cudaStream_t stream, LaunchStatus* status) {
  const WeightGradOperands& in = a.in;
  const bool takes = weight_grad_takes(in) && a.nnz > 0 && a.nnz <= INT32_MAX && a.chunk % kStepRows == 0 &&
                     a.splits <= 65535 && a.splits * a.chunk >= in.M && a.splits * a.chunk <= INT32_MAX &&
                     (a.splits == 1 || a.partial != nullptr);
  if (!takes || !device_runs_sm90a()) return false;
  *status = dispatch(in.type, in.block_size, [&](auto tag, auto block_size) {
    return launch_sddmm<typename decltype(tag)::type, decltype(block_size)::value>(a, stream);
  });
  return true;
}

}  // namespace cuda
}  // namespace sparsekern
