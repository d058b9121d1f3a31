// The ring schedule: one loop for every device, over two interfaces.
//
// At step t (0 <= t < world) rank r holds the K/V that started on rank (r - t) mod world.
// Forward : before computing step t, post the exchange that brings step t+1's K/V (send what is in
//           hand to r+1, receive from r-1): K/V make world-1 hops, double-buffered.
// Backward: K/V travel as in forward. The own block's dK/dV (step 0) stay home. Every other
//           block's dK/dV follow it one step behind: at step t >= 1 rank r computes its
//           contribution to the block in hand, adds the partial sum that r-1 sent at the end of
//           step t-1 (none at t = 1: the sum starts there), and sends the sum to r+1; after step
//           world-1 that hop goes to the block's owner instead, which adds it to its home part:
//           world-1 dK/dV hops (one fewer than sending the own block's part around too). dQ
//           stays local (inside BlockOps).
// Truncated ring: when no rank needs K/V from further than k ranks back (a causal sliding window
// over contiguous shards), the ring runs k+1 steps only and the last dK/dV hop jumps back k ranks.
// Each step is split into phases (begin, compute, end; finish after the last step) so that a
// single thread can drive several virtual ranks in lockstep over an in-memory transport.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace ring_attn {

// Buffer slots named by the scheduler; adapters map them to memory. K/V slots hold K and V of one
// block packed together; grad slots hold dK and dV of one block packed the same way (accumulator
// dtype).
namespace slot {
constexpr int kOwnKV = 0;
constexpr int kKVRecv0 = 1;     // kKVRecv0 + (i % 2)
constexpr int kGradAcc0 = 3;    // kGradAcc0 + (i % 2)
constexpr int kGradRecv0 = 5;   // kGradRecv0 + (i % 2)
constexpr int kGradHome = 7;    // the own block's dK/dV; the result
// All-gather exchange: every rank's K/V, (world, 2, ...): block `source` at index source; and
// this rank's dK/dV contributions to every block, laid out alike (accumulator dtype).
constexpr int kAllKV = 8;
constexpr int kAllGrad = 9;
constexpr int kCount = 10;
}  // namespace slot

enum class Channel : int { kKV = 0, kGradKV = 1 };
const char* channel_name(Channel channel);

// One ring exchange: send `send_slot` to rank+offset and receive `recv_slot` from rank-offset.
struct Exchange {
  Channel channel;
  int step;  // the ring step at whose start (K/V) or end (dK/dV) the exchange is posted
  int send_slot;
  int recv_slot;
  int offset = 1;  // 1 around the ring; the final dK/dV hop of a truncated ring goes back
};

// One collective over every rank of a transport.
//   kAllGather:     recv[r] = rank r's send, for every rank r (recv: (world, *send.shape)).
//   kReduceScatter: recv = sum over ranks r of rank r's send[rank] (send: (world, *recv.shape)).
enum class CollectiveKind : int { kAllGather = 0, kReduceScatter = 1 };
const char* collective_name(CollectiveKind kind);

struct Collective {
  CollectiveKind kind;
  int send_slot;
  int recv_slot;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // Starts the exchange without blocking.
  virtual void post(const Exchange& exchange) = 0;
  // Blocks until both halves of a posted exchange completed; throws RingTimeoutError on deadline.
  // The exchange is identified by (channel, step).
  virtual void wait(const Exchange& exchange) = 0;
  // Starts a collective without blocking; every rank posts the same collectives in the same order.
  virtual void post_collective(const Collective& collective);
  // Blocks until this rank's part of the collective completed (identified by its kind).
  virtual void wait_collective(const Collective& collective);
};

class BlockOps {
 public:
  virtual ~BlockOps() = default;
  // False when the mask hides every (local query, key of `source`) pair: the block is skipped.
  virtual bool is_needed(int source) const = 0;
  // Attends the local queries to the K/V in `kv_slot` (which started on `source`) and merges.
  // In the all-rank slots (kAllKV, kAllGrad) a block is the entry `source`.
  virtual void forward(int kv_slot, int source) = 0;
  // Writes this rank's dK/dV contribution for the K/V in `kv_slot` into `grad_slot` (overwriting)
  // and accumulates dQ locally.
  virtual void backward(int kv_slot, int source, int grad_slot) = 0;
  virtual void zero_grad(int grad_slot) = 0;  // the whole slot
  // grad[dst] += grad[src]
  virtual void add_grad(int dst_slot, int src_slot) = 0;
};

// Raised when a ring wait passes its deadline: `receiving` from `peer`, or sending to it. A
// transport that runs both halves of a hop as one operation (NCCL) passes send_peer >= 0: then
// `peer` is the rank received from, send_peer the rank sent to, and the message names both.
class RingTimeoutError : public std::runtime_error {
 public:
  RingTimeoutError(double seconds, int step, Channel channel, bool receiving, int peer,
                   int send_peer = -1);
  int step;
  int peer;
  bool receiving;
  int send_peer;
};

inline int mod(int a, int n) { return ((a % n) + n) % n; }

// Rank whose K/V a rank holds at `step`.
inline int source_at(int rank, int world, int step) { return mod(rank - step, world); }

// Steps the ring must run so that every rank sees every block it needs: 1 + the largest step at
// which some rank needs the block in hand. needed(rank, source) must be the same on every rank.
template <typename Needed>
int steps_needed(int world, Needed needed) {
  int steps = 1;
  for (int rank = 0; rank < world; ++rank) {
    for (int step = steps; step < world; ++step) {
      if (needed(rank, source_at(rank, world, step))) steps = step + 1;
    }
  }
  return steps;
}

class RingForward {
 public:
  // num_steps: from steps_needed (world when <= 0).
  RingForward(Transport& transport, BlockOps& ops, int num_steps = 0);
  int num_steps() const { return steps_; }
  void begin_step(int step);    // post the K/V exchange for step+1
  void compute_step(int step);  // attend to the block in hand (unless skipped)
  void end_step(int step);      // wait for the K/V of step+1
  void run();
  int blocks_computed() const { return computed_; }
  int exchanges_posted() const { return posted_; }

 private:
  static int kv_slot(int step) { return step == 0 ? slot::kOwnKV : slot::kKVRecv0 + (step - 1) % 2; }
  Exchange kv_exchange(int step) const;

  Transport& transport_;
  BlockOps& ops_;
  int rank_;
  int world_;
  int steps_;
  int computed_ = 0;
  int posted_ = 0;
};

class RingBackward {
 public:
  RingBackward(Transport& transport, BlockOps& ops, int num_steps = 0);
  int num_steps() const { return steps_; }
  void begin_step(int step);
  void compute_step(int step);
  void end_step(int step);
  void finish();  // wait for the rest of this rank's own dK/dV to come home, add it (kGradHome)
  void run();
  int blocks_computed() const { return computed_; }
  int exchanges_posted() const { return posted_; }

 private:
  static int kv_slot(int step) { return step == 0 ? slot::kOwnKV : slot::kKVRecv0 + (step - 1) % 2; }
  static int grad_acc(int step) { return slot::kGradAcc0 + step % 2; }
  static int grad_recv(int step) { return slot::kGradRecv0 + step % 2; }
  Exchange kv_exchange(int step) const;
  Exchange grad_exchange(int step) const;

  Transport& transport_;
  BlockOps& ops_;
  int rank_;
  int world_;
  int steps_;
  int send_slot_ = -1;  // slot holding the travelling dK/dV sum to send at the end of this step
  int computed_ = 0;
  int posted_ = 0;
};

// Drives every virtual rank's schedule from one thread, phase by phase: all ranks begin a step,
// then all compute it, then all end it; after the last step, backward schedules all finish. Every
// exchange is then posted by both its ends before either waits for it, so an in-memory transport
// between the virtual ranks never blocks (LocalRing, bench_ring).
template <typename Schedule>
void run_lockstep(std::vector<Schedule>& schedules) {
  const int steps = schedules.at(0).num_steps();
  for (int step = 0; step < steps; ++step) {
    for (Schedule& schedule : schedules) schedule.begin_step(step);
    for (Schedule& schedule : schedules) schedule.compute_step(step);
    for (Schedule& schedule : schedules) schedule.end_step(step);
  }
  if constexpr (requires(Schedule& schedule) { schedule.finish(); }) {
    for (Schedule& schedule : schedules) schedule.finish();
  }
}

}  // namespace ring_attn
