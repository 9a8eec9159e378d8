// The Hopper TMA emulated on the host, shared by tests/cuda_sm90_host_checks.cu (the GEMMs) and
// tests/cuda_sm90_conv_host_checks.cu (the convolutions), each of which includes it first, before CuTe and the
// kernels. It provides:
//   - a cuTensorMapEncodeTiled stub (no driver here) that records each descriptor's arguments in tma_records and
//     keeps their index in the descriptor; CuTe's make_tma_atom and the kernels call it directly
//     (CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL, defined here);
//   - CuTe's device-only layout helpers (tma_partition) made callable on the host (CUTE_DEVICE as host-and-device);
//   - tma_descriptor_problem: what the box emulation takes for granted of a descriptor;
//   - emulate_tma_box: one TMA box as the hardware writes it into a host image of shared memory (swizzled, zero-filled
//     past the tensor's edge), each 2-byte slot receiving the id (address / 2) of the element it holds, or 0;
//   - BlockLayout and block_layout: the block-sparse index the kernels walk, for the blocks a test chooses.
#pragma once

#define CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL 1

// CuTe's device-only layout helpers (tma_partition, called by the kernels' loaders) callable here too.
#include <cute/config.hpp>
#undef CUTE_DEVICE
#define CUTE_DEVICE CUTE_HOST_DEVICE

#include <cuda.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

// cuTensorMapEncodeTiled's arguments: the tensor (global strides in bytes, of dimensions 1..rank-1), the box and how
// it lands in shared memory.
struct TmaRecord {
  CUtensorMapDataType type;
  int rank;
  uint64_t address;
  uint64_t dims[5], strides[5];
  uint32_t box[5], element_strides[5];
  CUtensorMapInterleave interleave;
  CUtensorMapSwizzle swizzle;
  CUtensorMapFloatOOBfill oob_fill;
};
std::vector<TmaRecord> tma_records;

// No driver here: the descriptor keeps the index of its arguments in tma_records. CuTe's make_tma_atom and the
// kernels' encode_image call it directly (CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL), where the build looks it up
// through the runtime.
extern "C" CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank,
                                                   void* address, const cuuint64_t* dims, const cuuint64_t* strides,
                                                   const cuuint32_t* box, const cuuint32_t* element_strides,
                                                   CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob_fill) {
  if (rank < 1 || rank > 5) return CUDA_ERROR_INVALID_VALUE;
  TmaRecord r{type, static_cast<int>(rank), reinterpret_cast<uint64_t>(address), {}, {}, {}, {}, interleave, swizzle,
              oob_fill};
  for (cuuint32_t i = 0; i < rank; ++i) {
    r.dims[i] = dims[i];
    r.strides[i] = i == 0 ? 0 : strides[i - 1];
    r.box[i] = box[i];
    r.element_strides[i] = element_strides[i];
  }
  *map = CUtensorMap{};
  map->opaque[0] = tma_records.size();
  tma_records.push_back(r);
  return CUDA_SUCCESS;
}

__attribute__((format(printf, 1, 2))) inline std::string tma_message(const char* format, ...) {
  char text[256];
  va_list args;
  va_start(args, format);
  std::vsnprintf(text, sizeof(text), format, args);
  va_end(args);
  return text;
}

inline int tma_swizzle_bytes(CUtensorMapSwizzle swizzle) {
  switch (swizzle) {
    case CU_TENSOR_MAP_SWIZZLE_32B: return 32;
    case CU_TENSOR_MAP_SWIZZLE_64B: return 64;
    case CU_TENSOR_MAP_SWIZZLE_128B: return 128;
    default: return 0;
  }
}

// What the box emulation takes for granted, from cuTensorMapEncodeTiled's rules (2-byte elements of `type`); the
// box's inner extent fills the swizzle's rows exactly, as CuTe and the kernels make it. Empty if so, else the problem.
inline std::string tma_descriptor_problem(const TmaRecord& d, CUtensorMapDataType type) {
  bool ok = d.type == type && d.interleave == CU_TENSOR_MAP_INTERLEAVE_NONE &&
            d.oob_fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE && d.address % 16 == 0 &&
            d.box[0] * 2 == static_cast<uint32_t>(tma_swizzle_bytes(d.swizzle));
  for (int i = 0; i < d.rank; ++i) {
    ok = ok && d.box[i] >= 1 && d.box[i] <= 256 && d.element_strides[i] == 1 && d.strides[i] % 16 == 0;
  }
  if (ok) return {};
  return tma_message("a TMA descriptor this test cannot emulate, or the hardware would refuse (type %d, swizzle %d, "
                     "box[0] %u)",
                     static_cast<int>(d.type), static_cast<int>(d.swizzle), d.box[0]);
}

// One TMA box as the hardware writes it: its elements in order, dimension 0 fastest, fill the destination densely,
// then the swizzle moves each 16-byte chunk, XORing the shared address's bits from 4 with those from 7 (as many as
// the swizzle span has 16-byte chunks, log2); the destination is aligned to the pattern's repeat, as TMA requires.
// Elements whose coordinates fall outside the tensor (negative ones too) are zero-filled: their slot gets 0, the
// others the element's id (its address / 2).
// slot(offset) is the int64_t slot of the shared-memory image at that byte offset, or nullptr outside it; a slot
// must hold `empty` before the box writes it. problem(message) hears of each fault: a destination off the swizzle
// pattern (the box is still written), a slot outside the image or written twice (the box stops there). Returns the
// box's element count, or -1 if it stopped; *zero_filled counts the zero-filled elements written.
template <class Slot, class Problem>
int64_t emulate_tma_box(const TmaRecord& d, const int32_t* coord, int64_t dst, int64_t empty, const Slot& slot,
                        const Problem& problem, int64_t* zero_filled) {
  const int chunks = tma_swizzle_bytes(d.swizzle) / 16;
  if (dst % (128 * chunks) != 0) {
    problem(tma_message("a TMA box to shared offset %lld, off its swizzle pattern", static_cast<long long>(dst)));
  }
  int64_t elements = 1;
  for (int i = 0; i < d.rank; ++i) elements *= d.box[i];
  for (int64_t e = 0; e < elements; ++e) {
    int64_t rest = e, global = static_cast<int64_t>(d.address);
    bool inside = true;
    for (int i = 0; i < d.rank; ++i) {
      const int64_t c = coord[i] + rest % d.box[i];
      rest /= d.box[i];
      inside = inside && c >= 0 && c < static_cast<int64_t>(d.dims[i]);
      global += c * (i == 0 ? 2 : static_cast<int64_t>(d.strides[i]));
    }
    int64_t at = dst + e * 2;
    at ^= ((at >> 7) & (chunks - 1)) << 4;
    int64_t* s = slot(at);
    if (s == nullptr || *s != empty) {
      problem(tma_message("a TMA box writes shared offset %lld %s", static_cast<long long>(at),
                          s == nullptr ? "outside the shared memory" : "twice"));
      return -1;
    }
    *s = inside ? global / 2 : 0;
    *zero_filled += !inside;
  }
  return elements;
}

// A block-sparse layout's index, as the kernels read it (block-CSR row_ptr, col_idx, coo_row and the transposed
// col_ptr, row_idx, perm).
struct BlockLayout {
  std::vector<int32_t> row_ptr{0}, col_idx, coo_row, col_ptr, row_idx, perm;
  int64_t nnz() const { return static_cast<int64_t>(col_idx.size()); }
};

// The layout of the blocks (r, c) that keep(r, c) selects, asked row by row; the last block where it selects none.
template <class Keep>
BlockLayout block_layout(int block_rows, int block_cols, Keep&& keep) {
  BlockLayout w;
  for (int r = 0; r < block_rows; ++r) {
    for (int c = 0; c < block_cols; ++c) {
      if (keep(r, c) || (w.col_idx.empty() && r == block_rows - 1 && c == block_cols - 1)) {
        w.col_idx.push_back(c);
        w.coo_row.push_back(r);
      }
    }
    w.row_ptr.push_back(static_cast<int32_t>(w.col_idx.size()));
  }
  w.col_ptr.assign(block_cols + 1, 0);
  for (int32_t c : w.col_idx) ++w.col_ptr[c + 1];
  for (int c = 0; c < block_cols; ++c) w.col_ptr[c + 1] += w.col_ptr[c];
  std::vector<int32_t> next(w.col_ptr.begin(), w.col_ptr.end() - 1);
  w.row_idx.resize(w.col_idx.size());
  w.perm.resize(w.col_idx.size());
  for (int32_t j = 0; j < w.nnz(); ++j) {
    const int32_t q = next[w.col_idx[j]]++;
    w.row_idx[q] = w.coo_row[j];
    w.perm[q] = j;
  }
  return w;
}
