// native_masked_sgd_ on CUDA: argument checks and dispatch registration around the kernels in masked_sgd.cu.
// Runs on the current stream with no host synchronisation: found_inf, inv_loss_scale and the step counter are
// read by the kernel.
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/masked_sgd.cuh"

namespace sparsekern {
namespace {

using at::Tensor;

cuda::ElementType element_type(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::ElementType::kFloat32;
    case at::kDouble: return cuda::ElementType::kFloat64;
    case at::kBFloat16: return cuda::ElementType::kBFloat16;
    case at::kHalf: return cuda::ElementType::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_one_element(const Tensor& t, const char* name, const Tensor& param) {
  TORCH_CHECK(t.numel() == 1, name, " must hold one element, got shape ", t.sizes());
  TORCH_CHECK(t.device() == param.device(), name, " must be on the same device as param (", param.device(),
              "), got ", t.device());
}

void masked_sgd_cuda(Tensor& param, const Tensor& grad, const c10::optional<Tensor>& momentum_buffer,
                     const c10::optional<Tensor>& master, Tensor& step, const c10::optional<Tensor>& grad_scale,
                     const c10::optional<Tensor>& inv_loss_scale, const c10::optional<Tensor>& found_inf, double lr,
                     double momentum, double dampening, double weight_decay, bool nesterov,
                     bool decoupled_weight_decay) {
  TORCH_CHECK(param.is_cuda(), "param must be a CUDA tensor, got ", param.device());
  TORCH_CHECK(grad.sizes() == param.sizes(), "grad must have the shape of param ", param.sizes(), ", got ",
              grad.sizes());
  SK_CHECK_SAME_DEVICE(grad, param);
  const c10::cuda::CUDAGuard device_guard(param.device());

  const bool has_master = master.has_value();
  const Tensor weights = has_master ? *master : param;
  const auto wtype = weights.scalar_type();
  TORCH_CHECK(wtype == at::kFloat || wtype == at::kDouble, has_master ? "master" : "param",
              " (the weights updated) must be float32 or float64, got ", wtype,
              "; bf16/fp16 params need an fp32 master");
  if (has_master) {
    TORCH_CHECK(master->sizes() == param.sizes(), "master must have the shape of param ", param.sizes(), ", got ",
                master->sizes());
    SK_CHECK_SAME_DEVICE((*master), param);
  }
  TORCH_CHECK(grad.scalar_type() == param.scalar_type() || grad.scalar_type() == wtype,
              "grad must have the dtype of param (", param.scalar_type(), ") or of the weights (", wtype, "), got ",
              grad.scalar_type());
  const bool use_momentum = momentum != 0;
  if (use_momentum) {
    TORCH_CHECK(momentum_buffer.has_value(), "momentum_buffer is required when momentum != 0");
    TORCH_CHECK(momentum_buffer->sizes() == param.sizes() && momentum_buffer->scalar_type() == wtype,
                "momentum_buffer must have shape ", param.sizes(), " and dtype ", wtype, ", got ",
                momentum_buffer->sizes(), " and ", momentum_buffer->scalar_type());
    SK_CHECK_SAME_DEVICE((*momentum_buffer), param);
  }
  SK_CHECK_DTYPE(step, at::kLong, "int64");
  check_one_element(step, "step", param);
  TORCH_CHECK(step.is_contiguous(), "step must be contiguous");

  // The small operands are cast to what the kernel reads (asynchronously; no-ops when they already match).
  const int64_t n_slices = param.dim() > 0 ? param.size(0) : 1;
  Tensor scale, inv, inf;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->dim() <= 1 && grad_scale->numel() == n_slices, "grad_scale must have one factor per ",
                "leading index of param (", n_slices, "), got shape ", grad_scale->sizes());
    SK_CHECK_SAME_DEVICE((*grad_scale), param);
    scale = grad_scale->to(wtype).contiguous();
  }
  if (inv_loss_scale.has_value()) {
    check_one_element(*inv_loss_scale, "inv_loss_scale", param);
    inv = inv_loss_scale->to(wtype).contiguous();
  }
  if (found_inf.has_value()) {
    check_one_element(*found_inf, "found_inf", param);
    inf = found_inf->to(at::kFloat).contiguous();
  }

  // The kernel walks flat memory: strided operands go through contiguous copies (a slow path that nothing in
  // sparsekern takes: values, masters, buffers and autograd's gradients are contiguous).
  Tensor param_c = param.contiguous();
  const Tensor grad_c = grad.contiguous();
  Tensor weights_c = has_master ? weights.contiguous() : param_c;
  Tensor buffer_c = use_momentum ? momentum_buffer->contiguous() : Tensor();

  cuda::MaskedSgdArgs args;
  args.weights = weights_c.data_ptr();
  args.param = param_c.data_ptr();
  args.grad = grad_c.data_ptr();
  args.momentum_buffer = use_momentum ? buffer_c.data_ptr() : nullptr;
  args.grad_scale = scale.defined() ? scale.data_ptr() : nullptr;
  args.inv_loss_scale = inv.defined() ? inv.data_ptr() : nullptr;
  args.found_inf = inf.defined() ? inf.data_ptr<float>() : nullptr;
  args.step = step.data_ptr<int64_t>();
  args.numel = param.numel();
  args.slice = n_slices > 0 ? param.numel() / n_slices : 1;
  if (args.slice < 1) args.slice = 1;
  args.lr = lr;
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.nesterov = nesterov;
  args.decoupled_weight_decay = decoupled_weight_decay;
  args.has_master = has_master;
  args.weights_type = element_type(weights, "weights");
  args.param_type = element_type(param, "param");
  args.grad_type = element_type(grad, "grad");
  const cudaError_t err = cuda::masked_sgd(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err != cudaErrorInvalidValue, "native_masked_sgd_ on CUDA supports fp32 weights with fp32/bf16/fp16 ",
              "param (grad of the param's dtype or fp32) and fp64 weights with fp64 param and grad; got weights ",
              wtype, ", param ", param.scalar_type(), ", grad ", grad.scalar_type());
  C10_CUDA_CHECK(err);

  if (!param_c.is_same(param)) param.copy_(param_c);
  if (has_master && !weights_c.is_same(*master)) master->copy_(weights_c);
  if (use_momentum && !buffer_c.is_same(*momentum_buffer)) momentum_buffer->copy_(buffer_c);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("native_masked_sgd_", &sparsekern::masked_sgd_cuda);
}
