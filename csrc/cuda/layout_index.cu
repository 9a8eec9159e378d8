// Kernels of native_build_layout_index_: count per row and column, scan, then scatter.
// Each pass gives one warp a whole block-row or block-column, so a block's rank within its line is a
// popcount of a warp ballot and the passes need no atomics: the result is deterministic.
#include "layout_index.cuh"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kAllLanes = 0xffffffffu;
constexpr int kLineThreads = 256;  // one warp per line
constexpr int kLinesPerBlock = kLineThreads / kWarp;
constexpr int kScanThreads = kWarp * kWarp;  // one warp can scan the per-warp totals
static_assert(kScanThreads <= 1024, "scan block too large");

__device__ __forceinline__ int64_t warp_line() {
  return static_cast<int64_t>(blockIdx.x) * kLinesPerBlock + threadIdx.x / kWarp;
}

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarp; }

// counts[l] = number of blocks present in line l, where element i of line l is
// mask[l * line_stride + i * elem_stride] (rows: line_stride = n_cols, elem_stride = 1; columns: the reverse).
__global__ void __launch_bounds__(kLineThreads)
count_lines_kernel(const uint8_t* __restrict__ mask, int64_t n_lines, int64_t line_length, int64_t line_stride,
                   int64_t elem_stride, int32_t* __restrict__ counts) {
  const int64_t line = warp_line();
  if (line >= n_lines) return;  // the whole warp leaves together
  const int lane = lane_id();
  int32_t count = 0;
  for (int64_t i0 = 0; i0 < line_length; i0 += kWarp) {
    const int64_t i = i0 + lane;
    const bool present = i < line_length && mask[line * line_stride + i * elem_stride] != 0;
    count += __popc(__ballot_sync(kAllLanes, present));
  }
  if (lane == 0) counts[line] = count;
}

__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v, int lane) {
  for (int d = 1; d < kWarp; d *= 2) {
    const int32_t below = __shfl_up_sync(kAllLanes, v, d);
    if (lane >= d) v += below;
  }
  return v;
}

// Turns counts into offsets in place: on entry ptr[1..n] holds the counts, on exit ptr[0] = 0 and
// ptr[i + 1] = counts[0] + ... + counts[i]. Block 0 scans row_ptr, block 1 col_ptr; each block walks
// its array in chunks of kScanThreads, carrying the running total.
__global__ void __launch_bounds__(kScanThreads)
scan_counts_kernel(int32_t* __restrict__ row_ptr, int64_t n_rows, int32_t* __restrict__ col_ptr, int64_t n_cols) {
  __shared__ int32_t warp_totals[kScanThreads / kWarp];
  int32_t* ptr = blockIdx.x == 0 ? row_ptr : col_ptr;
  const int64_t n = blockIdx.x == 0 ? n_rows : n_cols;
  const int lane = lane_id();
  const int warp = threadIdx.x / kWarp;

  if (threadIdx.x == 0) ptr[0] = 0;
  int32_t carry = 0;
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    int32_t v = warp_inclusive_scan(i < n ? ptr[i + 1] : 0, lane);
    if (lane == kWarp - 1) warp_totals[warp] = v;
    __syncthreads();
    if (warp == 0) warp_totals[lane] = warp_inclusive_scan(warp_totals[lane], lane);
    __syncthreads();
    if (warp > 0) v += warp_totals[warp - 1];
    if (i < n) ptr[i + 1] = carry + v;
    carry += warp_totals[kScanThreads / kWarp - 1];
    __syncthreads();  // the next chunk rewrites warp_totals
  }
}

// CSR scatter, one warp per block-row: a block's position is its row's offset plus the number of blocks
// before it in the row. csr_pos keeps that position at the block's mask index for the CSC pass.
__global__ void __launch_bounds__(kLineThreads)
fill_rows_kernel(const uint8_t* __restrict__ mask, int64_t n_rows, int64_t n_cols, int64_t capacity,
                 const int32_t* __restrict__ row_ptr, int32_t* __restrict__ col_idx, int32_t* __restrict__ coo_row,
                 int32_t* __restrict__ csr_pos) {
  const int64_t r = warp_line();
  if (r >= n_rows) return;
  const int lane = lane_id();
  const unsigned lanes_before = (1u << lane) - 1u;
  int64_t row_offset = row_ptr[r];
  for (int64_t c0 = 0; c0 < n_cols; c0 += kWarp) {
    const int64_t c = c0 + lane;
    const bool present = c < n_cols && mask[r * n_cols + c] != 0;
    const unsigned ballot = __ballot_sync(kAllLanes, present);
    if (present) {
      const int64_t p = row_offset + __popc(ballot & lanes_before);
      csr_pos[r * n_cols + c] = static_cast<int32_t>(p);
      if (p < capacity) {
        col_idx[p] = static_cast<int32_t>(c);
        coo_row[p] = static_cast<int32_t>(r);
      }
    }
    row_offset += __popc(ballot);
  }
}

// CSC scatter, one warp per block-column, rows in ascending order; perm is the CSR position recorded by
// fill_rows_kernel for the same block.
__global__ void __launch_bounds__(kLineThreads)
fill_cols_kernel(const uint8_t* __restrict__ mask, int64_t n_rows, int64_t n_cols, int64_t capacity,
                 const int32_t* __restrict__ col_ptr, const int32_t* __restrict__ csr_pos,
                 int32_t* __restrict__ row_idx, int32_t* __restrict__ perm) {
  const int64_t c = warp_line();
  if (c >= n_cols) return;
  const int lane = lane_id();
  const unsigned lanes_before = (1u << lane) - 1u;
  int64_t col_offset = col_ptr[c];
  for (int64_t r0 = 0; r0 < n_rows; r0 += kWarp) {
    const int64_t r = r0 + lane;
    const bool present = r < n_rows && mask[r * n_cols + c] != 0;
    const unsigned ballot = __ballot_sync(kAllLanes, present);
    if (present) {
      const int64_t q = col_offset + __popc(ballot & lanes_before);
      if (q < capacity) {
        row_idx[q] = static_cast<int32_t>(r);
        perm[q] = csr_pos[r * n_cols + c];
      }
    }
    col_offset += __popc(ballot);
  }
}

unsigned line_blocks(int64_t n_lines) {
  return static_cast<unsigned>((n_lines + kLinesPerBlock - 1) / kLinesPerBlock);
}

}  // namespace

cudaError_t build_layout_index(const uint8_t* block_mask, int64_t n_rows, int64_t n_cols, int64_t capacity,
                               int32_t* row_ptr, int32_t* col_idx, int32_t* coo_row, int32_t* col_ptr,
                               int32_t* row_idx, int32_t* perm, int32_t* csr_pos, cudaStream_t stream) {
  cudaError_t err;
  // Counts go straight into ptr[1..n]; the scan turns them into offsets in place.
  if (n_rows > 0) {
    count_lines_kernel<<<line_blocks(n_rows), kLineThreads, 0, stream>>>(block_mask, n_rows, n_cols, n_cols, 1,
                                                                         row_ptr + 1);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (n_cols > 0) {
    count_lines_kernel<<<line_blocks(n_cols), kLineThreads, 0, stream>>>(block_mask, n_cols, n_rows, 1, n_cols,
                                                                         col_ptr + 1);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  scan_counts_kernel<<<2, kScanThreads, 0, stream>>>(row_ptr, n_rows, col_ptr, n_cols);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // With no capacity or an empty grid there is nothing to scatter.
  if (capacity == 0 || n_rows * n_cols == 0) return cudaSuccess;
  fill_rows_kernel<<<line_blocks(n_rows), kLineThreads, 0, stream>>>(block_mask, n_rows, n_cols, capacity, row_ptr,
                                                                     col_idx, coo_row, csr_pos);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  fill_cols_kernel<<<line_blocks(n_cols), kLineThreads, 0, stream>>>(block_mask, n_rows, n_cols, capacity, col_ptr,
                                                                     csr_pos, row_idx, perm);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparsekern
