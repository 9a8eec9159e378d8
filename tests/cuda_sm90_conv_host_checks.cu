// Host-side checks of the Hopper convolution kernels (csrc/cuda/bsr_conv_sm90.cu: the forward pass, the input
// gradient and the filter gradient, on sm90_mainloop.cuh), compiled and run by tests/test_cuda_static.py. The kernels
// need an H100, but their own code runs here: this file compiles bsr_conv_sm90.cu's kernels as host functions (the
// macros around its #include) and its public entry points run them, through their launchers, for every CTA of the
// grid they launch. What the kernels call that only a GPU has is replaced by emulations, declared in the kernels'
// namespace before them so that their unqualified names find these first:
//   - TMA: the 4-D image boxes of load_pixels (SM90_TMA_LOAD_4D) and the boxes of the CuTe atom that loads the
//     blocks' values (CuTe's own copy runs, down to the instruction) are written box by box into a host image of the
//     CTA's shared memory, swizzled and zero-filled past the tensor's edge as the hardware does, each 2-byte slot
//     holding the id of the element it received (sm90_host_emulation.h's emulation, shared with cuda_sm90_host_checks.cu);
//   - run_mainloop: the producer's steps in order, each into stage step % kStages; each stage, once loaded, is
//     checked and its A and B tiles (read through the kernels' smem layouts) multiplied in float64 into the CTA's
//     [TM, TN] sums, which go to the kernel's epilogue thread by consumer thread, at the coordinates that
//     thread_mma.partition_C gives each one, as run_mainloop hands them over;
//   - the epilogues' stores (store_pair; store_block_tile, whose layout is restated) record what each output element
//     receives.
// Checked, on small layers (two 9 x 19 images: 3 x 3 pad 1, 3 x 3 dilation 2 pad 2, 3 x 1 pad 0; one 5 x 7 image
// under a 2 x 3 kernel whose output size pads and crops unevenly) with random block layouts that leave a block-row,
// and in some layers a channel chunk, without blocks: the forward pass and the input gradient at fp16 bs 64 and
// bf16 bs 128, the filter gradient at those and bf16 bs 64 (its X tile in 64-byte swizzled atoms), in one split and
// several:
//   1. every CTA's step count, and every element of every step's A and B tiles against the element of x, dY or the
//      blocks' values that the step needs there by the convolution's definition (zero outside the image); the bytes
//      each step's copies write against the pipeline's transaction bytes, and the barrier they signal; the
//      descriptors against what the emulation models;
//   2. every output element stored exactly once, with the value of a direct float64 convolution, input gradient or
//      filter gradient (the loops below; the filter's K ordered (kh, kw, c) as in sparsekern/reference.py), exactly:
//      the data are small integers, so every sum is exact; the filter gradient's splits bring every dY element once
//      to each block of its block-row (each output pixel once), and their partials add up to the gradient.
// Which block each CTA's step takes (forward_tiles, dgrad_tiles, wgrad_tiles) is the test's statement of the kernels'
// grid order; the consumers' side (what the wgmmas read, the accumulator pairs) is the GEMMs' configurations' and is
// checked in cuda_sm90_host_checks.cu. Prints "ok ..." and exits 0, else the first failures and exits 1.
#include "sm90_host_emulation.h"  // first: the cuTensorMapEncodeTiled stub, CUTE_DEVICE, the TMA box emulation

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/sm90_mainloop.cuh"

namespace sparsekern {
namespace cuda {
namespace {  // the kernel file's anonymous namespace: the emulations below are found before sm90's and CuTe's names

using namespace cute;
using namespace sm90;

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
  long ctas = 0, steps = 0, boxes = 0, zero_filled = 0, elements = 0, outputs = 0;
} counts;

// ---------------------------------------------------------------------------------------------
// The tensors: never allocated, only addressed (but for the bias, which the forward kernel reads itself)

// Where the operands are: 2^40 apart, far from any host pointer, so that an element's address / 2 names it (its id).
constexpr uint64_t kX = 1ull << 40, kDy = 2ull << 40, kValues = 3ull << 40, kOut = 4ull << 40, kPartial = 5ull << 40,
                   kBias = 6ull << 40;  // kBias: ids only, for the bias's values
constexpr int64_t kEmpty = -1;          // a shared-memory slot that no copy wrote; 0 is the TMA's zero fill

int64_t element(uint64_t tensor, int64_t offset) { return static_cast<int64_t>(tensor / 2) + offset; }

void* address(uint64_t tensor) { return reinterpret_cast<void*>(tensor); }

uint64_t tensor_of(int64_t id) { return ((static_cast<uint64_t>(id) * 2) >> 40) << 40; }

// Every element's value: a small integer drawn from its id (0 for the zero fill), so that every sum of products
// below is exact in float.
double value(int64_t id) {
  if (id == 0) return 0;
  uint64_t z = static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull;  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<double>(static_cast<int>((z ^ (z >> 31)) % 5) - 2);
}

// The layer being checked, for the messages: x [batch, height, width, channels], dY [batch, out_h, out_w, N].
struct Shapes {
  int64_t height, width, channels, out_h, out_w, out_channels, bs;
} shapes;

std::string nhwc(const char* name, int64_t offset, int64_t height, int64_t width, int64_t channels) {
  const int64_t pixel = offset / channels;
  return std::string(name) + "[" + std::to_string(pixel / (height * width)) + ", " +
         std::to_string(pixel / width % height) + ", " + std::to_string(pixel % width) + ", " +
         std::to_string(offset % channels) + "]";
}

std::string describe(int64_t id) {
  if (id == kEmpty) return "nothing";
  if (id == 0) return "zero";
  const int64_t offset = id - element(tensor_of(id), 0);
  switch (tensor_of(id)) {
    case kX: return nhwc("x", offset, shapes.height, shapes.width, shapes.channels);
    case kDy: return nhwc("dy", offset, shapes.out_h, shapes.out_w, shapes.out_channels);
    case kValues:
      return "values[" + std::to_string(offset / (shapes.bs * shapes.bs)) + "][" +
             std::to_string(offset / shapes.bs % shapes.bs) + "][" + std::to_string(offset % shapes.bs) + "]";
    default: return "?[" + std::to_string(offset) + "]";
  }
}

// ---------------------------------------------------------------------------------------------
// What the launch must do, set by each check before it calls the kernels' entry point

// One CTA's steps: how many, and the element id each step's A(row, k) and B(column, k) must hold (0: zero fill).
struct CtaTiles {
  int steps = 0;
  std::function<int64_t(int step, int row, int k)> a, b;
};

struct Expected {
  std::string what;
  CUtensorMapDataType type;
  std::function<CtaTiles(dim3 cta)> tiles;
  std::vector<int>* dy_loads = nullptr;  // where set, how many times each dY element is loaded into a stage
} expected;

std::string where;  // the launch's current CTA and step, for the messages

// What the next launch must do; its launcher's descriptors are recorded afresh.
void expect(Expected e) {
  expected = std::move(e);
  tma_records.clear();
}

// What the epilogues stored into the one output of the launch (of element_bytes each): per element the number of
// stores and the last value stored.
struct Output {
  uint64_t base = 0;
  int element_bytes = 0;
  int64_t size = 0;
  std::vector<int> stores;
  std::vector<double> values;
} output;

void expect_output(uint64_t base, int element_bytes, int64_t size) {
  output = Output{base, element_bytes, size, std::vector<int>(size, 0), std::vector<double>(size, 0)};
}

// A pair of adjacent elements stored at `at` (4 or 8-byte aligned, as the stores are).
void record_pair(const void* at, int element_bytes, float v0, float v1) {
  const int64_t offset = static_cast<int64_t>(reinterpret_cast<uint64_t>(at) - output.base);
  const int64_t i = offset / element_bytes;
  if (element_bytes != output.element_bytes || offset % (2 * element_bytes) != 0 || i < 0 || i + 1 >= output.size) {
    return fail("%s: a store of %d-byte elements at output offset %lld, outside the output or misaligned",
                where.c_str(), element_bytes, static_cast<long long>(offset));
  }
  ++output.stores[i];
  ++output.stores[i + 1];
  output.values[i] = v0;
  output.values[i + 1] = v1;
}

// ---------------------------------------------------------------------------------------------
// The CTA's shared memory and TMA

alignas(kSmemAlign) unsigned char smem_raw[256 * 1024];  // the kernels' `extern __shared__` array
std::vector<int64_t> slots(sizeof(smem_raw) / 2);      // what each 2-byte slot holds: kEmpty, 0 or an element id
int launch_smem_bytes = 0;                               // the dynamic shared memory the launch asked for
int64_t bytes_written = 0;                               // by the current step's copies
const uint64_t* step_barrier = nullptr;                  // the barrier the current step's copies must signal

int64_t smem_offset(const void* p) { return static_cast<const unsigned char*>(p) - smem_raw; }

int64_t* slot(const void* p) {
  const int64_t offset = smem_offset(p);
  return offset >= 0 && offset / 2 < static_cast<int64_t>(slots.size()) ? &slots[offset / 2] : nullptr;
}

// What the box emulation takes for granted of a descriptor (sm90_host_emulation.h).
void check_descriptor(const TmaRecord& d) {
  const std::string problem = tma_descriptor_problem(d, expected.type);
  if (!problem.empty()) fail("%s: %s", expected.what.c_str(), problem.c_str());
}

// One TMA box into the CTA's shared memory, emulated as the hardware writes it (sm90_host_emulation.h).
void emulate_box(const TmaRecord& d, const int32_t* coord, int64_t dst) {
  const int64_t elements = emulate_tma_box(
      d, coord, dst, kEmpty, [](int64_t at) { return slot(smem_raw + at); },
      [](const std::string& problem) { fail("%s: %s", where.c_str(), problem.c_str()); }, &counts.zero_filled);
  if (elements < 0) return;
  bytes_written += elements * 2;
  ++counts.boxes;
}

// A TMA load as the kernels issue it: descriptor, barrier, destination and the box's coordinates.
void tma_load(const void* descriptor, const uint64_t* barrier, void* dst, const int32_t* coord, int rank) {
  const uint64_t record = static_cast<const CUtensorMap*>(descriptor)->opaque[0];
  if (record >= tma_records.size()) return fail("%s: a TMA load from no encoded descriptor", where.c_str());
  const TmaRecord& d = tma_records[record];
  if (barrier != step_barrier) fail("%s: a TMA load signals another barrier than the step's", where.c_str());
  if (rank != d.rank) return fail("%s: %d TMA coordinates for a rank-%d descriptor", where.c_str(), rank, d.rank);
  emulate_box(d, coord, smem_offset(dst));
}

// ---------------------------------------------------------------------------------------------
// What the kernels call, emulated (found before sm90's and CuTe's names by the kernels' unqualified lookups)

dim3 blockIdx;  // the CTA a kernel runs as

// load_pixels' image boxes.
struct SM90_TMA_LOAD_4D {
  static void copy(const void* descriptor, uint64_t* barrier, uint64_t, void* dst, int32_t c0, int32_t c1, int32_t c2,
                   int32_t c3) {
    const int32_t coord[4] = {c0, c1, c2, c3};
    tma_load(descriptor, barrier, dst, coord, 4);
  }
};

void prefetch_tma_descriptor(const CUtensorMap*) {}

template <typename T>
void store_pair(T* at, float v0, float v1) {
  record_pair(at, sizeof(T), v0, v1);
}

// sm90_mainloop.cuh's store_block_tile (device code), restated: the stored block `block` [bs, bs] row-major in `out`
// with one split, or split `split`'s fp32 partial of it in `partial` [splits, nnz, bs, bs] with several.
template <int BS, typename T, class Acc, class Coords>
void store_block_tile(const Acc& acc, const Coords& coords, T* out, float* partial, int64_t block, int split,
                      int64_t nnz) {
  for (int i = 0; i < size(acc); i += 2) {
    const int64_t at = block * (BS * BS) + get<0>(coords(i)) * BS + get<1>(coords(i));
    if (partial == nullptr) {
      store_pair(out + at, acc(i), acc(i + 1));
    } else {
      record_pair(partial + split * nnz * (BS * BS) + at, sizeof(float), acc(i), acc(i + 1));
    }
  }
}

CtaTiles cta_tiles;  // the running CTA's, from expected.tiles

// Every element of a stage's tile against want(row, column); the tile's values into `values` [rows, columns].
template <class Tile, class Want>
void read_tile(const char* name, const Tile& tile, const Want& want, std::vector<double>& values) {
  const int columns = size<1>(tile);
  for (int r = 0; r < size<0>(tile); ++r) {
    for (int c = 0; c < columns; ++c) {
      const int64_t* s = slot(&tile(r, c));
      const int64_t got = s == nullptr ? kEmpty : *s;
      const int64_t wanted = want(r, c);
      if (got != wanted) {
        fail("%s: %s(%d, %d) holds %s, expected %s", where.c_str(), name, r, c, describe(got).c_str(),
             describe(wanted).c_str());
      }
      values[r * columns + c] = value(got == kEmpty ? 0 : got);
      if (expected.dy_loads != nullptr && got > 0 && tensor_of(got) == kDy) {
        ++(*expected.dy_loads)[got - element(kDy, 0)];
      }
      ++counts.elements;
    }
  }
}

// sm90_mainloop.cuh's run_mainloop, on the host: the producer's loop (step by step into stage step % kStages, each
// stage checked once loaded, with the other stages' slots emptied so that every write must land in this one), the
// consumers' sums (acc(m, n) += A(m, k) B(n, k) over the stage's k, in float64) and the epilogue of each consumer
// thread with its accumulators and their coordinates in the [TM, TN] tile, as run_mainloop passes them.
template <class C, class MakeLoader, class Epilogue>
void run_mainloop(unsigned char* smem, int n_steps, const MakeLoader& make_loader, const Epilogue& epilogue) {
  auto* storage = reinterpret_cast<typename C::SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem) + kSmemAlign - 1) & ~uintptr_t(kSmemAlign - 1));
  if (smem_offset(storage + 1) > launch_smem_bytes) {
    return fail("%s: the shared storage ends past the launch's dynamic shared memory", where.c_str());
  }
  Tensor sA = make_tensor(make_smem_ptr(storage->a.begin()), typename C::SmemLayoutA{});  // (TM, TK, stage)
  Tensor sB = make_tensor(make_smem_ptr(storage->b.begin()), typename C::SmemLayoutB{});  // (TN, TK, stage)
  constexpr int TM = size<0>(typename C::CTile{}), TN = size<1>(typename C::CTile{});
  constexpr int TK = size<1>(typename C::ATile{});
  if (n_steps != cta_tiles.steps) {
    return fail("%s: %d steps, expected %d", where.c_str(), n_steps, cta_tiles.steps);
  }
  const std::string cta = where;
  std::vector<double> acc(TM * TN, 0.0), a(TM * TK), b(TN * TK);
  auto load = make_loader(sA, sB);
  for (int step = 0; step < n_steps; ++step) {
    const int stage = step % C::kStages;
    where = cta + " step " + std::to_string(step) + " stage " + std::to_string(stage);
    std::fill(slots.begin(), slots.end(), kEmpty);
    bytes_written = 0;
    uint64_t barrier = 0;
    step_barrier = &barrier;
    load(step, stage, barrier);
    if (bytes_written != C::kStageBytes) {
      fail("%s: the copies wrote %lld bytes, the pipeline waits for %d", where.c_str(),
           static_cast<long long>(bytes_written), C::kStageBytes);
    }
    read_tile("sA", sA(_, _, stage), [&](int m, int k) { return cta_tiles.a(step, m, k); }, a);
    read_tile("sB", sB(_, _, stage), [&](int n, int k) { return cta_tiles.b(step, n, k); }, b);
    for (int m = 0; m < TM; ++m) {
      for (int n = 0; n < TN; ++n) {
        double sum = 0;
        for (int k = 0; k < TK; ++k) sum += a[m * TK + k] * b[n * TK + k];
        acc[m * TN + n] += sum;
      }
    }
    ++counts.steps;
  }
  where = cta + " epilogue";
  typename C::TiledMma mma;
  for (int thread = 0; thread < kConsumerThreads; ++thread) {
    Tensor coords = mma.get_thread_slice(thread).partition_C(make_identity_tensor(typename C::CTile{}));
    Tensor fragment = partition_fragment_C(mma, typename C::CTile{});
    for (int i = 0; i < size(fragment); ++i) {
      fragment(i) = static_cast<float>(acc[get<0>(coords(i)) * TN + get<1>(coords(i))]);
    }
    epilogue(fragment, coords);
  }
}

// The launchers' launch (sm90::launch): every CTA of the grid, one after the other, as blockIdx.
template <class Params>
LaunchStatus launch(void (*kernel)(Params), dim3 grid, int smem_bytes, cudaStream_t, const Params& p) {
  static_assert(sizeof(smem_raw) >= 227 * 1024);
  if (smem_bytes > 227 * 1024) {
    fail("%s: %d bytes of dynamic shared memory, over sm_90's 227 KiB", expected.what.c_str(), smem_bytes);
  }
  launch_smem_bytes = smem_bytes;
  for (const TmaRecord& d : tma_records) check_descriptor(d);
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx = dim3(x, y);
      where = expected.what + " CTA (" + std::to_string(x) + ", " + std::to_string(y) + ")";
      cta_tiles = expected.tiles(blockIdx);
      kernel(p);
      ++counts.ctas;
    }
  }
  return LaunchStatus{cudaSuccess, true, grid, dim3(kThreads), smem_bytes};
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

// The CuTe TMA atom's loads (copy(tma.with(barrier), ...) of the blocks' values): CuTe's copy runs as on the device,
// cuts the tensors into boxes and issues each through CallCOPY<SM90_TMA_LOAD_OP> (TMA_LOAD_Unpack), here into the
// emulation.
namespace cute {
namespace detail {
template <>
struct CallCOPY<SM90_TMA_LOAD_OP> {
  // Host-and-device as its caller in CuTe, but only ever called on the host.
#pragma nv_exec_check_disable
  template <class... Coords>
  CUTE_HOST_DEVICE void operator()(const TmaDescriptor* descriptor, uint64_t* barrier, uint64_t, void* dst,
                                   const Coords&... coords) const {
    const int32_t coord[] = {static_cast<int32_t>(coords)...};
    sparsekern::cuda::tma_load(descriptor, barrier, dst, coord, sizeof...(Coords));
  }
};
}  // namespace detail
}  // namespace cute

// The kernel file with its kernels as host functions: no __global__ (nor the launch bounds and grid-constant
// parameter that go with it), its __device__ helpers host functions, the sm_90a bodies compiled, the dynamic shared
// memory the array above.
#pragma push_macro("__global__")
#pragma push_macro("__device__")
#pragma push_macro("__shared__")
#pragma push_macro("__launch_bounds__")
#pragma push_macro("CUTE_GRID_CONSTANT")
#pragma push_macro("__CUDA_ARCH_FEAT_SM90_ALL")
#undef __global__
#define __global__
#undef __device__
#define __device__ __host__
#undef __shared__
#define __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef CUTE_GRID_CONSTANT
#define CUTE_GRID_CONSTANT
#define __CUDA_ARCH_FEAT_SM90_ALL 1
#include "cuda/bsr_conv_sm90.cu"
#pragma pop_macro("__CUDA_ARCH_FEAT_SM90_ALL")
#pragma pop_macro("CUTE_GRID_CONSTANT")
#pragma pop_macro("__launch_bounds__")
#pragma pop_macro("__shared__")
#pragma pop_macro("__device__")
#pragma pop_macro("__global__")

namespace sparsekern {
namespace cuda {

// The machine this would run on is an H100 (bsr_gemm_sm90.cu's probe, not built here).
bool sm90::device_runs_sm90a() { return true; }

// The split filter gradient's second pass (bsr_gemm_wgrad.cu, not built here), which launch_wgrad runs after its
// kernel: the partials are added up below.
LaunchStatus sum_sddmm_partials(const SddmmArgs&, cudaStream_t) { return {}; }

namespace {

// ---------------------------------------------------------------------------------------------
// The layers

// x [batch, height, width, C] -> y [batch, out_h, out_w, N], stride 1.
struct Layer {
  const char* name;
  int batch, height, width, kernel_h, kernel_w, pad_top, pad_left, dil_h, dil_w, out_h, out_w;
};

// A layer with C input and N output channels and its filter W [N, taps * C] in bs x bs blocks.
struct Problem {
  std::string what;
  Layer layer;
  int bs, channels, out_channels;
  BlockLayout w;
  ConvShape shape;

  int taps() const { return layer.kernel_h * layer.kernel_w; }
  int64_t K() const { return int64_t{taps()} * channels; }
  int64_t x_size() const { return int64_t{layer.batch} * layer.height * layer.width * channels; }
  int64_t dy_size() const { return int64_t{layer.batch} * layer.out_h * layer.out_w * out_channels; }
};

// About half of the blocks stored, but none in block-row `empty_row` (none: -1) nor, where `empty_chunk`, at the
// last chunk of channels of any tap; at least one block.
BlockLayout random_layout(int block_rows, int block_cols, int chunks_per_tap, int empty_row, bool empty_chunk,
                          std::mt19937& rng) {
  std::bernoulli_distribution stored(0.5);
  return block_layout(block_rows, block_cols, [&](int r, int c) {
    const bool allowed = r != empty_row && !(empty_chunk && c % chunks_per_tap == chunks_per_tap - 1);
    return allowed && stored(rng);
  });
}

template <typename T>
CUtensorMapDataType tma_type() {
  return std::is_same_v<T, cutlass::half_t> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

template <typename T>
ElementType element_type() {
  return std::is_same_v<T, cutlass::half_t> ? ElementType::kFloat16 : ElementType::kBFloat16;
}

template <typename T>
const char* type_name() {
  return std::is_same_v<T, cutlass::half_t> ? "fp16" : "bf16";
}

template <typename T>
Problem make_problem(const char* op, int bs, const Layer& layer, int channels, int out_channels, int empty_row,
                     bool empty_chunk, unsigned seed) {
  std::mt19937 rng(seed);
  Problem q{std::string(op) + " " + type_name<T>() + " bs " + std::to_string(bs) + " " + layer.name + " C " +
                std::to_string(channels) + " N " + std::to_string(out_channels),
            layer, bs, channels, out_channels, {}, {}};
  q.w = random_layout(out_channels / bs, static_cast<int>(q.K() / bs), channels / bs, empty_row, empty_chunk, rng);
  q.shape = ConvShape{layer.batch, layer.height, layer.width, channels, layer.out_h, layer.out_w, layer.kernel_h,
                      layer.kernel_w, 1, 1, layer.pad_top, layer.pad_left, layer.dil_h, layer.dil_w};
  shapes = Shapes{layer.height, layer.width, channels, layer.out_h, layer.out_w, out_channels, bs};
  return q;
}

// Column k of the filter matrix: tap (kh, kw) and input channel c, K ordered (kh, kw, c).
struct FilterColumn {
  int kh, kw, c;
};

FilterColumn filter_column(const Problem& q, int64_t k) {
  const int tap = static_cast<int>(k / q.channels);
  return {tap / q.layer.kernel_w, tap % q.layer.kernel_w, static_cast<int>(k % q.channels)};
}

// An element of x or dY by pixel and channel, zero outside the image.
int64_t x_id(const Problem& q, int image, int h, int w, int c) {
  const Layer& l = q.layer;
  if (h < 0 || h >= l.height || w < 0 || w >= l.width) return 0;
  return element(kX, ((int64_t{image} * l.height + h) * l.width + w) * q.channels + c);
}

int64_t dy_id(const Problem& q, int image, int h, int w, int n) {
  const Layer& l = q.layer;
  if (h < 0 || h >= l.out_h || w < 0 || w >= l.out_w) return 0;
  return element(kDy, ((int64_t{image} * l.out_h + h) * l.out_w + w) * q.out_channels + n);
}

int64_t value_id(const Problem& q, int block, int row, int column) {
  return element(kValues, (int64_t{block} * q.bs + row) * q.bs + column);
}

struct Pixel {
  int image, h, w;
};

// The first pixel of patch `patch`, images of rows x columns pixels cut into patches of patch_h x 16, row-major,
// image after image.
Pixel patch_origin(int patch, int rows, int columns, int patch_h) {
  const int across = (columns + 15) / 16, down = (rows + patch_h - 1) / patch_h;
  return {patch / (across * down), patch / across % down * patch_h, patch % across * 16};
}

// ---------------------------------------------------------------------------------------------
// 1. Each CTA's tiles, by the convolution's definition (x at the output pixel shifted by the tap), in the kernels' grid
// order

// Forward: an 8 x 16 patch of output pixels and a block-row of W (block-rows fastest), the block-row's blocks in
// CSR order. A(m, k): x at the patch's pixel m shifted by the tap of the block's column k; B(n, k): the block at
// (n, k).
CtaTiles forward_tiles(const Problem& q, dim3 cta) {
  const int lines = static_cast<int>(q.w.row_ptr.size()) - 1;
  const int line = static_cast<int>(cta.x) % lines;
  const Pixel o = patch_origin(static_cast<int>(cta.x) / lines, q.layer.out_h, q.layer.out_w, 8);
  const int first = q.w.row_ptr[line];
  const Layer& l = q.layer;
  return {q.w.row_ptr[line + 1] - first,
          [&q, &l, o, first](int step, int m, int k) {
            const FilterColumn f = filter_column(q, int64_t{q.w.col_idx[first + step]} * q.bs + k);
            return x_id(q, o.image, o.h + m / 16 + f.kh * l.dil_h - l.pad_top,
                        o.w + m % 16 + f.kw * l.dil_w - l.pad_left, f.c);
          },
          [&q, first](int step, int n, int k) { return value_id(q, first + step, n, k); }};
}

// Input gradient: an 8 x 16 patch of input pixels and a chunk of bs input channels (chunks fastest), the blocks of
// the chunk's block-column at every tap, tap by tap, in CSC order. A(m, k): dY at the patch's pixel m shifted back
// by the tap, at the block's output channel k; B(n, k): the block at (k, n).
CtaTiles dgrad_tiles(const Problem& q, dim3 cta) {
  const int chunks = q.channels / q.bs;
  const int chunk = static_cast<int>(cta.x) % chunks;
  const Pixel o = patch_origin(static_cast<int>(cta.x) / chunks, q.layer.height, q.layer.width, 8);
  std::vector<std::pair<int, int>> steps;  // (tap, CSC position)
  for (int tap = 0; tap < q.taps(); ++tap) {
    const int column = static_cast<int>((int64_t{tap} * q.channels + int64_t{chunk} * q.bs) / q.bs);
    for (int at = q.w.col_ptr[column]; at < q.w.col_ptr[column + 1]; ++at) steps.emplace_back(tap, at);
  }
  const Layer& l = q.layer;
  return {static_cast<int>(steps.size()),
          [&q, &l, o, steps](int step, int m, int k) {
            const auto [tap, at] = steps[step];
            return dy_id(q, o.image, o.h + m / 16 + l.pad_top - tap / l.kernel_w * l.dil_h,
                         o.w + m % 16 + l.pad_left - tap % l.kernel_w * l.dil_w, q.w.row_idx[at] * q.bs + k);
          },
          [&q, steps](int step, int n, int k) { return value_id(q, q.w.perm[steps[step].second], k, n); }};
}

// Filter gradient: a stored block and a split (grid.y) of the 4 x 16 patches of output pixels (an even share of
// whole patches each), one patch a step. A(r, m): dY at the patch's pixel m, at the block's output channel r;
// B(c, m): x at that pixel shifted by the tap of the block's column c.
CtaTiles wgrad_tiles(const Problem& q, int splits, dim3 cta) {
  const Layer& l = q.layer;
  const int patches = l.batch * ((l.out_h + 3) / 4) * ((l.out_w + 15) / 16);
  const int per_split = (patches + splits - 1) / splits;
  const int first = static_cast<int>(cta.y) * per_split;
  const int block = static_cast<int>(cta.x);
  const auto pixel = [&l, first](int step, int m) {
    const Pixel o = patch_origin(first + step, l.out_h, l.out_w, 4);
    return Pixel{o.image, o.h + m / 16, o.w + m % 16};
  };
  return {std::max(0, std::min(patches, first + per_split) - first),
          [&q, pixel, block](int step, int r, int m) {
            const Pixel p = pixel(step, m);
            return dy_id(q, p.image, p.h, p.w, q.w.coo_row[block] * q.bs + r);
          },
          [&q, &l, pixel, block](int step, int c, int m) {
            const Pixel p = pixel(step, m);
            const FilterColumn f = filter_column(q, int64_t{q.w.col_idx[block]} * q.bs + c);
            return x_id(q, p.image, p.h + f.kh * l.dil_h - l.pad_top, p.w + f.kw * l.dil_w - l.pad_left, f.c);
          }};
}

// ---------------------------------------------------------------------------------------------
// 2. The direct float64 results, and the outputs against them

std::vector<double> values_of(uint64_t tensor, int64_t size) {
  std::vector<double> v(size);
  for (int64_t i = 0; i < size; ++i) v[i] = value(element(tensor, i));
  return v;
}

// W [N, K] as the blocks stand for it (zero elsewhere).
std::vector<double> dense_filter(const Problem& q) {
  std::vector<double> w(q.out_channels * q.K(), 0.0);
  for (int j = 0; j < q.w.nnz(); ++j) {
    for (int r = 0; r < q.bs; ++r) {
      for (int c = 0; c < q.bs; ++c) {
        const int64_t n = int64_t{q.w.coo_row[j]} * q.bs + r, k = int64_t{q.w.col_idx[j]} * q.bs + c;
        w[n * q.K() + k] = value(value_id(q, j, r, c));
      }
    }
  }
  return w;
}

// y [b, oh, ow, n] = bias[n] + sum over (kh, kw, c) of x[b, oh + kh dil_h - pad_top, ow + kw dil_w - pad_left, c]
// W[n, (kh, kw, c)].
std::vector<double> direct_forward(const Problem& q, const std::vector<double>& bias) {
  const Layer& l = q.layer;
  const std::vector<double> x = values_of(kX, q.x_size()), w = dense_filter(q);
  std::vector<double> y(q.dy_size());
  for (int b = 0; b < l.batch; ++b) {
    for (int oh = 0; oh < l.out_h; ++oh) {
      for (int ow = 0; ow < l.out_w; ++ow) {
        double* out = &y[((int64_t{b} * l.out_h + oh) * l.out_w + ow) * q.out_channels];
        for (int n = 0; n < q.out_channels; ++n) out[n] = bias.empty() ? 0.0 : bias[n];
        for (int kh = 0; kh < l.kernel_h; ++kh) {
          for (int kw = 0; kw < l.kernel_w; ++kw) {
            const int ih = oh + kh * l.dil_h - l.pad_top, iw = ow + kw * l.dil_w - l.pad_left;
            if (ih < 0 || ih >= l.height || iw < 0 || iw >= l.width) continue;
            const double* in = &x[((int64_t{b} * l.height + ih) * l.width + iw) * q.channels];
            const int64_t k0 = (int64_t{kh} * l.kernel_w + kw) * q.channels;
            for (int n = 0; n < q.out_channels; ++n) {
              for (int c = 0; c < q.channels; ++c) out[n] += in[c] * w[n * q.K() + k0 + c];
            }
          }
        }
      }
    }
  }
  return y;
}

// dx [b, ih, iw, c] = sum over (kh, kw, n) of dy[b, ih + pad_top - kh dil_h, iw + pad_left - kw dil_w, n]
// W[n, (kh, kw, c)]: the forward pass's adjoint.
std::vector<double> direct_dgrad(const Problem& q) {
  const Layer& l = q.layer;
  const std::vector<double> dy = values_of(kDy, q.dy_size()), w = dense_filter(q);
  std::vector<double> dx(q.x_size(), 0.0);
  for (int b = 0; b < l.batch; ++b) {
    for (int ih = 0; ih < l.height; ++ih) {
      for (int iw = 0; iw < l.width; ++iw) {
        double* out = &dx[((int64_t{b} * l.height + ih) * l.width + iw) * q.channels];
        for (int kh = 0; kh < l.kernel_h; ++kh) {
          for (int kw = 0; kw < l.kernel_w; ++kw) {
            const int oh = ih + l.pad_top - kh * l.dil_h, ow = iw + l.pad_left - kw * l.dil_w;
            if (oh < 0 || oh >= l.out_h || ow < 0 || ow >= l.out_w) continue;
            const double* in = &dy[((int64_t{b} * l.out_h + oh) * l.out_w + ow) * q.out_channels];
            const int64_t k0 = (int64_t{kh} * l.kernel_w + kw) * q.channels;
            for (int n = 0; n < q.out_channels; ++n) {
              for (int c = 0; c < q.channels; ++c) out[c] += in[n] * w[n * q.K() + k0 + c];
            }
          }
        }
      }
    }
  }
  return dx;
}

// dW at the stored blocks [nnz, bs, bs]: block j's (r, c) is dW[n, k] at n = its row's r-th, k = its column's c-th,
// the sum over output pixels (b, oh, ow) of dy[b, oh, ow, n] x[b, oh + kh dil_h - pad_top, ow + kw dil_w - pad_left,
// c'] with k = (kh, kw, c').
std::vector<double> direct_wgrad(const Problem& q) {
  const Layer& l = q.layer;
  const std::vector<double> x = values_of(kX, q.x_size()), dy = values_of(kDy, q.dy_size());
  std::vector<double> dw(int64_t{q.w.nnz()} * q.bs * q.bs, 0.0);
  for (int j = 0; j < q.w.nnz(); ++j) {
    for (int c = 0; c < q.bs; ++c) {
      const FilterColumn f = filter_column(q, int64_t{q.w.col_idx[j]} * q.bs + c);
      for (int b = 0; b < l.batch; ++b) {
        for (int oh = 0; oh < l.out_h; ++oh) {
          for (int ow = 0; ow < l.out_w; ++ow) {
            const int ih = oh + f.kh * l.dil_h - l.pad_top, iw = ow + f.kw * l.dil_w - l.pad_left;
            if (ih < 0 || ih >= l.height || iw < 0 || iw >= l.width) continue;
            const double in = x[((int64_t{b} * l.height + ih) * l.width + iw) * q.channels + f.c];
            const double* grad = &dy[((int64_t{b} * l.out_h + oh) * l.out_w + ow) * q.out_channels];
            for (int r = 0; r < q.bs; ++r) {
              dw[(int64_t{j} * q.bs + r) * q.bs + c] += grad[q.w.coo_row[j] * q.bs + r] * in;
            }
          }
        }
      }
    }
  }
  return dw;
}

// Every element stored once (stores[i] == 1); `name(i)` names element i.
template <class Name>
void check_stored_once(const std::string& what, const std::vector<int>& stores, const Name& name) {
  for (size_t i = 0; i < stores.size(); ++i) {
    if (stores[i] != 1) fail("%s: %s stored %d times", what.c_str(), name(i).c_str(), stores[i]);
  }
}

// Every element with the value wanted, exactly (all integers).
template <class Name>
void check_values(const std::string& what, const std::vector<double>& values, const std::vector<double>& want,
                  const Name& name) {
  if (values.size() != want.size()) {
    return fail("%s: %zu outputs, expected %zu", what.c_str(), values.size(), want.size());
  }
  for (size_t i = 0; i < values.size(); ++i) {
    if (values[i] != want[i]) fail("%s: %s = %g, expected %g", what.c_str(), name(i).c_str(), values[i], want[i]);
    ++counts.outputs;
  }
}

template <class Name>
void check_output(const std::string& what, const std::vector<double>& want, const Name& name) {
  check_stored_once(what, output.stores, name);
  check_values(what, output.values, want, name);
}

// ---------------------------------------------------------------------------------------------
// The checks, through the kernels' entry points

template <typename T, int BS>
void check_forward(const Layer& layer, int channels, int out_channels, bool with_bias, unsigned seed) {
  const Problem q =
      make_problem<T>("bsr_conv2d", BS, layer, channels, out_channels, out_channels / BS - 1, false, seed);
  const std::string what = q.what + (with_bias ? " bias" : "");
  std::vector<T> bias;  // read by the kernel itself
  std::vector<double> bias_values;
  if (with_bias) {
    bias_values = values_of(kBias, out_channels);
    for (double v : bias_values) bias.push_back(T(static_cast<float>(v)));
  }
  const BsrGemmArgs args{element_type<T>(), BS, false, address(kX), q.K(), address(kValues),
                         with_bias ? bias.data() : nullptr, address(kOut), q.w.row_ptr.data(), q.w.col_idx.data(),
                         q.w.perm.data(), int64_t{layer.batch} * layer.out_h * layer.out_w, q.K(), out_channels,
                         static_cast<int64_t>(q.w.row_ptr.size()) - 1, q.w.nnz(), &q.shape};
  expect({what, tma_type<T>(), [&q](dim3 cta) { return forward_tiles(q, cta); }});
  expect_output(kOut, sizeof(T), q.dy_size());
  LaunchStatus status;
  if (!bsr_conv2d_sm90(args, nullptr, &status) || status.error != cudaSuccess) {
    return fail("%s: bsr_conv2d_sm90 did not launch", what.c_str());
  }
  check_output(what, direct_forward(q, bias_values),
               [&](int64_t i) { return nhwc("y", i, layer.out_h, layer.out_w, out_channels); });
}

template <typename T, int BS>
void check_dgrad(const Layer& layer, int channels, int out_channels, bool empty_chunk, unsigned seed) {
  const Problem q =
      make_problem<T>("bsr_conv2d_dgrad", BS, layer, channels, out_channels, -1, empty_chunk, seed);
  const std::string what = q.what + (empty_chunk ? " empty chunk" : "");
  const ConvDgradArgs args{element_type<T>(), BS, address(kDy), address(kValues), address(kOut), q.w.col_ptr.data(),
                           q.w.row_idx.data(), q.w.perm.data(), out_channels, q.w.nnz(), q.shape};
  expect({what, tma_type<T>(), [&q](dim3 cta) { return dgrad_tiles(q, cta); }});
  expect_output(kOut, sizeof(T), q.x_size());
  LaunchStatus status;
  if (!bsr_conv2d_dgrad_sm90(args, nullptr, &status) || status.error != cudaSuccess) {
    return fail("%s: bsr_conv2d_dgrad_sm90 did not launch", what.c_str());
  }
  check_output(what, direct_dgrad(q), [&](int64_t i) { return nhwc("dx", i, layer.height, layer.width, channels); });
}

template <typename T, int BS>
void check_wgrad(const Layer& layer, int channels, int out_channels, int splits, unsigned seed) {
  const Problem q = make_problem<T>("bsr_conv2d_wgrad", BS, layer, channels, out_channels, -1, false, seed);
  const std::string what = q.what + " splits " + std::to_string(splits);
  const int64_t M = int64_t{layer.batch} * layer.out_h * layer.out_w, block_elements = int64_t{q.w.nnz()} * BS * BS;
  const SddmmArgs args{{element_type<T>(), BS, address(kDy), out_channels, address(kX), q.K(), M, out_channels, q.K(),
                        &q.shape},
                       q.w.coo_row.data(), q.w.col_idx.data(), q.w.nnz(), splits, (M + splits - 1) / splits,
                       splits > 1 ? static_cast<float*>(address(kPartial)) : nullptr, address(kOut)};
  std::vector<int> dy_loads(q.dy_size(), 0);
  expect({what, tma_type<T>(), [&q, splits](dim3 cta) { return wgrad_tiles(q, splits, cta); }, &dy_loads});
  if (splits > 1) {
    expect_output(kPartial, sizeof(float), splits * block_elements);
  } else {
    expect_output(kOut, sizeof(T), block_elements);
  }
  LaunchStatus status;
  if (!bsr_conv2d_wgrad_sm90(args, nullptr, &status) || status.error != cudaSuccess) {
    return fail("%s: bsr_conv2d_wgrad_sm90 did not launch", what.c_str());
  }
  // Each block reduces over every output pixel once: dY's elements at its block-row's channels, once per block.
  std::vector<int> row_blocks(out_channels / BS, 0);
  for (int32_t r : q.w.coo_row) ++row_blocks[r];
  for (int64_t i = 0; i < q.dy_size(); ++i) {
    const int want = row_blocks[i % out_channels / BS];
    if (dy_loads[i] != want) {
      fail("%s: %s loaded %d times, expected once for each of the %d blocks of its block-row", what.c_str(),
           nhwc("dy", i, layer.out_h, layer.out_w, out_channels).c_str(), dy_loads[i], want);
    }
  }
  const auto block_element = [&](int64_t i) {
    return "dW[" + std::to_string(i / (BS * BS)) + "][" + std::to_string(i / BS % BS) + "][" +
           std::to_string(i % BS) + "]";
  };
  const std::vector<double> want = direct_wgrad(q);
  if (splits == 1) return check_output(what, want, block_element);
  // The partials [splits, nnz, bs, bs]: each stored once, adding up (in any order: integers) to the gradient.
  check_stored_once(what, output.stores, [&](int64_t i) {
    return "split " + std::to_string(i / block_elements) + "'s partial of " + block_element(i % block_elements);
  });
  std::vector<double> sums(block_elements, 0.0);
  for (int64_t i = 0; i < splits * block_elements; ++i) sums[i % block_elements] += output.values[i];
  check_values(what + " (partials added)", sums, want, block_element);
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

int main() {
  using namespace sparsekern::cuda;
  using cutlass::bfloat16_t;
  using cutlass::half_t;
  // (name, batch, height, width, kernel_h, kernel_w, pad_top, pad_left, dil_h, dil_w, out_h, out_w)
  const Layer k3x3{"3x3 pad 1", 2, 9, 19, 3, 3, 1, 1, 1, 1, 9, 19};
  const Layer k3x3_dilated{"3x3 dilation 2 pad 2", 2, 9, 19, 3, 3, 2, 2, 2, 2, 9, 19};
  const Layer k3x1{"3x1 pad 0", 2, 9, 19, 3, 1, 0, 0, 1, 1, 7, 19};
  // Bottom padding 10, right padding -1 (cropped): output_size given.
  const Layer k2x3_uneven{"2x3 dilation (3, 2) pad (0, 1) to 12x3", 1, 5, 7, 2, 3, 0, 1, 3, 2, 12, 3};

  // (layer, C, N, bias, seed); the last block-row without blocks
  check_forward<half_t, 64>(k3x3, 128, 128, true, 1);
  check_forward<half_t, 64>(k3x3_dilated, 128, 192, false, 2);
  check_forward<half_t, 64>(k3x1, 192, 128, true, 3);
  check_forward<half_t, 64>(k2x3_uneven, 64, 128, false, 4);
  check_forward<bfloat16_t, 128>(k3x3, 128, 256, false, 5);
  check_forward<bfloat16_t, 128>(k3x3_dilated, 256, 256, true, 6);
  check_forward<bfloat16_t, 128>(k3x1, 128, 256, true, 7);
  // (layer, C, N, the last chunk of channels without blocks, seed)
  check_dgrad<half_t, 64>(k3x3, 128, 128, false, 11);
  check_dgrad<half_t, 64>(k3x3_dilated, 192, 128, true, 12);
  check_dgrad<half_t, 64>(k3x1, 128, 192, false, 13);
  check_dgrad<half_t, 64>(k2x3_uneven, 128, 64, false, 14);
  check_dgrad<bfloat16_t, 128>(k3x3, 256, 128, false, 15);
  check_dgrad<bfloat16_t, 128>(k3x3_dilated, 128, 256, false, 16);
  check_dgrad<bfloat16_t, 128>(k3x1, 256, 128, true, 17);
  // (layer, C, N, splits, seed): 12 patches of 4 x 16 output pixels on the 9 x 19 outputs, 8 on the 7 x 19, 3 on the
  // 12 x 3 (5 splits of 12: the last one empty)
  check_wgrad<half_t, 64>(k3x3, 128, 128, 1, 21);
  check_wgrad<half_t, 64>(k3x3_dilated, 128, 128, 5, 22);
  check_wgrad<half_t, 64>(k3x1, 64, 128, 3, 23);
  check_wgrad<half_t, 64>(k2x3_uneven, 128, 64, 2, 24);
  check_wgrad<bfloat16_t, 128>(k3x3, 128, 256, 1, 25);
  check_wgrad<bfloat16_t, 128>(k3x3_dilated, 256, 128, 5, 26);
  check_wgrad<bfloat16_t, 128>(k3x1, 128, 128, 4, 27);
  check_wgrad<bfloat16_t, 64>(k3x3, 128, 64, 1, 28);
  check_wgrad<bfloat16_t, 64>(k3x3_dilated, 64, 128, 3, 29);

  if (failures > 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok %ld CTAs, %ld steps, %ld TMA boxes (%ld elements zero-filled), %ld tile elements, %ld outputs\n",
              counts.ctas, counts.steps, counts.boxes, counts.zero_filled, counts.elements, counts.outputs);
  return 0;
}
