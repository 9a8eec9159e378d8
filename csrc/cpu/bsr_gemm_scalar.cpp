// The block-sparse GEMM kernels in portable C++: the fp32 fallback for CPUs without AVX2, and the
// fp64 kernels (used for gradcheck, where exactness matters more than speed). The compiler may
// vectorise them for the baseline instruction set.
#include <cstdint>
#include <type_traits>
#include <utility>

#include "bsr_gemm.h"

namespace sparsekern {
namespace cpu {
namespace {

template <typename Element>
struct Scalar {
  using T = Element;
  using reg = Element;
  static constexpr int W = 1;
  static constexpr int kMaxVectors = 8;
  static constexpr int kAccumulators = 32;
  static constexpr int kMaxRows = 4;

  static reg zero() { return T(0); }
  static reg load(const T* p) { return *p; }
  static reg load_partial(const T* p, int n) { return n > 0 ? *p : T(0); }
  static void store(T* p, reg v) { *p = v; }
  static void stream(T* p, reg v) { *p = v; }
  static void stream_fence() {}
  static void store_partial(T* p, reg v, int n) {
    if (n > 0) *p = v;
  }
  static reg set1(T v) { return v; }
  static reg add(reg a, reg b) { return a + b; }
  // Not std::fma: without FMA hardware that is a slow library call.
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }

  static constexpr int kTransposeTile = 8;
  static void transpose_tile(const T* src, int64_t lds, T* dst, int64_t ldd) {
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
};

#include "bsr_gemm_impl.h"

}  // namespace

const KernelTable<float>* kernels_scalar_f32() {
  static const KernelTable<float> table = Entry<Scalar<float>>::table("scalar");
  return &table;
}

const KernelTable<double>* kernels_scalar_f64() {
  static const KernelTable<double> table = Entry<Scalar<double>>::table("scalar");
  return &table;
}

}  // namespace cpu
}  // namespace sparsekern
