// The warp-specialised pipeline pieces every Hopper kernel (sm90_fwd_kernel.cuh,
// sm90_bwd_kernel.cuh, sm90_dq_kernel.cuh) shares: the traits of the warpgroup split, the
// shared-memory layout's aligned base, the stages' mbarriers, the producer's TMA loads of a tile,
// its tail stage (rows past the sequence zeroed in place) and its end-of-stream entry.
#pragma once

#include <cstdint>

#include "cuda/primitives.cuh"
#include "cuda/sm90_fwd_geometry.h"
#include "cuda/sm90_primitives.cuh"
#include "cuda/warp_mma.cuh"

namespace ring_attn {
namespace cuda {
namespace sm90 {

// What the traits of every Hopper kernel share: two consumer warpgroups (64 rows of the wgmma M
// dimension each) and one producer warpgroup, last; stages of the operands that stream; 16-bit
// tiles of kHeadDim columns as 64-column blocks (TMA boxes); the registers setmaxnreg leaves to
// each side.
template <bool kBF16_, int kHeadDim_>
struct WarpSpecializedTraits {
  static constexpr bool kBF16 = kBF16_;
  static constexpr int kHeadDim = kHeadDim_;  // exactly the operands' head dim
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kNThreads = kConsumerThreads + 128;  // producer last
  static constexpr int kStages = 2;
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-column blocks (TMA boxes) of a tile
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
};

// The layout's base: the first 1024-byte aligned (swizzle atom) address at or after the dynamic
// shared memory's start; the kernels ask for kSwizzleAtomBytes more than their layouts take.
RA_DEV char* layout_base(char* smem_unaligned) {
  const uint32_t misalign = smem_address(smem_unaligned) % kSwizzleAtomBytes;
  return smem_unaligned + (misalign ? kSwizzleAtomBytes - misalign : 0);
}

// Thread 0 initialises the pipeline's mbarriers, laid out in a row: full[kStages] (the producer's
// arrival, with its TMA bytes), empty[kStages] (one arrival per consumer warp), then kSingles of
// one arrival each (the operands loaded once, the tail), and publishes them to TMA. The CTA
// synchronises before any other thread uses them.
template <int kStages, int kSingles>
RA_DEV void init_pipeline_barriers(uint64_t* bars, int consumer_warps, int tid) {
  if (tid != 0) return;
  for (int s = 0; s < kStages; ++s) {
    mbar_init(bars + s, 1);
    mbar_init(bars + kStages + s, consumer_warps);
  }
  for (int i = 0; i < kSingles; ++i) mbar_init(bars + 2 * kStages + i, 1);
  fence_proxy_async();  // the inits, before TMA completes on them
}

// Zeroes rows `first` .. kRows - 1 of a 16-bit tile of kColBlocks 64-column blocks (kRows x 128
// bytes each, swizzled: whole rows, so the swizzle does not matter): generic stores by kThreads
// threads (`thread` = 0 .. kThreads - 1), one warp unless said otherwise.
template <int kRows, int kColBlocks, int kThreads = 32>
RA_DEV void zero_tile_rows(char* tile, int first, int thread) {
  constexpr int kChunks = kColBlocks * 8;  // 16-byte chunks of a row
  for (int i = thread; i < (kRows - first) * kChunks; i += kThreads) {
    const int row = first + i / kChunks, block = (i / 8) % kColBlocks;
    float4 zero;
    zero.x = zero.y = zero.z = zero.w = 0.f;
    *reinterpret_cast<float4*>(tile + block * kRows * 128 + row * 128 + (i % 8) * 16) = zero;
  }
}

// The producer warp's end of a stage whose TMA loads (tiles a and b of kRows rows) complete on the
// tail mbarrier: the sequence's last tile, `valid` rows in it. Once the loads have landed (the
// tail's phase of parity `parity`), the rows past the sequence, which hold what follows it in
// memory (any bits), are zeroed (generic stores published to wgmma by fence.proxy.async); then
// lane 0 arrives on the stage's full mbarrier.
template <int kRows, int kColBlocks>
RA_DEV void publish_tail_stage(uint64_t* tail, int parity, char* tile_a, char* tile_b, int valid,
                               uint64_t* full, int lane) {
  mbar_wait(tail, parity);
  zero_tile_rows<kRows, kColBlocks>(tile_a, valid, lane);
  zero_tile_rows<kRows, kColBlocks>(tile_b, valid, lane);
  fence_proxy_async();
  sync_warp();  // every lane's zeros are published before lane 0's arrival
  if (lane == 0) mbar_arrive(full);
}

// The TMA loads of kRows rows of an operand from row `row` on (origin o of its 2-D matrix,
// sm90_fwd_geometry.h) into a tile of kColBlocks 64-column blocks, completing on bar. kRolled
// keeps the loop rolled (its boxes' coordinates would otherwise outgrow the producer's registers).
template <int kRows, int kColBlocks, bool kRolled = false>
RA_DEV void tma_load_rows(char* tile, const TensorMap* map, uint64_t* bar, OperandOrigin o, int row) {
  if constexpr (kRolled) {
    RA_ROLLED
    for (int j = 0; j < kColBlocks; ++j) {
      sm90::tma_load_2d(tile + j * kRows * 128, map, bar, o.col + 64 * j, o.row + row);
    }
  } else {
    for (int j = 0; j < kColBlocks; ++j) {
      sm90::tma_load_2d(tile + j * kRows * 128, map, bar, o.col + 64 * j, o.row + row);
    }
  }
}

constexpr uint32_t kEndEntry = 0xffffffffu;  // no more tiles

// The producer's last step, after `issued` stages: once the next stage is free (empty mbarrier),
// lane 0 writes the end entry there and arrives on its full mbarrier.
template <int kStages>
RA_DEV void end_stream(volatile uint32_t* entry, uint64_t* full, uint64_t* empty, int issued,
                       int lane) {
  const int stage = issued % kStages;
  if (issued >= kStages) mbar_wait(empty + stage, (issued / kStages - 1) & 1);
  if (lane == 0) {
    entry[stage] = kEndEntry;
    mbar_arrive(full + stage);
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
