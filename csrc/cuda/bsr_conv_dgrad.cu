// The convolution's input gradient, gathered through the filter's transposed index (no atomics, deterministic):
//   dX[b, ih, iw, c] = Σ_taps (kh, kw) Σ_n dY[b, oh, ow, n] W[n, (kh, kw, c)]
// where (oh, ow) is the output pixel that read (ih, iw) through that tap: oh = (ih + pad_top - kh*dh) / sh when
// that is a whole number in [0, OH) (the same for ow). It is bsr_linear_dx's GEMM (the same tile configuration,
// bsr_gemm_line_config.cuh) with two changes:
// - a CTA owns BM input pixels x bs input channels and walks, tap after tap, the block-column(s) of W holding
//   (tap, its channels); its dY rows are its pixels shifted by the tap;
// - strided convolutions: whether a tap reaches an input pixel depends only on the pixel's phase (ih mod sh,
//   iw mod sw), so CTAs tile the pixels of one phase and skip the taps their phase never uses (a 3x3 stride-2
//   convolution has 9 taps, but each phase uses 1, 2 or 4 of them) instead of multiplying masked-out rows.
// When C is a multiple of bs, a tap's bs channels are one block-column; otherwise (any other channel count) up to
// two, each read at the matching column shift inside its blocks, element by element.
#include "bsr_gemm.cuh"
#include "bsr_gemm_line_config.cuh"

namespace sparsekern {
namespace cuda {
namespace {

using namespace tiles;

template <typename T>
struct DgradParams {
  const T* dy;
  const T* values;
  T* dx;
  const int32_t* col_ptr;
  const int32_t* row_idx;
  const int32_t* perm;
  int batch, height, width, channels, out_h, out_w, out_channels;
  int kernel_w, n_taps, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
  FastDivmod phase_cols, phase_rows;  // the phase grid: ceil(W / sw) columns, ceil(H / sh) rows
  int n_chunks, tiles_per_phase;
  bool dy_vec;      // 16-byte copies of dY: aligned, N whole chunks
};

// What a CTA knows of each of its pixel rows, computed once: its image b and place (i, j) in the phase grid, and
// its dX pixel index (or -1 past the image).
struct PixelRow {
  int b, i, j, dx_pixel;
};

template <typename T, int BS>
struct DgradLayout : GemmLayout<T, BS, true> {
  static constexpr int kRowsOffset = GemmLayout<T, BS, true>::kSmemBytes;  // 16-byte multiple
  static constexpr int kSmemBytes = kRowsOffset + GemmLayout<T, BS, true>::BM * static_cast<int>(sizeof(PixelRow));
  static_assert(kRowsOffset % 16 == 0, "the pixel table must start 16-byte aligned");
  // fp32 with 128-wide blocks: FmaMath's two sets of 64 accumulators plus the walk's cursor do not fit the 128
  // registers that two CTAs per SM would leave, and ptxas would spill; one CTA per SM instead.
  static constexpr int kMinBlocks = sizeof(T) == 4 && BS == 128 ? 1 : ctas_per_sm(kSmemBytes);
};

template <typename T, int BS>
__global__ void __launch_bounds__(DgradLayout<T, BS>::kThreads, DgradLayout<T, BS>::kMinBlocks)
conv_dgrad_kernel(const DgradParams<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using L = DgradLayout<T, BS>;
  constexpr int BM = L::BM;
  constexpr int KS = L::KS;
  constexpr int kThreads = L::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;

  // Channel chunk fastest (neighbouring CTAs gather the same dY rows), then pixel tile, then phase.
  const int chunk = blockIdx.x % p.n_chunks;
  const int rest = blockIdx.x / p.n_chunks;
  const int tile = rest % p.tiles_per_phase;
  const int phase = rest / p.tiles_per_phase;
  const int phase_h = phase / p.stride_w;
  const int phase_w = phase % p.stride_w;
  const int c0 = chunk * BS;
  const int c_valid = p.channels - c0 < BS ? p.channels - c0 : BS;

  PixelRow* pixels = reinterpret_cast<PixelRow*>(smem + L::kRowsOffset);
  for (int r = tid; r < BM; r += kThreads) {
    int i, j;
    const int b = p.phase_rows.divmod(p.phase_cols.divmod(tile * BM + r, j), i);
    const int ih = i * p.stride_h + phase_h;
    const int iw = j * p.stride_w + phase_w;
    const bool inside = b < p.batch && ih < p.height && iw < p.width;
    pixels[r] = PixelRow{b, i, j, inside ? (b * p.height + ih) * p.width + iw : -1};
  }
  __syncthreads();  // the pipeline's first loads read the table

  // A tap reaches this phase's pixels when the shift from pixel to output pixel is a whole number of strides.
  const auto tap_shift = [&](int tap, int& oh_shift, int& ow_shift) {
    const int shift_h = phase_h + p.pad_top - (tap / p.kernel_w) * p.dil_h;
    const int shift_w = phase_w + p.pad_left - (tap % p.kernel_w) * p.dil_w;
    oh_shift = shift_h / p.stride_h;  // exact when used, so the rounding direction does not matter
    ow_shift = shift_w / p.stride_w;
    return shift_h % p.stride_h == 0 && shift_w % p.stride_w == 0;
  };
  // The block-columns of W holding this CTA's channels at a tap: K-columns tap*C + c0 .. + c_valid.
  const auto tap_columns = [&](int tap, int& first, int& last) {
    const int k_first = tap * p.channels + c0;
    first = k_first / BS;
    last = (k_first + c_valid - 1) / BS;
    return k_first;
  };

  int n_steps = 0;
  for (int tap = 0; tap < p.n_taps; ++tap) {
    int oh_shift, ow_shift, first, last;
    if (!tap_shift(tap, oh_shift, ow_shift)) continue;
    tap_columns(tap, first, last);
    n_steps += (p.col_ptr[last + 1] - p.col_ptr[first]) * L::kSlices;
  }

  // The walk: tap by tap, block-column by block-column, stored block by stored block; the pipeline loads its
  // steps in order, so one cursor advanced after a block's last slice suffices.
  int tap = -1, column = 0, last_column = -1, pos = 0, pos_end = 0, oh_shift = 0, ow_shift = 0, k_first = 0;
  const auto next_block = [&]() {
    ++pos;
    while (pos >= pos_end) {
      if (column < last_column) {
        ++column;
      } else {
        do {
          ++tap;
        } while (tap < p.n_taps && !tap_shift(tap, oh_shift, ow_shift));
        if (tap >= p.n_taps) return;  // only after the last step
        k_first = tap_columns(tap, column, last_column);
      }
      pos = p.col_ptr[column];
      pos_end = p.col_ptr[column + 1];
    }
  };
  next_block();

  typename L::Math math(tid);
  const auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * L::kStageBytes); };
  const auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * L::kStageBytes + L::kABytes); };
  const T zero = Elem<T>::from_float(0.0f);
  const auto load = [&](int step, int s) {
    const int slice = step % L::kSlices;
    const int n0 = p.row_idx[pos] * BS + slice * KS;  // the block's output channels of this slice
    const int red = clamp_count(p.out_channels, n0, KS);
    // A [BM][KS]: dY at each pixel shifted by the tap, channels n0..; zero where the shift leaves dY.
    T* a = stage_a(s);
    const auto dy_at = [&](int row) -> int64_t {
      const PixelRow px = pixels[row];
      const int oh = px.i + oh_shift;
      const int ow = px.j + ow_shift;
      if (px.dx_pixel < 0 || oh < 0 || oh >= p.out_h || ow < 0 || ow >= p.out_w) return -1;
      return ((static_cast<int64_t>(px.b) * p.out_h + oh) * p.out_w + ow) * p.out_channels + n0;
    };
    if (p.dy_vec) {
      for_each_chunk<T, BM, KS, kThreads>(tid, [&](int row, int col) {
        const int64_t at = col < red ? dy_at(row) : -1;
        if (at >= 0) {
          cp_async_16(a + row * L::LDA + col, p.dy + at + col, kVecBytes);
        } else {
          zero_chunk(a + row * L::LDA + col);
        }
      });
    } else {
      for_each_element<BM, KS, kThreads>(tid, [&](int row, int col) {
        const int64_t at = col < red ? dy_at(row) : -1;
        a[row * L::LDA + col] = at >= 0 ? p.dy[at + col] : zero;
      });
    }
    // B [KS][BS] (reduction-major): rows n0.. of the block, its columns shifted to this CTA's channels.
    const T* w = p.values + static_cast<int64_t>(p.perm[pos]) * (BS * BS) + slice * KS * BS;
    const int shift = k_first - column * BS;
    if (shift == 0 && c_valid == BS) {
      load_tile<T, KS, BS, L::LDB, kThreads>(stage_b(s), w, BS, red, BS, true, tid);
    } else {
      T* b = stage_b(s);
      for_each_element<KS, BS, kThreads>(tid, [&](int row, int col) {
        const int from = col + shift;
        b[row * L::LDB + col] = row < red && col < c_valid && from >= 0 && from < BS ? w[row * BS + from] : zero;
      });
    }
    if (slice == L::kSlices - 1) next_block();
  };
  run_pipeline<L::STAGES>(n_steps, load, [&](int s) { math.stage(stage_a(s), L::LDA, stage_b(s), L::LDB); });

  float* c = reinterpret_cast<float*>(smem);
  math.store(c, L::LDT);
  __syncthreads();
  for (int e = tid; e < BM * BS; e += kThreads) {
    const int row = e / BS;
    const int col = e % BS;
    const int dx_pixel = pixels[row].dx_pixel;
    if (dx_pixel >= 0 && col < c_valid) {
      float v = c[row * L::LDT + col];
#pragma unroll
      for (int g = 1; g < L::Math::kGroups; ++g) v += c[(g * BM + row) * L::LDT + col];
      p.dx[static_cast<int64_t>(dx_pixel) * p.channels + c0 + col] = Elem<T>::from_float(v);
    }
  }
#endif
}

template <typename T, int BS>
LaunchStatus launch(const ConvDgradArgs& a, cudaStream_t stream) {
  using L = DgradLayout<T, BS>;
  constexpr int kVec = kVecBytes / sizeof(T);
  const ConvShape& s = a.shape;
  DgradParams<T> p;
  p.dy = static_cast<const T*>(a.dy);
  p.values = static_cast<const T*>(a.values);
  p.dx = static_cast<T*>(a.dx);
  p.col_ptr = a.col_ptr;
  p.row_idx = a.row_idx;
  p.perm = a.perm;
  p.batch = static_cast<int>(s.batch);
  p.height = static_cast<int>(s.height);
  p.width = static_cast<int>(s.width);
  p.channels = static_cast<int>(s.channels);
  p.out_h = static_cast<int>(s.out_h);
  p.out_w = static_cast<int>(s.out_w);
  p.out_channels = static_cast<int>(a.out_channels);
  p.kernel_w = s.kernel_w;
  p.n_taps = s.kernel_h * s.kernel_w;
  p.stride_h = s.stride_h;
  p.stride_w = s.stride_w;
  p.pad_top = s.pad_top;
  p.pad_left = s.pad_left;
  p.dil_h = s.dil_h;
  p.dil_w = s.dil_w;
  const int64_t phase_rows = cdiv(s.height, s.stride_h), phase_cols = cdiv(s.width, s.stride_w);
  p.phase_cols = FastDivmod(static_cast<int>(phase_cols));
  p.phase_rows = FastDivmod(static_cast<int>(phase_rows));
  p.n_chunks = static_cast<int>(cdiv(s.channels, BS));
  const int64_t tiles_per_phase = cdiv(s.batch * phase_rows * phase_cols, L::BM);
  p.tiles_per_phase = static_cast<int>(tiles_per_phase);
  p.dy_vec = aligned16(a.dy) && a.out_channels % kVec == 0;

  // (channel chunk, pixel tile, phase) all in grid.x: in y or z they would be capped at 65535.
  const int64_t ctas = p.n_chunks * tiles_per_phase * s.stride_h * s.stride_w;
  if (ctas == 0) return LaunchStatus{};
  // Pixel indices of the last tile (past the image included) must stay int32.
  if (ctas > INT32_MAX || tiles_per_phase * L::BM > INT32_MAX) return LaunchStatus{cudaErrorInvalidConfiguration};
  return launch_kernel(conv_dgrad_kernel<T, BS>, dim3(static_cast<unsigned>(ctas)), L::kThreads, L::kSmemBytes,
                       stream, p);
}

}  // namespace

LaunchStatus bsr_conv2d_dgrad(const ConvDgradArgs& args, cudaStream_t stream) {
  return dispatch_kernel(args.type, args.block_size, [&](auto type, auto block_size) {
    return launch<typename decltype(type)::type, decltype(block_size)::value>(args, stream);
  });
}

}  // namespace cuda
}  // namespace sparsekern
