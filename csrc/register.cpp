// The native module sparsekern._C: op schemas (kernels are registered per device in csrc/cpu and
// csrc/cuda) and the build facts that `python -m sparsekern.info` shows.
#include <string>

#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#ifdef SPARSEKERN_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION: the toolkit the kernels were compiled with
#endif

namespace py = pybind11;

namespace {

// Every op defined here, in the order build_info() lists them.
constexpr const char* kNativeOps[] = {
    "native_build_layout_index_",
};

#ifdef SPARSEKERN_WITH_CUDA
py::list split_arch_list(const std::string& archs) {
  py::list out;
  std::string item;
  for (const char ch : archs + ";") {
    if (ch == ';' || ch == ' ' || ch == ',') {
      if (!item.empty()) out.append(item);
      item.clear();
    } else {
      item += ch;
    }
  }
  return out;
}
#endif

py::dict build_info() {
  py::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef SPARSEKERN_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_archs"] = split_arch_list(SPARSEKERN_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
#endif
  // Asked of the dispatcher rather than assumed, so this reports what actually registered.
  py::dict native_ops;
  for (const char* name : kNativeOps) {
    py::list devices;
    const auto op = c10::Dispatcher::singleton().findSchema({std::string("sparsekern::") + name, ""});
    if (op.has_value()) {
      if (op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) devices.append("cpu");
      if (op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) devices.append("cuda");
    }
    native_ops[name] = devices;
  }
  info["native_ops"] = native_ops;
  return info;
}

}  // namespace

// FRAGMENT: the Python side (sparsekern/ops.py) defines more ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // block_mask [R, C] bool -> block-CSR (row_ptr [R+1], col_idx, coo_row) and block-CSC
  // (col_ptr [C+1], row_idx, perm into CSR order), all int32 and rewritten in place.
  m.def(
      "native_build_layout_index_(Tensor block_mask, Tensor(a!) row_ptr, Tensor(b!) col_idx, Tensor(c!) coo_row, "
      "Tensor(d!) col_ptr, Tensor(e!) row_idx, Tensor(f!) perm) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekern native kernels (ops are registered under torch.ops.sparsekern)";
  m.def("build_info", &build_info,
        "Build facts: torch_version, cuda, cuda_version, cuda_archs, and native_ops (op -> devices with a kernel).");
}
