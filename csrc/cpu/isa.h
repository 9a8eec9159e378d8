// Which SIMD instruction set the CPU kernels run with: the best the CPU has, or SPARSEKERN_CPU_ISA
// (auto|avx512|avx2|scalar) so that tests can exercise every path on one machine.
#pragma once

#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>

namespace sparsekern {
namespace cpu {

enum class Isa { kAvx512, kAvx2, kScalar };

// `with_half_conversions`: the kernel also converts fp16/bf16 in registers (F16C, AVX-512 BW).
inline bool cpu_has(Isa isa, bool with_half_conversions) {
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") &&
             (!with_half_conversions || (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("f16c")));
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             (!with_half_conversions || __builtin_cpu_supports("f16c"));
    case Isa::kScalar:
      return true;
  }
  return false;
}

inline Isa chosen_isa(bool with_half_conversions) {
  const char* env = std::getenv("SPARSEKERN_CPU_ISA");
  const std::string requested = env == nullptr ? "auto" : env;
  if (requested.empty() || requested == "auto") {
    if (cpu_has(Isa::kAvx512, with_half_conversions)) return Isa::kAvx512;
    if (cpu_has(Isa::kAvx2, with_half_conversions)) return Isa::kAvx2;
    return Isa::kScalar;
  }
  Isa isa = Isa::kScalar;
  if (requested == "avx512") {
    isa = Isa::kAvx512;
  } else if (requested == "avx2") {
    isa = Isa::kAvx2;
  } else {
    TORCH_CHECK(requested == "scalar", "SPARSEKERN_CPU_ISA must be auto, avx512, avx2 or scalar, got '", requested,
                "'");
  }
  TORCH_CHECK(cpu_has(isa, with_half_conversions), "SPARSEKERN_CPU_ISA=", requested,
              " but this CPU does not support it");
  return isa;
}

}  // namespace cpu
}  // namespace sparsekern
