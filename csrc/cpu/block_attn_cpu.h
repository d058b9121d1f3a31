// CPU block attention: one query block against one K/V block, masked by global positions.
//
// block_attn_fwd merges the block's attention into the running state (out_acc, lse) of the params
// (online softmax, see core/merge.h), so the ring calls it once per step on the same state.
// block_attn_bwd accumulates (+=) the block pair's dq/dk/dv given the FINAL lse and
// delta = rowsum(dout * out). dtypes: kFloat32 (float accumulators) and kFloat64 (double).
//
// Work is split with at::parallel_for (forward: batch x head x query tile; backward: batch x kv
// head, plus key-tile splits when there are fewer of those than threads); BLAS runs single-threaded
// inside. Scratch memory is tile-sized per thread (backward with key splits also keeps one dq
// partial of the query block per split).
#pragma once

#include "core/params.h"

namespace ring_attn {
namespace cpu {

void block_attn_fwd(const BlockFwdParams& p);
void block_attn_bwd(const BlockBwdParams& p);

}  // namespace cpu
}  // namespace ring_attn
