// The ring schedule: one loop for every device, over two interfaces.
//
// At step t (0 <= t < steps) rank r works on the K/V block that started on rank (r - t) mod world,
// if that block came this far. Each block travels only as far as some rank needs it: block j's
// reach d_j is the largest s in 1..world-1 such that rank (j + s) mod world needs block j (0 when
// no other rank does), and block j makes the d_j hops j -> j+1 -> ... -> j+d_j. The ring runs
// steps = 1 + max_j d_j steps; every rank agrees on every reach (they derive from the call's agreed
// arguments), so both ends of a hop know of it.
// Forward : before computing step t, post the exchange that brings step t+1's K/V: rank r sends
//           the block in hand, j = r-t, to r+1 iff d_j >= t+1, and receives block r-1-t from r-1
//           iff d_{r-1-t} >= t+1 (either half, both or neither: then nothing is posted).
//           Double-buffered. Forward hops: sum_j d_j.
// Backward: K/V travel as in forward. The own block's dK/dV (step 0) stay home. Block j's dK/dV
//           follow it one step behind: at step t in 1..d_j rank j+t computes its contribution (if
//           it needs the block), adds the partial sum that j+t-1 sent at the end of step t-1
//           (none at t = 1: the sum starts there), and at the end of step t sends the sum on to
//           j+t+1 if t < d_j (channel kGradKV), or home to j, d_j ranks back, if t == d_j
//           (channel kGradHome: at one step a rank may receive a travelling sum from r-1 and its
//           own block's sum from r+d_r). The owner adds its home sum once that exchange completed
//           (end of step d_j+1, or finish). Every exchange posted at the end of step t completes
//           at the end of step t+1 (or in finish), before its buffers are written again: double
//           buffering. Backward hops: 2 * sum_j d_j (K/V and dK/dV). dQ stays local (inside
//           BlockOps).
// A rank that receives no block for step t holds none then, and needs none: if it needed block
// r-t, the definition of the reach gives d_{r-t} >= t, so the block would have come.
// A full ring (every rank needs every block) is the special case d_j = world-1: world-1 hops of
// K/V per block and world-1 of dK/dV, the last of which jumps back home.
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
constexpr int kNone = -1;       // no slot: the exchange has no such half
constexpr int kOwnKV = 0;
constexpr int kKVRecv0 = 1;     // kKVRecv0 + (i % 2)
constexpr int kGradAcc0 = 3;    // kGradAcc0 + (i % 2)
constexpr int kGradRecv0 = 5;   // kGradRecv0 + (i % 2)
constexpr int kGradHome = 7;    // the own block's dK/dV; the result
constexpr int kGradHomeRecv = 8;  // the other ranks' sum for the own block, brought home
// All-gather exchange: every rank's K/V, (world, 2, ...): block `source` at index source; and
// this rank's dK/dV contributions to every block, laid out alike (accumulator dtype).
constexpr int kAllKV = 9;
constexpr int kAllGrad = 10;
constexpr int kCount = 11;
}  // namespace slot

// kKV: K/V to the next rank; kGradKV: travelling dK/dV sums to the next rank; kGradHome: finished
// dK/dV sums back to their owner. An exchange is identified by (channel, step).
enum class Channel : int { kKV = 0, kGradKV = 1, kGradHome = 2 };
constexpr int kChannelCount = 3;
const char* channel_name(Channel channel);

// One ring exchange: send `send_slot` to rank+offset and receive `recv_slot` from rank-offset.
// Either half may be absent (slot::kNone); an exchange with neither half is never posted.
struct Exchange {
  Channel channel;
  int step;  // the ring step at whose start (K/V) or end (dK/dV) the exchange is posted
  int send_slot;
  int recv_slot;
  int offset = 1;  // 1 around the ring; -step for the dK/dV hops home (kGradHome)
  bool sends() const { return send_slot != slot::kNone; }
  bool receives() const { return recv_slot != slot::kNone; }
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
  // Starts the halves the exchange has (at least one) without blocking.
  virtual void post(const Exchange& exchange) = 0;
  // Blocks until the halves of a posted exchange completed; throws RingTimeoutError on deadline.
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

// How far each block travels: reaches[j] = the largest s in 1..world-1 such that
// needed((j + s) mod world, j), 0 when no other rank needs block j. needed(rank, source) must be
// the same on every rank.
template <typename Needed>
std::vector<int> block_reaches(int world, Needed needed) {
  std::vector<int> reaches(world, 0);
  for (int block = 0; block < world; ++block) {
    for (int s = world - 1; s >= 1; --s) {
      if (needed(mod(block + s, world), block)) {
        reaches[block] = s;
        break;
      }
    }
  }
  return reaches;
}

// Steps of a ring whose blocks travel `reaches`: 1 + the largest reach.
int ring_steps(const std::vector<int>& reaches);

// Which block a rank holds at each step and the K/V exchanges that move the blocks, from every
// block's reach (block_reaches; empty: the full ring, every block reaches world-1).
class RingRoute {
 public:
  RingRoute(int rank, int world, std::vector<int> reaches);
  int rank() const { return rank_; }
  int steps() const { return steps_; }
  int reach(int block) const { return reaches_[block]; }
  // The block of `step`: the one that started on rank-step.
  int source(int step) const { return source_at(rank_, world_, step); }
  // Whether that block came this far.
  bool holds(int step) const { return step == 0 || reach(source(step)) >= step; }
  // Whether the block of `step` goes on to rank+1 after it, and whether step+1's block comes in
  // from rank-1: the halves of the step's hop, for K/V and the travelling dK/dV sums alike.
  bool passes_on(int step) const { return reach(source(step)) > step; }
  bool takes_in(int step) const { return reach(source(step + 1)) > step; }
  static int kv_slot(int step) { return step == 0 ? slot::kOwnKV : slot::kKVRecv0 + (step - 1) % 2; }
  // Posted at the start of `step` (< steps-1): the block in hand on to rank+1, step+1's block in.
  Exchange kv_exchange(int step) const;

 private:
  int rank_;
  int world_;
  std::vector<int> reaches_;
  int steps_;
};

class RingForward {
 public:
  // reaches: from block_reaches (empty: the full ring).
  RingForward(Transport& transport, BlockOps& ops, std::vector<int> reaches = {});
  int num_steps() const { return route_.steps(); }
  void begin_step(int step);    // post the K/V exchange for step+1
  void compute_step(int step);  // attend to the block in hand (unless skipped)
  void end_step(int step);      // wait for the K/V of step+1
  void run();
  int blocks_computed() const { return computed_; }
  // Hops this rank sent (exchanges posted with a send half).
  int exchanges_posted() const { return posted_; }

 private:
  Transport& transport_;
  BlockOps& ops_;
  RingRoute route_;
  int computed_ = 0;
  int posted_ = 0;
};

class RingBackward {
 public:
  // reaches: from block_reaches (empty: the full ring).
  RingBackward(Transport& transport, BlockOps& ops, std::vector<int> reaches = {});
  int num_steps() const { return route_.steps(); }
  void begin_step(int step);    // post the K/V exchange for step+1
  void compute_step(int step);  // this rank's dK/dV contribution to the block in hand
  void end_step(int step);      // take in the sums of step-1's dK/dV hops, post this step's
  void finish();  // wait for the last dK/dV hops; the own block's sum home into kGradHome
  void run();
  int blocks_computed() const { return computed_; }
  // Hops this rank sent (exchanges posted with a send half).
  int exchanges_posted() const { return posted_; }

 private:
  static int grad_acc(int step) { return slot::kGradAcc0 + step % 2; }
  static int grad_recv(int step) { return slot::kGradRecv0 + step % 2; }
  // Posted at the end of `step` (>= 1): the sum for the block in hand on to rank+1, and the sum
  // for block rank-1-step in from rank-1.
  Exchange travel_exchange(int step) const;
  // Posted at the end of `step` (>= 1): the finished sum for the block in hand home to its owner
  // (rank-step), and this rank's own block's sum in from rank+step.
  Exchange home_exchange(int step) const;
  // Waits for the dK/dV exchanges posted at the end of the previous step and adds what they
  // brought: a travelling sum into the one to send on, a home sum into kGradHome.
  void complete_grad_exchanges();

  Transport& transport_;
  BlockOps& ops_;
  RingRoute route_;
  int send_slot_ = slot::kNone;  // the travelling dK/dV sum to send at the end of this step
  std::vector<Exchange> grad_in_flight_;  // dK/dV exchanges posted at the end of the last step
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
