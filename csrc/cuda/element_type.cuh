// The element types that the CUDA launchers take, named without torch (the .cu files never include it).
#pragma once

namespace sparsekern {
namespace cuda {

enum class ElementType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

}  // namespace cuda
}  // namespace sparsekern
