// The all-gather schedule: every rank's K/V gathered once, then all blocks attended locally.
//
// Forward : post the all-gather of the own K/V (slot kOwnKV -> kAllKV), attend to the own block
//           while it is in flight, wait, then attend to every other rank's block in ring order
//           (sources r-1, r-2, ...: the ring's merge order).
// Backward: gather K/V again the same way, compute this rank's dK/dV contribution to every block
//           it needs into kAllGrad (zero for the others), then reduce-scatter kAllGrad: rank r
//           receives sum over ranks of their contributions to block r (kGradRecv0), which becomes
//           its dK/dV (kGradHome). dQ stays local (inside BlockOps).
// One step (begin, compute, end; finish in backward), so that run_lockstep can drive several
// virtual ranks over an in-memory transport: every collective is posted by all ranks before any
// waits for it. Every rank moves the whole sequence's K/V whatever the mask: blocks the mask hides
// are skipped in compute only.
#pragma once

#include <string>

#include "ring_scheduler.h"

namespace ring_attn {

// How K/V reach the ranks that attend to them: passed around the ring, or all-gathered.
enum class KVExchange : int { kRing = 0, kAllGather = 1 };
bool parse_kv_exchange(const std::string& name, KVExchange* out);  // "ring" | "allgather"
const char* kv_exchange_name(KVExchange exchange);

// What both directions share: one step that starts with the all-gather of every rank's K/V.
class AllGatherSchedule {
 public:
  int num_steps() const { return 1; }
  void begin_step(int step);  // post the all-gather
  int blocks_computed() const { return computed_; }
  int exchanges_posted() const { return posted_; }

 protected:
  AllGatherSchedule(Transport& transport, BlockOps& ops);

  Transport& transport_;
  BlockOps& ops_;
  int rank_;
  int world_;
  int computed_ = 0;
  int posted_ = 0;
};

class AllGatherForward : public AllGatherSchedule {
 public:
  AllGatherForward(Transport& transport, BlockOps& ops) : AllGatherSchedule(transport, ops) {}
  void compute_step(int step);  // own block, wait, the others
  void end_step(int) {}
  void run();
};

class AllGatherBackward : public AllGatherSchedule {
 public:
  AllGatherBackward(Transport& transport, BlockOps& ops) : AllGatherSchedule(transport, ops) {}
  void compute_step(int step);  // every needed block's dK/dV contribution into kAllGrad
  void end_step(int step);      // post the reduce-scatter
  void finish();                // wait for it: kGradHome = this rank's block's summed dK/dV
  void run();
};

}  // namespace ring_attn
