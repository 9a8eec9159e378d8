// What the Hopper (sm_90a) kernels on CUTLASS's CuTe share: the warp-specialised TMA/wgmma main loop, the tile
// configurations, the epilogue's paired stores and the launch plumbing (bsr_gemm_sm90.cu: the four GEMMs;
// bsr_conv_sm90.cu: the convolution's forward pass). CUDA and CUTLASS headers only, no torch.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "bsr_gemm.cuh"

namespace sparsekern {
namespace cuda {
namespace sm90 {

using namespace cute;

constexpr int kThreads = 384;  // one producer and two consumer warp groups
[[maybe_unused]] constexpr int kConsumerThreads = kThreads - cutlass::NumThreadsPerWarpGroup;
// setmaxnreg's split of the 168 registers per thread that 384 threads have: the producer's one copying thread
// needs few (CUTLASS gives it 40; the convolution's filter gradient, with two images' coordinates, spilled there),
// the consumers hold the accumulators (the block scores 3 x 64 at bs = 128). 128 x 56 + 256 x 224 = 384 x 168.
constexpr int kProducerRegisters = 56, kConsumerRegisters = 224;
constexpr int kSmemAlign = 1024;  // a 128-byte-swizzled tile repeats every 1024 bytes: tiles start on that grid
constexpr int kSmemBudget = 192 * 1024;
constexpr int kMaxStages = 8;

// Stage tiles of ROWS x COLS (the MMA's M or N, the reduction), 128-byte swizzled, or (MN-major, WIDE = false)
// 64-byte swizzled in 32-wide atoms: where two warp groups split a tile's 64 columns, each one's wgmma descriptor
// then starts on an atom of its own. MN-major tiles are laid out along the reduction first, so that each TMA box
// spans the whole reduction extent of a stage instead of one 8-wide slice of it (CUTLASS's collectives do the same).
template <typename T, GMMA::Major MAJOR, int ROWS, int COLS, int STAGES, bool WIDE = true>
using SwizzledTiles = conditional_t<
    MAJOR == GMMA::Major::K,
    decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<ROWS>, Int<COLS>, Int<STAGES>>{})),
    decltype(tile_to_shape(conditional_t<WIDE, GMMA::Layout_MN_SW128_Atom<T>, GMMA::Layout_MN_SW64_Atom<T>>{},
                           Shape<Int<ROWS>, Int<COLS>, Int<STAGES>>{}, Step<_2, _1, _3>{}))>;

// A pipeline of A tiles [TM, TK] and B tiles [TN, TK] (the MMA's (rows, reduction) and (columns, reduction)),
// accumulated into a [TM, TN] fp32 tile by the two consumer warp groups laid out as WG_M x WG_N (WG_N = 2 only
// with an MN-major B of 64 columns, each warp group's 32 in an atom of their own).
template <typename T, int TM, int TN, int TK, GMMA::Major MAJOR_A, GMMA::Major MAJOR_B, int WG_M, int WG_N>
struct MainloopConfig {
  static constexpr int kStageBytes = (TM + TN) * TK * static_cast<int>(sizeof(T));
  static constexpr int kStages = kSmemBudget / kStageBytes < kMaxStages ? kSmemBudget / kStageBytes : kMaxStages;
  using ATile = Shape<Int<TM>, Int<TK>>;
  using BTile = Shape<Int<TN>, Int<TK>>;
  using CTile = Shape<Int<TM>, Int<TN>>;
  using SmemLayoutA = SwizzledTiles<T, MAJOR_A, TM, TK, kStages>;
  static_assert(WG_N == 1 || (MAJOR_B == GMMA::Major::MN && TN == 64), "see SwizzledTiles");
  using SmemLayoutB = SwizzledTiles<T, MAJOR_B, TN, TK, kStages, WG_N == 1>;
  using TiledMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<TM / WG_M>, Int<TN / WG_N>, _16>, MAJOR_A, MAJOR_B>(),
      Layout<Shape<Int<WG_M>, Int<WG_N>, _1>>{}));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  struct SharedStorage {
    alignas(kSmemAlign) ArrayEngine<T, cosize_v<SmemLayoutA>> a;
    alignas(kSmemAlign) ArrayEngine<T, cosize_v<SmemLayoutB>> b;
    typename Pipeline::SharedStorage pipeline;
  };
  // The dynamic shared memory's base is only 16-byte aligned for sure: the kernel aligns it itself.
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage)) + kSmemAlign;
  static_assert(kStages >= 3, "the consumers hold two stages at a time");
};

// How the consumers add a stage's products to their sums. CHAINED: the wgmmas accumulate in place, one stage's
// MMAs kept in flight across stages (fp16/bf16 outputs, whose one rounding hides the tensor cores' truncating
// accumulation). NEAREST: each 16-deep product starts from zero and is added to the sums with FADD, so the sums
// round to nearest as an fp32 GEMM's do (fp32 outputs: the block norms), at the cost of waiting on every stage.
enum class Accumulation { kChained, kNearest };

// acc += the stage's products, each k16 step from zero into one of two alternating scratch tiles, added with FADD
// once it lands; the next step's wgmma runs meanwhile.
template <class TiledMma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void accumulate_nearest(TiledMma& mma, const FragA& a, const FragB& b, Acc& acc) {
  Tensor scratch0 = make_fragment_like(acc);
  Tensor scratch1 = make_fragment_like(acc);
  constexpr int kSteps = decltype(size<2>(a))::value;
  static_assert(kSteps % 2 == 0, "the scratch tiles alternate");
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  const auto issue = [&](int k, auto& scratch) {
    warpgroup_fence_operand(scratch);
    warpgroup_arrive();  // also orders the FADDs that read this scratch tile before the wgmma rewrites it
    gemm(mma, a(_, _, k), b(_, _, k), scratch);
    warpgroup_commit_batch();
  };
  const auto add = [&](auto& scratch) {
    warpgroup_fence_operand(scratch);
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) acc(i) += scratch(i);
  };
  issue(0, scratch0);
  CUTE_UNROLL
  for (int k = 1; k < kSteps; ++k) {
    if (k % 2 == 1) {
      issue(k, scratch1);
      warpgroup_wait<1>();
      add(scratch0);
    } else {
      issue(k, scratch0);
      warpgroup_wait<1>();
      add(scratch1);
    }
  }
  warpgroup_wait<0>();
  add(kSteps % 2 == 0 ? scratch1 : scratch0);
}

// The warp-specialised main loop. `make_loader(sA, sB)` runs in the one producer thread and returns
// `load(step, stage, barrier)`, which issues the TMA copies of a step into a stage; `epilogue(acc, coords)` runs in
// the consumer threads with the fp32 sums and each one's (row, column) in the [TM, TN] tile.
template <class C, Accumulation ACCUMULATION = Accumulation::kChained, class MakeLoader, class Epilogue>
__device__ __forceinline__ void run_mainloop(unsigned char* smem_raw, int n_steps, const MakeLoader& make_loader,
                                             const Epilogue& epilogue) {
  using Pipeline = typename C::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  auto& shared = *reinterpret_cast<typename C::SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kSmemAlign - 1) & ~uintptr_t(kSmemAlign - 1));
  const int warp_group = threadIdx.x / cutlass::NumThreadsPerWarpGroup;

  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = C::kStageBytes;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = kConsumerThreads;
  Pipeline pipeline(shared.pipeline, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // the barriers are initialised before anyone waits on them

  Tensor sA = make_tensor(make_smem_ptr(shared.a.begin()), typename C::SmemLayoutA{});  // (TM, TK, stage)
  Tensor sB = make_tensor(make_smem_ptr(shared.b.begin()), typename C::SmemLayoutB{});  // (TN, TK, stage)

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();  // the whole warp group, before its idle threads leave
    if (threadIdx.x != 0) return;
    auto load = make_loader(sA, sB);
    PipelineState state = cutlass::make_producer_start_state<Pipeline>();
    for (int step = 0; step < n_steps; ++step) {
      pipeline.producer_acquire(state);
      load(step, state.index(), *pipeline.producer_get_barrier(state));
      ++state;
    }
    pipeline.producer_tail(state);  // the CTA's shared memory outlives every copy in flight
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
  typename C::TiledMma mma;
  auto thread_mma = mma.get_thread_slice(threadIdx.x - cutlass::NumThreadsPerWarpGroup);
  Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // wgmma descriptors, per stage
  Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));
  Tensor acc = partition_fragment_C(mma, typename C::CTile{});
  clear(acc);
  mma.accumulate_ = GMMA::ScaleOut::One;

  PipelineState read;
  if constexpr (ACCUMULATION == Accumulation::kNearest) {
    for (int step = 0; step < n_steps; ++step) {
      pipeline.consumer_wait(read);
      accumulate_nearest(mma, tCrA(_, _, _, read.index()), tCrB(_, _, _, read.index()), acc);
      pipeline.consumer_release(read);
      ++read;
    }
    epilogue(acc, thread_mma.partition_C(make_identity_tensor(typename C::CTile{})));
    return;
  }
  PipelineState release;
  for (int step = 0; step < n_steps; ++step) {
    pipeline.consumer_wait(read);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA(_, _, _, read.index()), tCrB(_, _, _, read.index()), acc);
    warpgroup_commit_batch();
    // One stage's MMAs stay in flight; the stage before it is read by now and goes back to the producer.
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc);
    if (step > 0) {
      pipeline.consumer_release(release);
      ++release;
    }
    ++read;
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if (n_steps > 0) pipeline.consumer_release(release);
  epilogue(acc, thread_mma.partition_C(make_identity_tensor(typename C::CTile{})));
}

// Two adjacent columns of a row in one 4-byte store: wgmma's accumulator fragment holds each thread's values in
// pairs of adjacent columns (PTX ISA, wgmma .m64nNk16 D layout), so value i is column c and value i + 1 column c + 1
// for even i; rows of N or K (multiples of bs) elements keep the pair 4-byte aligned.
template <typename T>
__device__ __forceinline__ void store_pair(T* at, float v0, float v1) {
  cutlass::AlignedArray<T, 2> pair;
  pair[0] = T(v0);
  pair[1] = T(v1);
  *reinterpret_cast<cutlass::AlignedArray<T, 2>*>(at) = pair;
}

// A weight-gradient tile written out: the stored block `block` [bs, bs] row-major in `out` with one split of M, or
// split `split`'s fp32 partial of it in `partial` [splits, nnz, bs, bs] with several.
template <int BS, typename T, class Acc, class Coords>
__device__ __forceinline__ void store_block_tile(const Acc& acc, const Coords& coords, T* out, float* partial,
                                                 int64_t block, int split, int64_t nnz) {
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2) {
    const int64_t at = block * (BS * BS) + get<0>(coords(i)) * BS + get<1>(coords(i));
    if (partial == nullptr) {
      store_pair(out + at, acc(i), acc(i + 1));
    } else {
      *reinterpret_cast<float2*>(partial + split * nnz * (BS * BS) + at) = make_float2(acc(i), acc(i + 1));
    }
  }
}

// The forward and input-gradient tiles (also the convolution's forward): 128 dense rows x one line of W.
constexpr int kBM = 128;

template <typename T, int BS, bool TRANS>
using LinearConfig = MainloopConfig<T, kBM, BS, BS, GMMA::Major::K, TRANS ? GMMA::Major::MN : GMMA::Major::K, 2, 1>;

// values [nnz, bs, bs] as one matrix whose (the MMA's N, reduction) tiles are the blocks: [nnz * bs, bs] read row
// by row forward (reduction contiguous), its transpose [bs, nnz * bs] for the input gradient (N contiguous).
template <int BS, bool TRANS>
CUTE_HOST_DEVICE auto values_matrix_shape(int nnz) {
  if constexpr (TRANS) {
    return make_shape(Int<BS>{}, nnz * BS);
  } else {
    return make_shape(nnz * BS, Int<BS>{});
  }
}

template <int BS, bool TRANS>
CUTE_HOST_DEVICE auto values_matrix_stride() {
  if constexpr (TRANS) {
    return make_stride(Int<1>{}, Int<BS>{});
  } else {
    return make_stride(Int<BS>{}, Int<1>{});
  }
}

// The values matrix cut into its blocks: (bs, bs, block).
template <int BS, bool TRANS, class ValuesMatrix>
CUTE_HOST_DEVICE auto block_tiles(const ValuesMatrix& values) {
  if constexpr (TRANS) {
    return local_tile(values, Shape<Int<BS>, Int<BS>>{}, make_coord(0, _));
  } else {
    return local_tile(values, Shape<Int<BS>, Int<BS>>{}, make_coord(_, 0));
  }
}

// The weight-gradient tiles (the SDDMM, the block scores, the convolution's filter gradient): one block x 64 rows
// of M per step.
constexpr int kStepRows = 64;  // rows of M per pipeline step

// dYᵀ X: A is dY's [bs, 64] column tile read as (block-row features, M) and B is X's as (block-column features, M):
// both N/K-contiguous (MN-major). bs = 128: each warp group owns 64 of the block's rows; bs = 64: 32 of its columns
// (X's tile then in 64-byte swizzled atoms of 32 columns, one per warp group).
template <typename T, int BS>
using SddmmConfig = MainloopConfig<T, BS, BS, kStepRows, GMMA::Major::MN, GMMA::Major::MN, BS == 128 ? 2 : 1,
                                   BS == 128 ? 1 : 2>;

// Whether the device loaded the sm_90a image of these kernels (bsr_gemm_sm90.cu): the other architectures' images
// hold bodies that trap. Asked once (see there); false until answered.
bool device_runs_sm90a();

template <class Kernel, class Params>
LaunchStatus launch(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream, const Params& p) {
  LaunchStatus status{cudaSuccess, true, grid, dim3(kThreads), smem_bytes};
  status.error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (status.error != cudaSuccess) return status;
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  status.error = cudaGetLastError();
  return status;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}, std::integral_constant<int, BS>{}) for the 16-bit types and bs 64 or 128 (checked by the callers).
template <class F>
LaunchStatus dispatch(ElementType type, int block_size, const F& f) {
  const auto with_type = [&](auto tag) {
    return block_size == 64 ? f(tag, std::integral_constant<int, 64>{}) : f(tag, std::integral_constant<int, 128>{});
  };
  return type == ElementType::kBFloat16 ? with_type(TypeTag<cutlass::bfloat16_t>{})
                                        : with_type(TypeTag<cutlass::half_t>{});
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// TMA reads 16-bit rows from 16-byte aligned addresses 16-byte multiples apart; a row stride under the row's width
// (an expanded operand's 0) is no matrix TMA can describe.
inline bool tma_rows(const void* base, int64_t stride, int64_t width) {
  return aligned16(base) && (stride * 2) % 16 == 0 && stride >= width;
}

inline bool tensor_core_case(ElementType type, int block_size) {
  return (type == ElementType::kBFloat16 || type == ElementType::kFloat16) && (block_size == 64 || block_size == 128);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace sparsekern
