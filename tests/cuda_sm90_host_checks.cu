// Host-side checks of the Hopper GEMMs' tiles (csrc/cuda/bsr_gemm_sm90.cu on sm90_mainloop.cuh), compiled and run
// by tests/test_cuda_static.py. The kernels need an H100 to run, but where their TMA copies put each tile in shared
// memory, where their wgmmas read it and which accumulator holds which output are all CuTe layouts and descriptor
// fields that the host can evaluate. This file includes the kernel file, runs its launchers up to the launch (their
// tensors, TMA atoms and grid, as in the build) and checks:
//   1. the producer's TMA copies, for every CTA and step of a few problems (M not a multiple of the tile, padded rows,
//      random block layouts): each box emulated as the hardware writes it into a host image of the CTA's shared
//      memory, then every element of the stage's A and B tiles, read through the kernels' smem layouts, compared
//      with the matrix element the step needs (zero past M), and the bytes written compared with the pipeline's
//      transaction bytes. bsr_linear and bsr_linear_dx at fp16 bs 64 and bf16 bs 128; bsr_sddmm (one split and
//      several) and block_grad_scores at the same two;
//   2. the epilogue's pairing: each consumer thread's accumulators i and i + 1 (i even) are columns c and c + 1 of one
//      row, c even (its 4-byte stores), and the 256 consumer threads cover the output tile once;
//   3. what the wgmmas read: for every instruction of every stage, each operand element's shared-memory address as
//      the PTX ISA's matrix descriptor defines it (start address, leading/stride byte offsets, swizzle) holds the
//      element that the tiled MMA assigns to it.
// Prints "ok ..." and exits 0, else the first failures and exits 1.
//
// Emulated rather than run: cuTensorMapEncodeTiled (the stub in sm90_host_emulation.h keeps its arguments; CuTe calls it directly with
// CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL, where the build looks it up through the runtime), the TMA and wgmma
// address arithmetic, and the producer's loop, restated from the kernels' make_loader (device code); CuTe's layout
// helpers that are declared device-only (tma_partition) are made callable here by defining CUTE_DEVICE as
// host-and-device before CuTe is included.
#include "sm90_host_emulation.h"  // first: the cuTensorMapEncodeTiled stub, CUTE_DEVICE, the TMA box emulation

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <any>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/bsr_gemm_sm90.cu"

namespace sparsekern {
namespace cuda {

// The split SDDMM's second pass (bsr_gemm_wgrad.cu, not built here), which launch_sddmm runs after its kernel.
LaunchStatus sum_sddmm_partials(const SddmmArgs&, cudaStream_t) { return {}; }

namespace {  // the kernel file's anonymous namespace (one per translation unit): its launchers, and sm90's names

int failures = 0;

__attribute__((format(printf, 1, 2))) void fail(const char* format, ...) {
  if (failures++ >= 20) return;  // the first ones tell
  va_list args;
  va_start(args, format);
  std::vprintf(format, args);
  va_end(args);
  std::printf("\n");
}

struct Counts {
  long boxes = 0, elements = 0, ctas = 0, pairs = 0, wgmma_reads = 0;
} counts;

// ---------------------------------------------------------------------------------------------
// The launchers, run up to the launch

// What a launcher would have launched.
struct Launched {
  std::any params;
  dim3 grid;
};
Launched launched;

// The launchers call launch(kernel, grid, smem_bytes, stream, params) with a LinearParams, SddmmParams or
// ScoresParams: this overload is more specialised than sm90::launch, and argument-dependent lookup finds it (in the
// parameters' namespace) where the launchers are instantiated below, so it takes their launches.
template <class Kernel, template <typename, class, class> class Params, typename T, class TmaA, class TmaB>
LaunchStatus launch(Kernel, dim3 grid, int smem_bytes, cudaStream_t, const Params<T, TmaA, TmaB>& p) {
  launched = Launched{p, grid};
  return LaunchStatus{cudaSuccess, true, grid, dim3(kThreads), smem_bytes};
}

// The parameter types the launchers build, spelled out to read Launched::params (an any_cast to another type fails).
template <typename T, class Shape, class Stride>
using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const T*>(nullptr)), Shape{}, Stride{}));
template <class GTensor, class SmemLayout, class Tile>
using TmaAtom =
    decltype(make_tma_atom(SM90_TMA_LOAD{}, std::declval<const GTensor&>(), SmemLayout{}(_, _, 0), Tile{}));

template <typename T, int BS, bool TRANS, class C = LinearConfig<T, BS, TRANS>>
using LinearParamsOf = LinearParams<
    T, TmaAtom<GmemTensor<T, Shape<int, int>, Stride<int64_t, _1>>, typename C::SmemLayoutA, typename C::ATile>,
    TmaAtom<GmemTensor<T, decltype(values_matrix_shape<BS, TRANS>(0)), decltype(values_matrix_stride<BS, TRANS>())>,
            typename C::SmemLayoutB, typename C::BTile>>;

// dY as (N, M) and X as (K, M), both with a unit stride along the first mode.
template <template <typename, class, class> class Params, typename T, int BS, class C = SddmmConfig<T, BS>>
using WeightGradParamsOf =
    Params<T, TmaAtom<GmemTensor<T, Shape<int, int>, Stride<_1, int64_t>>, typename C::SmemLayoutA, typename C::ATile>,
           TmaAtom<GmemTensor<T, Shape<int, int>, Stride<_1, int64_t>>, typename C::SmemLayoutB, typename C::BTile>>;

// Runs a launcher and returns the parameters and grid it launched with (or fails and returns null).
template <class Params, class Launcher>
const Params* run_launcher(const std::string& what, const Launcher& launcher, dim3& grid) {
  launched = Launched{};
  const LaunchStatus status = launcher();
  const Params* p = std::any_cast<Params>(&launched.params);
  if (!launched.params.has_value() || status.error != cudaSuccess) {
    fail("%s: the launcher launched nothing (error %d)", what.c_str(), static_cast<int>(status.error));
  } else if (p == nullptr) {
    fail("%s: the launcher's parameters are of another type than the *ParamsOf here spell out", what.c_str());
  }
  grid = launched.grid;
  return p;
}

template <typename T>
ElementType element_type() {
  return std::is_same_v<T, cutlass::half_t> ? ElementType::kFloat16 : ElementType::kBFloat16;
}

template <typename T>
CUtensorMapDataType tma_type() {
  return std::is_same_v<T, cutlass::half_t> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

// ---------------------------------------------------------------------------------------------
// The matrices: never allocated, only addressed

// Where the operands are: 2^40 apart, far from any host pointer, so that an element's address / 2 names it.
constexpr uint64_t kA = 1ull << 40, kValues = 2ull << 40, kDy = 3ull << 40, kX = 4ull << 40, kOut = 5ull << 40;
constexpr int64_t kEmpty = -1;  // a shared-memory slot that no copy wrote; 0 is the TMA's zero fill

int64_t element(uint64_t matrix, int64_t offset) { return static_cast<int64_t>(matrix / 2) + offset; }

void* address(uint64_t matrix) { return reinterpret_cast<void*>(matrix); }

std::string describe(int64_t id) {
  if (id == kEmpty) return "nothing";
  if (id == 0) return "zero";
  static const char* const names[] = {"?", "A", "values", "dY", "X", "out"};
  const uint64_t matrix = (static_cast<uint64_t>(id) * 2) >> 40;
  return std::string(names[std::min<uint64_t>(matrix, 5)]) + "[" + std::to_string(id - element(matrix << 40, 0)) +
         "]";
}

// W's stored blocks: about 60% of the grid, at random.
BlockLayout random_layout(int block_rows, int block_cols, std::mt19937& rng) {
  std::bernoulli_distribution stored(0.6);
  return block_layout(block_rows, block_cols, [&](int, int) { return stored(rng); });
}

// ---------------------------------------------------------------------------------------------
// 1. The TMA copies

// One CTA's shared memory: the kernel's SharedStorage on a buffer aligned as the kernel aligns it (CuTe's swizzled
// smem tensors permute their pointer's own address bits, as the hardware does), and beside it what each 2-byte slot
// holds: kEmpty, 0, or the id of the element a copy put there.
template <class C>
struct SharedMemory {
  std::vector<unsigned char> buffer = std::vector<unsigned char>(sizeof(typename C::SharedStorage) + kSmemAlign);
  unsigned char* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(buffer.data()) + kSmemAlign - 1) & ~uintptr_t(kSmemAlign - 1));
  std::vector<int64_t> slots = std::vector<int64_t>(sizeof(typename C::SharedStorage) / 2, kEmpty);
  int64_t bytes_written = 0;

  auto& storage() { return *reinterpret_cast<typename C::SharedStorage*>(base); }
  auto sA() { return make_tensor(make_smem_ptr(storage().a.begin()), typename C::SmemLayoutA{}); }
  auto sB() { return make_tensor(make_smem_ptr(storage().b.begin()), typename C::SmemLayoutB{}); }
  int64_t offset(const void* p) const { return static_cast<const unsigned char*>(p) - base; }
  int64_t* slot(int64_t offset) {
    return offset >= 0 && offset / 2 < static_cast<int64_t>(slots.size()) ? &slots[offset / 2] : nullptr;
  }
  void clear() {
    std::fill(slots.begin(), slots.end(), kEmpty);
    bytes_written = 0;
  }
};

// What the box emulation takes for granted of a descriptor (sm90_host_emulation.h).
void check_descriptor(const std::string& what, const TmaRecord& d, CUtensorMapDataType type) {
  const std::string problem = tma_descriptor_problem(d, type);
  if (!problem.empty()) fail("%s: %s", what.c_str(), problem.c_str());
}

// One TMA box into the CTA's shared memory, emulated as the hardware writes it (sm90_host_emulation.h).
template <class C>
void emulate_box(const std::string& what, const TmaRecord& d, const int32_t* coord, int64_t dst,
                 SharedMemory<C>& smem) {
  int64_t zero_filled = 0;
  const int64_t elements = emulate_tma_box(
      d, coord, dst, kEmpty, [&](int64_t at) { return smem.slot(at); },
      [&](const std::string& problem) { fail("%s: %s", what.c_str(), problem.c_str()); }, &zero_filled);
  if (elements < 0) return;
  smem.bytes_written += elements * 2;
  ++counts.boxes;
}

// cuTensorMapEncodeTiled's arguments of an atom's descriptor.
template <class Atom>
const TmaRecord& record_of(const Atom& atom) {
  return tma_records.at(atom.get_tma_descriptor()->opaque[0]);
}

// cute::copy(tma.with(barrier), src, dst) as it runs on the device: loops over all modes but the first and peels
// nested rank-1 modes until src is one box (copy.hpp, Copy_Atom::call), then issues the box at src's TMA coordinates
// into dst's address (TMA_LOAD_Unpack). Here each box is emulated.
template <class Atom, class Src, class Dst, class C>
void emulate_copy(const std::string& what, const Atom& atom, const Src& src, const Dst& dst, SharedMemory<C>& smem) {
  constexpr int R = decltype(rank(src))::value;
  if constexpr (R > 1) {
    Tensor src_v = group_modes<1, R>(src);
    Tensor dst_v = group_modes<1, R>(dst);
    for (int i = 0; i < size<1>(src_v); ++i) emulate_copy(what, atom, src_v(_, i), dst_v(_, i), smem);
  } else if constexpr (is_constant<Atom::NumValSrc, decltype(size(src))>::value) {
    const TmaRecord& d = record_of(atom);
    int32_t coord[5] = {};
    int n = 0;
    for_each(src.data().coord_, [&](auto c) {
      if (n < 5) coord[n] = static_cast<int32_t>(c);
      ++n;
    });
    if (n != d.rank) fail("%s: %d TMA coordinates for a rank-%d descriptor", what.c_str(), n, d.rank);
    emulate_box(what, d, coord, smem.offset(raw_pointer_cast(dst.data())), smem);
  } else {
    emulate_copy(what, atom, tensor<0>(src), tensor<0>(dst), smem);
  }
}


// Every element (row, column) of a stage's tile against want(row, column).
template <class C, class Tile, class Want>
void check_tile(const std::string& what, const char* name, SharedMemory<C>& smem, const Tile& tile, const Want& want) {
  for (int r = 0; r < size<0>(tile); ++r) {
    for (int c = 0; c < size<1>(tile); ++c) {
      const int64_t* slot = smem.slot(smem.offset(&tile(r, c)));
      const int64_t expected = want(r, c);
      if (slot == nullptr || *slot != expected) {
        fail("%s: %s(%d, %d) holds %s, expected %s", what.c_str(), name, r, c,
             slot == nullptr ? "(outside)" : describe(*slot).c_str(), describe(expected).c_str());
      }
      ++counts.elements;
    }
  }
}

// The producer's loop of run_mainloop over one CTA's steps: load(step, stage) issues a step's copies, into the stage
// after the last; each stage checked once loaded (the other stages emptied: every write must land in this one).
// want_a(step, row, reduction) and want_b(step, column, reduction) are the elements the step's tiles must hold.
template <class C, class Load, class WantA, class WantB>
void run_producer(const std::string& what, SharedMemory<C>& smem, int n_steps, const Load& load, const WantA& want_a,
                  const WantB& want_b) {
  for (int step = 0; step < n_steps; ++step) {
    const int stage = step % C::kStages;
    const std::string at = what + " step " + std::to_string(step) + " stage " + std::to_string(stage);
    smem.clear();
    load(step, stage);
    if (smem.bytes_written != C::kStageBytes) {
      fail("%s: the copies wrote %lld bytes, the pipeline waits for %d", at.c_str(),
           static_cast<long long>(smem.bytes_written), C::kStageBytes);
    }
    check_tile(at, "sA", smem, smem.sA()(_, _, stage), [&](int r, int k) { return want_a(step, r, k); });
    check_tile(at, "sB", smem, smem.sB()(_, _, stage), [&](int n, int k) { return want_b(step, n, k); });
  }
}

// bsr_linear (out = A Wᵀ, lines = block-rows of W) or bsr_linear_dx (out = A W, lines = block-columns) on an
// [M, a_cols] A with `pad` elements of padding per row.
template <typename T, int BS, bool TRANS>
void check_linear(const char* type, int M, int block_rows, int block_cols, int pad, unsigned seed) {
  using C = LinearConfig<T, BS, TRANS>;
  std::mt19937 rng(seed);
  const BlockLayout w = random_layout(block_rows, block_cols, rng);
  const int64_t a_cols = int64_t{TRANS ? block_rows : block_cols} * BS;
  const int64_t out_cols = int64_t{TRANS ? block_cols : block_rows} * BS;
  const int64_t lda = a_cols + pad;
  const std::vector<int32_t>& line_ptr = TRANS ? w.col_ptr : w.row_ptr;
  const BsrGemmArgs args{element_type<T>(), BS, TRANS, address(kA), lda, address(kValues), nullptr, address(kOut),
                         line_ptr.data(), (TRANS ? w.row_idx : w.col_idx).data(), w.perm.data(), M, a_cols,
                         out_cols, static_cast<int64_t>(line_ptr.size()) - 1, w.nnz(), nullptr};
  const std::string what = std::string(TRANS ? "bsr_linear_dx " : "bsr_linear ") + type + " bs " +
                           std::to_string(BS) + " M " + std::to_string(M);
  if (!bsr_gemm_sm90_takes(args)) return fail("%s: bsr_gemm_sm90_takes refuses it", what.c_str());
  dim3 grid;
  const auto* p = run_launcher<LinearParamsOf<T, BS, TRANS>>(
      what, [&] { return launch_linear<T, BS, TRANS>(args, nullptr); }, grid);
  if (p == nullptr) return;
  check_descriptor(what + " A", record_of(p->tma_a), tma_type<T>());
  check_descriptor(what + " values", record_of(p->tma_b), tma_type<T>());

  SharedMemory<C> smem;
  for (unsigned cta = 0; cta < grid.x; ++cta) {
    // bsr_gemm_sm90_kernel and its make_loader
    const int line = static_cast<int>(cta % p->n_lines);
    const int m_tile = static_cast<int>(cta / p->n_lines);
    const int first = p->line_ptr[line];
    const int n_blocks = p->line_ptr[line + 1] - first;
    Tensor gA = local_tile(p->tma_a.get_tma_tensor(make_shape(p->M, p->a_cols)), typename C::ATile{},
                           make_coord(m_tile, _));
    Tensor gB = block_tiles<BS, TRANS>(p->tma_b.get_tma_tensor(values_matrix_shape<BS, TRANS>(p->nnz)));
    auto a_parts = tma_partition(p->tma_a, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(smem.sA()),
                                         group_modes<0, 2>(gA));
    auto b_parts = tma_partition(p->tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(smem.sB()),
                                         group_modes<0, 2>(gB));
    const std::string at = what + " CTA " + std::to_string(cta);
    const auto load = [&](int step, int stage) {
      const int j = first + step;
      emulate_copy(at, p->tma_a, get<0>(a_parts)(_, p->line_idx[j]), get<1>(a_parts)(_, stage), smem);
      emulate_copy(at, p->tma_b, get<0>(b_parts)(_, TRANS ? p->perm[j] : j), get<1>(b_parts)(_, stage), smem);
    };

    // Step s: the line's s-th block in its storage order (block-CSR forward, CSC for dX); B(n, k) is W at the line's
    // n and the block's k: values[block][n][k] forward, values[block][k][n] for dX; A(m, k) is A's row of the M-tile
    // at the block's k.
    const auto reduction_block = [&](int step) {
      return TRANS ? w.row_idx[w.col_ptr[line] + step] : w.col_idx[w.row_ptr[line] + step];
    };
    const auto want_a = [&](int step, int m, int k) {
      const int64_t row = int64_t{m_tile} * kBM + m;
      return row < M ? element(kA, row * lda + int64_t{reduction_block(step)} * BS + k) : 0;
    };
    const auto want_b = [&](int step, int n, int k) {
      const int64_t block = TRANS ? w.perm[w.col_ptr[line] + step] : w.row_ptr[line] + step;
      return element(kValues, block * BS * BS + (TRANS ? k * BS + n : n * BS + k));
    };
    run_producer(at, smem, n_blocks, load, want_a, want_b);
    ++counts.ctas;
  }
}

// The weight-gradient problems: dY [M, N] and X [M, K] with padded rows, W's blocks.
struct WeightGradProblem {
  std::string what;
  int M, N, K;
  int64_t ld_dy, ld_x;
  BlockLayout w;
  WeightGradOperands operands;
};

template <typename T, int BS>
WeightGradProblem weight_grad_problem(const char* kernel, const char* type, int M, int block_rows, int block_cols,
                                      int pad, unsigned seed) {
  std::mt19937 rng(seed);
  WeightGradProblem q{std::string(kernel) + " " + type + " bs " + std::to_string(BS) + " M " + std::to_string(M),
                      M, block_rows * BS, block_cols * BS, block_rows * BS + pad, block_cols * BS + 2 * pad,
                      random_layout(block_rows, block_cols, rng), {}};
  q.operands = WeightGradOperands{element_type<T>(), BS, address(kDy), q.ld_dy, address(kX), q.ld_x, M, q.N, q.K,
                                  nullptr};
  if (!weight_grad_takes(q.operands)) fail("%s: weight_grad_takes refuses it", q.what.c_str());
  return q;
}

// One CTA of bsr_sddmm_sm90_kernel or block_scores_sm90_kernel (their make_loader): steps of kStepRows rows of M
// from first_step, dY's and X's [bs, 64] tiles at the kernel's tile_row and tile_col, which must be W's block-row
// and block-column (want_row, want_col). Counts in loads[row] each row of M that a step brings.
template <class C, class Params>
void check_weight_grad_cta(const std::string& what, const WeightGradProblem& q, const Params& p, int tile_row,
                           int tile_col, int first_step, int n_steps, int want_row, int want_col,
                           std::vector<int>& loads) {
  SharedMemory<C> smem;
  Tensor gA = local_tile(p.tma_dy.get_tma_tensor(make_shape(p.N, p.M)), typename C::ATile{},
                         make_coord(tile_row, _));
  Tensor gB = local_tile(p.tma_x.get_tma_tensor(make_shape(p.K, p.M)), typename C::BTile{}, make_coord(tile_col, _));
  auto a_parts = tma_partition(p.tma_dy, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(smem.sA()),
                                       group_modes<0, 2>(gA));
  auto b_parts = tma_partition(p.tma_x, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(smem.sB()),
                                       group_modes<0, 2>(gB));
  const auto load = [&](int step, int stage) {
    emulate_copy(what, p.tma_dy, get<0>(a_parts)(_, first_step + step), get<1>(a_parts)(_, stage), smem);
    emulate_copy(what, p.tma_x, get<0>(b_parts)(_, first_step + step), get<1>(b_parts)(_, stage), smem);
  };
  // A(n, m) = dY[row][want_row * bs + n] and B(n, m) = X[row][want_col * bs + n], row = the step's m-th row of M.
  const int bs = size<0>(typename C::ATile{});
  const auto row_of = [&](int step, int m) { return int64_t{first_step + step} * kStepRows + m; };
  const auto want_a = [&](int step, int n, int m) {
    const int64_t row = row_of(step, m);
    return row < q.M ? element(kDy, row * q.ld_dy + int64_t{want_row} * bs + n) : 0;
  };
  const auto want_b = [&](int step, int n, int m) {
    const int64_t row = row_of(step, m);
    return row < q.M ? element(kX, row * q.ld_x + int64_t{want_col} * bs + n) : 0;
  };
  run_producer(what, smem, n_steps, load, want_a, want_b);
  for (int step = 0; step < n_steps; ++step) {
    for (int m = 0; m < kStepRows && row_of(step, m) < q.M; ++m) ++loads[row_of(step, m)];
  }
  ++counts.ctas;
}

// Each block's reduction must see every row of M once.
void check_rows_once(const std::string& what, const std::vector<int>& loads) {
  for (size_t row = 0; row < loads.size(); ++row) {
    if (loads[row] != 1) return fail("%s: row %zu of M loaded %d times", what.c_str(), row, loads[row]);
  }
}

// bsr_sddmm with M split into chunks of `chunk` rows (one split where chunk >= M).
template <typename T, int BS>
void check_sddmm(const char* type, int M, int block_rows, int block_cols, int pad, int64_t chunk, unsigned seed) {
  using C = SddmmConfig<T, BS>;
  const WeightGradProblem q = weight_grad_problem<T, BS>("bsr_sddmm", type, M, block_rows, block_cols, pad, seed);
  const int64_t splits = (M + chunk - 1) / chunk;
  const SddmmArgs args{q.operands, q.w.coo_row.data(), q.w.col_idx.data(), q.w.nnz(), splits, chunk,
                       splits > 1 ? static_cast<float*>(address(kOut)) : nullptr, address(kOut)};
  const std::string what = q.what + " chunk " + std::to_string(chunk);
  dim3 grid;
  const auto* p = run_launcher<WeightGradParamsOf<SddmmParams, T, BS>>(
      what, [&] { return launch_sddmm<T, BS>(args, nullptr); }, grid);
  if (p == nullptr) return;
  check_descriptor(what + " dY", record_of(p->tma_dy), tma_type<T>());
  check_descriptor(what + " X", record_of(p->tma_x), tma_type<T>());
  for (unsigned block = 0; block < grid.x; ++block) {
    std::vector<int> loads(M, 0);
    for (unsigned split = 0; split < grid.y; ++split) {
      // bsr_sddmm_sm90_kernel
      const int m_begin = static_cast<int>(split) * p->chunk;
      const int m_end = std::min(p->M, m_begin + p->chunk);
      const int n_steps = (m_end - m_begin + kStepRows - 1) / kStepRows;
      check_weight_grad_cta<C>(what + " block " + std::to_string(block) + " split " + std::to_string(split), q, *p,
                               p->coo_row[block], p->col_idx[block], m_begin / kStepRows, n_steps,
                               q.w.coo_row[block], q.w.col_idx[block], loads);
    }
    check_rows_once(what + " block " + std::to_string(block), loads);
  }
}

// block_grad_scores: every block of the grid, over all of M.
template <typename T, int BS>
void check_scores(const char* type, int M, int block_rows, int block_cols, int pad, unsigned seed) {
  using C = SddmmConfig<T, BS>;
  const WeightGradProblem q =
      weight_grad_problem<T, BS>("block_grad_scores", type, M, block_rows, block_cols, pad, seed);
  const BlockScoresArgs args{q.operands, static_cast<float*>(address(kOut))};
  dim3 grid;
  const auto* p = run_launcher<WeightGradParamsOf<ScoresParams, T, BS>>(
      q.what, [&] { return launch_scores<T, BS>(args, nullptr); }, grid);
  if (p == nullptr) return;
  check_descriptor(q.what + " dY", record_of(p->tma_dy), tma_type<T>());
  check_descriptor(q.what + " X", record_of(p->tma_x), tma_type<T>());
  for (unsigned cta = 0; cta < grid.x; ++cta) {
    // block_scores_sm90_kernel
    const int block_row = static_cast<int>(cta / p->n_block_cols);
    const int block_col = static_cast<int>(cta % p->n_block_cols);
    const int n_steps = (p->M + kStepRows - 1) / kStepRows;
    std::vector<int> loads(M, 0);
    const std::string at = q.what + " CTA " + std::to_string(cta);
    check_weight_grad_cta<C>(at, q, *p, block_row, block_col, 0, n_steps, static_cast<int>(cta) / block_cols,
                             static_cast<int>(cta) % block_cols, loads);
    check_rows_once(at, loads);
  }
}

// ---------------------------------------------------------------------------------------------
// 2. The accumulators' pairs

template <class C>
void check_accumulator_pairs(const char* what) {
  using CTile = typename C::CTile;
  constexpr int TM = size<0>(CTile{}), TN = size<1>(CTile{});
  typename C::TiledMma mma;
  std::vector<int> hits(TM * TN, 0);
  for (int thread = 0; thread < kConsumerThreads; ++thread) {
    // run_mainloop's coordinates for the epilogue, and its accumulators: value i of one is value i of the other.
    Tensor coords = mma.get_thread_slice(thread).partition_C(make_identity_tensor(CTile{}));
    Tensor acc = partition_fragment_C(mma, CTile{});
    static_assert(std::is_same_v<decltype(shape(acc)), decltype(shape(coords))>);
    static_assert(decltype(size(acc))::value % 2 == 0);
    for (int i = 0; i < size(coords); i += 2) {
      const int r = get<0>(coords(i)), c = get<1>(coords(i));
      if (get<0>(coords(i + 1)) != r || get<1>(coords(i + 1)) != c + 1 || c % 2 != 0) {
        fail("%s: thread %d's accumulators %d and %d are (%d, %d) and (%d, %d), not a pair", what, thread, i, i + 1,
             r, c, static_cast<int>(get<0>(coords(i + 1))), static_cast<int>(get<1>(coords(i + 1))));
      }
      ++hits[r * TN + c];
      ++hits[get<0>(coords(i + 1)) * TN + get<1>(coords(i + 1))];
      ++counts.pairs;
    }
  }
  for (int i = 0; i < TM * TN; ++i) {
    if (hits[i] != 1) return fail("%s: output (%d, %d) held by %d threads", what, i / TN, i % TN, hits[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// 3. What the wgmmas read

// A descriptor's swizzle: its rows' width in 16-byte chunks (0: not swizzled).
int swizzle_chunks(GmmaDescriptor d) {
  switch (static_cast<GMMA::LayoutType>(d.bitfield.layout_type_)) {
    case GMMA::LayoutType::B128: return 8;
    case GMMA::LayoutType::B64: return 4;
    case GMMA::LayoutType::B32: return 2;
    default: return 0;
  }
}

// The shared-memory address a wgmma reads for element (mn, k) of its operand tile, by the PTX ISA's matrix
// descriptor for 16-bit elements and a swizzle of rows of `chunks` 16-byte chunks (LBO and SBO in 16-byte units):
// K-major, rows mn in groups of 8 SBO apart, k contiguous; MN-major, 8 * chunks elements of mn contiguous, then LBO
// apart, rows k in groups of 8 SBO apart. Then the swizzle, on the address.
int64_t wgmma_address(GmmaDescriptor d, int64_t start, int chunks, GMMA::Major major, int mn, int k) {
  const int64_t lbo = d.bitfield.leading_byte_offset_ * 16, sbo = d.bitfield.stride_byte_offset_ * 16;
  const int64_t row = chunks * 16;
  const int64_t at = major == GMMA::Major::K
                         ? start + (mn % 8) * row + (mn / 8) * sbo + k * 2
                         : start + (mn % (8 * chunks)) * 2 + (mn / (8 * chunks)) * lbo + (k % 8) * row + (k / 8) * sbo;
  return at ^ (((at >> 7) & (chunks - 1)) << 4);
}

// CuTe builds a descriptor's start address with cast_smem_ptr_to_uint, which exists on the device only: on the host
// it prints an error and gives 0 (the start is taken from the tensor's pointer below instead). Keep that off stdout.
template <class F>
auto with_stdout_muted(const F& f) {
  std::fflush(stdout);
  const int saved = dup(STDOUT_FILENO), null = open("/dev/null", O_WRONLY);
  dup2(null, STDOUT_FILENO);
  auto result = f();
  std::fflush(stdout);
  dup2(saved, STDOUT_FILENO);
  close(null);
  close(saved);
  return result;
}

// One operand of every wgmma of one warp group, all stages: partition (the smem tile cut by the tiled MMA, as
// thread_mma.partition_A/B), descriptors (make_fragment_A/B of it, as run_mainloop builds them) and the atom's layout
// (thread, value) -> mn + MN * k, MN the instruction's extent.
template <class C, class Partition, class Descriptors, class AtomLayout>
void check_wgmma_operand(const std::string& what, SharedMemory<C>& smem, GMMA::Major major, int extent,
                         const Partition& partition, const Descriptors& descriptors, const AtomLayout& atom_layout) {
  // On the device a descriptor's start is the partition's first element's address plus the descriptors' offset from
  // the first one (DescriptorIterator); on the host CuTe's start address is 0, the offset the same.
  const GmmaDescriptor first = descriptors(0, 0, 0, 0);
  const int64_t base = smem.offset(raw_pointer_cast(partition.data()));
  for (int s = 0; s < size<3>(partition); ++s) {
    for (int i = 0; i < size<1>(partition); ++i) {
      for (int kb = 0; kb < size<2>(partition); ++kb) {
        const GmmaDescriptor d = descriptors(0, i, kb, s);
        const int64_t start = base + (d.bitfield.start_address_ - first.bitfield.start_address_) * 16;
        const int chunks = swizzle_chunks(d);
        // The swizzle pattern's phase at the start must be 0 (base offset 0): the model swizzles the address itself.
        if (chunks == 0 || d.bitfield.base_offset_ != 0 || ((start >> 7) & (chunks - 1)) != 0) {
          fail("%s stage %d (%d, %d): descriptor of layout %d, base offset %d, start %lld: not one this test models",
               what.c_str(), s, i, kb, d.bitfield.layout_type_, d.bitfield.base_offset_,
               static_cast<long long>(start));
          continue;
        }
        for (int v = 0; v < size<0>(partition); ++v) {
          const int at = atom_layout(0, v);
          const int64_t read = wgmma_address(d, start, chunks, major, at % extent, at / extent);
          const int64_t assigned = smem.offset(&partition(v, i, kb, s));
          if (read != assigned) {
            fail("%s stage %d (%d, %d): the wgmma reads element (%d, %d) at %lld, the tiled MMA put it at %lld",
                 what.c_str(), s, i, kb, at % extent, at / extent, static_cast<long long>(read),
                 static_cast<long long>(assigned));
          }
          ++counts.wgmma_reads;
        }
      }
    }
  }
}

// A stage tile's major: K where the reduction index is the contiguous one (make_gmma_desc takes the tiles only in
// the MMA's own majors).
template <class SmemLayout>
GMMA::Major major_of() {
  return get_nonswizzle_portion(SmemLayout{})(0, 1, 0) == 1 ? GMMA::Major::K : GMMA::Major::MN;
}

template <class C>
void check_wgmma_reads(const char* what) {
  using Atom = typename C::TiledMma::Atom;
  SharedMemory<C> smem;
  typename C::TiledMma mma;
  for (int warp_group = 0; warp_group < 2; ++warp_group) {
    auto thread_mma = mma.get_thread_slice(warp_group * cutlass::NumThreadsPerWarpGroup);
    Tensor tCsA = thread_mma.partition_A(smem.sA());
    Tensor tCsB = thread_mma.partition_B(smem.sB());
    Tensor tCrA = with_stdout_muted([&] { return thread_mma.make_fragment_A(tCsA); });
    Tensor tCrB = with_stdout_muted([&] { return thread_mma.make_fragment_B(tCsB); });
    const std::string at = std::string(what) + " warp group " + std::to_string(warp_group);
    check_wgmma_operand(at + " A", smem, major_of<typename C::SmemLayoutA>(), size<0>(typename Atom::Shape_MNK{}),
                        tCsA, tCrA, typename Atom::ALayout{});
    check_wgmma_operand(at + " B", smem, major_of<typename C::SmemLayoutB>(), size<1>(typename Atom::Shape_MNK{}),
                        tCsB, tCrB, typename Atom::BLayout{});
  }
}

template <class C>
void check_consumers(const char* what) {
  check_accumulator_pairs<C>(what);
  check_wgmma_reads<C>(what);
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

int main() {
  using namespace sparsekern::cuda;
  using cutlass::bfloat16_t;
  using cutlass::half_t;
  check_consumers<LinearConfig<half_t, 64, false>>("linear fp16 bs 64");
  check_consumers<LinearConfig<half_t, 64, true>>("linear_dx fp16 bs 64");
  check_consumers<LinearConfig<bfloat16_t, 128, false>>("linear bf16 bs 128");
  check_consumers<LinearConfig<bfloat16_t, 128, true>>("linear_dx bf16 bs 128");
  check_consumers<SddmmConfig<half_t, 64>>("sddmm fp16 bs 64");
  check_consumers<SddmmConfig<bfloat16_t, 128>>("sddmm bf16 bs 128");

  // (M, W's block-rows and block-columns, row padding in elements, seed)
  check_linear<half_t, 64, false>("fp16", 77, 3, 4, 8, 1);
  check_linear<half_t, 64, false>("fp16", 200, 2, 3, 0, 2);
  check_linear<half_t, 64, true>("fp16", 77, 3, 4, 24, 3);
  check_linear<half_t, 64, true>("fp16", 200, 4, 2, 8, 4);
  check_linear<bfloat16_t, 128, false>("bf16", 77, 2, 3, 8, 5);
  check_linear<bfloat16_t, 128, false>("bf16", 200, 3, 2, 64, 6);
  check_linear<bfloat16_t, 128, true>("bf16", 77, 2, 3, 0, 7);
  check_linear<bfloat16_t, 128, true>("bf16", 200, 3, 2, 8, 8);
  // (M, block-rows, block-columns, padding, M-chunk, seed)
  check_sddmm<half_t, 64>("fp16", 77, 3, 2, 8, 128, 9);
  check_sddmm<half_t, 64>("fp16", 1000, 2, 3, 8, 256, 10);
  check_sddmm<bfloat16_t, 128>("bf16", 77, 2, 2, 0, 128, 11);
  check_sddmm<bfloat16_t, 128>("bf16", 200, 2, 3, 8, 128, 12);
  check_scores<half_t, 64>("fp16", 200, 2, 3, 8, 13);
  check_scores<bfloat16_t, 128>("bf16", 77, 2, 2, 8, 14);

  if (failures > 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok %ld CTAs, %ld TMA boxes, %ld tile elements, %ld accumulator pairs, %ld wgmma operand reads\n",
              counts.ctas, counts.boxes, counts.elements, counts.pairs, counts.wgmma_reads);
  return 0;
}
