// CPU block attention: one query block against one K/V block, masked by global positions, windows
// and packed sequences (core/mask.h: per query row its visible key positions; q_seg may be null).
//
// block_attn_fwd merges the block's attention into the running state (out_acc, lse) of the params
// (online softmax, see core/merge.h), so the ring calls it once per step on the same state. A row
// that sees no key of the block keeps its state (out 0 / lse -inf when nothing was merged before,
// e.g. a pad row of packed sequences).
// block_attn_bwd accumulates (+=) the block pair's dq/dk/dv given the FINAL lse and
// delta = rowsum(dout * out); rows with lse -inf contribute nothing.
// dtypes: kFloat32, kBFloat16, kFloat16 (fp32 accumulators and fp32 arithmetic throughout) and
// kFloat64 (fp64 throughout).
//
// Instruction set: chosen at the first call among AVX-512, AVX2+FMA and portable code, the best
// the CPU supports; RING_ATTN_CPU_KERNEL=generic|avx2|avx512 caps it (testing, comparisons).
// cpu_kernel_isa() names the one in use.
//
// Threads: at::parallel_for (forward: batch x head x query tile; backward: batch x kv head, split
// over key tiles when there are fewer of those than 2 x threads). The file must be compiled with
// OpenMP (-fopenmp): at::parallel_for is a header template that runs serially otherwise.
// Determinism: results are bitwise identical from run to run at a given thread count (each output
// is written by exactly one task; the backward's dq partials are added in a fixed order).
// Memory: tile scratch per thread, plus, in the calling thread, K^T (and V^T in backward) in packed
// panels and accumulator-type copies of the operands that are not already usable in place
// (bf16/fp16 inputs, or headdim not a multiple of the vector width), and in backward one dq
// partial per key split. All of it is cached per thread (grow-only) and reused by later calls;
// nothing is ever proportional to seqlen_q * seqlen_k.
#pragma once

#include "core/params.h"

namespace ring_attn {
namespace cpu {

void block_attn_fwd(const BlockFwdParams& p);
void block_attn_bwd(const BlockBwdParams& p);

// ValueError (c10::ValueError) when RING_ATTN_CPU_KERNEL or RING_ATTN_CPU_TILES holds an unknown
// value (env.h); the ops call it before any communication.
void check_environment();

// "avx512", "avx2" or "generic": the kernels block_attn_fwd/bwd run (decided at the first call).
const char* cpu_kernel_isa();

// fp32 GFLOP/s of independent FMAs on the vector width the kernels use, run for about `seconds` on
// the calling thread: the core's reachable peak at the clock it runs at now (benchmarks).
double fma_peak_gflops(double seconds);

}  // namespace cpu
}  // namespace ring_attn
