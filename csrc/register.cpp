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
    "native_bsr_linear",
    "native_bsr_linear_dx",
    "native_bsr_sddmm",
    "native_block_grad_scores",
    "native_bsr_conv2d",
    "native_bsr_conv2d_dgrad",
    "native_bsr_conv2d_wgrad",
    "native_bsr_conv2d_grad_scores",
    "native_masked_sgd_",
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
#ifdef SPARSEKERN_WITH_CUTE
  info["cuda_sm90_gemms"] = true;
#else
  info["cuda_sm90_gemms"] = false;
#endif
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
  info["cuda_sm90_gemms"] = false;
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

  // The training GEMMs, with exactly the arguments of their sparsekern.reference functions. W [N, K] is
  // block-sparse (values [nnz, bs, bs] + the six layout tensors); padding past N or K reads as zero.
#define SK_LAYOUT_ARGS "Tensor row_ptr, Tensor col_idx, Tensor coo_row, Tensor col_ptr, Tensor row_idx, Tensor perm"
  // Y [M, N] = X [M, K] Wᵀ (+ bias)
  m.def("native_bsr_linear(Tensor x, Tensor values, " SK_LAYOUT_ARGS ", int out_features, Tensor? bias) -> Tensor");
  // dX [M, K] = dY [M, N] W, through the block-CSC index (col_ptr, row_idx, perm)
  m.def("native_bsr_linear_dx(Tensor dy, Tensor values, " SK_LAYOUT_ARGS ", int in_features) -> Tensor");
  // [nnz, bs, bs] = dYᵀ X at the layout's blocks (zero in the padding)
  m.def("native_bsr_sddmm(Tensor dy, Tensor x, " SK_LAYOUT_ARGS ", int block_size) -> Tensor");
  // [ceil(N/bs), ceil(K/bs)] Frobenius norms of the blocks of the dense dYᵀX (fp64 for fp64, else fp32)
  m.def("native_block_grad_scores(Tensor dy, Tensor x, int block_size) -> Tensor");

  // Convolution with a block-sparse filter (groups = 1), NHWC images, K ordered (kh, kw, cin); zero padding is
  // given top/left, output_size fixes bottom/right. The CUDA kernels take any cin; the CPU kernels need cin a
  // multiple of the block size, except grad_scores.
  // Y [B, OH, OW, N] = conv(x [B, H, W, C]) (+ bias)
  m.def("native_bsr_conv2d(Tensor x, Tensor values, " SK_LAYOUT_ARGS ", int out_channels, Tensor? bias, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int[2] output_size) -> Tensor");
  // dX [B, H, W, in_channels] from dY [B, OH, OW, N]
  m.def("native_bsr_conv2d_dgrad(Tensor dy, Tensor values, " SK_LAYOUT_ARGS ", int in_channels, int[2] input_size, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // [nnz, bs, bs] filter gradient at the layout's blocks from dY [B, OH, OW, N] and x [B, H, W, C]
  m.def("native_bsr_conv2d_wgrad(Tensor dy, Tensor x, " SK_LAYOUT_ARGS ", int block_size, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // [ceil(N/bs), ceil(kh*kw*C/bs)] Frobenius norms of the blocks of the dense filter gradient
  m.def("native_bsr_conv2d_grad_scores(Tensor dy, Tensor x, int block_size, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation) -> Tensor");
#undef SK_LAYOUT_ARGS

  // One fused SGD step in place, in torch.optim.SGD's order (sparsekern.reference.masked_sgd_): weights =
  // master if given, else param; grad_scale [param.shape[0]] scales each leading slice (block); a non-zero
  // found_inf skips the step; step (0-dim int64) counts the steps taken. No host synchronisation on CUDA.
  m.def(
      "native_masked_sgd_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor(c!)? master, "
      "Tensor(d!) step, Tensor? grad_scale, Tensor? inv_loss_scale, Tensor? found_inf, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool decoupled_weight_decay) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekern native kernels (ops are registered under torch.ops.sparsekern)";
  m.def("build_info", &build_info,
        "Build facts: torch_version, cuda, cuda_version, cuda_archs, cuda_sm90_gemms (the CuTe Hopper GEMMs built), and native_ops (op -> devices with a kernel).");
}
