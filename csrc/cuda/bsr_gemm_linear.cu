// The forward and input-gradient GEMMs of a block-sparse W, one kernel for both:
//   bsr_linear     Y [M, N]  = X [M, K] Wᵀ (+ bias), walking the block-rows of W (block-CSR);
//   bsr_linear_dx  dX [M, K] = dY [M, N] W, walking the block-columns of W (block-CSC through perm).
// A CTA owns BM = 128 rows of the dense operand (the MMA's M side) and one line of W (its bs output features,
// the MMA's N side) and walks the line's blocks: each block adds a [BM, bs] x [bs, bs] product, its reduction
// (K = bs) cut into slices of KS. One pipeline step is one slice of one block, so the cp.async ring keeps
// STAGES - 1 slices in flight across the blocks of the line (a single block gives too little K to hide latency).
// The block values are read in their storage order in both directions: W[n][k] is the MMA's B stored
// [col][red] in the forward pass and [red][col] in the input gradient (ldmatrix .trans), never transposed in
// memory. An empty line computes nothing and writes zeros (or the bias).
#include "bsr_gemm.cuh"
#include "bsr_gemm_line_config.cuh"
#include "im2col.cuh"

namespace sparsekern {
namespace cuda {
namespace {

using namespace tiles;

// ASrc: where the dense operand's tiles come from (tiles::DenseRows, or tiles::Im2colRows for the convolution).
template <typename T, class ASrc>
struct GemmParams {
  ASrc a;
  const T* values;
  const T* bias;
  T* out;
  const int32_t* line_ptr;
  const int32_t* line_idx;
  const int32_t* perm;
  int64_t M, a_cols, out_cols, n_lines;
};

template <typename T, int BS, bool TRANS, class ASrc>
__global__ void __launch_bounds__(GemmLayout<T, BS, TRANS>::kThreads, GemmLayout<T, BS, TRANS>::kMinBlocks)
bsr_gemm_kernel(const GemmParams<T, ASrc> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = GemmLayout<T, BS, TRANS>;
  constexpr int BM = L::BM;
  constexpr int KS = L::KS;
  constexpr int kThreads = L::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;

  // Line fastest: consecutive CTAs share the dense operand's M-tile while it is in L2.
  const int64_t line = blockIdx.x % p.n_lines;
  const int64_t m0 = (blockIdx.x / p.n_lines) * static_cast<int64_t>(BM);
  const int first = p.line_ptr[line];
  const int n_blocks = p.line_ptr[line + 1] - first;
  const int64_t out_col0 = line * BS;
  const int rows = clamp_count(p.M, m0, BM);
  const ASrc a_tile = p.a.rows_from(m0);

  typename L::Math math(tid);
  const auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * L::kStageBytes); };
  const auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * L::kStageBytes + L::kABytes); };

  // The index of the block being loaded: block-column (forward) or block-row (transposed) of W, and where its
  // values are. The pipeline loads steps in order, so the next block's index is fetched while the current one
  // is loaded, and its latency hides behind a stage of math instead of stalling the next load.
  int held_block = n_blocks > 0 ? p.line_idx[first] : 0;
  int held_values = TRANS && n_blocks > 0 ? p.perm[first] : first;
  const auto load = [&](int step, int s) {
    const int slice = step % L::kSlices;
    const int64_t block = held_block;
    const int64_t values_at = held_values;
    const int j = first + step / L::kSlices;  // position in the line (CSR or CSC order)
    if (slice == L::kSlices - 1 && j + 1 < first + n_blocks) {
      held_block = p.line_idx[j + 1];
      held_values = TRANS ? p.perm[j + 1] : j + 1;
    }
    const int64_t red0 = block * BS + slice * KS;
    // Reduction entries past the dense operand's width (the padding of the last block) load as zeros on both
    // sides, so whatever the padding of `values` holds never reaches the sums.
    const int red = clamp_count(p.a_cols, red0, KS);
    a_tile.template load<BM, KS, L::LDA, kThreads>(stage_a(s), red0, rows, red, tid);
    const T* w = p.values + values_at * (BS * BS);
    if (TRANS) {
      load_tile<T, KS, BS, L::LDB, kThreads>(stage_b(s), w + slice * KS * BS, BS, red, BS, true, tid);
    } else {
      load_tile<T, BS, KS, L::LDB, kThreads>(stage_b(s), w + slice * KS, BS, BS, red, true, tid);
    }
  };
  run_pipeline<L::STAGES>(n_blocks * L::kSlices, load,
                          [&](int s) { math.stage(stage_a(s), L::LDA, stage_b(s), L::LDB); });

  float* c = reinterpret_cast<float*>(smem);
  math.store(c, L::LDT);
  __syncthreads();
  const int cols = clamp_count(p.out_cols, out_col0, BS);
  T* out = p.out + m0 * p.out_cols + out_col0;
  for (int e = tid; e < BM * BS; e += kThreads) {
    const int row = e / BS;
    const int col = e % BS;
    if (row < rows && col < cols) {
      float v = c[row * L::LDT + col];
#pragma unroll
      for (int g = 1; g < L::Math::kGroups; ++g) v += c[(g * BM + row) * L::LDT + col];
      if (p.bias != nullptr) v += Elem<T>::to_float(p.bias[out_col0 + col]);  // before the one rounding
      out[row * p.out_cols + col] = Elem<T>::from_float(v);
    }
  }
#endif
}

template <typename T, int BS, bool TRANS, class ASrc>
LaunchStatus launch(const BsrGemmArgs& a, const ASrc& source, cudaStream_t stream) {
  using L = GemmLayout<T, BS, TRANS>;
  GemmParams<T, ASrc> p;
  p.a = source;
  p.values = static_cast<const T*>(a.values);
  p.bias = static_cast<const T*>(a.bias);
  p.out = static_cast<T*>(a.out);
  p.line_ptr = a.line_ptr;
  p.line_idx = a.line_idx;
  p.perm = a.perm;
  p.M = a.M;
  p.a_cols = a.a_cols;
  p.out_cols = a.out_cols;
  p.n_lines = a.n_lines;

  // One CTA per (M-tile, line), all in grid.x: M-tiles in y would cap M at 65535 tiles.
  const int64_t ctas = cdiv(a.M, L::BM) * a.n_lines;
  if (ctas == 0) return LaunchStatus{};
  if (ctas > INT32_MAX) return LaunchStatus{cudaErrorInvalidConfiguration};
  return launch_kernel(bsr_gemm_kernel<T, BS, TRANS, ASrc>, dim3(static_cast<unsigned>(ctas)), L::kThreads,
                       L::kSmemBytes, stream, p);
}

// The dense operand: a plain matrix, or (forward convolution) the image's implicit im2col.
template <typename T, int BS, bool TRANS>
LaunchStatus launch(const BsrGemmArgs& a, cudaStream_t stream) {
  if (a.conv != nullptr) {
    if (TRANS) return LaunchStatus{cudaErrorInvalidValue};  // the convolution's input gradient is bsr_conv2d_dgrad
    return launch<T, BS, false>(a, im2col_rows<T>(a.a, *a.conv), stream);
  }
  return launch<T, BS, TRANS>(a, dense_rows<T>(a.a, a.lda, a.a_cols), stream);
}

}  // namespace

// perm may be null even when transposed: a layout without blocks has an empty (address-less) perm, and its lines
// are all empty, so nothing reads it.
LaunchStatus bsr_gemm(const BsrGemmArgs& args, cudaStream_t stream) {
  return dispatch_kernel(args.type, args.block_size, [&](auto type, auto block_size) {
    using T = typename decltype(type)::type;
    constexpr int BS = decltype(block_size)::value;
    return args.transposed ? launch<T, BS, true>(args, stream) : launch<T, BS, false>(args, stream);
  });
}

}  // namespace cuda
}  // namespace sparsekern
