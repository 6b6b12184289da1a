// Large CPU buffers recycled within the process (lstm.h: cpu_cached_empty).
//
// glibc serves allocations above its mmap threshold with fresh pages and unmaps them on free,
// so a 39 MB reserve (medium training) costs ~10,000 page faults, each zeroing 4 KB, on every
// call (benchmarks/notes/memory.md, "Recycling the large CPU buffers"). Buffers from kMinBytes on
// are kept here when freed
// and handed out again for a request of at most their size and at least kMinFill of it. The
// cache holds at most kMaxBlocks blocks and kMaxBytes in all; a block given back to a full cache
// makes room by freeing the least recently given back ones, so the cache follows the sizes in
// use now (a block larger than the cache is freed).
// The fit is tight because a block handed out is memory in use, counted by the profiler at its
// full size: with a fit of 1-2x, blocks left by a larger model served the smaller one's reserve
// and backward scratch, and a packed training call measured 141 MB where it needs 103 MB
// (benchmarks/notes/memory.md, "Recycled blocks sized to the request").
// Contents are not cleared: callers write every element they read (as with at::empty).
// A block handed out and given back is reported to PyTorch's memory profiler as an allocation
// and a free, as the CPU allocator reports its own, so profiled peak memory counts it.
#include "../lstm.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstddef>
#include <mutex>
#include <vector>

namespace fused_lstm {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;
constexpr size_t kMaxBytes = size_t{256} << 20;
constexpr size_t kMaxBlocks = 16;
// A block serves requests of at least kMinFill of its size (at most 1/8 of it unused).
constexpr size_t kMinFillNum = 7, kMinFillDen = 8;

struct Block {
  void* ptr;
  size_t bytes;
};

struct BufferCache {
  std::mutex mutex;
  std::vector<Block> free_blocks;
  size_t free_bytes = 0;

  // The smallest free block of [bytes, bytes / kMinFill], removed from the cache; or none.
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    size_t best = free_blocks.size();
    for (size_t i = 0; i < free_blocks.size(); ++i) {
      const size_t size = free_blocks[i].bytes;
      if (size >= bytes && size / kMinFillDen * kMinFillNum <= bytes &&
          (best == free_blocks.size() || size < free_blocks[best].bytes))
        best = i;
    }
    if (best == free_blocks.size()) return {nullptr, 0};
    const Block block = free_blocks[best];
    free_blocks.erase(free_blocks.begin() + static_cast<std::ptrdiff_t>(best));
    free_bytes -= block.bytes;
    return block;
  }

  // Keeps `block` (free_blocks is in the order blocks were given back, oldest first), freeing
  // the oldest blocks as needed to stay within the caps; a block over kMaxBytes is freed.
  void give_back(Block block) {
    if (block.bytes > kMaxBytes) {
      c10::free_cpu(block.ptr);
      return;
    }
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex);
      size_t drop = 0;
      size_t bytes = free_bytes;
      while (drop < free_blocks.size() &&
             (free_blocks.size() - drop + 1 > kMaxBlocks || bytes + block.bytes > kMaxBytes)) {
        bytes -= free_blocks[drop].bytes;
        ++drop;
      }
      evicted.assign(free_blocks.begin(), free_blocks.begin() + static_cast<std::ptrdiff_t>(drop));
      free_blocks.erase(free_blocks.begin(), free_blocks.begin() + static_cast<std::ptrdiff_t>(drop));
      free_blocks.push_back(block);
      free_bytes = bytes + block.bytes;
    }
    for (const Block& old : evicted) c10::free_cpu(old.ptr);  // outside the lock
  }

  // Frees every block held (blocks handed out come back later as usual).
  void clear() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex);
      blocks.swap(free_blocks);
      free_bytes = 0;
    }
    for (const Block& block : blocks) c10::free_cpu(block.ptr);
  }
};

// Never destroyed: tensors freed during interpreter shutdown may still give blocks back.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

void report_to_profiler(const Block& block, int64_t sign) {
  if (c10::memoryProfilingEnabled())
    c10::reportMemoryUsageToProfiler(block.ptr, sign * static_cast<int64_t>(block.bytes), 0, 0,
                                     c10::Device(c10::kCPU));
}

}  // namespace

at::Tensor cpu_cached_empty(int64_t numel, at::ScalarType dtype) {
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (bytes < kMinBytes) return at::empty({numel}, at::TensorOptions().dtype(dtype));
  Block block = cache().take(bytes);
  if (block.ptr == nullptr) block = Block{c10::alloc_cpu(bytes), bytes};
  report_to_profiler(block, +1);
  return at::from_blob(
      block.ptr, {numel},
      [block](void*) {
        report_to_profiler(block, -1);
        cache().give_back(block);
      },
      at::TensorOptions().dtype(dtype));
}

void empty_buffer_cache() { cache().clear(); }

}  // namespace fused_lstm
