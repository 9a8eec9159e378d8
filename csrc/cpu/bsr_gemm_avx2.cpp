// The block-sparse GEMM kernels for AVX2 + FMA (8 fp32 lanes, 16 vector registers). Used only where
// the CPU reports avx2 and fma (checked at run time by the glue).
#include <cstdint>
#include <type_traits>
#include <utility>

#include <immintrin.h>

#include "bsr_gemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace sparsekern {
namespace cpu {
namespace {

struct Avx2 {
  using T = float;
  using reg = __m256;
  static constexpr int W = 8;
  static constexpr int kMaxVectors = 2;
  static constexpr int kAccumulators = 12;  // 16 registers: 12 accumulators, the B strip, a broadcast
  static constexpr int kMaxRows = 6;

  static __m256i lanes(int n) {
    const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), index);  // lane i is on when i < n
  }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load_partial(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, reg v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static void stream_fence() { _mm_sfence(); }
  static void store_partial(float* p, reg v, int n) { _mm256_maskstore_ps(p, lanes(n), v); }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }

  // dst[j][i] = src[i][j] for an 8 x 8 tile.
  static constexpr int kTransposeTile = 8;
  static void transpose_tile(const float* src, int64_t lds, float* dst, int64_t ldd) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      for (int j = 0; j < 2; ++j) {
        r[i + j] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t[i + j]), _mm256_castps_pd(t[i + j + 2])));
        r[i + j + 2] =
            _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t[i + j]), _mm256_castps_pd(t[i + j + 2])));
      }
    }
    // r[4a + b] holds, in 128-bit lane L, column 4L + kColumn[b] of rows 4a..4a+3.
    constexpr int kColumn[4] = {0, 2, 1, 3};
    for (int b = 0; b < 4; ++b) {
      _mm256_storeu_ps(dst + kColumn[b] * ldd, _mm256_permute2f128_ps(r[b], r[4 + b], 0x20));
      _mm256_storeu_ps(dst + (4 + kColumn[b]) * ldd, _mm256_permute2f128_ps(r[b], r[4 + b], 0x31));
    }
  }
};

#include "bsr_gemm_impl.h"

}  // namespace

const KernelTable<float>* kernels_avx2_f32() {
  static const KernelTable<float> table = Entry<Avx2>::table("avx2");
  return &table;
}

}  // namespace cpu
}  // namespace sparsekern

#pragma GCC pop_options
