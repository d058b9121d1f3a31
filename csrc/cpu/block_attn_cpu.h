// CPU block attention: one query block against one K/V block, masked by global positions.
//
// block_attn_fwd merges the block's attention into the running state (out_acc, lse) of the params
// (online softmax, see core/merge.h), so the ring calls it once per step on the same state.
// block_attn_bwd accumulates (+=) the block pair's dq/dk/dv given the FINAL lse and
// delta = rowsum(dout * out). dtypes: kFloat32 (float accumulators) and kFloat64 (double).
//
// Threads: at::parallel_for (forward: batch x head x query tile; backward: batch x kv head, split
// over key tiles when there are fewer of those than 2 x threads), BLAS single-threaded inside.
// The file must be compiled with OpenMP (-fopenmp): at::parallel_for is a header template that
// runs serially otherwise.
// Memory: tile scratch per thread, plus, in the calling thread, head-major copies of the inputs
// whose rows are not dense per head (row stride != headdim) and, in backward, one dq partial per
// key split. All of it is cached per thread (grow-only) and reused by later calls; nothing is
// ever proportional to seqlen_q * seqlen_k.
#pragma once

#include "core/params.h"

namespace ring_attn {
namespace cpu {

void block_attn_fwd(const BlockFwdParams& p);
void block_attn_bwd(const BlockBwdParams& p);

}  // namespace cpu
}  // namespace ring_attn
