// The convolution's three passes on Hopper (sm_90a), at stride 1: Y = conv(X, W) + b, dX and dW at the blocks, over
// NHWC images: implicit GEMMs with the images' patches as TMA boxes (sm90_mainloop.cuh: the warp-specialised
// TMA/wgmma main loop they share with the GEMMs).
// A CTA owns a patch of 8 x 16 output pixels of one image (the MMA's 128 rows) and one block-row of W (bs output
// channels), and walks the block-row's blocks. With in_channels a multiple of bs, a block's reduction range is one
// tap (kh, kw) and one chunk of bs input channels, and at stride 1 the input pixels that tap reads for the patch are
// an 8 x 16 patch of the image shifted by the tap: 4-D TMA boxes [1, 8, 16, 64 channels] of the NHWC image, at
// coordinates that may lie outside the image (the padding), where TMA writes zeros. So there is no im2col, no
// per-pixel address arithmetic and no mask. The boxes land pixel by pixel, 128-byte swizzled: exactly the K-major
// [128, bs] tile that wgmma reads. The block's values are the forward GEMM's B (bsr_gemm_sm90.cu).
// The input gradient is the same walk mirrored: a CTA owns a patch of 8 x 16 input pixels and one chunk of bs input
// channels; every tap's block-column for that chunk holds the blocks it needs (through the transposed index), and
// each block's dY pixels are the patch shifted back by the tap, again one box per 64 output channels; the block
// is the MMA's B MN-major, as bsr_linear_dx reads it. Every dX element is written once, no atomics.
// The filter gradient is the SDDMM of bsr_gemm_sm90.cu with a step's 64 rows a 4 x 16 patch of output pixels: dY's
// box at the block's output channels and X's box at its input channels, shifted by its tap.
// Taken only at stride 1 with in_channels and out_channels multiples of bs, 16-bit types and bs 64 or 128
// (bsr_conv2d_sm90, bsr_conv2d_dgrad_sm90, bsr_conv2d_wgrad_sm90); every other call runs the mma.sync kernels.
#include "sm90_mainloop.cuh"

#include <cuda.h>

namespace sparsekern {
namespace cuda {
namespace {

using namespace cute;
using namespace sm90;

constexpr int kPatchH = 8, kPatchW = 16;  // output pixels of a CTA: kBM of one image
constexpr int kBoxChannels = 64;          // channels of one TMA box: 128 bytes, the swizzle's span
static_assert(kPatchH * kPatchW == kBM, "a patch is the MMA's rows");

// An NHWC image [batch, height, width, channels]'s TMA descriptor, zeros outside the image: boxes of
// box_channels x 16 x box_h pixels of one image, their rows of box_channels * 2 bytes swizzled over as many bytes
// (128 or 64: the stage tiles' atoms, SwizzledTiles); or false where the driver refuses it (then the mma.sync kernel
// runs).
template <typename T>
bool encode_image(CUtensorMap* map, const void* image, int64_t batch, int64_t height, int64_t width,
                  int64_t channels, int box_channels = kBoxChannels, int box_h = kPatchH) {
  constexpr int64_t kBytes = static_cast<int64_t>(sizeof(T));
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(channels), static_cast<cuuint64_t>(width),
                              static_cast<cuuint64_t>(height), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(channels * kBytes),
                                 static_cast<cuuint64_t>(width * channels * kBytes),
                                 static_cast<cuuint64_t>(height * width * channels * kBytes)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_channels), kPatchW, static_cast<cuuint32_t>(box_h), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = std::is_same_v<T, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                         : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUtensorMapSwizzle swizzle = box_channels * kBytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                                                  : CU_TENSOR_MAP_SWIZZLE_64B;
  const CUresult result = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
      map, type, 4, const_cast<void*>(image), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS;
}

// ROWS pixels x CHANNELS of a stage tile from CHANNELS / BOX boxes of an image at (channel0, w, h, image): column
// slabs of ROWS pixel rows, as the tiles are laid out (SwizzledTiles: the K-major [128, bs] tiles of the forward and
// input-gradient passes and the MN-major [bs, 64] tiles of the filter gradient are both pixel-major in memory).
template <int ROWS, int CHANNELS, int BOX, typename T>
__device__ __forceinline__ void load_pixels(const CUtensorMap* image_map, uint64_t& barrier, T* tile, int channel0,
                                            int w, int h, int image) {
  CUTE_UNROLL
  for (int slab = 0; slab < CHANNELS / BOX; ++slab) {
    SM90_TMA_LOAD_4D::copy(image_map, &barrier, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                           tile + slab * (ROWS * BOX), channel0 + slab * BOX, w, h, image);
  }
}

// Patch `patch` of an image grid of patches_h x patches_w patches of patch_h x 16 pixels, image-major.
struct Patch {
  int image, h0, w0;
};

[[maybe_unused]] __device__ __forceinline__ Patch patch_at(int patch, int patches_h, int patches_w, int patch_h) {
  return {patch / (patches_w * patches_h), patch / patches_w % patches_h * patch_h, patch % patches_w * kPatchW};
}

// What the three kernels' steps need of a layer: the grid of patches (of patch_h x 16 pixels) that their CTAs or
// steps walk, and where each tap of a block-column reads.
struct TapGeometry {
  int patches_h, patches_w, chunks_per_tap, kernel_w, dil_h, dil_w, pad_top, pad_left;
};

TapGeometry tap_geometry(const ConvShape& s, int block_size, int64_t height, int64_t width, int patch_h) {
  return {static_cast<int>((height + patch_h - 1) / patch_h), static_cast<int>((width + kPatchW - 1) / kPatchW),
          static_cast<int>(s.channels / block_size), s.kernel_w, s.dil_h, s.dil_w, s.pad_top, s.pad_left};
}

// The input pixel that `tap` pairs with output pixel (0, 0) at stride 1: (kh dil_h - pad_top, kw dil_w - pad_left).
struct TapShift {
  int dh, dw;
};

[[maybe_unused]] __device__ __forceinline__ TapShift tap_shift(const TapGeometry& g, int tap) {
  return {tap / g.kernel_w * g.dil_h - g.pad_top, tap % g.kernel_w * g.dil_w - g.pad_left};
}

template <typename T, class TmaB>
struct ConvParams {
  CUtensorMap image;  // x as (C, W, H, B): boxes of 64 channels x 16 x 8 x 1, 128-byte swizzled, zeros outside
  TmaB tma_b;         // the blocks' values, as the forward GEMM reads them
  const T* bias;
  T* out;  // y [batch, out_h, out_w, N]
  const int32_t* row_ptr;
  const int32_t* col_idx;
  int out_h, out_w, N, n_lines, nnz;
  TapGeometry geometry;  // patches of the output
};

template <typename T, int BS, class Params>
__global__ void __launch_bounds__(kThreads, 1) bsr_conv2d_sm90_kernel(CUTE_GRID_CONSTANT const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = LinearConfig<T, BS, false>;
  extern __shared__ unsigned char smem_raw[];
  // Block-row fastest: consecutive CTAs read the same image patch while it is in L2.
  const int line = static_cast<int>(blockIdx.x % p.n_lines);
  const TapGeometry& g = p.geometry;
  const Patch out_patch = patch_at(static_cast<int>(blockIdx.x / p.n_lines), g.patches_h, g.patches_w, kPatchH);
  const int first = p.row_ptr[line];
  const int n_blocks = p.row_ptr[line + 1] - first;

  const auto make_loader = [&](auto& sA, auto& sB) {
    prefetch_tma_descriptor(&p.image);
    prefetch_tma_descriptor(p.tma_b.get_tma_descriptor());
    Tensor gB = block_tiles<BS, false>(p.tma_b.get_tma_tensor(values_matrix_shape<BS, false>(p.nnz)));
    auto b_parts = tma_partition(p.tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
    T* a_stages = raw_pointer_cast(sA.data());
    // p by reference: a TMA copy names its descriptor by address, which must stay in the kernel's parameter space.
    return [&p, first, out_patch, a_stages, b_parts](int step, int stage, uint64_t& barrier) {
      const int j = first + step;
      const int block_col = p.col_idx[j];
      const TapShift shift = tap_shift(p.geometry, block_col / p.geometry.chunks_per_tap);
      load_pixels<kBM, BS, kBoxChannels>(&p.image, barrier, a_stages + stage * (kBM * BS),
                                         block_col % p.geometry.chunks_per_tap * BS, out_patch.w0 + shift.dw,
                                         out_patch.h0 + shift.dh, out_patch.image);
      copy(p.tma_b.with(barrier), get<0>(b_parts)(_, j), get<1>(b_parts)(_, stage));
    };
  };

  // Bias in fp32 before the one rounding; pixels outside the output are not written; an empty block-row writes
  // zeros or the bias.
  const auto epilogue = [&](const auto& acc, const auto& coords) {
    const int64_t col0 = static_cast<int64_t>(line) * BS;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      const int row = get<0>(coords(i));
      const int col = get<1>(coords(i));
      const int oh = out_patch.h0 + row / kPatchW;
      const int ow = out_patch.w0 + row % kPatchW;
      if (oh < p.out_h && ow < p.out_w) {
        float v0 = acc(i), v1 = acc(i + 1);
        if (p.bias != nullptr) {
          v0 += static_cast<float>(p.bias[col0 + col]);
          v1 += static_cast<float>(p.bias[col0 + col + 1]);
        }
        const int64_t pixel = (static_cast<int64_t>(out_patch.image) * p.out_h + oh) * p.out_w + ow;
        store_pair(p.out + pixel * p.N + col0 + col, v0, v1);
      }
    }
  };
  run_mainloop<C>(smem_raw, n_blocks, make_loader, epilogue);
#else
  __trap();  // never launched: the launcher checks that the device loaded the sm_90a image (device_runs_sm90a)
#endif
}

template <typename T, int BS>
bool launch_conv(const BsrGemmArgs& a, cudaStream_t stream, LaunchStatus* status) {
  using C = LinearConfig<T, BS, false>;
  const ConvShape& s = *a.conv;
  const int nnz = static_cast<int>(a.nnz);
  Tensor values = make_tensor(make_gmem_ptr(static_cast<const T*>(a.values)), values_matrix_shape<BS, false>(nnz),
                              values_matrix_stride<BS, false>());
  auto tma_b = make_tma_atom(SM90_TMA_LOAD{}, values, typename C::SmemLayoutB{}(_, _, 0), typename C::BTile{});
  using Params = ConvParams<T, decltype(tma_b)>;
  Params p{};
  if (!encode_image<T>(&p.image, a.a, s.batch, s.height, s.width, s.channels)) return false;
  p.tma_b = tma_b;
  p.bias = static_cast<const T*>(a.bias);
  p.out = static_cast<T*>(a.out);
  p.row_ptr = a.line_ptr;
  p.col_idx = a.line_idx;
  p.out_h = static_cast<int>(s.out_h);
  p.out_w = static_cast<int>(s.out_w);
  p.N = static_cast<int>(a.out_cols);
  p.n_lines = static_cast<int>(a.n_lines);
  p.nnz = nnz;
  p.geometry = tap_geometry(s, BS, s.out_h, s.out_w, kPatchH);
  const int64_t ctas = s.batch * p.geometry.patches_h * p.geometry.patches_w * a.n_lines;
  if (ctas > INT32_MAX) return false;
  *status = launch(bsr_conv2d_sm90_kernel<T, BS, Params>, dim3(static_cast<unsigned>(ctas)), C::kSmemBytes, stream,
                   p);
  return true;
}

template <typename T, class TmaB>
struct DgradParams {
  CUtensorMap grad;  // dy as (N, out_w, out_h, B), boxes as encode_image's
  TmaB tma_b;        // the blocks' values, as the input-gradient GEMM reads them
  T* dx;             // [batch, height, width, channels]
  const int32_t* col_ptr;
  const int32_t* row_idx;
  const int32_t* perm;
  int height, width, channels, nnz, taps;
  TapGeometry geometry;  // patches of the input
};

template <typename T, int BS, class Params>
__global__ void __launch_bounds__(kThreads, 1) bsr_conv2d_dgrad_sm90_kernel(CUTE_GRID_CONSTANT const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = LinearConfig<T, BS, true>;
  extern __shared__ unsigned char smem_raw[];
  // Channel chunk fastest: consecutive CTAs read the same dY patches while they are in L2.
  const TapGeometry& g = p.geometry;
  const int chunk = static_cast<int>(blockIdx.x % g.chunks_per_tap);
  const Patch in_patch = patch_at(static_cast<int>(blockIdx.x / g.chunks_per_tap), g.patches_h, g.patches_w, kPatchH);
  // The steps: the blocks of the chunk's block-column at every tap, tap by tap.
  int n_steps = 0;
  for (int tap = 0; tap < p.taps; ++tap) {
    const int column = tap * g.chunks_per_tap + chunk;
    n_steps += p.col_ptr[column + 1] - p.col_ptr[column];
  }

  const auto make_loader = [&](auto& sA, auto& sB) {
    prefetch_tma_descriptor(&p.grad);
    prefetch_tma_descriptor(p.tma_b.get_tma_descriptor());
    Tensor gB = block_tiles<BS, true>(p.tma_b.get_tma_tensor(values_matrix_shape<BS, true>(p.nnz)));
    auto b_parts = tma_partition(p.tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
    T* a_stages = raw_pointer_cast(sA.data());
    // The walk's cursor: position q in the block-column of `tap` (the producer calls this once per step, in order).
    // p by reference: a TMA copy names its descriptor by address, which must stay in the kernel's parameter space.
    return [&p, chunk, in_patch, a_stages, b_parts, tap = -1, q = 0, end = 0](int, int stage,
                                                                               uint64_t& barrier) mutable {
      while (q == end) {
        ++tap;
        q = p.col_ptr[tap * p.geometry.chunks_per_tap + chunk];
        end = p.col_ptr[tap * p.geometry.chunks_per_tap + chunk + 1];
      }
      // dX at (ih, iw) takes dY at (ih - dh, iw - dw) through this tap (stride 1).
      const TapShift shift = tap_shift(p.geometry, tap);
      load_pixels<kBM, BS, kBoxChannels>(&p.grad, barrier, a_stages + stage * (kBM * BS), p.row_idx[q] * BS,
                                         in_patch.w0 - shift.dw, in_patch.h0 - shift.dh, in_patch.image);
      copy(p.tma_b.with(barrier), get<0>(b_parts)(_, p.perm[q]), get<1>(b_parts)(_, stage));
      ++q;
    };
  };

  // Pixels outside the image are not written; a chunk no block reaches gets zeros.
  const auto epilogue = [&](const auto& acc, const auto& coords) {
    const int64_t channel0 = static_cast<int64_t>(chunk) * BS;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      const int row = get<0>(coords(i));
      const int ih = in_patch.h0 + row / kPatchW;
      const int iw = in_patch.w0 + row % kPatchW;
      if (ih < p.height && iw < p.width) {
        const int64_t pixel = (static_cast<int64_t>(in_patch.image) * p.height + ih) * p.width + iw;
        store_pair(p.dx + pixel * p.channels + channel0 + get<1>(coords(i)), acc(i), acc(i + 1));
      }
    }
  };
  run_mainloop<C>(smem_raw, n_steps, make_loader, epilogue);
#else
  __trap();  // never launched: the launcher checks that the device loaded the sm_90a image (device_runs_sm90a)
#endif
}

template <typename T, int BS>
bool launch_dgrad(const ConvDgradArgs& a, cudaStream_t stream, LaunchStatus* status) {
  using C = LinearConfig<T, BS, true>;
  const ConvShape& s = a.shape;
  const int nnz = static_cast<int>(a.nnz);
  Tensor values = make_tensor(make_gmem_ptr(static_cast<const T*>(a.values)), values_matrix_shape<BS, true>(nnz),
                              values_matrix_stride<BS, true>());
  auto tma_b = make_tma_atom(SM90_TMA_LOAD{}, values, typename C::SmemLayoutB{}(_, _, 0), typename C::BTile{});
  using Params = DgradParams<T, decltype(tma_b)>;
  Params p{};
  if (!encode_image<T>(&p.grad, a.dy, s.batch, s.out_h, s.out_w, a.out_channels)) return false;
  p.tma_b = tma_b;
  p.dx = static_cast<T*>(a.dx);
  p.col_ptr = a.col_ptr;
  p.row_idx = a.row_idx;
  p.perm = a.perm;
  p.height = static_cast<int>(s.height);
  p.width = static_cast<int>(s.width);
  p.channels = static_cast<int>(s.channels);
  p.nnz = nnz;
  p.taps = s.kernel_h * s.kernel_w;
  p.geometry = tap_geometry(s, BS, s.height, s.width, kPatchH);
  const int64_t ctas = s.batch * p.geometry.patches_h * p.geometry.patches_w * p.geometry.chunks_per_tap;
  if (ctas > INT32_MAX) return false;
  *status = launch(bsr_conv2d_dgrad_sm90_kernel<T, BS, Params>, dim3(static_cast<unsigned>(ctas)), C::kSmemBytes,
                   stream, p);
  return true;
}

constexpr int kWgradPatchH = 4;  // a filter-gradient step: 4 x 16 output pixels of one image (kStepRows)
static_assert(kWgradPatchH * kPatchW == kStepRows, "a step is the SDDMM's 64 rows");

template <typename T>
struct WgradParams {
  CUtensorMap grad;   // dy as (N, out_w, out_h, B): boxes of 64 channels x 16 x 4
  CUtensorMap image;  // x as (C, W, H, B): boxes of 64 (bs 128) or 32 (bs 64) channels x 16 x 4
  const int32_t* coo_row;
  const int32_t* col_idx;
  T* out;          // [nnz, bs, bs] (one split)
  float* partial;  // [splits, nnz, bs, bs] (several)
  int64_t nnz;
  int patches, patches_per_split;
  TapGeometry geometry;  // patches of the output, 4 rows high
};

// dW at one stored block over one split of the output pixels: the SDDMM of bsr_gemm_sm90.cu with a step's 64 rows
// a 4 x 16 patch of output pixels (dY's box) and the input pixels that the block's tap pairs with them (X's box,
// shifted by the tap), both zero outside their images (stride 1).
template <typename T, int BS, class Params>
__global__ void __launch_bounds__(kThreads, 1) bsr_conv2d_wgrad_sm90_kernel(CUTE_GRID_CONSTANT const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = SddmmConfig<T, BS>;
  constexpr int kImageBox = BS == 128 ? kBoxChannels : kBoxChannels / 2;  // X's tiles: 128- or 64-byte atoms
  extern __shared__ unsigned char smem_raw[];
  const int64_t block = blockIdx.x;
  const int split = blockIdx.y;
  const int first_patch = split * p.patches_per_split;
  const int n_steps = max(0, min(p.patches, first_patch + p.patches_per_split) - first_patch);

  const auto make_loader = [&](auto& sA, auto& sB) {
    prefetch_tma_descriptor(&p.grad);
    prefetch_tma_descriptor(&p.image);
    const TapGeometry& g = p.geometry;
    const int block_col = p.col_idx[block];
    // p by reference: a TMA copy names its descriptor by address, which must stay in the kernel's parameter space.
    return [&p, first_patch, a_stages = raw_pointer_cast(sA.data()), b_stages = raw_pointer_cast(sB.data()),
            grad_channel0 = p.coo_row[block] * BS, image_channel0 = block_col % g.chunks_per_tap * BS,
            shift = tap_shift(g, block_col / g.chunks_per_tap)](int step, int stage, uint64_t& barrier) {
      const Patch at = patch_at(first_patch + step, p.geometry.patches_h, p.geometry.patches_w, kWgradPatchH);
      load_pixels<kStepRows, BS, kBoxChannels>(&p.grad, barrier, a_stages + stage * (kStepRows * BS), grad_channel0,
                                               at.w0, at.h0, at.image);
      load_pixels<kStepRows, BS, kImageBox>(&p.image, barrier, b_stages + stage * (kStepRows * BS), image_channel0,
                                            at.w0 + shift.dw, at.h0 + shift.dh, at.image);
    };
  };

  // The block, or this split's fp32 partial of it.
  const auto epilogue = [&](const auto& acc, const auto& coords) {
    store_block_tile<BS>(acc, coords, p.out, p.partial, block, split, p.nnz);
  };
  run_mainloop<C>(smem_raw, n_steps, make_loader, epilogue);
#else
  __trap();  // never launched: the launcher checks that the device loaded the sm_90a image (device_runs_sm90a)
#endif
}

template <typename T, int BS>
bool launch_wgrad(const SddmmArgs& a, cudaStream_t stream, LaunchStatus* status) {
  using C = SddmmConfig<T, BS>;
  const ConvShape& s = *a.in.conv;
  WgradParams<T> p{};
  if (!encode_image<T>(&p.grad, a.in.dy, s.batch, s.out_h, s.out_w, a.in.N, kBoxChannels, kWgradPatchH) ||
      !encode_image<T>(&p.image, a.in.x, s.batch, s.height, s.width, s.channels,
                       BS == 128 ? kBoxChannels : kBoxChannels / 2, kWgradPatchH)) {
    return false;
  }
  p.coo_row = a.coo_row;
  p.col_idx = a.col_idx;
  p.out = static_cast<T*>(a.out);
  p.partial = a.splits > 1 ? a.partial : nullptr;
  p.nnz = a.nnz;
  p.geometry = tap_geometry(s, BS, s.out_h, s.out_w, kWgradPatchH);
  const int64_t patches = s.batch * p.geometry.patches_h * p.geometry.patches_w;
  if (patches > INT32_MAX) return false;
  p.patches = static_cast<int>(patches);
  // sddmm_plan's splits (the partials are allocated for them), each a run of whole patches.
  p.patches_per_split = static_cast<int>((patches + a.splits - 1) / a.splits);
  const LaunchStatus launched = launch(bsr_conv2d_wgrad_sm90_kernel<T, BS, WgradParams<T>>,
                                       dim3(static_cast<unsigned>(a.nnz), static_cast<unsigned>(a.splits)),
                                       C::kSmemBytes, stream, p);
  *status = launched.error != cudaSuccess || a.splits == 1 ? launched : sum_sddmm_partials(a, stream);
  return true;
}

// The stride-1 layers whose box coordinates (a patch's origin shifted by any tap, in either direction) fit int32.
bool stride1_geometry(const ConvShape& s) {
  const auto fits = [](int64_t kernel, int64_t dilation, int64_t pad, int64_t in, int64_t out) {
    return (kernel - 1) * dilation + pad + (in > out ? in : out) + kPatchW < INT32_MAX;
  };
  return s.stride_h == 1 && s.stride_w == 1 && s.batch <= INT32_MAX &&
         fits(s.kernel_h, s.dil_h, s.pad_top, s.height, s.out_h) &&
         fits(s.kernel_w, s.dil_w, s.pad_left, s.width, s.out_w);
}

}  // namespace

bool bsr_conv2d_wgrad_sm90(const SddmmArgs& a, cudaStream_t stream, LaunchStatus* status) {
  const WeightGradOperands& in = a.in;
  if (in.conv == nullptr) return false;
  const ConvShape& s = *in.conv;
  const bool takes = tensor_core_case(in.type, in.block_size) && a.nnz > 0 && a.nnz <= INT32_MAX &&
                     stride1_geometry(s) && s.channels % in.block_size == 0 &&
                     in.N % in.block_size == 0 && aligned16(in.dy) && aligned16(in.x) && a.splits >= 1 &&
                     a.splits <= 65535 && (a.splits == 1 || a.partial != nullptr) && s.batch <= INT32_MAX;
  if (!takes || !device_runs_sm90a()) return false;
  bool launched = false;
  dispatch(in.type, in.block_size, [&](auto tag, auto block_size) {
    launched = launch_wgrad<typename decltype(tag)::type, decltype(block_size)::value>(a, stream, status);
    return LaunchStatus{};
  });
  return launched;
}

bool bsr_conv2d_dgrad_sm90(const ConvDgradArgs& a, cudaStream_t stream, LaunchStatus* status) {
  const ConvShape& s = a.shape;
  const bool takes = tensor_core_case(a.type, a.block_size) && a.nnz > 0 && a.nnz * a.block_size <= INT32_MAX &&
                     stride1_geometry(s) && s.channels % a.block_size == 0 &&
                     a.out_channels % a.block_size == 0 && aligned16(a.dy) && aligned16(a.values) &&
                     s.batch <= INT32_MAX && s.height * s.width <= INT32_MAX && s.channels <= INT32_MAX;
  if (!takes || !device_runs_sm90a()) return false;
  bool launched = false;
  dispatch(a.type, a.block_size, [&](auto tag, auto block_size) {
    launched = launch_dgrad<typename decltype(tag)::type, decltype(block_size)::value>(a, stream, status);
    return LaunchStatus{};
  });
  return launched;
}

bool bsr_conv2d_sm90(const BsrGemmArgs& a, cudaStream_t stream, LaunchStatus* status) {
  if (a.conv == nullptr) return false;
  const ConvShape& s = *a.conv;
  const bool takes = tensor_core_case(a.type, a.block_size) && a.nnz > 0 && a.nnz * a.block_size <= INT32_MAX &&
                     stride1_geometry(s) && s.channels % a.block_size == 0 &&
                     a.out_cols % a.block_size == 0 && a.out_cols <= INT32_MAX && aligned16(a.a) &&
                     aligned16(a.values) && s.batch <= INT32_MAX && s.out_h * s.out_w <= INT32_MAX;
  if (!takes || !device_runs_sm90a()) return false;
  bool launched = false;
  dispatch(a.type, a.block_size, [&](auto tag, auto block_size) {
    launched = launch_conv<typename decltype(tag)::type, decltype(block_size)::value>(a, stream, status);
    return LaunchStatus{};
  });
  return launched;
}

}  // namespace cuda
}  // namespace sparsekern
