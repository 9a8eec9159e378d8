// The weight-gradient GEMMs: tiles of dYᵀX [N, K] reduced over the M rows of dY [M, N] and X [M, K].
//   bsr_sddmm          one bs x bs tile per stored block (coo_row, col_idx), M split into chunks across CTAs
//                      when there are too few blocks to fill the GPU (fp32 partials, summed in a fixed order);
//   block_grad_scores  every TILE x TILE tile of the dense dYᵀX (TILE = 64, or 128 for 128-wide blocks), folded
//                      into the Frobenius norms of its blocks in the epilogue, so the dense gradient is never
//                      written. A norm needs the whole sum before squaring, so M is not split there.
// X is a plain matrix or the implicit im2col of an NHWC image (im2col.cuh: the convolution's filter gradient and its
// block scores), the kernel templated on where its tiles come from.
// Per pipeline step a CTA stages BLOCK_M rows of dY (its tile's columns n) and of X (columns k); both are the
// MMA operands stored reduction-major, read with ldmatrix .trans. Rows past M (or past the chunk) and columns past
// N or K load as zeros, so the padding of a block comes out exactly zero (sddmm) or adds nothing (norms).
#include "bsr_gemm.cuh"
#include "bsr_gemm_tiles.cuh"
#include "im2col.cuh"

namespace sparsekern {
namespace cuda {
namespace {

using namespace tiles;

// Tile shapes per element type and tile width (under 99 KB of shared memory, see bsr_gemm_linear.cu). Tiles of
// 16 and 32 are too small for one warp per piece of C: four warps each reduce every fourth k16 step (or row)
// of a stage into their own copy of the tile, summed in the epilogue. SCORES: block_grad_scores, whose fp32
// output shows the tensor cores' truncating accumulation (MmaWarpTile's NEAREST).
template <typename T, int TILE, bool SCORES, bool MMA = Elem<T>::kTensorCores>
struct WgradConfig;

// kRegisterCtas: CTAs per SM that the registers allow, where that is fewer than the shared memory allows (32: no
// limit). ptxas spilled at the shared memory's occupancy where two sets of accumulators live: the scores' NEAREST
// tiles (~130 registers at TILE 64: three CTAs of 128 threads, not four; ~220 at TILE 128: one CTA of 256 threads)
// and FmaMath's two-level sums (~200 at TILE 128: one CTA).
template <typename T, int TILE, bool SCORES>
struct WgradConfig<T, TILE, SCORES, true> {
  static constexpr int BLOCK_M = TILE <= 32 ? 64 : 32;
  static constexpr int STAGES = 4;
  using Math = MmaMath<T, TILE, TILE, BLOCK_M, TILE <= 32 ? 4 : 1, TILE <= 32 ? 1 : 2,
                       TILE <= 32 ? 1 : (TILE == 64 ? 2 : 4), true, true, SCORES>;
  static constexpr int kRegisterCtas = !SCORES ? 32 : (TILE == 128 ? 1 : 3);
};

template <int TILE, bool SCORES>
struct WgradConfig<float, TILE, SCORES, false> {
  static constexpr int BLOCK_M = TILE <= 32 ? 32 : 16;
  static constexpr int STAGES = 4;
  using Math = FmaMath<TILE, TILE, BLOCK_M, TILE <= 32 ? 4 : 1, TILE <= 32 ? 4 : 16, TILE == 128 ? 16 : 8, true, true>;
  static constexpr int kRegisterCtas = TILE == 128 ? 1 : 32;
};

// Per stage dY [BLOCK_M][LD] then X [BLOCK_M][LD]; after the pipeline the fp32 tile [groups][TILE][LDT].
template <typename T, int TILE, bool SCORES>
struct WgradLayout : WgradConfig<T, TILE, SCORES> {
  using Cfg = WgradConfig<T, TILE, SCORES>;
  static constexpr int kThreads = Cfg::Math::kThreads;
  static constexpr int LD = TILE + kPad<T>;
  static constexpr int LDT = kTileStride<TILE>;
  static constexpr int kABytes = Cfg::BLOCK_M * LD * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = 2 * kABytes;
  static constexpr int kSmemBytes =
      imax(Cfg::STAGES * kStageBytes, Cfg::Math::kGroups * TILE * LDT * static_cast<int>(sizeof(float)));
  static_assert(kSmemBytes <= 99 * 1024, "over the shared memory of consumer sm_80+ parts");
  static constexpr int kMinBlocks = imin(ctas_per_sm(kSmemBytes), Cfg::kRegisterCtas);
};

// XSrc: where X's tiles come from (tiles::DenseRows, or tiles::Im2colRows for the convolution's filter gradient).
template <typename T, class XSrc>
struct WgradParams {
  DenseRows<T> dy;
  XSrc x;
  int64_t M, N, K;
  // bsr_sddmm
  const int32_t* coo_row;
  const int32_t* col_idx;
  int64_t nnz, chunk;
  float* partial;
  T* out;
  // block_grad_scores
  int64_t n_tile_cols, n_block_rows, n_block_cols;
  float* scores;
};

// SCORES = false: grid (nnz, splits), one stored block (TILE == BS) and one M-chunk per CTA.
// SCORES = true: grid (tiles of N x tiles of K), all of M per CTA.
template <typename T, int TILE, int BS, bool SCORES, class XSrc>
__global__ void __launch_bounds__(WgradLayout<T, TILE, SCORES>::kThreads,
                                  WgradLayout<T, TILE, SCORES>::kMinBlocks)
weight_grad_kernel(const WgradParams<T, XSrc> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = WgradLayout<T, TILE, SCORES>;
  static_assert(SCORES || TILE == BS, "an SDDMM tile is one block");
  static_assert(TILE % BS == 0, "a score tile holds whole blocks");
  constexpr int BLOCK_M = L::BLOCK_M;
  constexpr int kThreads = L::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;

  int64_t n0, k0, m_begin, m_end;
  if (SCORES) {
    n0 = (blockIdx.x / p.n_tile_cols) * TILE;
    k0 = (blockIdx.x % p.n_tile_cols) * TILE;
    m_begin = 0;
    m_end = p.M;
  } else {
    n0 = static_cast<int64_t>(p.coo_row[blockIdx.x]) * BS;
    k0 = static_cast<int64_t>(p.col_idx[blockIdx.x]) * BS;
    m_begin = blockIdx.y * p.chunk;
    m_end = m_begin + p.chunk < p.M ? m_begin + p.chunk : p.M;
  }
  const int n_valid = clamp_count(p.N, n0, TILE);
  const int k_valid = clamp_count(p.K, k0, TILE);

  typename L::Math math(tid);
  const auto stage_dy = [&](int s) { return reinterpret_cast<T*>(smem + s * L::kStageBytes); };
  const auto stage_x = [&](int s) { return reinterpret_cast<T*>(smem + s * L::kStageBytes + L::kABytes); };
  const auto load = [&](int step, int s) {
    const int64_t m = m_begin + static_cast<int64_t>(step) * BLOCK_M;
    const int rows = clamp_count(m_end, m, BLOCK_M);
    p.dy.rows_from(m).template load<BLOCK_M, TILE, L::LD, kThreads>(stage_dy(s), n0, rows, n_valid, tid);
    p.x.rows_from(m).template load<BLOCK_M, TILE, L::LD, kThreads>(stage_x(s), k0, rows, k_valid, tid);
  };
  run_pipeline<L::STAGES>(static_cast<int>(cdiv(m_end - m_begin, BLOCK_M)), load,
                          [&](int s) { math.stage(stage_dy(s), L::LD, stage_x(s), L::LD); });

  float* c = reinterpret_cast<float*>(smem);
  math.store(c, L::LDT);
  __syncthreads();
  // Entry (row, col) of the CTA's tile, the groups' partial tiles summed in a fixed order.
  const auto tile_at = [&](int row, int col) {
    float v = c[row * L::LDT + col];
#pragma unroll
    for (int g = 1; g < L::Math::kGroups; ++g) v += c[(g * TILE + row) * L::LDT + col];
    return v;
  };

  if (SCORES) {
    // One warp per block of the tile: sum of squares over its lanes, then a fixed butterfly (deterministic).
    constexpr int kBlocks = (TILE / BS) * (TILE / BS);
    const int warp = tid / kWarp;
    const int lane = tid % kWarp;
    for (int b = warp; b < kBlocks; b += kThreads / kWarp) {
      const int br = b / (TILE / BS);
      const int bc = b % (TILE / BS);
      float sum = 0.0f;
      for (int e = lane; e < BS * BS; e += kWarp) {
        const float v = tile_at(br * BS + e / BS, bc * BS + e % BS);
        sum = fmaf(v, v, sum);
      }
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      const int64_t r = n0 / BS + br;
      const int64_t col = k0 / BS + bc;
      if (lane == 0 && r < p.n_block_rows && col < p.n_block_cols) p.scores[r * p.n_block_cols + col] = sqrtf(sum);
    }
  } else {
    const int64_t first = static_cast<int64_t>(blockIdx.x) * (BS * BS);
    for (int e = tid; e < BS * BS; e += kThreads) {
      const float v = tile_at(e / BS, e % BS);
      if (p.partial != nullptr) {
        p.partial[blockIdx.y * p.nnz * (BS * BS) + first + e] = v;
      } else {
        p.out[first + e] = Elem<T>::from_float(v);
      }
    }
  }
#endif
}

// out[e] = Σ_s partial[s][e], s in order, rounded once.
template <typename T>
__global__ void __launch_bounds__(256)
sum_partials_kernel(const float* __restrict__ partial, int64_t splits, int64_t total, T* __restrict__ out) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    float v = partial[e];
    for (int64_t s = 1; s < splits; ++s) v += partial[s * total + e];
    out[e] = Elem<T>::from_float(v);
  }
#endif
}

template <typename T, class XSrc>
WgradParams<T, XSrc> common_params(const WeightGradOperands& in, const XSrc& x) {
  WgradParams<T, XSrc> p{};
  p.dy = dense_rows<T>(in.dy, in.ld_dy, in.N);
  p.x = x;
  p.M = in.M;
  p.N = in.N;
  p.K = in.K;
  return p;
}

template <typename T, int TILE, int BS, bool SCORES, class XSrc>
LaunchStatus launch_weight_grad(const WgradParams<T, XSrc>& p, dim3 grid, cudaStream_t stream) {
  using L = WgradLayout<T, TILE, SCORES>;
  return launch_kernel(weight_grad_kernel<T, TILE, BS, SCORES, XSrc>, grid, L::kThreads, L::kSmemBytes, stream, p);
}

template <typename T, int BS, class XSrc>
LaunchStatus sddmm(const SddmmArgs& a, const XSrc& x, cudaStream_t stream) {
  WgradParams<T, XSrc> p = common_params<T>(a.in, x);
  p.coo_row = a.coo_row;
  p.col_idx = a.col_idx;
  p.nnz = a.nnz;
  p.chunk = a.chunk;
  p.partial = a.splits > 1 ? a.partial : nullptr;
  p.out = static_cast<T*>(a.out);
  if (a.nnz == 0 || a.in.M == 0) return LaunchStatus{};  // the caller fills the empty cases
  // Blocks in grid.x, M-chunks in grid.y (sddmm_plan keeps them under its limit of 65535).
  if (a.nnz > INT32_MAX || a.splits > 65535 || a.splits * a.chunk < a.in.M || (a.splits > 1 && a.partial == nullptr))
    return LaunchStatus{cudaErrorInvalidValue};
  const LaunchStatus status = launch_weight_grad<T, BS, BS, false>(
      p, dim3(static_cast<unsigned>(a.nnz), static_cast<unsigned>(a.splits)), stream);
  if (status.error != cudaSuccess || a.splits == 1) return status;
  return sum_sddmm_partials(a, stream);
}

template <typename T, int BS, class XSrc>
LaunchStatus scores(const BlockScoresArgs& a, const XSrc& x, cudaStream_t stream) {
  constexpr int TILE = BS <= 64 ? 64 : 128;
  WgradParams<T, XSrc> p = common_params<T>(a.in, x);
  p.n_tile_cols = cdiv(a.in.K, TILE);
  p.n_block_rows = cdiv(a.in.N, BS);
  p.n_block_cols = cdiv(a.in.K, BS);
  p.scores = a.scores;
  const int64_t ctas = cdiv(a.in.N, TILE) * p.n_tile_cols;
  if (ctas == 0 || a.in.M == 0) return LaunchStatus{};  // the caller fills the empty cases
  if (ctas > INT32_MAX) return LaunchStatus{cudaErrorInvalidConfiguration};
  return launch_weight_grad<T, TILE, BS, true>(p, dim3(static_cast<unsigned>(ctas)), stream);
}

// X: a plain matrix, or (convolution) the image's implicit im2col.
template <typename T, int BS>
LaunchStatus sddmm(const SddmmArgs& a, cudaStream_t stream) {
  if (a.in.conv != nullptr) return sddmm<T, BS>(a, im2col_rows<T>(a.in.x, *a.in.conv), stream);
  return sddmm<T, BS>(a, dense_rows<T>(a.in.x, a.in.ld_x, a.in.K), stream);
}

template <typename T, int BS>
LaunchStatus scores(const BlockScoresArgs& a, cudaStream_t stream) {
  if (a.in.conv != nullptr) return scores<T, BS>(a, im2col_rows<T>(a.in.x, *a.in.conv), stream);
  return scores<T, BS>(a, dense_rows<T>(a.in.x, a.in.ld_x, a.in.K), stream);
}

}  // namespace

SddmmPlan sddmm_plan(int64_t M, int64_t nnz, int sm_count) {
  constexpr int64_t kMinRows = 256;  // a chunk long enough for the pipeline to reach its steady state
  constexpr int64_t kGranule = 128;
  const int64_t wanted = cdiv(4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1), nnz > 0 ? nnz : 1);
  int64_t splits = wanted < M / kMinRows ? wanted : M / kMinRows;
  splits = splits < 1 ? 1 : (splits > 65535 ? 65535 : splits);
  const int64_t chunk = cdiv(cdiv(M, splits), kGranule) * kGranule;
  return {cdiv(M, chunk), chunk};
}

LaunchStatus sum_sddmm_partials(const SddmmArgs& a, cudaStream_t stream) {
  const int64_t total = a.nnz * a.in.block_size * a.in.block_size;
  const int64_t blocks = cdiv(total, 256) < 65536 ? cdiv(total, 256) : 65536;
  const auto launch = [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_kernel(sum_partials_kernel<T>, dim3(static_cast<unsigned>(blocks)), 256, 0, stream, a.partial,
                         a.splits, total, static_cast<T*>(a.out));
  };
  switch (a.in.type) {
    case ElementType::kFloat32: return launch(TypeTag<float>{});
    case ElementType::kFloat16: return launch(TypeTag<__half>{});
    case ElementType::kBFloat16: return launch(TypeTag<__nv_bfloat16>{});
    default: return LaunchStatus{cudaErrorInvalidValue};
  }
}

LaunchStatus bsr_sddmm(const SddmmArgs& args, cudaStream_t stream) {
  return dispatch_kernel(args.in.type, args.in.block_size, [&](auto type, auto block_size) {
    return sddmm<typename decltype(type)::type, decltype(block_size)::value>(args, stream);
  });
}

LaunchStatus block_grad_scores(const BlockScoresArgs& args, cudaStream_t stream) {
  return dispatch_kernel(args.in.type, args.in.block_size, [&](auto type, auto block_size) {
    return scores<typename decltype(type)::type, decltype(block_size)::value>(args, stream);
  });
}

}  // namespace cuda
}  // namespace sparsekern
