// Argument checks of the fused masked_sgd_ step, shared by its CPU and CUDA glue. Each backend adds its own
// device check and the dtype limits of its kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "checks.h"

namespace sparsekern {

inline void check_one_element(const at::Tensor& t, const char* name, const at::Tensor& param) {
  TORCH_CHECK(t.numel() == 1, name, " must hold one element, got shape ", t.sizes());
  TORCH_CHECK(t.device() == param.device(), name, " must be on the same device as param (", param.device(),
              "), got ", t.device());
}

// Shapes, devices and dtypes of the operands; returns the dtype of the weights updated (master if given, else
// param): float32 or float64.
inline at::ScalarType check_masked_sgd_args(const at::Tensor& param, const at::Tensor& grad,
                                            const c10::optional<at::Tensor>& momentum_buffer,
                                            const c10::optional<at::Tensor>& master, const at::Tensor& step,
                                            const c10::optional<at::Tensor>& grad_scale,
                                            const c10::optional<at::Tensor>& inv_loss_scale,
                                            const c10::optional<at::Tensor>& found_inf, double momentum) {
  TORCH_CHECK(grad.sizes() == param.sizes(), "grad must have the shape of param ", param.sizes(), ", got ",
              grad.sizes());
  SK_CHECK_SAME_DEVICE(grad, param);
  const bool has_master = master.has_value();
  const auto wtype = has_master ? master->scalar_type() : param.scalar_type();
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
  if (momentum != 0) {
    TORCH_CHECK(momentum_buffer.has_value(), "momentum_buffer is required when momentum != 0");
    TORCH_CHECK(momentum_buffer->sizes() == param.sizes() && momentum_buffer->scalar_type() == wtype,
                "momentum_buffer must have shape ", param.sizes(), " and dtype ", wtype, ", got ",
                momentum_buffer->sizes(), " and ", momentum_buffer->scalar_type());
    SK_CHECK_SAME_DEVICE((*momentum_buffer), param);
  }
  SK_CHECK_DTYPE(step, at::kLong, "int64");
  check_one_element(step, "step", param);
  if (grad_scale.has_value()) {
    const int64_t n_slices = param.dim() > 0 ? param.size(0) : 1;
    TORCH_CHECK(grad_scale->dim() <= 1 && grad_scale->numel() == n_slices, "grad_scale must have one factor per ",
                "leading index of param (", n_slices, "), got shape ", grad_scale->sizes());
    SK_CHECK_SAME_DEVICE((*grad_scale), param);
  }
  if (inv_loss_scale.has_value()) check_one_element(*inv_loss_scale, "inv_loss_scale", param);
  if (found_inf.has_value()) check_one_element(*found_inf, "found_inf", param);
  return wtype;
}

}  // namespace sparsekern
