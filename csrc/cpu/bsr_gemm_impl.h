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
// For lambdas that touch the accumulators: one GCC leaves out of line keeps them in memory (measured 2.6x slower).
#define SK_INLINE_LAMBDA __attribute__((always_inline))

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

// Call f(std::integral_constant<int, BS>) for a full block, else f(depth): a full block's loop then has a constant
// trip count, unrolled, whose exit is predicted (measured 3-4% on the 2048^3 forward at 90% sparsity, blocks of 32).
template <int BS, class F>
SK_INLINE void with_depth(int depth, F&& f) {
  if (depth == BS)
    f(std::integral_constant<int, BS>{});
  else
    f(depth);
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

  // Row i of A at a[i] (conv dgrad: rows gathered from anywhere, or a row of zeros). `depth`: an int, or a
  // std::integral_constant for a loop of constant trip count (with_depth).
  template <class Depth>
  SK_INLINE void update(const T* const* a, Depth depth, const T* b, int64_t ldb) {
    const T* a_row[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) a_row[i] = a[i];
    update_rows([&](int i, int64_t t) { return a_row[i][t]; }, depth, b, ldb);
  }

  // Row i of A at a + i * LDA (a panel): one base register and constant offsets for the broadcasts.
  template <int LDA, class Depth>
  SK_INLINE void update_panel(const T* a, Depth depth, const T* b, int64_t ldb) {
    update_rows([&](int i, int64_t t) { return a[t + i * LDA]; }, depth, b, ldb);
  }

  // Row i of A at a + i * lda (a matrix read in place).
  template <class Depth>
  SK_INLINE void update_strided(const T* a, int64_t lda, Depth depth, const T* b, int64_t ldb) {
    update_rows([&](int i, int64_t t) { return a[t + i * lda]; }, depth, b, ldb);
  }

  template <class A, class Depth>
  SK_INLINE void update_rows(A&& a_at, Depth depth, const T* b, int64_t ldb) {
    const auto step = [&](int64_t t) SK_INLINE_LAMBDA {  // 64-bit t: no sign extension in the address arithmetic
      R b_vec[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) b_vec[v] = V::load(b + t * ldb + v * V::W);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const R a_val = V::set1(a_at(i, t));
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = V::fmadd(a_val, b_vec[v], acc[i][v]);
      }
    };
    if constexpr (std::is_same_v<Depth, int>) {
      for (int64_t t = 0; t < depth; ++t) step(t);
    } else {
      static_assert(Depth::value % 8 == 0);
      for (int64_t t = 0; t < Depth::value; t += 8) unrolled(step, t, std::make_integer_sequence<int, 8>{});
    }
  }

  template <class Step, int... I>
  SK_INLINE static void unrolled(const Step& step, int64_t t, std::integer_sequence<int, I...>) {
    (step(t + I), ...);
  }

  SK_INLINE static void prefetch_c(T* c, int64_t ldc, int cols) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) prefetch_row(c + i * ldc, cols, true);
  }

  // Rows i of C at c + i * ldc; `cols` valid columns of the strip; bias (strip-aligned) or nullptr.
  SK_INLINE void store(T* c, int64_t ldc, int cols, const T* bias, bool stream = false) const {
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
        if (full && stream)
          V::stream(c + i * ldc + v * V::W, out);
        else if (full)
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
// Panels. A task copies the m-chunk of the dense operand it multiplies (X, dY, or the implicit im2col
// of an image), the block-columns it needs, into [column block][row][BS], zero past K, and reads it from
// there: the rows of a micro-tile are then BS elements apart instead of a whole row. Whole rows apart (8 KB
// for K = 2048) they all fall into one L1 set, evict each other and the B panel, and defeat the hardware
// prefetcher. The forward and the linear dX still read a plain matrix in place when its blocks are 32 wide or
// more (reads_operand_in_place: there the copy measured dearer than the conflicts).

template <class V, int BS, bool CONV>
struct Panels {
  using T = typename V::T;
  const T* a;         // the operand: [M, width] or, for a convolution, the NHWC image
  const Im2col* geometry;
  int64_t width;      // K of the operand
  int64_t columns;    // column blocks of the operand
  int64_t capacity;   // rows of a panel
  int64_t stride;     // elements from one column block's panel to the next
  T* data;            // [columns][stride], each column block [capacity][BS]
  uint8_t* wanted;    // per column block: whether load() packs it
  BlockRef* refs;     // the wanted column blocks, ascending
  int64_t n_wanted;

  // Carves the panels out of `scratch` (panel_bytes(columns, rows, ...) of it); returns the bytes after them.
  char* init(char* scratch, const T* operand, const Im2col& g, int64_t operand_width, int64_t n_columns,
             int64_t rows) {
    a = operand;
    geometry = &g;
    width = operand_width;
    columns = n_columns;
    capacity = rows;
    // One cache line more than the panel: panels a multiple of 4 KB apart would share L1 sets.
    stride = capacity * BS + 64 / static_cast<int64_t>(sizeof(T));
    refs = reinterpret_cast<BlockRef*>(align64(scratch));
    wanted = reinterpret_cast<uint8_t*>(refs + columns);
    data = reinterpret_cast<T*>(align64(reinterpret_cast<char*>(wanted + columns)));
    clear();
    return align64(reinterpret_cast<char*>(data + columns * stride));
  }

  void clear() {
    for (int64_t c = 0; c < columns; ++c) wanted[c] = 0;
  }
  void want(int64_t c) { wanted[c] = 1; }

  // Packs the wanted column blocks of rows [m_begin, m_end), row by row: each source row is read front to
  // back once, a stream the hardware prefetcher follows (column by column it would not: rows are pages apart).
  void load(int64_t m_begin, int64_t m_end) {
    const Im2col& g = *geometry;
    n_wanted = 0;
    for (int64_t c = 0; c < columns; ++c)
      if (wanted[c]) refs[n_wanted++] = block_ref(g, c, BS, width);
    if (CONV && g.channels % BS != 0) return load_any_channels(m_begin, m_end);
    for (int64_t m = m_begin; m < m_end; ++m) {
      ConvRow row{};
      if constexpr (CONV) row = conv_row(g, m);
      T* dst_row = data + (m - m_begin) * BS;
      for (int64_t w = 0; w < n_wanted; ++w) {
        const BlockRef& ref = refs[w];
        const T* src = operand_row<CONV>(a, g, width, m, row, ref);
        T* dst = dst_row + (ref.col / BS) * stride;
#pragma GCC unroll 8
        for (int e = 0; e < BS; e += V::W) {
          const int n = ref.depth - e;
          V::store(dst + e, n >= V::W ? V::load(src + e) : n > 0 ? V::load_partial(src + e, n) : V::zero());
        }
      }
    }
  }

  // A convolution whose channels are not a multiple of BS: a column block may span two filter taps, so
  // every element is located on its own (block_grad_scores only; the GEMMs need whole-tap blocks).
  void load_any_channels(int64_t m_begin, int64_t m_end) {
    const Im2col& g = *geometry;
    for (int64_t m = m_begin; m < m_end; ++m) {
      const ConvRow row = conv_row(g, m);
      for (int64_t w = 0; w < n_wanted; ++w) {
        T* dst = data + (refs[w].col / BS) * stride + (m - m_begin) * BS;
        for (int e = 0; e < BS; ++e) {
          const int64_t k = refs[w].col + e;
          const int64_t tap = k / g.channels;
          const int64_t ih = row.ih0 + (tap / g.kernel_w) * g.dilation_h;
          const int64_t iw = row.iw0 + (tap % g.kernel_w) * g.dilation_w;
          const bool inside = e < refs[w].depth && ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
          dst[e] = inside ? a[row.image + (ih * g.width + iw) * g.channels + k - tap * g.channels] : T(0);
        }
      }
    }
  }

  // Column block c (wanted, loaded): [rows][BS].
  SK_INLINE const T* column(int64_t c) const { return data + c * stride; }

  static char* align64(char* p) {
    return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
  }
};

// ---------------------------------------------------------------------------------------------
// Forward and linear input gradient: one GEMM walker over the block-lines of W.
//   forward: Y[m, r-block] = Σ over block-row r's blocks (CSR) of A[m, c-block] · W_blockᵀ (+ bias), with
//            the blocks transposed (k-major) beforehand (transpose_blocks_tasks), so that the inner loop is a
//            broadcast of A times contiguous output-width vectors of Wᵀ;
//   dX:      dX[m, c-block] = Σ over block-column c's blocks (CSC) of dY[m, r-block] · W_block; W_block's
//            rows are contiguous along k, so it is used as stored.

template <class V, int BS>
void transpose_blocks_tasks(const TransposeArgs<typename V::T>& p, int64_t task_begin, int64_t task_end) {
  // In V::kTransposeTile square tiles, transposed in registers.
  constexpr int TB = V::kTransposeTile;
  for (int64_t j = task_begin; j < task_end; ++j) {
    const typename V::T* block = p.values + j * BS * BS;
    typename V::T* out = p.out + j * BS * BS;
    for (int n0 = 0; n0 < BS; n0 += TB)
      for (int k0 = 0; k0 < BS; k0 += TB) V::transpose_tile(block + n0 * BS + k0, BS, out + k0 * BS + n0, BS);
  }
}

template <typename T>
struct GemmWalk {
  const T* a;              // the dense operand (X, or dY)
  const Im2col* geometry;  // its addressing
  int64_t a_width;         // K of the operand
  const int32_t* line_ptr;    // row_ptr (forward) or col_ptr (dX)
  const int32_t* line_index;  // col_idx (forward) or row_idx (dX): the operand's column block
  const int32_t* perm;        // nullptr (forward: blocks in CSR order) or CSC -> CSR
  int64_t lines;              // block-lines of W walked: R (forward) or C (dX)
  int64_t panel_columns;      // column blocks of the operand
  const T* values;        // [nnz, BS, BS]: the forward's transposed blocks, or W's
  const T* bias;          // [out width] or nullptr
  T* out;                 // [M, out_width]
  int64_t out_width;
  int64_t M, m_chunk, groups;
};

// Block j's operand columns for the tile's rows: row i at slices[j] + (local_m + i) * lda, with lda = BS in
// panels or the operand's width when it is read in place.
template <class V, int BS, int MR, bool IN_PLACE>
SK_INLINE void gemm_tile(const GemmWalk<typename V::T>& w, int64_t m0, int64_t local_m, int64_t line,
                         const typename V::T* const* slices, const int* depths, const typename V::T* const* blocks,
                         int n_blocks) {
  using T = typename V::T;
  using S = TileShape<V, BS>;
  const int64_t lda = IN_PLACE ? w.a_width : BS;
  for (int s = 0; s < S::STRIPS; ++s) {
    const int64_t col0 = line * BS + s * S::STRIP;
    if (col0 >= w.out_width) break;
    const int cols = static_cast<int>(min_of<int64_t>(S::STRIP, w.out_width - col0));
    RowTile<V, MR, S::NV> tile;
    tile.clear();
    for (int j = 0; j < n_blocks; ++j) {
      // The next block's slice while this one is multiplied: its MR rows are short streams (BS elements
      // each) that the hardware prefetcher does not pick up in time.
      const T* next = j + 1 < n_blocks ? slices[j + 1] + local_m * lda : slices[0] + (local_m + MR) * lda;
      const T* b = blocks[j] + s * S::STRIP;
      if constexpr (IN_PLACE) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) prefetch_row(next + i * lda, BS, false);
        const T* a = slices[j] + local_m * lda;
        with_depth<BS>(depths[j], [&](auto depth) SK_INLINE_LAMBDA { tile.update_strided(a, lda, depth, b, BS); });
      } else {
        prefetch_row(next, MR * BS, false);
        const T* a = slices[j] + local_m * BS;
        with_depth<BS>(depths[j], [&](auto depth) SK_INLINE_LAMBDA { tile.template update_panel<BS>(a, depth, b, BS); });
      }
    }
    T* out = w.out + m0 * w.out_width + col0;
    const bool aligned = (reinterpret_cast<uintptr_t>(out) | (w.out_width * sizeof(T))) % 64 == 0;
    tile.store(out, w.out_width, cols, w.bias != nullptr ? w.bias + col0 : nullptr, aligned);
  }
}

template <class V, int BS, bool CONV>
void gemm_tasks(const GemmWalk<typename V::T>& w, int64_t task_begin, int64_t task_end, void* scratch) {
  using T = typename V::T;
  using S = TileShape<V, BS>;
  int64_t max_blocks = 0;
  for (int64_t l = 0; l < w.lines; ++l) {
    const int64_t blocks = w.line_ptr[l + 1] - w.line_ptr[l];
    max_blocks = blocks > max_blocks ? blocks : max_blocks;
  }
  constexpr bool kInPlace = reads_operand_in_place(CONV, BS);
  Panels<V, BS, CONV> panels;
  char* rest = static_cast<char*>(scratch);
  if constexpr (!kInPlace) rest = panels.init(rest, w.a, *w.geometry, w.a_width, w.panel_columns, w.m_chunk);
  const T** slice_of = reinterpret_cast<const T**>(rest);
  const T** block_of = slice_of + max_blocks;
  int* depth_of = reinterpret_cast<int*>(block_of + max_blocks);
  const int64_t lines_per_group = (w.lines + w.groups - 1) / w.groups;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t chunk = task / w.groups;
    const int64_t group = task - chunk * w.groups;
    const int64_t m_begin = chunk * w.m_chunk;
    const int64_t m_end = min_of(w.M, m_begin + w.m_chunk);
    const int64_t line_begin = min_of(w.lines, group * lines_per_group);  // the last groups may be empty
    const int64_t line_end = min_of(w.lines, line_begin + lines_per_group);
    if constexpr (!kInPlace) {
      panels.clear();
      for (int64_t q = w.line_ptr[line_begin]; q < w.line_ptr[line_end]; ++q) panels.want(w.line_index[q]);
      panels.load(m_begin, m_end);
    }
    for (int64_t line = line_begin; line < line_end; ++line) {
      const int64_t first = w.line_ptr[line];
      const int n_blocks = static_cast<int>(w.line_ptr[line + 1] - first);
      for (int j = 0; j < n_blocks; ++j) {
        const int64_t column = w.line_index[first + j];
        const int64_t stored = w.perm != nullptr ? w.perm[first + j] : first + j;
        block_of[j] = w.values + stored * BS * BS;
        slice_of[j] = kInPlace ? w.a + m_begin * w.a_width + column * BS : panels.column(column);
        depth_of[j] = static_cast<int>(min_of<int64_t>(BS, w.a_width - column * BS));
      }
      for (int64_t m0 = m_begin; m0 < m_end; m0 += S::MR) {
        with_rows<S::MR>(static_cast<int>(min_of<int64_t>(S::MR, m_end - m0)), [&](auto rows) {
          gemm_tile<V, BS, decltype(rows)::value, kInPlace>(w, m0, m0 - m_begin, line, slice_of, depth_of, block_of,
                                                            n_blocks);
        });
      }
    }
  }
  V::stream_fence();  // streaming stores are weakly ordered: drain them before the task ends
}

template <class V, int BS, bool CONV>
void forward_tasks(const ForwardArgs<typename V::T>& p, int64_t task_begin, int64_t task_end, void* scratch) {
  const GemmWalk<typename V::T> walk{p.x, &p.geometry, p.K, p.index.row_ptr, p.index.col_idx, nullptr,
                                     p.index.n_block_rows, p.index.n_block_cols, p.values_t, p.bias, p.y, p.N,
                                     p.M, p.m_chunk, p.groups};
  gemm_tasks<V, BS, CONV>(walk, task_begin, task_end, scratch);
}

template <class V, int BS>
void backward_input_linear_tasks(const BackwardInputArgs<typename V::T>& p, int64_t task_begin, int64_t task_end,
                                 void* scratch) {
  const Im2col plain{false, p.M, 1, 1, p.N, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1};
  const GemmWalk<typename V::T> walk{p.dy, &plain, p.N, p.index.col_ptr, p.index.row_idx, p.index.perm,
                                     p.index.n_block_cols, p.index.n_block_rows, p.values, nullptr, p.dx, p.K,
                                     p.M, p.m_chunk, p.groups};
  gemm_tasks<V, BS, false>(walk, task_begin, task_end, scratch);
}

// ---------------------------------------------------------------------------------------------
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
          const T* b = p.values + static_cast<int64_t>(p.index.perm[q]) * BS * BS + s * S::STRIP;
          with_depth<BS>(static_cast<int>(min_of<int64_t>(BS, p.N - r * BS)),
                         [&](auto depth) SK_INLINE_LAMBDA { tile.update(a, depth, b, BS); });
        }
      }
    }
    const int64_t iw = pw + i0 * geo.stride_w;
    T* out = p.dx + ((b * geo.height + ih) * geo.width + iw) * geo.channels + g * BS + s * S::STRIP;
    const int64_t ldc = geo.stride_w * geo.channels;
    tile.store(out, ldc, S::STRIP, nullptr, (reinterpret_cast<uintptr_t>(out) | (ldc * sizeof(T))) % 64 == 0);
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
  }  V::stream_fence();
}

// ---------------------------------------------------------------------------------------------
// Weight gradient: C[n, k] += Σ_m dY[m, r*BS + n] · A[m, c*BS + k] for one block. The reduction over
// M is long and the block small, so C lives in memory (L1/L2) and is updated by MR x strip register
// tiles, one m-chunk at a time, from the chunk's panels of dY and of A.

template <class V, int MR, int NV, bool PARTIAL>
SK_INLINE void weight_grad_tile(typename V::T* c, int64_t ldc, const typename V::T* dy, const typename V::T* a,
                                int64_t ld, int64_t count, int cols) {
  using R = typename V::reg;
  R acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = V::load(c + i * ldc + v * V::W);
  for (int64_t m = 0; m < count; ++m) {
    R a_vec[NV];
    const typename V::T* a_m = a + m * ld;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      a_vec[v] = PARTIAL ? V::load_partial(a_m + v * V::W, cols - v * V::W) : V::load(a_m + v * V::W);
    const typename V::T* d = dy + m * ld;
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

// Adds `count` rows of the product of two panel columns (dY's block-row r, A's block-column c) into out
// (BS x BS, row-major). Rows of the block past N and columns past K are left alone (the caller zeroed them).
template <class V, int BS>
SK_INLINE void weight_grad_block(const typename V::T* dy_panel, const typename V::T* a_panel, int64_t count,
                                 int n_valid, int depth, typename V::T* out) {
  using S = TileShape<V, BS>;
  for (int s = 0; s < S::STRIPS; ++s) {
    const int cols = min_of(S::STRIP, depth - s * S::STRIP);
    if (cols <= 0) break;
    for (int n0 = 0; n0 < n_valid; n0 += S::MR) {
      with_rows<S::MR>(min_of(S::MR, n_valid - n0), [&](auto rows) {
        constexpr int MR = decltype(rows)::value;
        auto* c_tile = out + n0 * BS + s * S::STRIP;
        if (cols == S::STRIP)
          weight_grad_tile<V, MR, S::NV, false>(c_tile, BS, dy_panel + n0, a_panel + s * S::STRIP, BS, count, cols);
        else
          weight_grad_tile<V, MR, S::NV, true>(c_tile, BS, dy_panel + n0, a_panel + s * S::STRIP, BS, count, cols);
      });
    }
  }
}

// The panels of dY (over block-rows) and of A (over block-columns) of one reduction.
template <class V, int BS, bool CONV>
struct WeightGradPanels {
  Im2col plain;
  Panels<V, BS, false> dy;
  Panels<V, BS, CONV> a;

  char* init(const WeightGradArgs<typename V::T>& p, void* scratch) {
    plain = Im2col{false, p.M, 1, 1, p.N, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1};
    char* rest = dy.init(static_cast<char*>(scratch), p.dy, plain, p.N, p.index.n_block_rows, p.m_chunk);
    return a.init(rest, p.x, p.geometry, p.K, p.index.n_block_cols, p.m_chunk);
  }

  void load(const WeightGradArgs<typename V::T>& p, int64_t chunk) {
    const int64_t m_begin = chunk * p.m_chunk;
    const int64_t m_end = min_of(p.M, m_begin + p.m_chunk);
    dy.load(m_begin, m_end);
    a.load(m_begin, m_end);
  }

  // Adds the loaded chunk's rows of block (r, c) into out.
  SK_INLINE void accumulate(const WeightGradArgs<typename V::T>& p, int64_t chunk, int64_t r, int64_t c,
                            typename V::T* out) const {
    const int64_t m_begin = chunk * p.m_chunk;
    const int64_t m_end = min_of(p.M, m_begin + p.m_chunk);
    weight_grad_block<V, BS>(dy.column(r), a.column(c), m_end - m_begin,
                             static_cast<int>(min_of<int64_t>(BS, p.N - r * BS)),
                             static_cast<int>(min_of<int64_t>(BS, p.K - c * BS)), out);
  }
};

template <class V, int BS, bool CONV>
void sddmm_tasks(const WeightGradArgs<typename V::T>& p, int64_t task_begin, int64_t task_end, void* scratch) {
  using T = typename V::T;
  for (int64_t e = task_begin * BS * BS; e < task_end * BS * BS; ++e) p.out[e] = T(0);
  WeightGradPanels<V, BS, CONV> panels;
  panels.init(p, scratch);
  // Chunk-outer: a chunk's panels serve every block of the task range before the next chunk is packed.
  for (int64_t j = task_begin; j < task_end; ++j) {
    panels.dy.want(p.index.coo_row[j]);
    panels.a.want(p.index.col_idx[j]);
  }
  const int64_t chunks = (p.M + p.m_chunk - 1) / p.m_chunk;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    panels.load(p, chunk);
    for (int64_t j = task_begin; j < task_end; ++j)
      panels.accumulate(p, chunk, p.index.coo_row[j], p.index.col_idx[j], p.out + j * BS * BS);
  }
}

// Tasks are groups of p.group_rows block-rows; their tiles live in the scratch until reduced to norms.
template <class V, int BS, bool CONV>
void block_scores_tasks(const WeightGradArgs<typename V::T>& p, int64_t task_begin, int64_t task_end,
                        void* scratch) {
  using T = typename V::T;
  const int64_t R = p.index.n_block_rows, C = p.index.n_block_cols;
  WeightGradPanels<V, BS, CONV> panels;
  T* tiles = reinterpret_cast<T*>(panels.init(p, scratch));
  const int64_t chunks = (p.M + p.m_chunk - 1) / p.m_chunk;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t r_begin = task * p.group_rows;
    const int64_t r_end = min_of(R, r_begin + p.group_rows);
    const int64_t n_tiles = (r_end - r_begin) * C;
    for (int64_t e = 0; e < n_tiles * BS * BS; ++e) tiles[e] = T(0);
    panels.dy.clear();
    for (int64_t r = r_begin; r < r_end; ++r) panels.dy.want(r);
    for (int64_t c = 0; c < C; ++c) panels.a.want(c);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      panels.load(p, chunk);
      for (int64_t t = 0; t < n_tiles; ++t) panels.accumulate(p, chunk, r_begin + t / C, t % C, tiles + t * BS * BS);
    }
    for (int64_t t = 0; t < n_tiles; ++t) {
      const T* tile = tiles + t * BS * BS;
      double sum = 0.0;  // fixed order, in double: the norm of a block is a sum of BS*BS squares
      for (int64_t e = 0; e < BS * BS; ++e) sum += static_cast<double>(tile[e]) * static_cast<double>(tile[e]);
      p.scores[r_begin * C + t] = static_cast<T>(__builtin_sqrt(sum));
    }
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

  static void backward_input(const BackwardInputArgs<T>& p, int64_t begin, int64_t end, void* scratch) {
    const bool conv = p.geometry.is_conv;
    switch (p.bs) {
      case 16: return conv ? backward_input_conv_tasks<V, 16>(p, begin, end) : backward_input_linear_tasks<V, 16>(p, begin, end, scratch);
      case 32: return conv ? backward_input_conv_tasks<V, 32>(p, begin, end) : backward_input_linear_tasks<V, 32>(p, begin, end, scratch);
      case 64: return conv ? backward_input_conv_tasks<V, 64>(p, begin, end) : backward_input_linear_tasks<V, 64>(p, begin, end, scratch);
      case 128: return conv ? backward_input_conv_tasks<V, 128>(p, begin, end) : backward_input_linear_tasks<V, 128>(p, begin, end, scratch);
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
    const bool conv = p.geometry.is_conv;
    switch (p.bs) {
      case 16: return conv ? block_scores_tasks<V, 16, true>(p, begin, end, scratch) : block_scores_tasks<V, 16, false>(p, begin, end, scratch);
      case 32: return conv ? block_scores_tasks<V, 32, true>(p, begin, end, scratch) : block_scores_tasks<V, 32, false>(p, begin, end, scratch);
      case 64: return conv ? block_scores_tasks<V, 64, true>(p, begin, end, scratch) : block_scores_tasks<V, 64, false>(p, begin, end, scratch);
      case 128: return conv ? block_scores_tasks<V, 128, true>(p, begin, end, scratch) : block_scores_tasks<V, 128, false>(p, begin, end, scratch);
    }
  }

  static void transpose_blocks(const TransposeArgs<T>& p, int64_t begin, int64_t end, void*) {
    switch (p.bs) {
      case 16: return transpose_blocks_tasks<V, 16>(p, begin, end);
      case 32: return transpose_blocks_tasks<V, 32>(p, begin, end);
      case 64: return transpose_blocks_tasks<V, 64>(p, begin, end);
      case 128: return transpose_blocks_tasks<V, 128>(p, begin, end);
    }
  }

  static KernelTable<T> table(const char* isa) {
    return {isa, &transpose_blocks, &forward, &backward_input, &sddmm, &block_scores};
  }
};

#undef SK_INLINE
