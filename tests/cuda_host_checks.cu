// Host-side checks of the integer helpers the CUDA kernels use (compiled and run by tests/test_cuda_static.py; no
// GPU needed): FastDivmod against plain division for every divisor up to 4096 and random ones, at the ends of its
// range [0, 2^31) and at random points. Prints "ok <count>" and exits 0, else the first failure and exits 1.
#include <cstdint>
#include <cstdio>
#include <random>

#include "cuda/bsr_gemm_tiles.cuh"

int main() {
  using sparsekern::cuda::tiles::FastDivmod;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> any(0, INT32_MAX);
  long checked = 0;
  for (int i = 0; i < 8192; ++i) {
    const int d = i < 4096 ? i + 1 : any(rng) % (INT32_MAX - 1) + 1;
    const FastDivmod fast(d);
    const int ends[] = {0, 1, d - 1, d, d + 1 > 0 ? d + 1 : 0, INT32_MAX - 1, INT32_MAX};
    for (int k = 0; k < 64; ++k) {
      const int n = k < 7 ? ends[k] : any(rng);
      int rem = -1;
      const int q = fast.divmod(n, rem);
      if (q != n / d || rem != n % d) {
        std::printf("FastDivmod(%d): %d -> %d rem %d, expected %d rem %d\n", d, n, q, rem, n / d, n % d);
        return 1;
      }
      ++checked;
    }
  }
  std::printf("ok %ld\n", checked);
  return 0;
}
