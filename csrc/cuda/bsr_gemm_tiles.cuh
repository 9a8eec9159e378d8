// Device building blocks of the block-sparse GEMM kernels (bsr_gemm_linear.cu, bsr_gemm_wgrad.cu): element
// traits, cp.async / ldmatrix / mma.sync wrappers, the tile loader, the multi-stage shared-memory pipeline, and
// the two kinds of tile math (tensor cores for 16-bit types, FFMA for fp32). CUDA headers only (no torch), and
// only sm_80+ instructions: include it only from device code compiled for sm_80 or newer.
//
// Conventions shared by every kernel. A CTA computes an fp32 tile C[ROWS][COLS] = Σ_red A[row][red] B[col][red]
// where, per pipeline stage, a slice of the reduction of both operands sits in shared memory:
//   A stored [row][red] (A_TRANS = false) or [red][row] (A_TRANS = true),
//   B stored [col][red] (B_TRANS = false) or [red][col] (B_TRANS = true),
// each shared-memory row padded by 16 bytes, which makes every ldmatrix, cp.async and FFMA operand read free of
// bank conflicts (row strides of 48, 80, 144 or 272 bytes put 8 consecutive rows on 8 distinct 16-byte bank
// groups). After the last stage the tile math writes its accumulators to an fp32 tile in shared memory (row
// stride COLS + 8 floats: 8-byte stores of 4 consecutive rows hit distinct banks), and the kernel's epilogue
// reads that tile with consecutive threads on consecutive columns (coalesced global stores).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "bsr_gemm.cuh"
#include "element_type.cuh"

namespace sparsekern {
namespace cuda {
namespace tiles {

constexpr int kWarp = 32;
constexpr int kVecBytes = 16;  // one cp.async: 16 bytes

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }

// Division of non-negative int32 values by a divisor fixed at launch, as a multiply-high and a shift
// (Granlund-Montgomery): the im2col address of every 16-byte chunk takes four divisions by image sizes, which a
// hardware-less integer division would make cost more than the chunk's MMAs.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 1, shift = 0;

  FastDivmod() = default;
  // d >= 1. shift = ceil(log2 d), multiplier = floor(2^32 (2^shift - d) / d) + 1.
  __host__ explicit FastDivmod(int d) : divisor(static_cast<uint32_t>(d)) {
    while ((1ull << shift) < divisor) ++shift;
    multiplier = static_cast<uint32_t>(((1ull << 32) * ((1ull << shift) - divisor)) / divisor + 1);
  }

  // n in [0, 2^31): the sum below stays under 2^32. (Host too, for tests/cuda_host_checks.cu.)
  __host__ __device__ __forceinline__ int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(multiplier, u);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(multiplier) * u) >> 32);
#endif
    return static_cast<int>((high + u) >> shift);
  }
  // quotient, and n - quotient * divisor in `rem`
  __host__ __device__ __forceinline__ int divmod(int n, int& rem) const {
    const int q = div(n);
    rem = n - q * static_cast<int>(divisor);
    return q;
  }
};

// How many of `size` rows/columns starting at `start` lie below `limit`, as an int in [0, size].
__device__ __forceinline__ int clamp_count(int64_t limit, int64_t start, int size) {
  const int64_t n = limit - start;
  return n <= 0 ? 0 : (n >= size ? size : static_cast<int>(n));
}

// ---------------------------------------------------------------------------------------------
// Element types (no implicit conversions: torch compiles with __CUDA_NO_HALF_CONVERSIONS__ and friends)

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr bool kTensorCores = false;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};

template <>
struct Elem<__half> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

__host__ inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0; }

// Shared-memory row padding in elements (16 bytes).
template <typename T>
constexpr int kPad = kVecBytes / sizeof(T);

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; the bytes past `src_bytes` (0..16) are written as zeros and not read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d (16x8 fp32) += a (16x16) b (16x8), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// Tile copies into shared memory [ROWS][LDS]: the CTA's threads split a tile into 16-byte chunks (consecutive
// threads on consecutive chunks of a row: coalesced reads), or into elements on the element-by-element paths.

// f(row, col) for each of this thread's chunks of a [ROWS][COLS] tile; col is the chunk's first element.
template <typename T, int ROWS, int COLS, int THREADS, class F>
__device__ __forceinline__ void for_each_chunk(int tid, F&& f) {
  constexpr int kVec = kVecBytes / sizeof(T);
  static_assert(COLS % kVec == 0, "tile rows must be whole 16-byte chunks");
  constexpr int kChunksPerRow = COLS / kVec;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += THREADS) {
    const int c = c0 + tid;
    if (kChunks % THREADS == 0 || c < kChunks) f(c / kChunksPerRow, (c % kChunksPerRow) * kVec);
  }
}

// f(row, col) for each of this thread's elements of a [ROWS][COLS] tile.
template <int ROWS, int COLS, int THREADS, class F>
__device__ __forceinline__ void for_each_element(int tid, F&& f) {
  for (int e = tid; e < ROWS * COLS; e += THREADS) f(e / COLS, e % COLS);
}

__device__ __forceinline__ void zero_chunk(void* dst) { *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u); }

// Tile loader: global [ROWS][COLS] (row stride ld elements) -> shared [ROWS][LDS]. Entries at row >= rows or
// col >= cols are written as zero and never read, so tiles may hang over the edge of a matrix (or of a block's
// valid region). `vec`: the 16-byte path with cp.async, valid when src and ld keep every 16-byte chunk of a row
// aligned (the caller checks); otherwise a synchronous element-by-element copy. Plain shared-memory stores (the
// zero chunks, the element path) are ordered by the pipeline's __syncthreads like the asynchronous copies.
template <typename T, int ROWS, int COLS, int LDS, int THREADS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int rows, int cols, bool vec, int tid) {
  constexpr int kVec = kVecBytes / sizeof(T);
  static_assert(LDS % kVec == 0, "shared rows must be whole 16-byte chunks");
  if (vec) {
    for_each_chunk<T, ROWS, COLS, THREADS>(tid, [&](int row, int col) {
      const int valid = row < rows ? (cols - col >= kVec ? kVec : (cols > col ? cols - col : 0)) : 0;
      if (valid > 0) {
        cp_async_16(dst + row * LDS + col, src + row * ld + col, valid * static_cast<int>(sizeof(T)));
      } else {  // outside the matrix: no address is formed from it at all
        zero_chunk(dst + row * LDS + col);
      }
    });
  } else {
    const T zero = Elem<T>::from_float(0.0f);
    for_each_element<ROWS, COLS, THREADS>(tid, [&](int row, int col) {
      dst[row * LDS + col] = (row < rows && col < cols) ? src[row * ld + col] : zero;
    });
  }
}

// The dense operand of a GEMM as a plain matrix. A kernel takes the view from its first row once (rows_from) and
// loads tiles at column k0 of it. The implicit-GEMM convolutions swap in an im2col gather with the same two calls
// (im2col.cuh), so one kernel serves both.
template <typename T>
struct DenseRows {
  const T* data;
  int64_t ld;
  bool vec;  // 16-byte copies: data 16-byte aligned, ld and the width whole 16-byte chunks

  __device__ __forceinline__ DenseRows rows_from(int64_t m0) const { return {data + m0 * ld, ld, vec}; }

  // dst [ROWS][LDS] = the view's first ROWS rows at columns k0..; `rows` and `cols` count the valid ones.
  template <int ROWS, int COLS, int LDS, int THREADS>
  __device__ __forceinline__ void load(T* dst, int64_t k0, int rows, int cols, int tid) const {
    load_tile<T, ROWS, COLS, LDS, THREADS>(dst, data + k0, ld, rows, cols, vec, tid);
  }
};

// A [rows, width] matrix with row stride ld. 16-byte copies need aligned rows and a width of whole chunks, so that
// a chunk is either entirely inside the matrix or entirely outside.
template <typename T>
DenseRows<T> dense_rows(const void* data, int64_t ld, int64_t width) {
  constexpr int kVec = kVecBytes / sizeof(T);
  return {static_cast<const T*>(data), ld, aligned16(data) && ld % kVec == 0 && width % kVec == 0};
}

// ---------------------------------------------------------------------------------------------
// Multi-stage pipeline over `n_steps` reduction steps: a ring of STAGES shared-memory stages, STAGES - 1 steps'
// copies in flight while one is computed. load(step, stage) issues the copies of a step (every thread, then one
// commit per thread per step, empty groups included, so that the group count is the same in every thread);
// compute(stage) reads a stage. On return every copy has landed and every warp is done with the stages, so the
// caller may reuse the shared memory.
template <int STAGES, class Load, class Compute>
__device__ __forceinline__ void run_pipeline(int n_steps, Load&& load, Compute&& compute) {
  static_assert(STAGES >= 2, "a pipeline needs at least two stages");
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_steps) load(s, s);
    cp_async_commit();
  }
  int stage = 0;           // stage holding step t
  int refill = STAGES - 1;  // stage for step t + STAGES - 1: the one computed at step t - 1
  for (int t = 0; t < n_steps; ++t) {
    // Groups committed so far: STAGES - 1 + t; allowing STAGES - 2 in flight means steps 0..t have landed.
    cp_async_wait<STAGES - 2>();
    // Makes step t visible to every thread, and marks every warp done with step t - 1 (the stage refilled next).
    __syncthreads();
    if (t + STAGES - 1 < n_steps) load(t + STAGES - 1, refill);
    cp_async_commit();
    compute(stage);
    stage = stage + 1 == STAGES ? 0 : stage + 1;
    refill = refill + 1 == STAGES ? 0 : refill + 1;
  }
  cp_async_wait<0>();
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Tensor-core tile math (16-bit types): the m16n8k16 fragments of a warp's MT x NT grid of 16x8 tiles, loaded
// with ldmatrix (.trans where the operand is stored reduction-major).
//
// Fragment layout of mma.m16n8k16 (g = lane / 4, t = lane % 4): a0 (row g, red 2t..2t+1), a1 (row g+8),
// a2 (row g, red 2t+8..), a3 (row g+8, red 2t+8..); b0 (red 2t..2t+1, col g), b1 (red 2t+8.., col g);
// c0,c1 (row g, col 2t..2t+1), c2,c3 (row g+8). ldmatrix hands thread `lane` the pair (row lane/4, cols
// 2(lane%4)..+1) of each 8x8 matrix as stored, or (rows 2(lane%4)..+1, col lane/4) with .trans; so a matrix
// stored [row][red] (or [col][red]) is read plainly and one stored [red][row] (or [red][col]) with .trans.
//
// NEAREST: the tensor cores add a product tile to the accumulators with truncation (rounding toward zero; Fasi et
// al., "Numerical behavior of NVIDIA tensor cores", 2021), a bias that builds up over a long reduction: after a few
// hundred rows the fp32 sums sit several ulps nearer zero than an FFMA GEMM's. A 16-bit output hides that, an fp32
// one does not (block_grad_scores, whose norms average the unbiased errors away but keep a bias): there each k16
// tile is computed alone and added to the accumulators with FADD, which rounds to nearest.
template <typename T, int MT, int NT, bool A_TRANS, bool B_TRANS, bool NEAREST>
struct MmaWarpTile {
  static_assert(NT % 2 == 0, "B fragments are loaded two 8-column tiles at a time");
  float acc[MT][NT][4];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  // One k16 step at reduction offset red0 of the stage; the warp's tile starts at (row0, col0).
  __device__ __forceinline__ void step(const T* a_s, int lda, const T* b_s, int ldb, int row0, int col0, int red0,
                                       int lane) {
    uint32_t a[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (A_TRANS) {
        // matrix lane/8: red half (lane >> 4), row half ((lane >> 3) & 1)
        ldmatrix_x4_trans(a[i], a_s + (red0 + (lane & 7) + ((lane >> 4) << 3)) * lda + row0 + i * 16 +
                                    (((lane >> 3) & 1) << 3));
      } else {
        // matrix lane/8: row half ((lane >> 3) & 1), red half (lane >> 4)
        ldmatrix_x4(a[i], a_s + (row0 + i * 16 + (lane & 15)) * lda + red0 + ((lane >> 4) << 3));
      }
    }
    uint32_t b[NT][2];
#pragma unroll
    for (int jp = 0; jp < NT / 2; ++jp) {
      // matrices: (cols 0-7, red 0-7) (cols 0-7, red 8-15) (cols 8-15, red 0-7) (cols 8-15, red 8-15)
      // = b0, b1 of tile 2jp, then b0, b1 of tile 2jp + 1
      uint32_t r[4];
      if (B_TRANS) {
        ldmatrix_x4_trans(r, b_s + (red0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * ldb + col0 + jp * 16 +
                                 ((lane >> 4) << 3));
      } else {
        ldmatrix_x4(r, b_s + (col0 + jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * ldb + red0 +
                           (((lane >> 3) & 1) << 3));
      }
      b[2 * jp][0] = r[0];
      b[2 * jp][1] = r[1];
      b[2 * jp + 1][0] = r[2];
      b[2 * jp + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (NEAREST) {
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // the tile's products alone: 0 + x is exact
          mma_16816<T>(d, a[i], b[j][0], b[j][1]);
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] += d[e];
        } else {
          mma_16816<T>(acc[i][j], a[i], b[j][0], b[j][1]);
        }
      }
  }

  __device__ __forceinline__ void store(float* c, int ldc, int row0, int col0, int lane) const {
    const int g = lane >> 2;
    const int t = lane & 3;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float2 v;
          v.x = acc[i][j][2 * h];
          v.y = acc[i][j][2 * h + 1];
          *reinterpret_cast<float2*>(c + (row0 + i * 16 + g + 8 * h) * ldc + col0 + j * 8 + 2 * t) = v;
        }
  }
};

// The CTA's C[ROWS][COLS] with tensor cores: GROUPS groups of WARPS_R x WARPS_C warps; each group takes every
// GROUPS-th k16 step of a stage (a split of the reduction inside the CTA, for tiles too small to give every warp
// its own part of C) and keeps its own partial C; store() writes group g's partial at c + g * ROWS * ldc.
// NEAREST: see MmaWarpTile.
template <typename T, int ROWS, int COLS, int RED, int GROUPS, int WARPS_R, int WARPS_C, bool A_TRANS, bool B_TRANS,
          bool NEAREST = false>
struct MmaMath {
  static constexpr int kThreads = GROUPS * WARPS_R * WARPS_C * kWarp;
  static constexpr int kGroups = GROUPS;
  static constexpr int kWarpRows = ROWS / WARPS_R;
  static constexpr int kWarpCols = COLS / WARPS_C;
  static constexpr int kSteps = RED / 16;
  static_assert(kWarpRows % 16 == 0 && kWarpCols % 16 == 0 && RED % 16 == 0, "tile does not split into MMAs");
  static_assert(kSteps % GROUPS == 0, "every group takes the same number of k16 steps");

  MmaWarpTile<T, kWarpRows / 16, kWarpCols / 8, A_TRANS, B_TRANS, NEAREST> tile;
  int row0, col0, group, lane;

  __device__ __forceinline__ explicit MmaMath(int tid) {
    const int warp = tid / kWarp;
    const int in_group = warp % (WARPS_R * WARPS_C);
    lane = tid % kWarp;
    group = warp / (WARPS_R * WARPS_C);
    row0 = (in_group / WARPS_C) * kWarpRows;
    col0 = (in_group % WARPS_C) * kWarpCols;
    tile.clear();
  }

  __device__ __forceinline__ void stage(const T* a_s, int lda, const T* b_s, int ldb) {
#pragma unroll
    for (int s = 0; s < kSteps / GROUPS; ++s) tile.step(a_s, lda, b_s, ldb, row0, col0, (s * GROUPS + group) * 16, lane);
  }

  __device__ __forceinline__ void store(float* c, int ldc) const {
    tile.store(c + group * ROWS * ldc, ldc, row0, col0, lane);
  }
};

// FFMA tile math (fp32): GROUPS groups of an RY x RX grid of threads; thread (ty, tx) owns rows ty + i RY and
// columns tx + j RX (i < TM, j < TN). Each warp is 4 rows x 8 columns of the grid, so an operand read is a
// broadcast of 4 consecutive A rows and 8 consecutive B columns: conflict-free in either storage order with the
// padded strides. Group g takes the reduction indices red = g, g + GROUPS, ... of a stage.
//
// A stage's products are summed from zero in registers and then added to the running sums (two levels of
// summation). One chain of FMAs over the whole reduction errs several times more than cuBLAS's blocked or split-K
// order (measured by emulation on the test shapes: 3-4x at 264-576 terms), and the tests' rule allows 2x PyTorch's
// error; two levels of ~16 terms each err as little as cuBLAS. It costs a second set of accumulators.
template <int ROWS, int COLS, int RED, int GROUPS, int RY, int RX, bool A_TRANS, bool B_TRANS>
struct FmaMath {
  static constexpr int kThreads = GROUPS * RY * RX;
  static constexpr int kGroups = GROUPS;
  static constexpr int TM = ROWS / RY;
  static constexpr int TN = COLS / RX;
  static_assert(TM * RY == ROWS && TN * RX == COLS, "thread grid does not cover the tile");
  static_assert(RY % 4 == 0 && RX % 8 == 0, "a warp is 4 x 8 threads of the grid");
  static_assert(RED % GROUPS == 0, "every group takes the same number of reduction indices");

  float acc[TM][TN];
  int ty, tx, group;

  __device__ __forceinline__ explicit FmaMath(int tid) {
    group = tid / (RY * RX);
    const int in_group = tid % (RY * RX);
    const int warp = in_group / kWarp;
    const int lane = in_group % kWarp;
    ty = (warp / (RX / 8)) * 4 + lane / 8;
    tx = (warp % (RX / 8)) * 8 + lane % 8;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void stage(const float* a_s, int lda, const float* b_s, int ldb) {
    float part[TM][TN];
#pragma unroll
    for (int s = 0; s < RED / GROUPS; ++s) {
      const int red = s * GROUPS + group;
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = A_TRANS ? a_s[red * lda + ty + i * RY] : a_s[(ty + i * RY) * lda + red];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = B_TRANS ? b_s[red * ldb + tx + j * RX] : b_s[(tx + j * RX) * ldb + red];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) part[i][j] = s == 0 ? a[i] * b[j] : fmaf(a[i], b[j], part[i][j]);
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] += part[i][j];
  }

  __device__ __forceinline__ void store(float* c, int ldc) const {
    float* mine = c + group * ROWS * ldc;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) mine[(ty + i * RY) * ldc + tx + j * RX] = acc[i][j];
  }
};

// ---------------------------------------------------------------------------------------------
// Launch dispatch (host): from the runtime element type and block size to the kernels' template arguments.

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}, std::integral_constant<int, BS>{}) for T in {float, __half, __nv_bfloat16} and BS in {16, 32,
// 64, 128}; refused with cudaErrorInvalidValue for anything else.
template <class F>
LaunchStatus dispatch_kernel(ElementType type, int block_size, F&& f) {
  const auto with_block_size = [&](auto tag) -> LaunchStatus {
    switch (block_size) {
      case 16: return f(tag, std::integral_constant<int, 16>{});
      case 32: return f(tag, std::integral_constant<int, 32>{});
      case 64: return f(tag, std::integral_constant<int, 64>{});
      case 128: return f(tag, std::integral_constant<int, 128>{});
      default: return LaunchStatus{cudaErrorInvalidValue};
    }
  };
  switch (type) {
    case ElementType::kFloat32: return with_block_size(TypeTag<float>{});
    case ElementType::kFloat16: return with_block_size(TypeTag<__half>{});
    case ElementType::kBFloat16: return with_block_size(TypeTag<__nv_bfloat16>{});
    default: return LaunchStatus{cudaErrorInvalidValue};
  }
}

// kernel<<<grid, threads, smem_bytes, stream>>>(args...), its configuration recorded for the error message. Over
// 48 KB the dynamic shared memory must be allowed first, or the launch fails with cudaErrorInvalidValue; so does a
// grid.y or grid.z over 65535 (grid.x goes to 2^31 - 1), which the callers avoid.
template <class Kernel, class... Args>
LaunchStatus launch_kernel(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                           const Args&... args) {
  LaunchStatus status{cudaSuccess, true, grid, dim3(threads), smem_bytes};
  if (smem_bytes > 48 * 1024) {
    status.error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (status.error != cudaSuccess) return status;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  status.error = cudaGetLastError();
  return status;
}

// CTAs per SM that a kernel's shared memory allows on an A100 (164 KB per SM, 1 KB reserved per CTA): the
// occupancy to give __launch_bounds__, so that ptxas budgets registers for it. Left to itself, ptxas aims for
// more CTAs than the shared memory allows and spills registers to get there.
constexpr int ctas_per_sm(int smem_bytes) { return imax(1, (164 * 1024) / (smem_bytes + 1024)); }

// Row stride (floats) of the fp32 tile that the accumulators are written to.
template <int COLS>
constexpr int kTileStride = COLS + 8;

}  // namespace tiles
}  // namespace cuda
}  // namespace sparsekern
