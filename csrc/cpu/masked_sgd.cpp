// native_masked_sgd_ on the CPU: one fused SGD step, in place, with torch.optim.SGD's arithmetic in
// torch's order (sparsekern.reference.masked_sgd_ is the definition).
//
// One pass over memory: each element of param/master, grad and the momentum buffer is read once from
// memory and written once. The work is cut into tiles of kTile elements; a tile's gradient lives in an
// L1-resident stack array while the steps of the update (scale, weight decay, momentum, update) run over
// it as separate short loops. Each of those loops is branch-free (the hyper-parameter flags are tested once
// per tile, outside them), so the compiler vectorises it for the instruction set of the calling wrapper
// (AVX-512, AVX2 + FMA, or portable; SPARSEKERN_CPU_ISA=avx512|avx2|scalar forces one, as for the GEMMs).
//
// Rounding: torch's CPU `x.add(y, alpha=a)` is a fused multiply-add (vec::fmadd, also in its scalar
// tails), so every such step here is std::fma and every plain product a plain product: on a CPU where
// torch uses FMA (every AVX2/AVX-512 part) the result is bit-identical to the reference. Nothing here is
// written as a*b + c, so floating-point contraction cannot change it. Every element is computed by one
// task in the same way, so the result does not depend on the number of threads.
#include "cpu/isa.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "checks.h"
#include "masked_sgd_checks.h"

namespace sparsekern {
namespace {

using at::Tensor;

// Every helper the ISA wrappers call is always inlined, so that it is compiled (and vectorised) with the
// wrapper's target; nothing compiled for AVX-512 or AVX2 has external linkage.
#define SK_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int64_t kTile = 512;           // elements per tile: 2 KB of fp32 gradient on the stack
constexpr int64_t kGrain = 32 * 1024;    // elements per parallel task at least

// ---------------------------------------------------------------------------------------------
// Element conversions: widen a stored value to the weights' type, round a weight to the param's type.

template <typename W>
SK_ALWAYS_INLINE W widen(W x) {
  return x;
}

template <typename W>
SK_ALWAYS_INLINE W widen(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return static_cast<W>(f);
}

template <typename W>
SK_ALWAYS_INLINE W widen(c10::Half x) {
  return static_cast<W>(static_cast<float>(x));
}

template <typename P, typename W>
SK_ALWAYS_INLINE P narrow(W x) {
  return static_cast<P>(x);
}

// Round to nearest even, as c10::BFloat16(float) does; written branch-free so that it vectorises.
template <>
SK_ALWAYS_INLINE c10::BFloat16 narrow<c10::BFloat16, float>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  rounded = x != x ? 0x7fc0u : rounded;  // NaN stays a quiet NaN
  return c10::BFloat16(static_cast<uint16_t>(rounded), c10::BFloat16::from_bits());
}

// ---------------------------------------------------------------------------------------------
// The step

// Hyper-parameters, already in the weights' type (Python floats are doubles; torch rounds them to the
// tensor's type the same way).
template <typename W>
struct Hyper {
  W inv_loss_scale;  // used only when has_inv_loss_scale
  W momentum;
  W dampening_keep;  // 1 - dampening
  W weight_decay;    // coupled decay (g += wd * w), used only when coupled_decay
  W decay;           // decoupled decay factor 1 - lr * wd, exactly 1 otherwise (w * 1 == w)
  W neg_lr;
  bool has_inv_loss_scale, coupled_decay, use_momentum, first_step, nesterov;
};

template <typename W, typename P, typename G>
struct Operands {
  W* weights;           // master when given, else param
  P* param;             // written only when there is a master
  const G* grad;
  W* buffer;            // momentum buffer, or null without momentum
  const W* grad_scale;  // one factor per leading index, or null
  int64_t slice;        // elements per leading index
  bool has_master;
};

template <typename W, typename P, typename G>
SK_ALWAYS_INLINE void step_tile(const Operands<W, P, G>& op, const Hyper<W>& h, int64_t begin, int64_t n,
                                const W* scale) {
  W g[kTile];
  W* __restrict w = op.weights + begin;
  const G* __restrict grad = op.grad + begin;
  // g = grad * inv_loss_scale * grad_scale, two roundings in the reference's order
  if (h.has_inv_loss_scale) {
    const W inv = h.inv_loss_scale;
    for (int64_t i = 0; i < n; ++i) g[i] = widen<W>(grad[i]) * inv;
  } else {
    for (int64_t i = 0; i < n; ++i) g[i] = widen<W>(grad[i]);
  }
  if (scale != nullptr) {
    const W s = *scale;
    for (int64_t i = 0; i < n; ++i) g[i] = g[i] * s;
  }
  if (h.coupled_decay) {
    const W wd = h.weight_decay;
    for (int64_t i = 0; i < n; ++i) g[i] = std::fma(w[i], wd, g[i]);  // g.add(w, alpha=wd)
  }
  const W* direction = g;
  if (h.use_momentum) {
    W* __restrict buf = op.buffer + begin;
    const W m = h.momentum;
    if (h.first_step) {
      for (int64_t i = 0; i < n; ++i) buf[i] = g[i];
    } else {
      const W keep = h.dampening_keep;
      for (int64_t i = 0; i < n; ++i) buf[i] = std::fma(g[i], keep, buf[i] * m);  // buf*m .add(g, 1-d)
    }
    if (h.nesterov) {
      for (int64_t i = 0; i < n; ++i) g[i] = std::fma(buf[i], m, g[i]);  // g.add(buf, alpha=m)
    } else {
      direction = buf;
    }
  }
  const W decay = h.decay, neg_lr = h.neg_lr;
  for (int64_t i = 0; i < n; ++i) w[i] = std::fma(direction[i], neg_lr, w[i] * decay);  // (w*decay).add(d, -lr)
  if (op.has_master) {
    P* __restrict p = op.param + begin;
    for (int64_t i = 0; i < n; ++i) p[i] = narrow<P>(w[i]);
  }
}

// Elements [begin, end): cut at leading-index boundaries (each has its own grad_scale factor), then in tiles.
template <typename W, typename P, typename G>
SK_ALWAYS_INLINE void step_range(const Operands<W, P, G>& op, const Hyper<W>& h, int64_t begin, int64_t end) {
  while (begin < end) {
    int64_t stop = end;
    const W* scale = nullptr;
    if (op.grad_scale != nullptr) {
      const int64_t index = begin / op.slice;
      stop = std::min(end, (index + 1) * op.slice);
      scale = op.grad_scale + index;
    }
    for (int64_t t = begin; t < stop; t += kTile) step_tile(op, h, t, std::min(kTile, stop - t), scale);
    begin = stop;
  }
}

// A skipped step (found_inf != 0) leaves the weights and the buffer alone; param is still rewritten from the
// master, as the reference does (a no-op whenever the two agree).
template <typename W, typename P, typename G>
SK_ALWAYS_INLINE void refresh_param(const Operands<W, P, G>& op, int64_t begin, int64_t end) {
  const W* __restrict w = op.weights;
  P* __restrict p = op.param;
  for (int64_t i = begin; i < end; ++i) p[i] = narrow<P>(w[i]);
}

// One entry point per instruction set; the templates above are inlined into each and compiled for it.
#define SK_ISA_WRAPPERS(suffix, ...)                                                                     \
  template <typename W, typename P, typename G>                                                          \
  __VA_ARGS__ void step_##suffix(const Operands<W, P, G>& op, const Hyper<W>& h, int64_t b, int64_t e) { \
    step_range(op, h, b, e);                                                                             \
  }                                                                                                      \
  template <typename W, typename P, typename G>                                                          \
  __VA_ARGS__ void refresh_##suffix(const Operands<W, P, G>& op, int64_t b, int64_t e) {                 \
    refresh_param(op, b, e);                                                                             \
  }
SK_ISA_WRAPPERS(avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma,f16c"))))
SK_ISA_WRAPPERS(avx2, __attribute__((target("avx2,fma,f16c"))))
SK_ISA_WRAPPERS(scalar)
#undef SK_ISA_WRAPPERS

// ---------------------------------------------------------------------------------------------
// Instruction set (same rules and variable as the GEMMs in bsr_ops.cpp)

using cpu::Isa;

Isa chosen_isa() { return cpu::chosen_isa(/*with_half_conversions=*/true); }

// ---------------------------------------------------------------------------------------------
// Glue

template <typename W, typename P, typename G>
void run(const Tensor& param, const Tensor& grad, const Tensor& weights, const c10::optional<Tensor>& buffer,
         const Tensor& grad_scale, bool has_master, bool skip, const Hyper<W>& h) {
  Operands<W, P, G> op;
  op.weights = weights.data_ptr<W>();
  op.param = param.data_ptr<P>();
  op.grad = grad.data_ptr<G>();
  op.buffer = h.use_momentum ? buffer->data_ptr<W>() : nullptr;
  op.grad_scale = grad_scale.defined() ? grad_scale.data_ptr<W>() : nullptr;
  op.slice = param.dim() > 0 && param.size(0) > 0 ? param.numel() / param.size(0) : 1;
  op.has_master = has_master;
  const int64_t n = param.numel();
  if (skip && !has_master) return;

  const Isa isa = chosen_isa();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    switch (isa) {
      case Isa::kAvx512:
        skip ? refresh_avx512(op, begin, end) : step_avx512(op, h, begin, end);
        break;
      case Isa::kAvx2:
        skip ? refresh_avx2(op, begin, end) : step_avx2(op, h, begin, end);
        break;
      case Isa::kScalar:
        skip ? refresh_scalar(op, begin, end) : step_scalar(op, h, begin, end);
        break;
    }
  });
}

template <typename W>
Hyper<W> hyper(const c10::optional<Tensor>& inv_loss_scale, double lr, double momentum, double dampening,
               double weight_decay, bool nesterov, bool decoupled_weight_decay, bool first_step) {
  Hyper<W> h;
  h.has_inv_loss_scale = inv_loss_scale.has_value();
  // item<double>() is exact for fp32 and fp64; the cast rounds as the reference's .to(weights.dtype) does.
  h.inv_loss_scale = h.has_inv_loss_scale ? static_cast<W>(inv_loss_scale->item<double>()) : W(1);
  h.momentum = static_cast<W>(momentum);
  h.dampening_keep = static_cast<W>(1.0 - dampening);
  h.weight_decay = static_cast<W>(weight_decay);
  h.coupled_decay = weight_decay != 0 && !decoupled_weight_decay;
  const double lr_wd = lr * weight_decay;  // Python's 1 - lr * weight_decay: two double roundings
  h.decay = decoupled_weight_decay && weight_decay != 0 ? static_cast<W>(1.0 - lr_wd) : W(1);
  h.neg_lr = static_cast<W>(-lr);
  h.use_momentum = momentum != 0;
  h.first_step = first_step;
  h.nesterov = nesterov;
  return h;
}

void masked_sgd_cpu(Tensor& param, const Tensor& grad, const c10::optional<Tensor>& momentum_buffer,
                    const c10::optional<Tensor>& master, Tensor& step, const c10::optional<Tensor>& grad_scale,
                    const c10::optional<Tensor>& inv_loss_scale, const c10::optional<Tensor>& found_inf, double lr,
                    double momentum, double dampening, double weight_decay, bool nesterov,
                    bool decoupled_weight_decay) {
  TORCH_CHECK(param.device().is_cpu(), "param must be a CPU tensor, got ", param.device());
  TORCH_CHECK(param.is_floating_point(), "param must be floating point, got ", param.scalar_type());
  const auto wtype = check_masked_sgd_args(param, grad, momentum_buffer, master, step, grad_scale, inv_loss_scale,
                                           found_inf, momentum);
  const bool has_master = master.has_value();
  const Tensor weights = has_master ? *master : param;
  const auto ptype = param.scalar_type();
  const auto gtype = grad.scalar_type();
  TORCH_CHECK(wtype == at::kFloat || (ptype == at::kDouble && gtype == at::kDouble),
              "float64 weights need float64 param and grad, got ", ptype, " and ", gtype);
  TORCH_CHECK(ptype == at::kFloat || ptype == at::kDouble || ptype == at::kBFloat16 || ptype == at::kHalf,
              "param must be float32, float64, bfloat16 or float16, got ", ptype);
  const bool use_momentum = momentum != 0;
  // [param.shape[0]]: small
  const Tensor scale = grad_scale.has_value() ? grad_scale->to(wtype).contiguous() : Tensor();
  // The reference takes the step only when found_inf == 0.
  const bool skip = found_inf.has_value() && !(found_inf->item<double>() == 0);

  // The kernel walks flat memory: strided operands go through contiguous copies (a slow path that nothing
  // in sparsekern takes: values, masters, buffers and autograd's gradients are contiguous).
  int64_t* step_count = step.data_ptr<int64_t>();
  const bool first_step = *step_count == 0;
  Tensor param_c = param.contiguous();
  const Tensor grad_c = grad.contiguous();
  Tensor weights_c = has_master ? weights.contiguous() : param_c;
  c10::optional<Tensor> buffer_c;
  if (use_momentum) buffer_c = momentum_buffer->contiguous();

  if (wtype == at::kDouble) {
    run<double, double, double>(param_c, grad_c, weights_c, buffer_c, scale, has_master, skip,
                                hyper<double>(inv_loss_scale, lr, momentum, dampening, weight_decay, nesterov,
                                              decoupled_weight_decay, first_step));
  } else {
    const Hyper<float> h = hyper<float>(inv_loss_scale, lr, momentum, dampening, weight_decay, nesterov,
                                        decoupled_weight_decay, first_step);
    const bool grad_is_weights = gtype == at::kFloat;
#define SK_RUN(P)                                                                                     \
  (grad_is_weights ? run<float, P, float>(param_c, grad_c, weights_c, buffer_c, scale, has_master, skip, h) \
                   : run<float, P, P>(param_c, grad_c, weights_c, buffer_c, scale, has_master, skip, h))
    switch (ptype) {
      case at::kFloat: run<float, float, float>(param_c, grad_c, weights_c, buffer_c, scale, has_master, skip, h); break;
      case at::kBFloat16: SK_RUN(c10::BFloat16); break;
      case at::kHalf: SK_RUN(c10::Half); break;
      default: TORCH_CHECK(false, "param must be float32, bfloat16 or float16 with float32 weights, got ", ptype);
    }
#undef SK_RUN
  }

  if (!param_c.is_same(param)) param.copy_(param_c);
  if (has_master && !weights_c.is_same(*master)) master->copy_(weights_c);
  if (use_momentum && !buffer_c->is_same(*momentum_buffer)) momentum_buffer->copy_(*buffer_c);
  if (!skip) *step_count += 1;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("native_masked_sgd_", &sparsekern::masked_sgd_cpu);
}
