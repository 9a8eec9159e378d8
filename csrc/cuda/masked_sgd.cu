// Kernels of native_masked_sgd_: a flat, grid-strided elementwise pass (16-byte vector loads and stores where
// every operand is aligned, one element at a time otherwise), then a one-thread kernel that advances the step
// counter. The counter, found_inf and inv_loss_scale are read on the device, so nothing waits for the host;
// the counter is advanced in its own launch because every thread of the first kernel reads it.
//
// Rounding follows the reference (torch.optim.SGD's order): each `x.add(y, alpha=a)` is one fused
// multiply-add, each product is rounded on its own (__fmul_rn / __dmul_rn cannot be contracted).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "masked_sgd.cuh"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Element types and rounding

template <typename W>
__device__ __forceinline__ W widen(W x) {
  return x;
}
template <typename W>
__device__ __forceinline__ W widen(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename W>
__device__ __forceinline__ W widen(__half x) {
  return __half2float(x);
}

template <typename P>
__device__ __forceinline__ P narrow(float x);
template <>
__device__ __forceinline__ float narrow<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half narrow<__half>(float x) {
  return __float2half_rn(x);
}
template <typename P>
__device__ __forceinline__ P narrow(double x) {
  return x;
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// N elements moved as one aligned access (16 bytes for the weights, 16 or 8 for 16-bit param and grad).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ---------------------------------------------------------------------------------------------
// The step

template <typename W>
struct Hyper {
  W momentum;
  W dampening_keep;  // 1 - dampening
  W weight_decay;    // coupled: g += wd * w
  W decay;           // decoupled factor 1 - lr * wd (1 when not decoupled: w * 1 == w)
  W neg_lr;
  bool coupled_decay, use_momentum, nesterov, has_master;
};

template <typename W, typename P, typename G>
struct Operands {
  W* __restrict__ weights;
  P* __restrict__ param;
  const G* __restrict__ grad;
  W* __restrict__ buffer;
  const W* __restrict__ grad_scale;
  const W* inv_loss_scale;
  const float* found_inf;
  const int64_t* step;
  int64_t numel, slice;
};

// One element: g (already scaled), w and buf in registers; returns the new weight, updates buf.
template <typename W>
__device__ __forceinline__ W update(const Hyper<W>& h, bool first_step, W w, W g, W& buf) {
  if (h.coupled_decay) g = fma_rn(w, h.weight_decay, g);
  if (h.use_momentum) {
    buf = first_step ? g : fma_rn(g, h.dampening_keep, mul_rn(buf, h.momentum));
    g = h.nesterov ? fma_rn(buf, h.momentum, g) : buf;
  }
  return fma_rn(g, h.neg_lr, mul_rn(w, h.decay));
}

// VEC elements per access; VEC > 1 only when every operand is aligned to its pack and, with grad_scale, the
// slice is a multiple of VEC (a pack never straddles two factors).
template <typename W, typename P, typename G, int VEC>
__global__ void __launch_bounds__(kThreads)
masked_sgd_kernel(Operands<W, P, G> op, Hyper<W> h) {
  const bool skip = op.found_inf != nullptr && *op.found_inf != 0.0f;  // NaN skips too, as in the reference
  if (skip && !h.has_master) return;
  const bool first_step = *op.step == 0;
  const bool has_inv = op.inv_loss_scale != nullptr;
  const W inv = has_inv ? *op.inv_loss_scale : W(1);

  const int64_t n_packs = op.numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t k = first; k < n_packs; k += stride) {
    const int64_t i0 = k * VEC;
    Pack<W, VEC> w = reinterpret_cast<const Pack<W, VEC>*>(op.weights)[k];
    if (skip) {  // weights and buffer stay; param is rewritten from the master as the reference does
      Pack<P, VEC> p;
#pragma unroll
      for (int j = 0; j < VEC; ++j) p.v[j] = narrow<P>(w.v[j]);
      reinterpret_cast<Pack<P, VEC>*>(op.param)[k] = p;
      continue;
    }
    const Pack<G, VEC> g = reinterpret_cast<const Pack<G, VEC>*>(op.grad)[k];
    Pack<W, VEC> buf;
    if (h.use_momentum && !first_step) buf = reinterpret_cast<const Pack<W, VEC>*>(op.buffer)[k];
    const W scale = op.grad_scale != nullptr ? op.grad_scale[i0 / op.slice] : W(1);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      W gj = widen<W>(g.v[j]);
      if (has_inv) gj = mul_rn(gj, inv);
      if (op.grad_scale != nullptr) gj = mul_rn(gj, scale);
      w.v[j] = update(h, first_step, w.v[j], gj, buf.v[j]);
    }
    reinterpret_cast<Pack<W, VEC>*>(op.weights)[k] = w;
    if (h.use_momentum) reinterpret_cast<Pack<W, VEC>*>(op.buffer)[k] = buf;
    if (h.has_master) {
      Pack<P, VEC> p;
#pragma unroll
      for (int j = 0; j < VEC; ++j) p.v[j] = narrow<P>(w.v[j]);
      reinterpret_cast<Pack<P, VEC>*>(op.param)[k] = p;
    }
  }

  // The numel % VEC elements past the last pack, one per thread.
  const int64_t i = n_packs * VEC + first;
  if (VEC > 1 && i < op.numel) {
    W w = op.weights[i];
    if (!skip) {
      W g = widen<W>(op.grad[i]);
      if (has_inv) g = mul_rn(g, inv);
      if (op.grad_scale != nullptr) g = mul_rn(g, op.grad_scale[i / op.slice]);
      W buf = h.use_momentum && !first_step ? op.buffer[i] : W(0);
      w = update(h, first_step, w, g, buf);
      op.weights[i] = w;
      if (h.use_momentum) op.buffer[i] = buf;
    }
    if (h.has_master) op.param[i] = narrow<P>(w);
  }
}

__global__ void advance_step_kernel(int64_t* step, const float* found_inf) {
  if (found_inf == nullptr || *found_inf == 0.0f) *step += 1;
}

// ---------------------------------------------------------------------------------------------
// Launch

template <typename T>
bool aligned(const void* p, int vec) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * vec) == 0;
}

template <typename W, typename P, typename G, int VEC>
cudaError_t launch(const Operands<W, P, G>& op, const Hyper<W>& h, cudaStream_t stream) {
  const int64_t work = op.numel / VEC > 0 ? op.numel / VEC : 1;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  blocks = blocks < kMaxBlocks ? blocks : kMaxBlocks;
  masked_sgd_kernel<W, P, G, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, h);
  return cudaGetLastError();
}

template <typename W, typename P, typename G>
cudaError_t run(const MaskedSgdArgs& a, cudaStream_t stream) {
  Operands<W, P, G> op;
  op.weights = static_cast<W*>(a.weights);
  op.param = static_cast<P*>(a.param);
  op.grad = static_cast<const G*>(a.grad);
  op.buffer = static_cast<W*>(a.momentum_buffer);
  op.grad_scale = static_cast<const W*>(a.grad_scale);
  op.inv_loss_scale = static_cast<const W*>(a.inv_loss_scale);
  op.found_inf = a.found_inf;
  op.step = a.step;
  op.numel = a.numel;
  op.slice = a.slice;

  Hyper<W> h;
  h.momentum = static_cast<W>(a.momentum);
  h.dampening_keep = static_cast<W>(1.0 - a.dampening);
  h.weight_decay = static_cast<W>(a.weight_decay);
  h.coupled_decay = a.weight_decay != 0 && !a.decoupled_weight_decay;
  const double lr_wd = a.lr * a.weight_decay;  // Python's 1 - lr * weight_decay, in doubles
  h.decay = a.decoupled_weight_decay && a.weight_decay != 0 ? static_cast<W>(1.0 - lr_wd) : W(1);
  h.neg_lr = static_cast<W>(-a.lr);
  h.use_momentum = a.momentum != 0;
  h.nesterov = a.nesterov;
  h.has_master = a.has_master;

  cudaError_t err = cudaSuccess;
  if (a.numel > 0) {
    constexpr int kVec = 16 / sizeof(W);
    const bool vectorised = aligned<W>(a.weights, kVec) && aligned<W>(a.momentum_buffer, kVec) &&
                            aligned<G>(a.grad, kVec) && (!a.has_master || aligned<P>(a.param, kVec)) &&
                            (a.grad_scale == nullptr || a.slice % kVec == 0);
    err = vectorised ? launch<W, P, G, kVec>(op, h, stream) : launch<W, P, G, 1>(op, h, stream);
    if (err != cudaSuccess) return err;
  }
  advance_step_kernel<<<1, 1, 0, stream>>>(a.step, a.found_inf);
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_sgd(const MaskedSgdArgs& a, cudaStream_t stream) {
  using E = ElementType;
  if (a.weights_type == E::kFloat64) {
    if (a.param_type == E::kFloat64 && a.grad_type == E::kFloat64) return run<double, double, double>(a, stream);
    return cudaErrorInvalidValue;
  }
  if (a.weights_type != E::kFloat32) return cudaErrorInvalidValue;
  switch (a.param_type) {
    case E::kFloat32:
      if (a.grad_type == E::kFloat32) return run<float, float, float>(a, stream);
      break;
    case E::kBFloat16:
      if (a.grad_type == E::kBFloat16) return run<float, __nv_bfloat16, __nv_bfloat16>(a, stream);
      if (a.grad_type == E::kFloat32) return run<float, __nv_bfloat16, float>(a, stream);
      break;
    case E::kFloat16:
      if (a.grad_type == E::kFloat16) return run<float, __half, __half>(a, stream);
      if (a.grad_type == E::kFloat32) return run<float, __half, float>(a, stream);
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsekern
