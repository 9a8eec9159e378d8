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
#include "masked_sgd_checks.h"
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

void masked_sgd_cuda(Tensor& param, const Tensor& grad, const c10::optional<Tensor>& momentum_buffer,
                     const c10::optional<Tensor>& master, Tensor& step, const c10::optional<Tensor>& grad_scale,
                     const c10::optional<Tensor>& inv_loss_scale, const c10::optional<Tensor>& found_inf, double lr,
                     double momentum, double dampening, double weight_decay, bool nesterov,
                     bool decoupled_weight_decay) {
  TORCH_CHECK(param.is_cuda(), "param must be a CUDA tensor, got ", param.device());
  const auto wtype = check_masked_sgd_args(param, grad, momentum_buffer, master, step, grad_scale, inv_loss_scale,
                                           found_inf, momentum);
  TORCH_CHECK(step.is_contiguous(), "step must be contiguous");
  const c10::cuda::CUDAGuard device_guard(param.device());
  const bool has_master = master.has_value();
  const Tensor weights = has_master ? *master : param;
  const bool use_momentum = momentum != 0;

  // The small operands are cast to what the kernel reads (asynchronously; no-ops when they already match).
  const int64_t n_slices = param.dim() > 0 ? param.size(0) : 1;
  const Tensor scale = grad_scale.has_value() ? grad_scale->to(wtype).contiguous() : Tensor();
  const Tensor inv = inv_loss_scale.has_value() ? inv_loss_scale->to(wtype).contiguous() : Tensor();
  const Tensor inf = found_inf.has_value() ? found_inf->to(at::kFloat).contiguous() : Tensor();

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
