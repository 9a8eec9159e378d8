// The implicit im2col matrix of an NHWC image, as a dense-operand source for the GEMM kernels (the same load() as
// tiles::DenseRows): the forward convolution is bsr_gemm over it, the filter gradient and its block scores are the
// weight-gradient kernels over it. It is never written to memory: each 16-byte chunk of a tile is copied straight
// from the image (cp.async), or written as zeros where the filter window hangs over the image's edge.
//
// Row m of im2col is output pixel (b, oh, ow), column k is filter tap (kh, kw) at input channel c, K ordered
// (kh, kw, c); entry = X[b, oh*sh - pad_top + kh*dh, ow*sw - pad_left + kw*dw, c], zero outside the image.
// Indices are int32 (the glue checks M and K < 2^31), image offsets int64.
#pragma once

#include <cstdint>

#include "bsr_gemm.cuh"
#include "bsr_gemm_tiles.cuh"

namespace sparsekern {
namespace cuda {
namespace tiles {

template <typename T>
struct Im2colRows {
  const T* x;
  int m_first;  // the view's first row (rows_from)
  int height, width, channels;
  int stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
  FastDivmod out_w, out_h, by_channels, kernel_w;
  // 16-byte copies: x aligned and C whole chunks, so a chunk never straddles two taps or two pixels.
  bool vec;

  // Offset in x of im2col entry (m, k), or -1 in the zero padding.
  __device__ __forceinline__ int64_t offset(int m, int k) const {
    int ow, oh, c, kw;
    const int b = out_h.divmod(out_w.divmod(m, ow), oh);
    const int kh = kernel_w.divmod(by_channels.divmod(k, c), kw);
    const int ih = oh * stride_h - pad_top + kh * dil_h;
    const int iw = ow * stride_w - pad_left + kw * dil_w;
    if (ih < 0 || ih >= height || iw < 0 || iw >= width) return -1;
    return ((static_cast<int64_t>(b) * height + ih) * width + iw) * channels + c;
  }

  __device__ __forceinline__ Im2colRows rows_from(int64_t m0) const {
    Im2colRows view = *this;
    view.m_first = m_first + static_cast<int>(m0);
    return view;
  }

  // dst [ROWS][LDS] = im2col rows m_first.. and columns k0..; `rows` and `cols` count the valid ones (k0 and the
  // valid width are whole chunks on the 16-byte path: k0 is a multiple of the slice, K of the chunk).
  template <int ROWS, int COLS, int LDS, int THREADS>
  __device__ __forceinline__ void load(T* dst, int64_t k0, int rows, int cols, int tid) const {
    static_assert(LDS % (kVecBytes / sizeof(T)) == 0, "shared rows must be whole 16-byte chunks");
    const int k_first = static_cast<int>(k0);
    if (vec) {
      for_each_chunk<T, ROWS, COLS, THREADS>(tid, [&](int row, int col) {
        const int64_t at = row < rows && col < cols ? offset(m_first + row, k_first + col) : -1;
        if (at >= 0) {
          cp_async_16(dst + row * LDS + col, x + at, kVecBytes);
        } else {
          zero_chunk(dst + row * LDS + col);
        }
      });
    } else {
      const T zero = Elem<T>::from_float(0.0f);
      for_each_element<ROWS, COLS, THREADS>(tid, [&](int row, int col) {
        const int64_t at = row < rows && col < cols ? offset(m_first + row, k_first + col) : -1;
        dst[row * LDS + col] = at >= 0 ? x[at] : zero;
      });
    }
  }
};

template <typename T>
Im2colRows<T> im2col_rows(const void* x, const ConvShape& s) {
  constexpr int kVec = kVecBytes / sizeof(T);
  Im2colRows<T> r;
  r.x = static_cast<const T*>(x);
  r.m_first = 0;
  r.height = static_cast<int>(s.height);
  r.width = static_cast<int>(s.width);
  r.channels = static_cast<int>(s.channels);
  r.stride_h = s.stride_h;
  r.stride_w = s.stride_w;
  r.pad_top = s.pad_top;
  r.pad_left = s.pad_left;
  r.dil_h = s.dil_h;
  r.dil_w = s.dil_w;
  r.out_w = FastDivmod(static_cast<int>(s.out_w));
  r.out_h = FastDivmod(static_cast<int>(s.out_h));
  r.by_channels = FastDivmod(static_cast<int>(s.channels));
  r.kernel_w = FastDivmod(s.kernel_w);
  r.vec = aligned16(x) && s.channels % kVec == 0;
  return r;
}

}  // namespace tiles
}  // namespace cuda
}  // namespace sparsekern
