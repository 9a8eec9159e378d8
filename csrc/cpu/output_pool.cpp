#include "cpu/output_pool.h"

#include <cstdint>
#include <deque>
#include <mutex>
#include <new>

#include <ATen/EmptyTensor.h>
#include <ATen/Functions.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>

namespace sparsekern {
namespace cpu {
namespace {

// Below this the page faults are a small share of an op's time: not worth holding memory for.
constexpr size_t kMinPooledBytes = size_t(1) << 20;
// Free buffers kept at most; beyond it the oldest are released. A request takes a free buffer at most 25%
// larger than itself, so that a small output never pins a large buffer.
constexpr size_t kMaxFreeBytes = size_t(256) << 20;
constexpr size_t kAlignment = 64;
constexpr size_t kGranule = size_t(64) << 10;

struct Buffer {
  void* data;
  size_t capacity;
};

class OutputPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    Buffer buffer = take(n);
    if (buffer.data == nullptr) {
      buffer.capacity = (n + kGranule - 1) / kGranule * kGranule;
      buffer.data = ::operator new(buffer.capacity, std::align_val_t(kAlignment));
    }
    auto* context = new Buffer(buffer);
    return {buffer.data, context, &OutputPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  static OutputPool& instance() {
    // Never destroyed: tensors may be freed after static destructors have run.
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

 private:
  // The smallest free buffer that fits n with at most 25% to spare, removed from the free list.
  Buffer take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->capacity >= n && it->capacity - n <= n / 4 && (best == free_.end() || it->capacity < best->capacity))
        best = it;
    if (best == free_.end()) return {nullptr, 0};
    const Buffer found = *best;
    free_.erase(best);
    free_bytes_ -= found.capacity;
    return found;
  }

  static void give_back(void* context) {
    auto* buffer = static_cast<Buffer*>(context);
    instance().keep(*buffer);
    delete buffer;
  }

  void keep(const Buffer& buffer) {
    std::deque<Buffer> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(buffer);
      free_bytes_ += buffer.capacity;
      while (free_bytes_ > kMaxFreeBytes) {
        released.push_back(free_.front());
        free_bytes_ -= free_.front().capacity;
        free_.pop_front();
      }
    }
    for (const Buffer& b : released) ::operator delete(b.data, std::align_val_t(kAlignment));
  }

  std::mutex mutex_;
  std::deque<Buffer> free_;  // oldest first
  size_t free_bytes_ = 0;
};

}  // namespace

at::Tensor empty_output(c10::IntArrayRef sizes, const at::Tensor& like) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (static_cast<size_t>(numel) * like.element_size() < kMinPooledBytes) return at::empty(sizes, like.options());
  return at::detail::empty_generic(sizes, &OutputPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), c10::nullopt);
}

}  // namespace cpu
}  // namespace sparsekern
