// The block-sparse GEMM kernels for AVX-512 (16 fp32 lanes, 32 vector registers). Used only where
// the CPU reports avx512f (checked at run time by the glue); the rest of the build stays baseline x86-64.
#include <cstdint>
#include <type_traits>
#include <utility>

#include <immintrin.h>

#include "bsr_gemm.h"

// Everything below (and only that) may use AVX-512: all standard headers are already included.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")

namespace sparsekern {
namespace cpu {
namespace {

struct Avx512 {
  using T = float;
  using reg = __m512;
  static constexpr int W = 16;
  static constexpr int kMaxVectors = 4;
  static constexpr int kAccumulators = 24;  // 32 registers: 24 accumulators, the B strip, a broadcast
  static constexpr int kMaxRows = 12;

  static __mmask16 lanes(int n) { return n >= W ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, reg v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static void stream_fence() { _mm_sfence(); }
  static void store_partial(float* p, reg v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }

  // dst[j][i] = src[i][j] for a 16 x 16 tile: interleave pairs of rows at 1, 2, 4 and 8 lanes apart.
  static constexpr int kTransposeTile = 16;
  static void transpose_tile(const float* src, int64_t lds, float* dst, int64_t ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      for (int j = 0; j < 2; ++j) {
        r[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2])));
        r[i + j + 2] =
            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2])));
      }
    }
    // Now r[4a + b] holds, in each 128-bit lane L, column 4L + kColumn[b] of rows 4a..4a+3; combine the
    // four row groups lane by lane.
    constexpr int kColumn[4] = {0, 2, 1, 3};
    for (int b = 0; b < 4; ++b) {
      const __m512 x0 = _mm512_shuffle_f32x4(r[b], r[4 + b], 0x88);       // lanes 0,2 of each
      const __m512 x1 = _mm512_shuffle_f32x4(r[b], r[4 + b], 0xDD);       // lanes 1,3 of each
      const __m512 y0 = _mm512_shuffle_f32x4(r[8 + b], r[12 + b], 0x88);
      const __m512 y1 = _mm512_shuffle_f32x4(r[8 + b], r[12 + b], 0xDD);
      t[b] = _mm512_shuffle_f32x4(x0, y0, 0x88);       // lane 0 of every row group
      t[8 + b] = _mm512_shuffle_f32x4(x0, y0, 0xDD);   // lane 2
      t[4 + b] = _mm512_shuffle_f32x4(x1, y1, 0x88);   // lane 1
      t[12 + b] = _mm512_shuffle_f32x4(x1, y1, 0xDD);  // lane 3
    }
    for (int L = 0; L < 4; ++L)
      for (int b = 0; b < 4; ++b) _mm512_storeu_ps(dst + (4 * L + kColumn[b]) * ldd, t[4 * L + b]);
  }
};

#include "bsr_gemm_impl.h"

}  // namespace

const KernelTable<float>* kernels_avx512_f32() {
  static const KernelTable<float> table = Entry<Avx512>::table("avx512");
  return &table;
}

}  // namespace cpu
}  // namespace sparsekern

#pragma GCC pop_options
