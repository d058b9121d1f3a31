// A cache of values by string key within a byte budget: when an insertion takes it over the
// budget, the least recently used entries go first, except pinned ones, which stay for good (the
// ring pins the device copies that a CUDA graph captured, since the graph keeps their addresses).
// Not thread-safe: the caller locks.
#pragma once

#include <cstddef>
#include <iterator>
#include <list>
#include <map>
#include <string>
#include <utility>

namespace ring_attn {

template <typename V>
class BoundedCache {
 public:
  explicit BoundedCache(size_t max_bytes) : max_bytes_(max_bytes) {}

  // The value of `key` (now the most recently used; pinned from now on when `pin`), or nullptr.
  const V* find(const std::string& key, bool pin) {
    const auto it = entries_.find(key);
    if (it == entries_.end()) return nullptr;
    Entry& e = it->second;
    recency_.splice(recency_.begin(), recency_, e.recency);
    e.pinned = e.pinned || pin;
    return &e.value;
  }

  // Adds `key` (absent) with its value of `bytes`, then evicts unpinned entries, least recently
  // used first, while over the budget (never the new one).
  const V& insert(const std::string& key, V value, size_t bytes, bool pin) {
    recency_.push_front(key);
    Entry& e = entries_.emplace(key, Entry{std::move(value), bytes, pin, recency_.begin()})
                   .first->second;
    bytes_ += bytes;
    for (auto it = std::prev(recency_.end()); bytes_ > max_bytes_ && it != recency_.begin();) {
      const auto victim = entries_.find(*it);
      const auto before = std::prev(it);
      if (!victim->second.pinned) {
        bytes_ -= victim->second.bytes;
        entries_.erase(victim);
        recency_.erase(it);
      }
      it = before;
    }
    return e.value;
  }

  size_t bytes() const { return bytes_; }
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    V value;
    size_t bytes;
    bool pinned;
    std::list<std::string>::iterator recency;
  };
  size_t max_bytes_;
  size_t bytes_ = 0;
  std::map<std::string, Entry> entries_;
  std::list<std::string> recency_;  // most recently used first
};

}  // namespace ring_attn
