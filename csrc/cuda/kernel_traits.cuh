// Tile shapes, warp layouts and shared-memory layouts of the three CUDA block kernels, per
// (dtype, head-dim bucket). The kernels (fwd_kernel.cuh, bwd_kernel.cuh, dq_kernel.cuh) read
// everything shape-related from here, and the launchers (launch_template.cuh) their grids and
// shared-memory sizes.
//
// Shared memory is one dynamic buffer cut into 16-byte aligned regions (every kernel stays within
// sm_80's 163 KiB per block, kSm80MaxSmemPerBlock); 16-bit tiles use a row pitch of kHeadDim + 8
// elements so that ldmatrix/stmatrix of 8 consecutive rows hit 8 distinct bank groups.
#pragma once

#include <cstdint>

#include "core/rounding.h"

namespace ring_attn {
namespace cuda {

// Entries of a per-CTA tile table (tile_table.cuh) built at a time: a window of this many tiles.
constexpr int kTableTiles = 1024;

constexpr int align16(int bytes) { return round_up(bytes, 16); }

// The most dynamic shared memory a CTA may ask for on sm_80 (163 KiB): every kernel here stays
// within it. GPUs of compute capability 8.6 and 8.9 allow 99 KiB (kSmallSmemPerBlock): there the
// launches pick the kSmallSmem_ variants of the traits below, which fit it at the head dims where
// the others do not (block_attn_cuda.h smem_variant).
constexpr int kSm80MaxSmemPerBlock = 163 * 1024;
constexpr int kSmallSmemPerBlock = 99 * 1024;

// What every kernel's traits have: the compiled (dtype, head-dim bucket), the CTA's warps, the
// row pitch of the 16-bit tiles in shared memory, and the sizes of the regions every kernel
// keeps (the tile table and the CTA reduction scratch). The derived traits name these with
// `using Base::...` (FlashAttention's Flash_kernel_traits pattern).
template <bool kBF16_, int kHeadDim_, int kNWarps_>
struct KernelTraitsBase {
  static constexpr bool kBF16 = kBF16_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled bucket; the real head dim is <= this
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kStride = kHeadDim + 8;
  static constexpr int kTableBytes = align16(kTableTiles * 2);
  static constexpr int kScratchBytes = align16(4 * (5 * kNWarps + 1));
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dim bucket");
};

// Forward (block_fwd_body): one CTA per (query tile of kBlockM rows, head, batch), 4 warps of
// kMTiles m-tiles of 16 rows, so that each K/V fragment read from shared memory feeds kMTiles MMAs.
// K/V tiles of kBlockN keys are double buffered. kSmallSmem_: one m-tile per warp (a Q tile half
// as tall) and, at d = 256, 16-key tiles: within kSmallSmemPerBlock at every head dim.
template <bool kBF16_, int kHeadDim_, bool kSmallSmem_ = false>
struct FwdTraits : KernelTraitsBase<kBF16_, kHeadDim_, 4> {
  using Base = KernelTraitsBase<kBF16_, kHeadDim_, 4>;
  using Base::kHeadDim, Base::kNWarps, Base::kNThreads, Base::kStride;
  static constexpr bool kSmallSmem = kSmallSmem_;
  // 32 rows per warp, except at d = 256 where the output accumulator (16 x 256 fp32 per m-tile)
  // leaves registers for one m-tile only.
  static constexpr int kMTiles = kHeadDim > 128 || kSmallSmem ? 1 : 2;
  static constexpr int kBlockM = 16 * kMTiles * kNWarps;
  static constexpr int kBlockN = kHeadDim <= 64 ? 128 : kHeadDim <= 128 ? 64 : kSmallSmem ? 16 : 32;
  // Q as MMA fragments in registers for the whole kernel (else re-read from smem per key tile).
  static constexpr bool kQInRegs = kHeadDim <= 32;
  // Register pressure: the S and O accumulators take 192 of a thread's 255 registers at d = 64 and
  // 128, so the main loop keeps few values across tiles. kConstsInSmem: the K/V base pointers and
  // the mask's multiplier wait in shared memory (fwd_kernel.cuh FwdConsts) and the copies derive
  // their places from the thread index read again; kRederivePlace: each tile derives the thread's
  // lane and rows again. Chosen per bucket so that no main loop spills (benchmarks/kernels/sass_budget.py).
  static constexpr bool kConstsInSmem = kHeadDim <= 64;
  static constexpr bool kRederivePlace = kHeadDim == 64 || kHeadDim == 128;
  // Q; K and V, two stages each; the key positions of a tile, two stages; the rows' bounds; each
  // thread's online-softmax state (m and l of its 2 kMTiles rows: between key tiles they wait in
  // shared memory, the registers are the output accumulator's); the tile table; the CTA reduction
  // scratch; the CTA's constants that the loop reads once per tile (fwd_kernel.cuh FwdConsts).
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + align16(kBlockM * kStride * 2);
  static constexpr int kOffV = kOffK + 2 * align16(kBlockN * kStride * 2);
  static constexpr int kOffKpos = kOffV + 2 * align16(kBlockN * kStride * 2);
  static constexpr int kOffRows = kOffKpos + 2 * align16(kBlockN * 4);
  static constexpr int kOffRowState = kOffRows + align16(kBlockM * 8);
  static constexpr int kOffTable = kOffRowState + align16(kNThreads * 4 * kMTiles * 4);
  static constexpr int kOffScratch = kOffTable + Base::kTableBytes;
  static constexpr int kOffConsts = kOffScratch + Base::kScratchBytes;
  static constexpr int kSmemBytes = kOffConsts + 32;
  static_assert(kSmemBytes <= (kSmallSmem ? kSmallSmemPerBlock : kSm80MaxSmemPerBlock),
                "shared memory of a CTA");
};

// Backward (block_bwd_body): one CTA per (key tile of kBlockN keys, head, batch), 8 warps (4 in
// the kSmallSmem variant at d = 256); query stages of kBlockM rows (a quarter of the CTA's
// threads: one thread per word of a stage's row data) stream through shared memory. Per stage,
// three warp layouts (rows x columns of warps):
//   S = Q K^T, dP = dO V^T (kBlockM x kBlockN): kSdpWarpsM x kSdpWarpsN, kSdpKeys keys a warp
//   dV += P^T dO, dK += dS^T Q (kBlockN x d):    kDkvWarpsN x (kNWarps / kDkvWarpsN), 32 keys each
//   dQ = dS K (kBlockM x d):                     kDqWarpsM x (kNWarps / kDqWarpsM)
// P and dS go through shared memory between the first and the other two. Shared memory stays
// within sm_80's 163 KiB: Q is double buffered for d <= 128 (single at d = 256); dO is single
// buffered (its next copy starts once dV is done with it); the dQ staging tile (fp32, flushed with
// vector reductions) takes the place of P and dS once dQ has been computed, and at d = 256 there is
// none (dQ is reduced from registers). kSmallSmem_: d = 256's choices (64 keys per CTA, Q single
// buffered, no dQ staging) at every head dim, within kSmallSmemPerBlock at d <= 128; at d = 256
// 4 warps, 32 keys per CTA and 32-row query stages, 16 keys a warp in S and dP, each warp's dQ
// all 32 rows (its dK/dV slice is the usual d = 256 one: 32 keys x 64 columns).
constexpr int bwd_warps(int head_dim, bool small_smem) {
  return head_dim > 128 && small_smem ? 4 : 8;
}

template <bool kBF16_, int kHeadDim_, bool kSmallSmem_ = false>
struct BwdTraits : KernelTraitsBase<kBF16_, kHeadDim_, bwd_warps(kHeadDim_, kSmallSmem_)> {
  using Base = KernelTraitsBase<kBF16_, kHeadDim_, bwd_warps(kHeadDim_, kSmallSmem_)>;
  using Base::kHeadDim, Base::kNWarps, Base::kNThreads, Base::kStride;
  static constexpr bool kSmallSmem = kSmallSmem_;
  static constexpr bool kWide = kHeadDim <= 128 && !kSmallSmem;  // 128 keys, Q double buffered
  static constexpr int kBlockN = kWide ? 128 : kNWarps == 8 ? 64 : 32;  // keys per CTA
  static constexpr int kBlockM = kNThreads / 4;                        // query rows per stage
  static constexpr int kStrideP = kBlockN + 8;    // P, dS (queries x keys)
  static constexpr int kStrideDq = kHeadDim + 8;  // dQ staging, fp32
  static constexpr int kQStages = kWide ? 2 : 1;
  static constexpr bool kDqStaging = kWide;
  static constexpr int kSdpKeys = kBlockN >= 64 ? 32 : 16;
  static constexpr int kSdpWarpsN = kBlockN / kSdpKeys;
  static constexpr int kSdpWarpsM = kNWarps / kSdpWarpsN;
  static constexpr int kSdpMTiles = kBlockM / kSdpWarpsM / 16;
  static constexpr int kDkvWarpsN = kBlockN / 32;
  static constexpr int kDkvCols = kHeadDim / (kNWarps / kDkvWarpsN);
  static constexpr int kDqWarpsM = kNWarps == 4 ? 1 : kHeadDim >= 128 ? 2 : 4;
  static constexpr int kDqMTiles = kBlockM / kDqWarpsM / 16;
  static constexpr int kDqCols = kHeadDim / (kNWarps / kDqWarpsM);
  // K, V; Q (kQStages), dO; P, dS (or the dQ staging tile); a stage's row data, two stages:
  // lse, delta, q_pos [kBlockM] and q_seg [kBlockM][2] (int32 or fp32 words); the keys' positions;
  // the tile table; scratch.
  static constexpr int kTileBytes = align16(kBlockM * kStride * 2);
  static constexpr int kPBytes = align16(kBlockM * kStrideP * 2);
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + align16(kBlockN * kStride * 2);
  static constexpr int kOffQ = kOffV + align16(kBlockN * kStride * 2);
  static constexpr int kOffDo = kOffQ + kQStages * kTileBytes;
  static constexpr int kOffP = kOffDo + kTileBytes;
  static constexpr int kOffDs = kOffP + kPBytes;
  static constexpr int kOffDq = kOffP;
  static constexpr int kRowWords = 5 * kBlockM;  // row data words per stage
  static constexpr int kOffRowData = kOffDs + kPBytes;
  static constexpr int kOffKpos = kOffRowData + align16(2 * kRowWords * 4);
  static constexpr int kOffTable = kOffKpos + align16(kBlockN * 4);
  static constexpr int kOffScratch = kOffTable + Base::kTableBytes;
  static constexpr int kSmemBytes = kOffScratch + Base::kScratchBytes;
  static_assert(kSdpWarpsM * kSdpWarpsN == kNWarps && kSdpMTiles >= 1 && kDqMTiles >= 1,
                "warp layout");
  static_assert(kDkvCols % 16 == 0 && kDqCols % 16 == 0, "warp column slices of 16");
  static_assert(!kDqStaging || kBlockM * kStrideDq * 4 <= 2 * kPBytes, "dQ staging size");
  static_assert(kSmemBytes <= (kSmallSmem ? kSmallSmemPerBlock : kSm80MaxSmemPerBlock),
                "shared memory of a CTA");
};

// Deterministic dQ (block_dq_body): one CTA per (query tile of kBlockM rows, head, batch), 4 warps
// of 16 rows; K/V tiles of kBlockN keys, double buffered. kSmallSmem_: 32-key tiles, as at d = 256;
// at d = 256 2 warps and 16-key tiles.
constexpr int dq_warps(int head_dim, bool small_smem) {
  return head_dim > 128 && small_smem ? 2 : 4;
}

template <bool kBF16_, int kHeadDim_, bool kSmallSmem_ = false>
struct DqTraits : KernelTraitsBase<kBF16_, kHeadDim_, dq_warps(kHeadDim_, kSmallSmem_)> {
  using Base = KernelTraitsBase<kBF16_, kHeadDim_, dq_warps(kHeadDim_, kSmallSmem_)>;
  using Base::kHeadDim, Base::kNWarps, Base::kStride;
  static constexpr bool kSmallSmem = kSmallSmem_;
  static constexpr int kBlockM = 16 * kNWarps;
  static constexpr int kBlockN = kHeadDim <= 128 ? (kSmallSmem ? 32 : 64) : (kSmallSmem ? 16 : 32);
  // Q, dO; K and V, two stages each; key positions of a partial tile, two stages; the rows' bounds;
  // the tile table; scratch.
  static constexpr int kOffQ = 0;
  static constexpr int kOffDo = kOffQ + align16(kBlockM * kStride * 2);
  static constexpr int kOffK = kOffDo + align16(kBlockM * kStride * 2);
  static constexpr int kOffV = kOffK + 2 * align16(kBlockN * kStride * 2);
  static constexpr int kOffKpos = kOffV + 2 * align16(kBlockN * kStride * 2);
  static constexpr int kOffRows = kOffKpos + 2 * align16(kBlockN * 4);
  static constexpr int kOffTable = kOffRows + align16(kBlockM * 8);
  static constexpr int kOffScratch = kOffTable + Base::kTableBytes;
  static constexpr int kSmemBytes = kOffScratch + Base::kScratchBytes;
  static_assert(kSmemBytes <= (kSmallSmem ? kSmallSmemPerBlock : kSm80MaxSmemPerBlock),
                "shared memory of a CTA");
};

}  // namespace cuda
}  // namespace ring_attn
