// Unit tests of csrc/core (no torch): mask classification, merge math, layouts, the ring
// scheduler driven in lockstep for several virtual ranks over an in-memory transport, and the
// bookkeeping of the library's in-memory transports (local_exchanges.h).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "core/bounded_cache.h"
#include "core/layout.h"
#include "core/local_exchanges.h"
#include "core/mask.h"
#include "core/merge.h"
#include "core/allgather_scheduler.h"
#include "core/ring_scheduler.h"

using namespace ring_attn;

static int g_failures = 0;
static int g_checks = 0;
#define CHECK(cond)                                                              \
  do {                                                                           \
    ++g_checks;                                                                  \
    if (!(cond)) {                                                               \
      ++g_failures;                                                              \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                            \
  } while (0)

// ------------------------------------------------------------------------------------------
// Masks: classification from ranges agrees with brute force over every element.

static TileKind brute_force(const MaskSpec& mask, const std::vector<int32_t>& q,
                            const std::vector<int32_t>& k) {
  size_t visible = 0;
  for (int32_t qp : q)
    for (int32_t kp : k) visible += is_visible(mask, qp, kp);
  if (visible == 0) return TileKind::kSkip;
  if (visible == q.size() * k.size()) return TileKind::kFull;
  return TileKind::kPartial;
}

static void test_mask_classification() {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 2000; ++trial) {
    const int nq = 1 + rng() % 9, nk = 1 + rng() % 9;
    const int q0 = rng() % 40, k0 = rng() % 40, qs = 1 + rng() % 3, ks = 1 + rng() % 3;
    std::vector<int32_t> q(nq), k(nk);
    for (int i = 0; i < nq; ++i) q[i] = q0 + i * qs;
    for (int j = 0; j < nk; ++j) k[j] = k0 + j * ks;
    for (bool causal : {false, true}) {
      MaskSpec mask{causal};
      const TileKind got = classify_tile(mask, range_of(q.data(), 0, nq), range_of(k.data(), 0, nk));
      const TileKind want = brute_force(mask, q, k);
      CHECK(got == want);  // exact for increasing positions
    }
  }
  MaskSpec causal{true};
  CHECK(classify_tile(causal, PositionRange{1, 0}, PositionRange{0, 5}) == TileKind::kSkip);
  CHECK(classify_tile(causal, PositionRange{10, 20}, PositionRange{0, 10}) == TileKind::kFull);
  CHECK(classify_tile(causal, PositionRange{10, 20}, PositionRange{0, 11}) == TileKind::kPartial);
  CHECK(classify_tile(causal, PositionRange{10, 20}, PositionRange{21, 30}) == TileKind::kSkip);
}

// Windows and packed sequences: tile_bounds + classify_tile against brute force over elements.
static void test_mask_bounds() {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 4000; ++trial) {
    MaskSpec mask;
    mask.causal = rng() % 2;
    mask.window_left = static_cast<int>(rng() % 6) - 1;
    mask.window_right = mask.causal ? -static_cast<int>(rng() % 2) : static_cast<int>(rng() % 6) - 1;
    // Three packed sequences [0,10), [10,13), [13,30) of which the last 2 tokens are padding.
    const int32_t starts[] = {0, 10, 13}, ends[] = {10, 13, 28};
    const int nq = 1 + rng() % 8, nk = 1 + rng() % 8;
    const int q0 = rng() % 30, k0 = rng() % 30;
    std::vector<int32_t> q, seg, k;
    for (int i = 0; i < nq; ++i) {
      const int32_t p = (q0 + i) % 30;
      q.push_back(p);
      const int s = p < 10 ? 0 : p < 13 ? 1 : 2;
      const bool pad = p >= 28;
      seg.push_back(pad ? 1 : starts[s]);
      seg.push_back(pad ? 0 : ends[s] - 1);
    }
    for (int j = 0; j < nk; ++j) k.push_back((k0 + j) % 30);
    size_t visible = 0;
    for (int i = 0; i < nq; ++i) {
      const PositionRange bounds = row_bounds(mask, q[i], PositionRange{seg[2 * i], seg[2 * i + 1]});
      for (int j = 0; j < nk; ++j) {
        const bool want = seg[2 * i] <= k[j] && k[j] <= seg[2 * i + 1] &&
                          (!mask.causal || k[j] <= q[i]) &&
                          (mask.window_left < 0 || k[j] >= q[i] - mask.window_left) &&
                          (mask.window_right < 0 || k[j] <= q[i] + mask.window_right);
        CHECK(is_visible(bounds, k[j]) == want);
        visible += want;
      }
    }
    const TileKind kind = classify_tile(tile_bounds(mask, q.data(), seg.data(), 0, nq),
                                        range_of(k.data(), 0, nk));
    if (visible == 0) CHECK(kind != TileKind::kFull);
    if (visible > 0) CHECK(kind != TileKind::kSkip);  // never skips visible work
    if (kind == TileKind::kFull) CHECK(visible == q.size() * k.size());
    // Dense rows with increasing positions and keys without gaps: the classification is exact.
    if (q0 + nq <= 30 && k0 + nk <= 30) {
      size_t dense_visible = 0;
      for (int32_t qp : q)
        for (int32_t kp : k) dense_visible += is_visible(mask, qp, kp);
      const TileKind dense = classify_tile(mask, range_of(q.data(), 0, nq), range_of(k.data(), 0, nk));
      CHECK(dense == (dense_visible == 0 ? TileKind::kSkip
                      : dense_visible == q.size() * k.size() ? TileKind::kFull : TileKind::kPartial));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Merge: the online state of tiles fed in turn equals one logsumexp, never NaN with -inf (NaN only
// from a NaN score).

static void test_merge() {
  const double inf = std::numeric_limits<double>::infinity();
  // Online form: feeding scores in two tiles equals one logsumexp.
  std::vector<double> s = {0.3, -1.2, 4.0, 2.5, -inf, 1.0};
  OnlineRow<double> row = OnlineRow<double>::from_lse(-inf);
  CHECK(row.l == 0.0 && row.inv_l() == 0.0 && row.lse() == -inf);
  for (int tile = 0; tile < 2; ++tile) {
    double tmax = -inf;
    for (int j = 3 * tile; j < 3 * tile + 3; ++j) tmax = std::max(tmax, s[j]);
    row.rescale_for(tmax);
    for (int j = 3 * tile; j < 3 * tile + 3; ++j) row.l += s[j] == -inf ? 0.0 : std::exp(s[j] - row.m);
  }
  double sum = 0.0;  // logsumexp(s) directly
  for (double x : s) sum += x == -inf ? 0.0 : std::exp(x);
  const double want = std::log(sum);
  CHECK(std::abs(row.lse() - want) < 1e-12);
  // Restarting from a normalised state keeps the lse.
  OnlineRow<double> again = OnlineRow<double>::from_lse(want);
  CHECK(std::abs(again.lse() - want) < 1e-12);
  // A tile with nothing visible changes nothing.
  CHECK(again.rescale_for(-inf) == 1.0);
  // A NaN score makes l NaN, and lse and 1 / l NaN with it (not the empty row's -inf and 0).
  again.l += std::nan("");
  CHECK(std::isnan(again.lse()) && std::isnan(again.inv_l()));
}

// ------------------------------------------------------------------------------------------
// Layouts: every layout is a permutation of [0, S), increasing per rank, zigzag balanced.

static void test_layouts() {
  for (int world = 1; world <= 5; ++world) {
    for (int64_t len : {2, 4, 6, 10}) {
      for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
        std::set<int32_t> seen;
        for (int r = 0; r < world; ++r) {
          std::vector<int32_t> pos(len);
          fill_positions(layout, r, world, len, pos.data());
          for (int64_t i = 0; i < len; ++i) {
            seen.insert(pos[i]);
            if (i) CHECK(pos[i] > pos[i - 1]);
          }
        }
        CHECK(static_cast<int64_t>(seen.size()) == world * len);
        CHECK(*seen.begin() == 0 && *seen.rbegin() == world * len - 1);
      }
    }
  }
  Layout layout;
  CHECK(parse_layout("zigzag", &layout) && layout == Layout::kZigzag);
  CHECK(!parse_layout("ZigZag", &layout));
  CHECK(!check_local_len(Layout::kZigzag, 7).empty());
  CHECK(check_local_len(Layout::kStriped, 7).empty());
  // zigzag, world 2, L 4: rank 0 holds chunks 0 and 3 -> 0 1 6 7
  std::vector<int32_t> pos(4);
  fill_positions(Layout::kZigzag, 0, 2, 4, pos.data());
  CHECK(pos[0] == 0 && pos[1] == 1 && pos[2] == 6 && pos[3] == 7);
}

// ------------------------------------------------------------------------------------------
// Scheduler: W virtual ranks in lockstep. Buffers hold vectors of doubles; a K/V slot carries
// the id of the rank it started on, so every block's arrival order is checked.

struct World;

class LocalTransport final : public Transport {
 public:
  LocalTransport(World& world, int rank) : world_(world), rank_(rank) {}
  int rank() const override { return rank_; }
  int world_size() const override;
  void post(const Exchange& x) override;
  void wait(const Exchange& x) override;
  void post_collective(const Collective& c) override;
  void wait_collective(const Collective& c) override;
  std::map<std::pair<int, int>, Exchange> posted;
  std::set<int> busy_slots;  // slots in flight: must not be written by compute

 private:
  World& world_;
  int rank_;
};

class FakeOps final : public BlockOps {
 public:
  FakeOps(World& world, int rank) : world_(world), rank_(rank) {}
  bool is_needed(int source) const override;
  void forward(int kv_slot, int source) override;
  void backward(int kv_slot, int source, int grad_slot) override;
  void zero_grad(int grad_slot) override;
  void add_grad(int dst, int src) override;
  std::vector<std::vector<double>> slots = std::vector<std::vector<double>>(slot::kCount, {0.0});
  std::vector<int> seen;  // sources attended in forward or backward

 private:
  World& world_;
  int rank_;
};

struct World {
  int size;
  std::function<bool(int rank, int source)> needed;
  std::vector<LocalTransport> transports;
  std::vector<FakeOps> ops;
  // (receiver, channel, step) -> (sender, message)
  std::map<std::tuple<int, int, int>, std::pair<int, std::vector<double>>> mailbox;
  std::map<int, std::vector<int>> collective_posts;  // kind -> ranks that posted, in order
  // (sender, receiver) -> the (channel, step) of each send half, and of each receive half, in the
  // order posted. NCCL has no tags: it pairs the sends and receives between two ranks in the order
  // they are posted, so both sequences must be equal.
  std::map<std::pair<int, int>, std::vector<std::pair<int, int>>> sends_in_order, receives_in_order;
  int posts = 0;  // hops sent (exchanges with a send half) and collectives
  std::vector<std::set<int>> kv_arrivals;  // per block: the ranks its K/V were received on
  World(int n, std::function<bool(int, int)> needed_)
      : size(n), needed(std::move(needed_)), kv_arrivals(n) {
    for (int r = 0; r < n; ++r) {
      transports.emplace_back(*this, r);
      ops.emplace_back(*this, r);
      ops[r].slots[slot::kOwnKV] = {static_cast<double>(r)};
    }
  }
};

int LocalTransport::world_size() const { return world_.size; }

void LocalTransport::post(const Exchange& x) {
  const auto key = std::make_pair(static_cast<int>(x.channel), x.step);
  CHECK(posted.count(key) == 0);
  CHECK(x.sends() || x.receives());  // an empty exchange is never posted
  CHECK(x.send_slot != x.recv_slot);
  CHECK(busy_slots.count(x.send_slot) == 0 && busy_slots.count(x.recv_slot) == 0);
  CHECK(mod(x.offset, world_.size) != 0);  // a hop goes to another rank
  posted[key] = x;
  if (x.receives()) {
    busy_slots.insert(x.recv_slot);
    world_.receives_in_order[{mod(rank_ - x.offset, world_.size), rank_}].push_back(key);
  }
  if (!x.sends()) return;
  world_.sends_in_order[{rank_, mod(rank_ + x.offset, world_.size)}].push_back(key);
  busy_slots.insert(x.send_slot);
  // The message is what the send buffer holds now; busy_slots checks nobody writes it in flight.
  const auto address = std::make_tuple(mod(rank_ + x.offset, world_.size), key.first, key.second);
  CHECK(world_.mailbox.count(address) == 0);  // one message per (receiver, channel, step)
  world_.mailbox[address] = {rank_, world_.ops[rank_].slots.at(x.send_slot)};
  ++world_.posts;
}

void LocalTransport::wait(const Exchange& x) {
  const auto key = std::make_pair(static_cast<int>(x.channel), x.step);
  CHECK(posted.count(key) == 1);
  if (posted.count(key) == 0) return;
  const Exchange mine = posted[key];
  if (mine.receives()) {
    const auto mail = world_.mailbox.find({rank_, key.first, key.second});
    CHECK(mail != world_.mailbox.end());  // else this wait would hang: the peer never sent
    if (mail != world_.mailbox.end()) {
      CHECK(mail->second.first == mod(rank_ - mine.offset, world_.size));  // from the right peer
      world_.ops[rank_].slots.at(mine.recv_slot) = mail->second.second;
      if (mine.channel == Channel::kKV) {
        world_.kv_arrivals.at(static_cast<int>(mail->second.second.at(0))).insert(rank_);
      }
      world_.mailbox.erase(mail);
    }
    busy_slots.erase(mine.recv_slot);
  }
  if (mine.sends()) busy_slots.erase(mine.send_slot);
  posted.erase(key);
}

// Collectives run once every rank has posted: an all-gather fills each rank's (world,) slot
// with every rank's id; a reduce-scatter gives rank r {r, sum over ranks of their entry r}.
void LocalTransport::post_collective(const Collective& c) {
  const int kind = static_cast<int>(c.kind);
  CHECK(busy_slots.count(c.send_slot) == 0 && busy_slots.count(c.recv_slot) == 0);
  busy_slots.insert(c.send_slot);
  busy_slots.insert(c.recv_slot);
  auto& ranks = world_.collective_posts[kind];
  ranks.push_back(rank_);
  ++world_.posts;
  if (static_cast<int>(ranks.size()) != world_.size) return;
  for (int r = 0; r < world_.size; ++r) {
    std::vector<double> result;
    if (c.kind == CollectiveKind::kAllGather) {
      for (int s = 0; s < world_.size; ++s) result.push_back(world_.ops[s].slots.at(c.send_slot).at(0));
    } else {
      result = {static_cast<double>(r), 0.0};
      for (int s = 0; s < world_.size; ++s) result[1] += world_.ops[s].slots.at(c.send_slot).at(r);
    }
    world_.ops[r].slots.at(c.recv_slot) = result;
  }
}

void LocalTransport::wait_collective(const Collective& c) {
  const auto& ranks = world_.collective_posts[static_cast<int>(c.kind)];
  CHECK(static_cast<int>(ranks.size()) == world_.size);  // else this wait would hang
  busy_slots.erase(c.send_slot);
  busy_slots.erase(c.recv_slot);
}

bool FakeOps::is_needed(int source) const { return world_.needed(rank_, source); }

void FakeOps::forward(int kv_slot, int source) {
  if (kv_slot == slot::kAllKV) {  // every rank's block, gathered
    CHECK(world_.transports[rank_].busy_slots.count(kv_slot) == 0);
    CHECK(static_cast<int>(slots[kv_slot].size()) == world_.size && slots[kv_slot][source] == source);
  } else {
    CHECK(slots[kv_slot].size() == 1 && slots[kv_slot][0] == source);  // right block, right step
  }
  seen.push_back(source);
}

// Grad buffers carry one entry per rank: contribution of rank r to a block is 1 << r.
// The all-gather's dK/dV slot holds one entry per block instead.
void FakeOps::backward(int kv_slot, int source, int grad_slot) {
  if (kv_slot == slot::kAllKV) {
    CHECK(world_.transports[rank_].busy_slots.count(kv_slot) == 0);
    CHECK(static_cast<int>(slots[kv_slot].size()) == world_.size && slots[kv_slot][source] == source);
  } else {
    CHECK(slots[kv_slot].size() == 1 && slots[kv_slot][0] == source);
  }
  CHECK(world_.transports[rank_].busy_slots.count(grad_slot) == 0);
  seen.push_back(source);
  if (grad_slot == slot::kAllGrad) {
    CHECK(static_cast<int>(slots[grad_slot].size()) == world_.size && slots[grad_slot][source] == 0);
    slots[grad_slot][source] = static_cast<double>(1 << rank_);
  } else {
    slots[grad_slot] = {static_cast<double>(source), static_cast<double>(1 << rank_)};
  }
}

void FakeOps::zero_grad(int grad_slot) {
  CHECK(world_.transports[rank_].busy_slots.count(grad_slot) == 0);
  if (grad_slot == slot::kAllGrad) {
    slots[grad_slot] = std::vector<double>(world_.size, 0.0);
  } else {
    slots[grad_slot] = {-1.0, 0.0};
  }
}

void FakeOps::add_grad(int dst, int src) {
  CHECK(world_.transports[rank_].busy_slots.count(dst) == 0);
  CHECK(slots[src].size() == 2 && slots[dst].size() == 2);
  // Both must describe the same block (or dst is a zeroed buffer).
  CHECK(slots[dst][0] == slots[src][0] || slots[dst][0] == -1.0 || slots[src][0] == -1.0);
  if (slots[dst][0] == -1.0) slots[dst][0] = slots[src][0];
  slots[dst][1] += slots[src][1];
}

// Every rank's schedule of the given kind over `world`, run in lockstep (core's run_lockstep), its
// blocks travelling `reaches` (empty: the full ring). Returns the hops the schedules counted.
template <typename Schedule>
static int run_ring(World& world, const std::vector<int>& reaches = {}) {
  std::vector<Schedule> rings;
  for (int r = 0; r < world.size; ++r) rings.emplace_back(world.transports[r], world.ops[r], reaches);
  run_lockstep(rings);
  int hops = 0;
  for (const Schedule& ring : rings) hops += ring.exchanges_posted();
  return hops;
}

static void test_forward_schedule() {
  for (int w = 1; w <= 5; ++w) {
    for (bool causal : {false, true}) {
      auto needed = [causal](int rank, int source) { return !causal || source <= rank; };
      World world(w, needed);
      run_ring<RingForward>(world);
      CHECK(world.posts == w * (w - 1));  // K/V make W-1 hops
      CHECK(world.sends_in_order == world.receives_in_order);
      for (int r = 0; r < w; ++r) {
        std::vector<int> want;
        for (int t = 0; t < w; ++t) {
          const int s = mod(r - t, w);
          if (needed(r, s)) want.push_back(s);
        }
        CHECK(world.ops[r].seen == want);
        CHECK(world.transports[r].busy_slots.empty());
      }
    }
  }
}

static void test_backward_schedule() {
  for (int w = 1; w <= 5; ++w) {
    for (int pattern = 0; pattern < 3; ++pattern) {
      // 0: everything needed; 1: causal; 2: only the own block and the one from rank+1
      auto needed = [pattern, w](int rank, int source) {
        if (pattern == 0) return true;
        if (pattern == 1) return source <= rank;
        return source == rank || source == mod(rank + 1, w);
      };
      World world(w, needed);
      run_ring<RingBackward>(world);
      // K/V: W-1 hops; dK/dV: W-1 hops (the own block's part stays home).
      CHECK(world.posts == (w > 1 ? 2 * w * (w - 1) : 0));
      CHECK(world.sends_in_order == world.receives_in_order);
      for (int r = 0; r < w; ++r) {
        const auto& grad = world.ops[r].slots[slot::kGradHome];
        double want = 0;
        for (int q = 0; q < w; ++q) want += needed(q, r) ? (1 << q) : 0;
        CHECK(grad.size() == 2);
        CHECK(grad[1] == want);           // every needing rank contributed exactly once
        CHECK(grad[0] == r || grad[0] == -1.0);  // and it is this rank's block
        CHECK(world.transports[r].busy_slots.empty());
      }
    }
  }
}

// The reach of every block by its definition: the farthest rank ahead of it that needs it.
static std::vector<int> reaches_by_definition(int w, const std::function<bool(int, int)>& needed) {
  std::vector<int> reaches(w, 0);
  for (int rank = 0; rank < w; ++rank) {
    for (int block = 0; block < w; ++block) {
      const int ahead = mod(rank - block, w);
      if (ahead > 0 && needed(rank, block)) reaches[block] = std::max(reaches[block], ahead);
    }
  }
  return reaches;
}

// The ring with every block travelling only as far as needed: forward, every rank attends to
// exactly the blocks it needs, in ring order, and each block's K/V arrive on exactly the d_j ranks
// after its owner (sum_j d_j hops in all, each message from the right peer); backward, 2 sum_j d_j
// hops and every block's dK/dV come home with each needing rank's contribution exactly once. The
// fake transport checks that no wait would block in lockstep and no buffer is written in flight.
static void check_block_reaches(int w, const std::function<bool(int, int)>& needed) {
  const std::vector<int> reaches = block_reaches(w, needed);
  CHECK(reaches == reaches_by_definition(w, needed));
  int hops = 0;
  for (int reach : reaches) hops += reach;
  const int steps = ring_steps(reaches);
  CHECK(steps == 1 + *std::max_element(reaches.begin(), reaches.end()));

  World world(w, needed);
  CHECK(run_ring<RingForward>(world, reaches) == hops);
  CHECK(world.posts == hops);
  CHECK(world.mailbox.empty());
  CHECK(world.sends_in_order == world.receives_in_order);
  for (int r = 0; r < w; ++r) {
    std::vector<int> want;
    for (int t = 0; t < w; ++t) {
      if (needed(r, mod(r - t, w))) want.push_back(mod(r - t, w));
    }
    CHECK(world.ops[r].seen == want);
    std::set<int> route;
    for (int s = 1; s <= reaches[r]; ++s) route.insert(mod(r + s, w));
    CHECK(world.kv_arrivals[r] == route);
    CHECK(world.transports[r].busy_slots.empty() && world.transports[r].posted.empty());
  }

  World back(w, needed);
  CHECK(run_ring<RingBackward>(back, reaches) == 2 * hops);
  CHECK(back.posts == 2 * hops);
  CHECK(back.mailbox.empty());
  CHECK(back.sends_in_order == back.receives_in_order);
  for (int r = 0; r < w; ++r) {
    const auto& grad = back.ops[r].slots[slot::kGradHome];
    double want = 0;
    for (int q = 0; q < w; ++q) want += needed(q, r) ? (1 << q) : 0;
    CHECK(grad.size() == 2 && grad[1] == want && (grad[0] == r || grad[0] == -1.0));
    CHECK(back.transports[r].busy_slots.empty() && back.transports[r].posted.empty());
  }
}

static void test_block_reaches() {
  // Causal sliding windows over contiguous shards: rank r needs ranks r-k .. r (no wrap-around):
  // block j travels min(k, w-1-j) hops.
  for (int w = 1; w <= 6; ++w) {
    for (int k = 0; k < w; ++k) {
      auto needed = [k](int rank, int source) { return source <= rank && source >= rank - k; };
      const std::vector<int> reaches = block_reaches(w, needed);
      for (int j = 0; j < w; ++j) CHECK(reaches[j] == std::min(k, w - 1 - j));
      CHECK(ring_steps(reaches) == std::min(k + 1, w));
      check_block_reaches(w, needed);
    }
  }
  // Windows that wrap around (striped-like needs): rank r needs r-a .. r+b mod w.
  for (int w = 2; w <= 6; ++w) {
    for (int a = 0; a < w; ++a) {
      for (int b = 0; a + b < w; ++b) {
        check_block_reaches(w, [a, b, w](int rank, int source) {
          const int ahead = mod(rank - source, w);
          return ahead <= a || ahead >= w - b;
        });
      }
    }
  }
  // Packed documents over contiguous shards of l tokens: rank r needs block s when a document has
  // tokens on both (causal: s <= r). E.g. one document over ranks 0 and 1 and short ones elsewhere:
  // only block 0 travels, one hop.
  std::mt19937 rng(99);
  for (int trial = 0; trial < 300; ++trial) {
    const int w = 1 + rng() % 6, l = 1 + rng() % 8;
    const bool causal = rng() % 4 != 0;
    std::vector<int> doc_of(w * l);  // document id of each token
    for (int token = 0, doc = 0; token < w * l; ++token) {
      if (token > 0 && rng() % (1 + rng() % (2 * l)) == 0) ++doc;
      doc_of[token] = doc;
    }
    auto needed = [doc_of, l, causal](int rank, int source) {
      if (causal && source > rank) return false;
      for (int i = 0; i < l; ++i) {
        for (int j = 0; j < l; ++j) {
          if (doc_of[rank * l + i] == doc_of[source * l + j]) return true;
        }
      }
      return false;
    };
    check_block_reaches(w, needed);
  }
  auto one_crossing = [](int rank, int source) { return source == rank || (rank == 1 && source == 0); };
  CHECK(block_reaches(4, one_crossing) == (std::vector<int>{1, 0, 0, 0}));
  check_block_reaches(4, one_crossing);
  // Random needs, the own block needed or not.
  for (int trial = 0; trial < 500; ++trial) {
    const int w = 1 + rng() % 7;
    std::vector<char> matrix(w * w);
    const int density = 1 + rng() % 5;
    for (char& m : matrix) m = rng() % density == 0;
    check_block_reaches(w, [matrix, w](int rank, int source) { return matrix[rank * w + source] != 0; });
  }
}

// The all-gather schedule: forward attends to the own block, then the others in the ring's order;
// backward's reduce-scatter brings every block's dK/dV home with each needing rank's contribution
// exactly once. One collective of each kind per rank and call, none at world size 1.
static void test_allgather_schedule() {
  for (int w = 1; w <= 5; ++w) {
    for (int pattern = 0; pattern < 3; ++pattern) {
      auto needed = [pattern, w](int rank, int source) {
        if (pattern == 0) return true;
        if (pattern == 1) return source <= rank;
        return source == mod(rank + 1, w);  // not even the own block
      };
      World world(w, needed);
      std::vector<AllGatherForward> forward;
      for (int r = 0; r < w; ++r) forward.emplace_back(world.transports[r], world.ops[r]);
      run_lockstep(forward);
      CHECK(world.posts == (w > 1 ? w : 0));
      for (int r = 0; r < w; ++r) {
        std::vector<int> want;
        for (int t = 0; t < w; ++t) {
          if (needed(r, mod(r - t, w))) want.push_back(mod(r - t, w));
        }
        CHECK(world.ops[r].seen == want);
        CHECK(forward[r].blocks_computed() == static_cast<int>(want.size()));
        CHECK(world.transports[r].busy_slots.empty());
      }

      World back(w, needed);
      std::vector<AllGatherBackward> backward;
      for (int r = 0; r < w; ++r) backward.emplace_back(back.transports[r], back.ops[r]);
      run_lockstep(backward);
      CHECK(back.posts == (w > 1 ? 2 * w : 0));
      for (int r = 0; r < w; ++r) {
        const auto& grad = back.ops[r].slots[slot::kGradHome];
        double want = 0;
        for (int q = 0; q < w; ++q) want += needed(q, r) ? (1 << q) : 0;
        CHECK(grad.size() == 2 && grad[1] == want && (grad[0] == r || grad[0] == -1.0));
        CHECK(back.transports[r].busy_slots.empty());
      }
    }
  }
  KVExchange exchange;
  CHECK(parse_kv_exchange("allgather", &exchange) && exchange == KVExchange::kAllGather);
  CHECK(parse_kv_exchange("ring", &exchange) && exchange == KVExchange::kRing);
  CHECK(!parse_kv_exchange("Ring", &exchange) && !parse_kv_exchange("", &exchange));
}

// LocalExchanges (the in-memory transports' bookkeeping): a hop is copied exactly once, as soon as
// both its ends have posted, also for the dK/dV hops home (offsets back) and at world size 1;
// a wait completes only once both hops of its exchange were copied.
static void test_local_exchanges() {
  struct Posted {
    int send = -1;  // the posting rank's message
    int recv = -1;  // what arrived in its receive slot
  };
  for (int world = 1; world <= 5; ++world) {
    for (int offset : {1, 1 - world, 2 - world}) {
      if (world > 1 && mod(offset, world) == 0) continue;  // not a hop between ranks
      LocalExchanges<Posted> exchanges(world);
      const Exchange exchange{Channel::kGradKV, 2, slot::kGradAcc0, slot::kGradRecv0, offset};
      std::vector<int> copies_into(world, 0);
      auto copy = [&](Posted& from, Posted& to, int receiver) {
        to.recv = from.send;
        ++copies_into[receiver];
      };
      for (int rank = 0; rank < world; ++rank) {
        exchanges.post(rank, exchange, Posted{100 + rank}, copy);
        const int receiver = mod(rank + offset, world);
        // Copied so far: every hop whose both ends have posted (ranks 0..rank).
        for (int r = 0; r < world; ++r) {
          const int sender = mod(r - offset, world);
          CHECK(copies_into[r] == (r <= rank && sender <= rank ? 1 : 0));
        }
        if (rank + 1 < world && receiver > rank) {
          CHECK(!exchanges.complete(rank, exchange));  // its hop out is still to be copied
        }
      }
      for (int rank = 0; rank < world; ++rank) {
        CHECK(exchanges.pending(rank) == 1);
        const auto done = exchanges.complete(rank, exchange);
        CHECK(done && done->posted.recv == 100 + mod(rank - offset, world));
        CHECK(exchanges.pending(rank) == 0);
        CHECK(!exchanges.complete(rank, exchange));  // completed once only
      }
    }
  }
  // Exchanges are told apart by (channel, step): a K/V post does not complete a dK/dV one.
  LocalExchanges<Posted> exchanges(2);
  auto ignore = [](Posted&, Posted&, int) {};
  exchanges.post(0, Exchange{Channel::kKV, 0, slot::kOwnKV, slot::kKVRecv0}, Posted{}, ignore);
  exchanges.post(1, Exchange{Channel::kGradKV, 0, slot::kGradAcc0, slot::kGradRecv0}, Posted{},
                 ignore);
  CHECK(!exchanges.complete(0, Exchange{Channel::kKV, 0, slot::kOwnKV, slot::kKVRecv0}));
  CHECK(exchanges.pending(0) == 1 && exchanges.pending(1) == 1);

  // Half exchanges: a send alone and a receive alone complete once their hop was copied; a
  // receive whose sender posted no send half never completes (its wait would deadlock).
  LocalExchanges<Posted> halves(3);
  int copies = 0;
  auto copy = [&](Posted& from, Posted& to, int) {
    to.recv = from.send;
    ++copies;
  };
  const Exchange send_only{Channel::kGradHome, 1, slot::kGradAcc0, slot::kNone, 1};
  const Exchange receive_only{Channel::kGradHome, 1, slot::kNone, slot::kGradHomeRecv, 1};
  halves.post(1, receive_only, Posted{}, copy);
  CHECK(copies == 0 && !halves.complete(1, receive_only));
  halves.post(0, send_only, Posted{7}, copy);  // 0 -> 1
  CHECK(copies == 1);
  halves.post(2, receive_only, Posted{}, copy);  // from 1, which sends nothing
  CHECK(copies == 1);
  const auto received = halves.complete(1, receive_only);
  CHECK(received && received->posted.recv == 7);
  CHECK(halves.complete(0, send_only).has_value());
  CHECK(!halves.complete(2, receive_only) && halves.pending(2) == 1);
}

static void test_timeout_message() {
  RingTimeoutError e(2.5, 3, Channel::kKV, true, 1);
  const std::string msg = e.what();
  CHECK(msg.find("ring step 3") != std::string::npos);
  CHECK(msg.find("receiving K/V from rank 1") != std::string::npos);
  CHECK(msg.find("unusable") != std::string::npos);
  CHECK(e.step == 3 && e.peer == 1 && e.receiving);
  RingTimeoutError sending(1.0, 0, Channel::kGradKV, false, 2);
  CHECK(std::string(sending.what()).find("sending dK/dV to rank 2") != std::string::npos);
  RingTimeoutError fused(1.0, 2, Channel::kKV, true, 3, 1);  // NCCL: one operation per hop
  const std::string both = fused.what();
  CHECK(both.find("exchanging K/V (sending to rank 1, receiving from rank 3") != std::string::npos);
  CHECK(both.find("ring step 2") != std::string::npos && fused.send_peer == 1);
}

// TileBounds32 (the GPU warps' 32-bit reduction): chunks of rows narrowed and combined field by
// field equal the narrowed bounds of all rows, and widen() classifies a tile as the exact bounds
// do or as partial: never a wrong skip or full, also with windows and positions at int32's ends.
// A row's narrowed bounds (PositionRange32) see exactly the int32 keys its bounds see.
static void test_tile_bounds_32() {
  std::mt19937_64 rng(7);
  int exact = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    const bool extreme = trial % 4 == 0;  // positions near INT32_MAX / 0, windows beyond int32
    MaskSpec mask;
    mask.causal = rng() % 2;
    auto window = [&]() -> int64_t {
      const int64_t r = static_cast<int64_t>(rng() % 5) - 1;
      return r < 2 ? r : (extreme ? static_cast<int64_t>(rng() % (int64_t{1} << 40)) : r * 7);
    };
    mask.window_left = window();
    mask.window_right = mask.causal ? -1 : window();
    const int64_t base = extreme ? INT32_MAX - static_cast<int64_t>(rng() % 64) : rng() % 1000;
    const int nq = 1 + rng() % 40, nk = 1 + rng() % 40;
    std::vector<int32_t> q(nq), k(nk);
    for (auto& p : q) p = static_cast<int32_t>(std::max<int64_t>(0, base - static_cast<int64_t>(rng() % 100)));
    for (auto& p : k) p = static_cast<int32_t>(std::max<int64_t>(0, base - static_cast<int64_t>(rng() % 100)));
    const TileBounds whole = tile_bounds(mask, q.data(), nullptr, 0, nq);
    // the warp's reduction: each lane narrows its chunk of rows; fields combine by min/max/or
    TileBounds32 reduced = narrow(empty_tile_bounds());
    for (int begin = 0; begin < nq;) {
      const int end = std::min<int>(nq, begin + 1 + rng() % 4);
      const TileBounds32 lane = narrow(tile_bounds(mask, q.data(), nullptr, begin, end));
      reduced = TileBounds32{std::min(reduced.min_lo, lane.min_lo), std::max(reduced.max_lo, lane.max_lo),
                             std::min(reduced.min_hi, lane.min_hi), std::max(reduced.max_hi, lane.max_hi),
                             reduced.any_empty_row || lane.any_empty_row};
      begin = end;
    }
    const TileBounds32 direct = narrow(whole);
    CHECK(reduced.min_lo == direct.min_lo && reduced.max_lo == direct.max_lo &&
          reduced.min_hi == direct.min_hi && reduced.max_hi == direct.max_hi &&
          reduced.any_empty_row == direct.any_empty_row);
    const PositionRange keys = range_of(k.data(), 0, nk);
    // one row's bounds narrowed (the GPU kernels' per-element mask): the same visibility
    for (int i = 0; i < nq; ++i) {
      const PositionRange row = row_bounds(mask, q[i], unbounded_range());
      for (int j = 0; j < nk; ++j) CHECK(is_visible(narrow(row), k[j]) == is_visible(row, k[j]));
      const PositionRange empty{row.hi + 1, row.hi};  // saturation must not close an empty row
      for (int j = 0; j < nk; ++j) CHECK(!is_visible(narrow(empty), k[j]));
    }
    const TileKind want = classify_tile(whole, keys), got = classify_tile(widen(reduced), keys);
    CHECK(got == want || got == TileKind::kPartial);
    exact += got == want;
    if (!extreme) CHECK(got == want);  // positions and windows well inside int32: no loss
  }
  CHECK(exact > 19000);
}

// BoundedCache (the ring's device copies of positions): least recently used entries go first when
// over the byte budget, pinned entries never, and the newest entry stays.
static void test_bounded_cache() {
  BoundedCache<int> cache(100);
  cache.insert("a", 1, 40, false);
  cache.insert("b", 2, 40, false);
  CHECK(cache.find("a", false) != nullptr);  // a is now more recent than b
  cache.insert("c", 3, 40, false);           // 120 > 100: b (least recently used) goes
  CHECK(cache.find("b", false) == nullptr);
  CHECK(cache.find("a", false) != nullptr && *cache.find("c", false) == 3);
  CHECK(cache.bytes() == 80 && cache.size() == 2);
  CHECK(cache.find("a", true) != nullptr);  // pinned, e.g. used in a CUDA graph capture
  cache.insert("d", 4, 40, false);           // over: c goes (a is pinned), not d
  CHECK(cache.find("c", false) == nullptr && cache.find("a", false) != nullptr);
  CHECK(cache.find("d", false) != nullptr && cache.bytes() == 80);
  cache.insert("e", 5, 200, false);  // larger than the budget: everything unpinned but e goes
  CHECK(cache.find("d", false) == nullptr && *cache.find("e", false) == 5);
  CHECK(*cache.find("a", false) == 1 && cache.size() == 2 && cache.bytes() == 240);
  cache.insert("f", 6, 10, false);  // e, least recently used and unpinned, goes
  CHECK(cache.find("e", false) == nullptr && cache.size() == 2 && cache.bytes() == 50);
}

int main() {
  test_mask_classification();
  test_mask_bounds();
  test_tile_bounds_32();
  test_bounded_cache();
  test_merge();
  test_layouts();
  test_forward_schedule();
  test_backward_schedule();
  test_block_reaches();
  test_allgather_schedule();
  test_local_exchanges();
  test_timeout_message();
  std::printf("test_core: %d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
