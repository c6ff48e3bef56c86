// The free blocks of one address range, by offset: first-fit allocation and coalescing on
// release. Used by the KV arena and the guarded backend. Not thread-safe (callers lock).
#pragma once

#include <cstddef>
#include <iterator>
#include <map>
#include <optional>

namespace kvgate::kernels {

class FreeList {
 public:
  // The offset of a block of `bytes` taken from the first free block large enough.
  std::optional<size_t> Take(size_t bytes) {
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < bytes) continue;
      const size_t offset = it->first, rest = it->second - bytes;
      free_.erase(it);
      if (rest > 0) free_[offset + bytes] = rest;
      return offset;
    }
    return std::nullopt;
  }
  // Makes [start, start + bytes) free, merged with free neighbours.
  void Release(size_t start, size_t bytes) {
    auto next = free_.lower_bound(start);
    if (next != free_.end() && next->first == start + bytes) {
      bytes += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == start) {
        start = prev->first;
        bytes += prev->second;
        free_.erase(prev);
      }
    }
    free_[start] = bytes;
  }

 private:
  std::map<size_t, size_t> free_;  // offset -> bytes
};

}  // namespace kvgate::kernels
