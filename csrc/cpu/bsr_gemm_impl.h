// The block-sparse GEMM kernels, written once over a SIMD traits type `V` and compiled once per
// instruction set. Include this only inside an anonymous namespace of an ISA unit (bsr_gemm_*.cpp),
// after `V`'s intrinsics are enabled, and only after every other header: nothing here may be seen by
// another unit (see bsr_gemm.h).
//
// V provides: T (element), reg (vector register), W (lanes), kMaxVectors (vectors across a strip),
// kAccumulators (accumulator registers), kMaxRows (rows of a micro-tile), zero, load, load_partial,
// store, store_partial, set1, add, fmadd.
//
// Every kernel computes each output element in exactly one task and with one fixed sequence of
// fused multiply-adds, so the result does not depend on the thread count or on the tiling.

#define SK_INLINE inline __attribute__((always_inline))

template <typename I>
constexpr SK_INLINE I min_of(I a, I b) {
  return a < b ? a : b;
}

// Rows of A, C and dY are bs-wide slices of long rows (8 KB apart for K = 2048): every row is on its own
// page, where the hardware prefetcher does not follow. So the kernels prefetch them themselves.
template <typename T>
SK_INLINE void prefetch_row(const T* p, int width, bool for_write) {
  constexpr int kLine = 64 / sizeof(T);
  for (int e = 0; e < width; e += kLine) {
    if (for_write)
      __builtin_prefetch(p + e, 1, 3);
    else
      __builtin_prefetch(p + e, 0, 3);
  }
}

template <typename T>
struct ZeroRow {
  // What a convolution tap outside the image reads: a block-wide row of zeros.
  alignas(64) static constexpr T data[128] = {};
};

// Micro-tile shape for block size BS: NV vectors across a strip of the output block, MR rows.
template <class V, int BS>
struct TileShape {
  static constexpr int NV = min_of(BS / V::W, V::kMaxVectors);
  static constexpr int MR = min_of(V::kMaxRows, V::kAccumulators / NV);
  static constexpr int STRIP = NV * V::W;
  static constexpr int STRIPS = BS / STRIP;
};

// Call f(std::integral_constant<int, rows>) with rows in [1, MR], so that edge tiles are unrolled too.
template <int MR, class F>
SK_INLINE void with_rows(int rows, F&& f) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      with_rows<MR - 1>(rows, f);
      return;
    }
  }
  f(std::integral_constant<int, MR>{});
}

// acc[MR][NV] held in registers; update() adds a rank-`depth` product of MR rows of A (one pointer
// per row, contiguous along the reduction) with a row-major panel B (a strip of width NV * W).
template <class V, int MR, int NV>
struct RowTile {
  using T = typename V::T;
  using R = typename V::reg;
  R acc[MR][NV];

  SK_INLINE void clear() {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
  }

  SK_INLINE void update(const T* const* a, int depth, const T* b, int64_t ldb) {
    const T* a_row[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) a_row[i] = a[i];
    for (int t = 0; t < depth; ++t) {
      R b_vec[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) b_vec[v] = V::load(b + t * ldb + v * V::W);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const R a_val = V::set1(a_row[i][t]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = V::fmadd(a_val, b_vec[v], acc[i][v]);
      }
    }
  }

  SK_INLINE static void prefetch_c(T* c, int64_t ldc, int cols) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) prefetch_row(c + i * ldc, cols, true);
  }

  // Rows i of C at c + i * ldc; `cols` valid columns of the strip; bias (strip-aligned) or nullptr.
  SK_INLINE void store(T* c, int64_t ldc, int cols, const T* bias) const {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int n = cols - v * V::W;
      if (n <= 0) break;
      const bool full = n >= V::W;
      R b_vec = V::zero();
      if (bias != nullptr) b_vec = full ? V::load(bias + v * V::W) : V::load_partial(bias + v * V::W, n);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const R out = bias != nullptr ? V::add(acc[i][v], b_vec) : acc[i][v];
        if (full)
          V::store(c + i * ldc + v * V::W, out);
        else
          V::store_partial(c + i * ldc + v * V::W, out, n);
      }
    }
  }
};

// Per output row of a micro-tile: where its receptive field starts in the NHWC image.
struct ConvRow {
  int64_t image;  // offset of the row's image
  int64_t ih0, iw0;
};

SK_INLINE ConvRow conv_row(const Im2col& g, int64_t m) {
  const int64_t per_image = g.out_h * g.out_w;
  const int64_t b = m / per_image;
  const int64_t rest = m - b * per_image;
  const int64_t oh = rest / g.out_w;
  const int64_t ow = rest - oh * g.out_w;
  return {b * g.height * g.width * g.channels, oh * g.stride_h - g.pad_h, ow * g.stride_w - g.pad_w};
}

// A stored block seen from the forward pass: its column offset in K, or for a convolution its tap
// (as a pixel offset) and first channel; `depth` is how much of it lies inside K.
struct BlockRef {
  int64_t col;       // Linear: first column in K
  int64_t dh, dw;    // Convolution: tap offset (kh * dilation_h, kw * dilation_w)
  int64_t channel0;  // Convolution: first input channel
  int depth;
};

SK_INLINE BlockRef block_ref(const Im2col& g, int64_t c, int bs, int64_t K) {
  BlockRef ref{c * bs, 0, 0, 0, static_cast<int>(min_of<int64_t>(bs, K - c * bs))};
  if (g.is_conv) {
    const int64_t tap = (c * bs) / g.channels;
    ref.channel0 = c * bs - tap * g.channels;
    ref.dh = (tap / g.kernel_w) * g.dilation_h;
    ref.dw = (tap % g.kernel_w) * g.dilation_w;
  }
  return ref;
}

// Pointer to row m's slice of block `ref` in the (implicit) [M, K] operand.
template <bool CONV, typename T>
SK_INLINE const T* operand_row(const T* x, const Im2col& g, int64_t K, int64_t m, const ConvRow& row,
                               const BlockRef& ref) {
  if constexpr (!CONV) {
    return x + m * K + ref.col;
  } else {
    const int64_t ih = row.ih0 + ref.dh;
    const int64_t iw = row.iw0 + ref.dw;
    if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) return ZeroRow<T>::data;
    return x + row.image + (ih * g.width + iw) * g.channels + ref.channel0;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: Y[m, r-block] = Σ over the row's blocks of A[m, c-block] · W_blockᵀ (+ bias).
// The row's blocks are packed transposed (k-major) once per task into the scratch, so that the
// inner loop is a broadcast of A times contiguous output-width vectors of Wᵀ.

template <class V, int BS>
SK_INLINE void pack_transposed(const typename V::T* block, typename V::T* packed) {
  // In V::kTransposeTile square tiles, transposed in registers.
  constexpr int TB = V::kTransposeTile;
  for (int n0 = 0; n0 < BS; n0 += TB)
    for (int k0 = 0; k0 < BS; k0 += TB) V::transpose_tile(block + n0 * BS + k0, BS, packed + k0 * BS + n0, BS);
}

template <class V, int BS, int MR, bool CONV>
SK_INLINE void forward_tile(const ForwardArgs<typename V::T>& p, int64_t m0, int64_t r, const typename V::T* packed,
                            const BlockRef* refs, int n_blocks) {
  using T = typename V::T;
  using S = TileShape<V, BS>;
  ConvRow rows[MR] = {};
  if constexpr (CONV) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) rows[i] = conv_row(p.geometry, m0 + i);
  }
  for (int s = 0; s < S::STRIPS; ++s) {
    const int64_t col0 = r * BS + s * S::STRIP;
    if (col0 >= p.N) break;
    const int cols = static_cast<int>(min_of<int64_t>(S::STRIP, p.N - col0));
    RowTile<V, MR, S::NV>::prefetch_c(p.y + m0 * p.N + col0, p.N, cols);
    RowTile<V, MR, S::NV> tile;
    tile.clear();
    for (int j = 0; j < n_blocks; ++j) {
      const T* a[MR];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) a[i] = operand_row<CONV>(p.x, p.geometry, p.K, m0 + i, rows[i], refs[j]);
      if (!CONV && s == 0 && m0 + 2 * MR <= p.M) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) prefetch_row(a[i] + MR * p.K, refs[j].depth, false);
      }
      tile.update(a, refs[j].depth, packed + j * BS * BS + s * S::STRIP, BS);
    }
    tile.store(p.y + m0 * p.N + col0, p.N, cols, p.bias != nullptr ? p.bias + col0 : nullptr);
  }
}

template <class V, int BS, bool CONV>
void forward_tasks(const ForwardArgs<typename V::T>& p, int64_t task_begin, int64_t task_end, void* scratch) {
  using T = typename V::T;
  using S = TileShape<V, BS>;
  const int64_t R = p.index.n_block_rows;
  // Scratch: the packed row (max blocks per row x BS x BS), then its block references.
  T* packed = static_cast<T*>(scratch);
  int64_t max_blocks = 0;
  for (int64_t r = 0; r < R; ++r)
    max_blocks = max_blocks > p.index.row_ptr[r + 1] - p.index.row_ptr[r] ? max_blocks
                                                                          : p.index.row_ptr[r + 1] - p.index.row_ptr[r];
  BlockRef* refs = reinterpret_cast<BlockRef*>(packed + max_blocks * BS * BS);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t chunk = task / R;
    const int64_t r = task - chunk * R;
    const int64_t m_begin = chunk * p.m_chunk;
    const int64_t m_end = min_of(p.M, m_begin + p.m_chunk);
    const int64_t first = p.index.row_ptr[r];
    const int n_blocks = static_cast<int>(p.index.row_ptr[r + 1] - first);
    for (int j = 0; j < n_blocks; ++j) {
      pack_transposed<V, BS>(p.values + (first + j) * BS * BS, packed + j * BS * BS);
      refs[j] = block_ref(p.geometry, p.index.col_idx[first + j], BS, p.K);
    }
    for (int64_t m0 = m_begin; m0 < m_end; m0 += S::MR) {
      with_rows<S::MR>(static_cast<int>(min_of<int64_t>(S::MR, m_end - m0)), [&](auto rows) {
        forward_tile<V, BS, decltype(rows)::value, CONV>(p, m0, r, packed, refs, n_blocks);
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Input gradient, Linear: dX[m, c-block] = Σ over the column's blocks (CSC) of dY[m, r-block] · W_block.
// W_block's rows are contiguous along k, so it is used in place, without a transpose.

template <class V, int BS, int MR>
SK_INLINE void backward_input_tile(const BackwardInputArgs<typename V::T>& p, int64_t m0, int64_t c) {
  using T = typename V::T;
  using S = TileShape<V, BS>;
  const int64_t q_begin = p.index.col_ptr[c];
  const int64_t q_end = p.index.col_ptr[c + 1];
  for (int s = 0; s < S::STRIPS; ++s) {
    const int64_t col0 = c * BS + s * S::STRIP;
    if (col0 >= p.K) break;
    const int cols = static_cast<int>(min_of<int64_t>(S::STRIP, p.K - col0));
    RowTile<V, MR, S::NV>::prefetch_c(p.dx + m0 * p.K + col0, p.K, cols);
    RowTile<V, MR, S::NV> tile;
    tile.clear();
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t r = p.index.row_idx[q];
      const int depth = static_cast<int>(min_of<int64_t>(BS, p.N - r * BS));
      const T* a[MR];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) a[i] = p.dy + (m0 + i) * p.N + r * BS;
      if (s == 0 && m0 + 2 * MR <= p.M) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) prefetch_row(a[i] + MR * p.N, depth, false);
      }
      tile.update(a, depth, p.values + static_cast<int64_t>(p.index.perm[q]) * BS * BS + s * S::STRIP, BS);
    }
    tile.store(p.dx + m0 * p.K + col0, p.K, cols, nullptr);
  }
}

template <class V, int BS>
void backward_input_linear_tasks(const BackwardInputArgs<typename V::T>& p, int64_t task_begin, int64_t task_end) {
  using S = TileShape<V, BS>;
  const int64_t C = p.index.n_block_cols;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t chunk = task / C;
    const int64_t c = task - chunk * C;
    const int64_t m_end = min_of(p.M, (chunk + 1) * p.m_chunk);
    for (int64_t m0 = chunk * p.m_chunk; m0 < m_end; m0 += S::MR) {
      with_rows<S::MR>(static_cast<int>(min_of<int64_t>(S::MR, m_end - m0)), [&](auto rows) {
        backward_input_tile<V, BS, decltype(rows)::value>(p, m0, c);
      });
    }
  }
}

// Input gradient, convolution: a transposed convolution straight into the NHWC dX. A task owns the
// pixels (b, ih, iw) with iw = pw + i * stride_w (one column phase), for one group g of BS channels;
// every pixel of a phase is reached by the same filter taps, so taps that cannot reach it are skipped
// as a whole instead of multiplying zeros (a stride-2 layer would otherwise do 4x the work).
template <class V, int BS, int MR>
SK_INLINE void conv_backward_input_tile(const BackwardInputArgs<typename V::T>& p, int64_t b, int64_t ih, int64_t pw,
                                        int64_t g, int64_t i0) {
  using T = typename V::T;
  using S = TileShape<V, BS>;
  const Im2col& geo = p.geometry;
  const int64_t groups = geo.channels / BS;
  for (int s = 0; s < S::STRIPS; ++s) {
    RowTile<V, MR, S::NV> tile;
    tile.clear();
    for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
      const int64_t oh_scaled = ih + geo.pad_h - kh * geo.dilation_h;
      if (oh_scaled < 0 || oh_scaled % geo.stride_h != 0) continue;
      const int64_t oh = oh_scaled / geo.stride_h;
      if (oh >= geo.out_h) continue;
      for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
        const int64_t phase = pw + geo.pad_w - kw * geo.dilation_w;
        if (((phase % geo.stride_w) + geo.stride_w) % geo.stride_w != 0) continue;
        // Output pixel offsets of the tile's rows for this tap; -1 where it falls outside.
        int64_t dy_row[MR];
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const int64_t ow_scaled = phase + (i0 + i) * geo.stride_w;
          const int64_t ow = ow_scaled / geo.stride_w;
          dy_row[i] = (ow_scaled >= 0 && ow < geo.out_w) ? ((b * geo.out_h + oh) * geo.out_w + ow) * p.N : -1;
        }
        const int64_t c = (kh * geo.kernel_w + kw) * groups + g;
        for (int64_t q = p.index.col_ptr[c]; q < p.index.col_ptr[c + 1]; ++q) {
          const int64_t r = p.index.row_idx[q];
          const T* a[MR];
#pragma GCC unroll 16
          for (int i = 0; i < MR; ++i) a[i] = dy_row[i] >= 0 ? p.dy + dy_row[i] + r * BS : ZeroRow<T>::data;
          tile.update(a, static_cast<int>(min_of<int64_t>(BS, p.N - r * BS)),
                      p.values + static_cast<int64_t>(p.index.perm[q]) * BS * BS + s * S::STRIP, BS);
        }
      }
    }
    const int64_t iw = pw + i0 * geo.stride_w;
    tile.store(p.dx + ((b * geo.height + ih) * geo.width + iw) * geo.channels + g * BS + s * S::STRIP,
               geo.stride_w * geo.channels, S::STRIP, nullptr);
  }
}

template <class V, int BS>
void backward_input_conv_tasks(const BackwardInputArgs<typename V::T>& p, int64_t task_begin, int64_t task_end) {
  using S = TileShape<V, BS>;
  const Im2col& geo = p.geometry;
  const int64_t groups = geo.channels / BS;
  for (int64_t task = task_begin; task < task_end; ++task) {
    // task = ((b * height + ih) * stride_w + pw) * groups + g
    int64_t rest = task;
    const int64_t g = rest % groups;
    rest /= groups;
    const int64_t pw = rest % geo.stride_w;
    rest /= geo.stride_w;
    const int64_t ih = rest % geo.height;
    const int64_t b = rest / geo.height;
    if (pw >= geo.width) continue;
    const int64_t n_cols = (geo.width - pw + geo.stride_w - 1) / geo.stride_w;
    for (int64_t i0 = 0; i0 < n_cols; i0 += S::MR) {
      with_rows<S::MR>(static_cast<int>(min_of<int64_t>(S::MR, n_cols - i0)), [&](auto rows) {
        conv_backward_input_tile<V, BS, decltype(rows)::value>(p, b, ih, pw, g, i0);
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Weight gradient: C[n, k] += Σ_m dY[m, r*BS + n] · A[m, c*BS + k] for one block. The reduction over
// M is long and the block small, so C lives in memory (L1) and is updated by MR x strip register
// tiles per M chunk; A's rows for the chunk are gathered into a pointer list once per block.

constexpr int64_t kReductionChunk = 256;  // rows of M per pass: a block's dY and A slices stay in L1/L2
constexpr int kScoreRun = 8;              // block_grad_scores: blocks of one block-row computed together

template <class V, int MR, int NV, bool PARTIAL>
SK_INLINE void weight_grad_tile(typename V::T* c, int64_t ldc, const typename V::T* dy, int64_t ldy,
                                const typename V::T* const* a_rows, int64_t a_offset, int64_t count, int cols) {
  using R = typename V::reg;
  R acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = V::load(c + i * ldc + v * V::W);
  constexpr int64_t kAhead = 8;  // rows of A and dY prefetched ahead of use
  for (int64_t m = 0; m < count; ++m) {
    if (m + kAhead < count) {
      prefetch_row(a_rows[m + kAhead] + a_offset, NV * V::W, false);
      prefetch_row(dy + (m + kAhead) * ldy, MR, false);
    }
    R a_vec[NV];
    const typename V::T* a = a_rows[m] + a_offset;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a_vec[v] = PARTIAL ? V::load_partial(a + v * V::W, cols - v * V::W) : V::load(a + v * V::W);
    const typename V::T* d = dy + m * ldy;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const R d_val = V::set1(d[i]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fmadd(d_val, a_vec[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) V::store(c + i * ldc + v * V::W, acc[i][v]);
}

// Adds rows [m_begin, m_end) of the product for block (r, c) into out (BS x BS, row-major). Rows of
// the block past N and columns past K are left alone (the caller zeroed them).
template <class V, int BS, bool CONV>
SK_INLINE void weight_grad_block(const WeightGradArgs<typename V::T>& p, int64_t r, int64_t c, int64_t m_begin,
                                 int64_t m_end, typename V::T* out, const typename V::T** a_rows) {
  using T = typename V::T;
  using S = TileShape<V, BS>;
  const BlockRef ref = block_ref(p.geometry, c, BS, p.K);
  for (int64_t m = m_begin; m < m_end; ++m) {
    ConvRow row{};
    if constexpr (CONV) row = conv_row(p.geometry, m);
    a_rows[m - m_begin] = operand_row<CONV>(p.x, p.geometry, p.K, m, row, ref);
  }
  const int n_valid = static_cast<int>(min_of<int64_t>(BS, p.N - r * BS));
  const T* dy = p.dy + m_begin * p.N + r * BS;
  for (int s = 0; s < S::STRIPS; ++s) {
    const int cols = static_cast<int>(min_of<int64_t>(S::STRIP, ref.depth - s * S::STRIP));
    if (cols <= 0) break;
    for (int n0 = 0; n0 < n_valid; n0 += S::MR) {
      with_rows<S::MR>(min_of(S::MR, n_valid - n0), [&](auto rows) {
        constexpr int MR = decltype(rows)::value;
        T* c_tile = out + n0 * BS + s * S::STRIP;
        if (cols == S::STRIP)
          weight_grad_tile<V, MR, S::NV, false>(c_tile, BS, dy + n0, p.N, a_rows, s * S::STRIP,
                                                m_end - m_begin, cols);
        else
          weight_grad_tile<V, MR, S::NV, true>(c_tile, BS, dy + n0, p.N, a_rows, s * S::STRIP,
                                               m_end - m_begin, cols);
      });
    }
  }
}

template <class V, int BS, bool CONV>
void sddmm_tasks(const WeightGradArgs<typename V::T>& p, int64_t task_begin, int64_t task_end, void* scratch) {
  using T = typename V::T;
  const T** a_rows = static_cast<const T**>(scratch);
  for (int64_t j = task_begin; j < task_end; ++j)
    for (int64_t e = 0; e < BS * BS; ++e) p.out[j * BS * BS + e] = T(0);
  // Blocks of one block-row share dY's slice: run over them inside each M chunk.
  for (int64_t run = task_begin; run < task_end;) {
    const int64_t r = p.index.coo_row[run];
    int64_t run_end = run + 1;
    while (run_end < task_end && p.index.coo_row[run_end] == r) ++run_end;
    for (int64_t m0 = 0; m0 < p.M; m0 += kReductionChunk) {
      const int64_t m1 = min_of(p.M, m0 + kReductionChunk);
      for (int64_t j = run; j < run_end; ++j)
        weight_grad_block<V, BS, CONV>(p, r, p.index.col_idx[j], m0, m1, p.out + j * BS * BS, a_rows);
    }
    run = run_end;
  }
}

template <class V, int BS>
void block_scores_tasks(const WeightGradArgs<typename V::T>& p, int64_t task_begin, int64_t task_end,
                        void* scratch) {
  using T = typename V::T;
  const int64_t C = p.index.n_block_cols;
  T* tiles = static_cast<T*>(scratch);
  const T** a_rows = reinterpret_cast<const T**>(tiles + kScoreRun * BS * BS);
  for (int64_t run = task_begin; run < task_end;) {
    const int64_t r = run / C;
    const int64_t run_end = min_of(min_of(task_end, (r + 1) * C), run + kScoreRun);
    for (int64_t e = 0; e < (run_end - run) * BS * BS; ++e) tiles[e] = T(0);
    for (int64_t m0 = 0; m0 < p.M; m0 += kReductionChunk) {
      const int64_t m1 = min_of(p.M, m0 + kReductionChunk);
      for (int64_t j = run; j < run_end; ++j)
        weight_grad_block<V, BS, false>(p, r, j - r * C, m0, m1, tiles + (j - run) * BS * BS, a_rows);
    }
    for (int64_t j = run; j < run_end; ++j) {
      const T* tile = tiles + (j - run) * BS * BS;
      double sum = 0.0;  // fixed order, in double: the norm of a block is a sum of BS*BS squares
      for (int64_t e = 0; e < BS * BS; ++e) sum += static_cast<double>(tile[e]) * static_cast<double>(tile[e]);
      p.scores[j] = static_cast<T>(__builtin_sqrt(sum));
    }
    run = run_end;
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points: block size and addressing picked once per task range.

template <class V>
struct Entry {
  using T = typename V::T;

  static void forward(const ForwardArgs<T>& p, int64_t begin, int64_t end, void* scratch) {
    const bool conv = p.geometry.is_conv;
    switch (p.bs) {
      case 16: return conv ? forward_tasks<V, 16, true>(p, begin, end, scratch) : forward_tasks<V, 16, false>(p, begin, end, scratch);
      case 32: return conv ? forward_tasks<V, 32, true>(p, begin, end, scratch) : forward_tasks<V, 32, false>(p, begin, end, scratch);
      case 64: return conv ? forward_tasks<V, 64, true>(p, begin, end, scratch) : forward_tasks<V, 64, false>(p, begin, end, scratch);
      case 128: return conv ? forward_tasks<V, 128, true>(p, begin, end, scratch) : forward_tasks<V, 128, false>(p, begin, end, scratch);
    }
  }

  static void backward_input(const BackwardInputArgs<T>& p, int64_t begin, int64_t end, void*) {
    const bool conv = p.geometry.is_conv;
    switch (p.bs) {
      case 16: return conv ? backward_input_conv_tasks<V, 16>(p, begin, end) : backward_input_linear_tasks<V, 16>(p, begin, end);
      case 32: return conv ? backward_input_conv_tasks<V, 32>(p, begin, end) : backward_input_linear_tasks<V, 32>(p, begin, end);
      case 64: return conv ? backward_input_conv_tasks<V, 64>(p, begin, end) : backward_input_linear_tasks<V, 64>(p, begin, end);
      case 128: return conv ? backward_input_conv_tasks<V, 128>(p, begin, end) : backward_input_linear_tasks<V, 128>(p, begin, end);
    }
  }

  static void sddmm(const WeightGradArgs<T>& p, int64_t begin, int64_t end, void* scratch) {
    const bool conv = p.geometry.is_conv;
    switch (p.bs) {
      case 16: return conv ? sddmm_tasks<V, 16, true>(p, begin, end, scratch) : sddmm_tasks<V, 16, false>(p, begin, end, scratch);
      case 32: return conv ? sddmm_tasks<V, 32, true>(p, begin, end, scratch) : sddmm_tasks<V, 32, false>(p, begin, end, scratch);
      case 64: return conv ? sddmm_tasks<V, 64, true>(p, begin, end, scratch) : sddmm_tasks<V, 64, false>(p, begin, end, scratch);
      case 128: return conv ? sddmm_tasks<V, 128, true>(p, begin, end, scratch) : sddmm_tasks<V, 128, false>(p, begin, end, scratch);
    }
  }

  static void block_scores(const WeightGradArgs<T>& p, int64_t begin, int64_t end, void* scratch) {
    switch (p.bs) {
      case 16: return block_scores_tasks<V, 16>(p, begin, end, scratch);
      case 32: return block_scores_tasks<V, 32>(p, begin, end, scratch);
      case 64: return block_scores_tasks<V, 64>(p, begin, end, scratch);
      case 128: return block_scores_tasks<V, 128>(p, begin, end, scratch);
    }
  }

  static KernelTable<T> table(const char* isa) { return {isa, &forward, &backward_input, &sddmm, &block_scores}; }
};

#undef SK_INLINE
