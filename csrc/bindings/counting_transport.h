// A Transport that forwards to another and counts what this rank sends: an exchange with a send
// half sends its send slot (one message); an all-gather sends the own block to each other rank, and a
// reduce-scatter each other rank its share of the send slot, (world - 1) * the received size
// (world - 1 messages each). These are the volumes of a ring or direct algorithm, whatever the
// backend does inside a collective.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "core/ring_scheduler.h"

namespace ring_attn {

class CountingTransport final : public Transport {
 public:
  // `inner` and `slots` must outlive this transport.
  CountingTransport(Transport& inner, const std::vector<at::Tensor>& slots)
      : inner_(inner), slots_(slots) {}
  int rank() const override { return inner_.rank(); }
  int world_size() const override { return inner_.world_size(); }
  void post(const Exchange& exchange) override {
    inner_.post(exchange);
    if (!exchange.sends()) return;
    bytes_ += static_cast<int64_t>(slots_.at(exchange.send_slot).nbytes());
    ++messages_;
  }
  void wait(const Exchange& exchange) override { inner_.wait(exchange); }
  void post_collective(const Collective& collective) override {
    inner_.post_collective(collective);
    const at::Tensor& block = collective.kind == CollectiveKind::kAllGather
                                  ? slots_.at(collective.send_slot)
                                  : slots_.at(collective.recv_slot);
    bytes_ += static_cast<int64_t>(block.nbytes()) * (world_size() - 1);
    messages_ += world_size() - 1;
  }
  void wait_collective(const Collective& collective) override {
    inner_.wait_collective(collective);
  }
  int64_t bytes_sent() const { return bytes_; }
  int64_t messages_sent() const { return messages_; }

 private:
  Transport& inner_;
  const std::vector<at::Tensor>& slots_;
  int64_t bytes_ = 0;
  int64_t messages_ = 0;
};

}  // namespace ring_attn
