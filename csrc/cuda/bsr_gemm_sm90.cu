// The forward and input-gradient GEMMs of a block-sparse W on Hopper (sm_90a), built on CUTLASS's CuTe:
//   bsr_linear     Y [M, N]  = X [M, K] Wᵀ (+ bias), walking the block-rows of W;
//   bsr_linear_dx  dX [M, K] = dY [M, N] W, walking the block-columns of W through perm.
// The mma.sync kernel of bsr_gemm_linear.cu computes the same tile (BM = 128 dense rows x one line of W) with
// cp.async and ldmatrix; here the tensor-memory accelerator loads the tiles and wgmma reads them from shared
// memory, in a warp-specialised CTA:
//   - warp group 0, the producer, gives up registers; one thread walks the line and, per stored block, loads the
//     dense operand's [BM, bs] tile at the block's coordinate (the block-sparse gather along the reduction is
//     just a TMA box at a block-aligned column) and the block's [bs, bs] values, into one stage of a ring that
//     CUTLASS's PipelineTmaAsync guards with transaction barriers;
//   - warp groups 1 and 2, the consumers, each own 64 of the BM rows and run one 64 x bs x 16 wgmma per 16
//     reduction entries, keeping one stage's MMAs in flight while they wait for the next stage.
// The block values are read in their storage order in both directions: W[n][k] is the MMA's B K-major in the
// forward pass and MN-major in the input gradient (wgmma reads both from shared memory), never transposed in
// memory. Taken only where no block has padding (N and K multiples of bs), the rows' addresses suit TMA, the
// type is 16-bit and bs is 64 or 128 (bsr_gemm_sm90_takes); every other call runs the mma.sync kernel.
#include "bsr_gemm.cuh"

#include <cute/tensor.hpp>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace sparsekern {
namespace cuda {
namespace {

using namespace cute;

constexpr int kBM = 128;
constexpr int kThreads = 384;  // one producer and two consumer warp groups
constexpr int kSmemAlign = 1024;  // a 128-byte-swizzled tile repeats every 1024 bytes: its base must be aligned so

template <typename T, int BS, bool TRANS>
struct Sm90Config {
  // As many stages as fit in 192 KB: 8 of 24 KB at bs = 64, 3 of 64 KB at bs = 128.
  static constexpr int kStageBytes = (kBM * BS + BS * BS) * static_cast<int>(sizeof(T));
  static constexpr int kStages = (192 * 1024) / kStageBytes < 8 ? (192 * 1024) / kStageBytes : 8;
  using BlockTile = Shape<Int<BS>, Int<BS>>;
  using ATile = Shape<Int<kBM>, Int<BS>>;
  using SmemLayoutA =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBM>, Int<BS>, Int<kStages>>{}));
  // B is (the MMA's N, its reduction): W's block as stored, [n][k] forward (reduction contiguous: K-major) and
  // read as [k][n] for the input gradient (the MMA's N contiguous: MN-major).
  using SmemLayoutB = conditional_t<
      TRANS, decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<BS>, Int<BS>, Int<kStages>>{})),
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<BS>, Int<BS>, Int<kStages>>{}))>;
  static constexpr GMMA::Major kMajorB = TRANS ? GMMA::Major::MN : GMMA::Major::K;
  using TiledMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<_64, Int<BS>, _16>, GMMA::Major::K, kMajorB>(),
      Layout<Shape<_2, _1, _1>>{}));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  struct SharedStorage {
    alignas(kSmemAlign) ArrayEngine<T, cosize_v<SmemLayoutA>> a;
    alignas(kSmemAlign) ArrayEngine<T, cosize_v<SmemLayoutB>> b;
    typename Pipeline::SharedStorage pipeline;
  };
  // The dynamic shared memory's base is only 16-byte aligned for sure: the kernel aligns it itself.
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage)) + kSmemAlign;
};

// The dense operand A [M, a_cols] and the blocks' values, as TMA tensors; out [M, out_cols].
template <typename T, class TmaA, class TmaB>
struct Sm90Params {
  TmaA tma_a;
  TmaB tma_b;
  const T* bias;
  T* out;
  const int32_t* line_ptr;
  const int32_t* line_idx;
  const int32_t* perm;
  int M, a_cols, out_cols, n_lines, nnz;
};

template <typename T, int BS, bool TRANS>
CUTE_HOST_DEVICE auto values_shape(int nnz) {
  // values [nnz, bs, bs] as one matrix whose (N, reduction) tiles are the blocks: [nnz * bs, bs] read
  // row by row forward, its transpose [bs, nnz * bs] for the input gradient.
  if constexpr (TRANS) {
    return make_shape(Int<BS>{}, nnz * BS);
  } else {
    return make_shape(nnz * BS, Int<BS>{});
  }
}

// The values matrix of values_shape cut into its blocks: (bs, bs, block).
template <int BS, bool TRANS, class ValuesTensor>
CUTE_DEVICE auto block_tiles(const ValuesTensor& values) {
  if constexpr (TRANS) {
    return local_tile(values, Shape<Int<BS>, Int<BS>>{}, make_coord(0, _));
  } else {
    return local_tile(values, Shape<Int<BS>, Int<BS>>{}, make_coord(_, 0));
  }
}

template <typename T, int BS, bool TRANS, class Params>
__global__ void __launch_bounds__(kThreads, 1) bsr_gemm_sm90_kernel(CUTE_GRID_CONSTANT const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Sm90Config<T, BS, TRANS>;
  using Pipeline = typename C::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  extern __shared__ unsigned char smem_raw[];
  auto& shared = *reinterpret_cast<typename C::SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kSmemAlign - 1) & ~uintptr_t(kSmemAlign - 1));

  // Line fastest: consecutive CTAs share the dense operand's M-tile while it is in L2.
  const int line = static_cast<int>(blockIdx.x % p.n_lines);
  const int m_tile = static_cast<int>(blockIdx.x / p.n_lines);
  const int first = p.line_ptr[line];
  const int n_blocks = p.line_ptr[line + 1] - first;
  const int warp_group = threadIdx.x / cutlass::NumThreadsPerWarpGroup;

  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = C::kStageBytes;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = kThreads - cutlass::NumThreadsPerWarpGroup;
  Pipeline pipeline(shared.pipeline, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // the barriers are initialised before anyone waits on them

  Tensor sA = make_tensor(make_smem_ptr(shared.a.begin()), typename C::SmemLayoutA{});  // (BM, bs, stage)
  Tensor sB = make_tensor(make_smem_ptr(shared.b.begin()), typename C::SmemLayoutB{});  // (bs, bs, stage)

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x != 0) return;
    Tensor mA = p.tma_a.get_tma_tensor(make_shape(p.M, p.a_cols));
    Tensor gA = local_tile(mA, typename C::ATile{}, make_coord(m_tile, _));  // (BM, bs, block-column)
    Tensor mB = p.tma_b.get_tma_tensor(values_shape<T, BS, TRANS>(p.nnz));
    Tensor gB = block_tiles<BS, TRANS>(mB);  // (bs, bs, block)
    auto [tAgA, tAsA] = tma_partition(p.tma_a, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA), group_modes<0, 2>(gA));
    auto [tBgB, tBsB] = tma_partition(p.tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
    PipelineState state = cutlass::make_producer_start_state<Pipeline>();
    for (int j = first; j < first + n_blocks; ++j) {
      const int reduction_block = p.line_idx[j];
      const int block = TRANS ? p.perm[j] : j;
      pipeline.producer_acquire(state);
      auto* full = pipeline.producer_get_barrier(state);
      copy(p.tma_a.with(*full), tAgA(_, reduction_block), tAsA(_, state.index()));
      copy(p.tma_b.with(*full), tBgB(_, block), tBsB(_, state.index()));
      ++state;
    }
    pipeline.producer_tail(state);  // the CTA's shared memory outlives every copy in flight
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<232>();
  typename C::TiledMma mma;
  auto thread_mma = mma.get_thread_slice(threadIdx.x - cutlass::NumThreadsPerWarpGroup);
  Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // wgmma descriptors, per stage
  Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));
  Tensor cC = make_identity_tensor(Shape<Int<kBM>, Int<BS>>{});  // (row, column) in the CTA's tile
  Tensor tCcC = thread_mma.partition_C(cC);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<BS>>{});
  clear(acc);
  mma.accumulate_ = GMMA::ScaleOut::One;

  PipelineState read;
  PipelineState release;
  for (int j = 0; j < n_blocks; ++j) {
    pipeline.consumer_wait(read);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA(_, _, _, read.index()), tCrB(_, _, _, read.index()), acc);
    warpgroup_commit_batch();
    // One stage's MMAs stay in flight; the stage before it is read by now and goes back to the producer.
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc);
    if (j > 0) {
      pipeline.consumer_release(release);
      ++release;
    }
    ++read;
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if (n_blocks > 0) pipeline.consumer_release(release);

  // Epilogue: bias in fp32 before the one rounding; rows past M are not written (N and K have no padding here).
  const int rows = min(kBM, p.M - m_tile * kBM);
  const int64_t col0 = static_cast<int64_t>(line) * BS;
  T* out = p.out + static_cast<int64_t>(m_tile) * kBM * p.out_cols + col0;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int row = get<0>(tCcC(i));
    const int col = get<1>(tCcC(i));
    if (row < rows) {
      float v = acc(i);
      if (p.bias != nullptr) v += static_cast<float>(p.bias[col0 + col]);
      out[static_cast<int64_t>(row) * p.out_cols + col] = T(v);
    }
  }
#else
  // Never launched: bsr_gemm_sm90 checks that the binary for the device holds the sm_90a code above.
  __trap();
#endif
}

// The kernel as compiled for the current device: sm_90a code, or (no 9.0a in TORCH_CUDA_ARCH_LIST) the empty
// body of another architecture, which must never run. One answer per kernel: the glue only calls here on
// compute capability 9.0 devices, which all load the same image.
template <class Kernel>
bool has_sm90a_code(Kernel kernel) {
  static const bool has = [&] {
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attributes.binaryVersion == 90;
  }();
  return has;
}

template <typename T, int BS, bool TRANS>
bool launch_sm90(const BsrGemmArgs& a, cudaStream_t stream, LaunchStatus* status) {
  using C = Sm90Config<T, BS, TRANS>;
  const int M = static_cast<int>(a.M), a_cols = static_cast<int>(a.a_cols), nnz = static_cast<int>(a.nnz);
  Tensor gA = make_tensor(make_gmem_ptr(static_cast<const T*>(a.a)), make_shape(M, a_cols),
                          make_stride(a.lda, Int<1>{}));
  const auto values_stride = [] {
    if constexpr (TRANS) {
      return make_stride(Int<1>{}, Int<BS>{});
    } else {
      return make_stride(Int<BS>{}, Int<1>{});
    }
  }();
  Tensor gB = make_tensor(make_gmem_ptr(static_cast<const T*>(a.values)), values_shape<T, BS, TRANS>(nnz),
                          values_stride);
  auto tma_a = make_tma_atom(SM90_TMA_LOAD{}, gA, typename C::SmemLayoutA{}(_, _, 0), typename C::ATile{});
  auto tma_b = make_tma_atom(SM90_TMA_LOAD{}, gB, typename C::SmemLayoutB{}(_, _, 0), typename C::BlockTile{});

  using Params = Sm90Params<T, decltype(tma_a), decltype(tma_b)>;
  const auto kernel = bsr_gemm_sm90_kernel<T, BS, TRANS, Params>;
  if (!has_sm90a_code(kernel)) return false;
  Params p{tma_a,
           tma_b,
           static_cast<const T*>(a.bias),
           static_cast<T*>(a.out),
           a.line_ptr,
           a.line_idx,
           a.perm,
           M,
           a_cols,
           static_cast<int>(a.out_cols),
           static_cast<int>(a.n_lines),
           nnz};
  // One CTA per (M-tile, line), all in grid.x (the line fastest).
  const int64_t ctas = (a.M + kBM - 1) / kBM * a.n_lines;
  if (ctas > INT32_MAX) return false;
  *status = LaunchStatus{cudaSuccess, true, dim3(static_cast<unsigned>(ctas)), dim3(kThreads), C::kSmemBytes};
  status->error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  if (status->error != cudaSuccess) return true;
  kernel<<<status->grid, status->block, C::kSmemBytes, stream>>>(p);
  status->error = cudaGetLastError();
  return true;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
struct TypeTag {
  using type = T;
};

}  // namespace

bool bsr_gemm_sm90_takes(const BsrGemmArgs& a) {
  const bool half_type = a.type == ElementType::kBFloat16 || a.type == ElementType::kFloat16;
  return a.conv == nullptr && half_type && (a.block_size == 64 || a.block_size == 128) && a.nnz > 0 &&
         a.M > 0 && a.M <= INT32_MAX && a.a_cols % a.block_size == 0 && a.out_cols % a.block_size == 0 &&
         a.a_cols <= INT32_MAX && a.nnz * a.block_size <= INT32_MAX &&
         // TMA: 16-byte aligned bases and row strides
         aligned16(a.a) && aligned16(a.values) && (a.lda * 2) % 16 == 0;
}

bool bsr_gemm_sm90(const BsrGemmArgs& a, cudaStream_t stream, LaunchStatus* status) {
  if (!bsr_gemm_sm90_takes(a)) return false;
  const bool bf16 = a.type == ElementType::kBFloat16;
  const auto with_type = [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.block_size == 64) {
      return a.transposed ? launch_sm90<T, 64, true>(a, stream, status) : launch_sm90<T, 64, false>(a, stream, status);
    }
    return a.transposed ? launch_sm90<T, 128, true>(a, stream, status) : launch_sm90<T, 128, false>(a, stream, status);
  };
  return bf16 ? with_type(TypeTag<cutlass::bfloat16_t>{}) : with_type(TypeTag<cutlass::half_t>{});
}

}  // namespace cuda
}  // namespace sparsekern
