// Tile configurations of the kernels that walk the lines of W (bsr_gemm_linear.cu: forward and input gradient of
// the linear layer and the forward convolution; bsr_conv_dgrad.cu: the convolution's input gradient). A CTA computes
// an output tile [BM rows, bs columns] from the blocks of its line(s), one K-slice of one block per pipeline step.
#pragma once

#include "bsr_gemm_tiles.cuh"

namespace sparsekern {
namespace cuda {
namespace tiles {

// Tile shapes per element type and block size. Shared memory stays under 99 KB so that every sm_80+ part
// (A100 163 KB, H100 227 KB, consumer 99 KB per block) can run every configuration.
template <typename T, int BS, bool TRANS, bool MMA = Elem<T>::kTensorCores>
struct GemmConfig;

// fp16 / bf16: warps of 64 or 32 rows x 16..32 columns of mma.m16n8k16.
template <typename T, int BS, bool TRANS>
struct GemmConfig<T, BS, TRANS, true> {
  static constexpr int BM = 128;
  static constexpr int KS = BS == 128 ? 32 : BS;
  static constexpr int STAGES = BS == 64 ? 3 : 4;
  static constexpr int WARPS_R = BS >= 64 ? 2 : 4;
  static constexpr int WARPS_C = BS == 128 ? 4 : (BS == 64 ? 2 : 1);
  using Math = MmaMath<T, BM, BS, KS, 1, WARPS_R, WARPS_C, false, TRANS>;
};

// fp32: 8 x (2..8) outputs per thread, FFMA.
template <int BS, bool TRANS>
struct GemmConfig<float, BS, TRANS, false> {
  static constexpr int BM = 128;
  static constexpr int KS = BS <= 32 ? BS : 16;
  static constexpr int STAGES = BS <= 32 ? 3 : 4;
  using Math = FmaMath<BM, BS, KS, 1, 16, BS == 128 ? 16 : 8, false, TRANS>;
};

// Shared-memory layout derived from a config: per stage A [BM][LDA] then B ([BS][LDB] forward, [KS][LDB]
// transposed); after the pipeline, the fp32 tile [groups][BM][LDT] over the same memory.
template <typename T, int BS, bool TRANS>
struct GemmLayout : GemmConfig<T, BS, TRANS> {
  using Cfg = GemmConfig<T, BS, TRANS>;
  static constexpr int kThreads = Cfg::Math::kThreads;
  static constexpr int kSlices = BS / Cfg::KS;
  static constexpr int LDA = Cfg::KS + kPad<T>;
  static constexpr int B_ROWS = TRANS ? Cfg::KS : BS;
  static constexpr int B_COLS = TRANS ? BS : Cfg::KS;
  static constexpr int LDB = B_COLS + kPad<T>;
  static constexpr int LDT = kTileStride<BS>;
  static constexpr int kABytes = Cfg::BM * LDA * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = kABytes + B_ROWS * LDB * static_cast<int>(sizeof(T));
  static constexpr int kSmemBytes =
      imax(Cfg::STAGES * kStageBytes, Cfg::Math::kGroups * Cfg::BM * LDT * static_cast<int>(sizeof(float)));
  static_assert(kSmemBytes <= 99 * 1024, "over the shared memory of consumer sm_80+ parts");
  static_assert(BS % Cfg::KS == 0, "slices must cover the block");
  // fp32 with 128-wide blocks: FmaMath's two sets of 64 accumulators take ~200 registers, more than the 128 that
  // two CTAs of 256 threads leave (ptxas spilled): one CTA per SM.
  static constexpr int kMinBlocks = sizeof(T) == 4 && BS == 128 ? 1 : ctas_per_sm(kSmemBytes);
};

}  // namespace tiles
}  // namespace cuda
}  // namespace sparsekern
