// Op schemas (one list, every device) and the CPU implementations.
// The Python package loads this library with torch.ops.load_library and registers fake kernels.
#include <torch/library.h>

#include "bindings/agreement.h"
#include "bindings/op_impls.h"
#include "bindings/transport_select.h"
#include "comm/c10d_transport.h"
#include "comm/group_devices.h"
#include "cpu/block_attn_cpu.h"

namespace ring_attn {

struct CpuDevice {
  static constexpr BlockKernels kKernels{&cpu::block_attn_fwd, &cpu::block_attn_bwd,
                                         &cpu::check_environment};
};

// Shapes: q (batch, seqlen_local, heads, headdim), k and v (batch, seqlen_local, heads_kv,
// headdim); with cu_seqlens (packed sequences, int32 (num_seqs + 1,) global boundaries) q is
// (tokens_local, heads, headdim) and lse (heads, tokens_local). window_left/right: -1 unbounded.
TORCH_LIBRARY(ring_attention, m) {
  // Ring attention over the process group registered as `group_name` ("" = world size 1), K/V
  // exchanged by `kv_exchange`: "ring" (passed around the ring) or "allgather" (gathered once).
  // Returns out (like q), lse (batch, heads, seqlen_local) in the accumulator dtype and
  // forward_call, a CPU int64 (1,): the call's number among the forward calls over the group
  // (0 with checks off or one rank), which the backward's agreement compares.
  m.def("ring_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, str group_name, bool causal, "
        "float softmax_scale, int window_left, int window_right, str layout, "
        "str kv_exchange=\"ring\") -> (Tensor, Tensor, Tensor)");
  // Returns dq, dk, dv (like q, k, v) given the forward's out, lse and forward_call (None: 0) and
  // the gradients of out and lse (dlse like lse; None: 0). deterministic: no atomics in the CUDA
  // kernels (the CPU kernels are always deterministic).
  m.def("ring_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? cu_seqlens, str group_name, bool causal, float softmax_scale, int window_left, "
        "int window_right, str layout, bool deterministic=False, str kv_exchange=\"ring\", "
        "Tensor? dlse=None, Tensor? forward_call=None) -> (Tensor, Tensor, Tensor)");
  // Ulysses (bindings/ulysses_ops.h): the all-to-all over heads inside the process group
  // registered as `ulysses_group_name` (U ranks) around the same ring over `group_name`, after
  // the U x R grid's ranks agree. Returns out (like q), lse (as ring_fwd's, or an empty tensor
  // unless return_lse) and what the backward takes: q_heads, k_heads, v_heads, out_heads,
  // lse_heads (U * L tokens of heads / U and lcm(U, heads_kv) / U heads) and forward_calls, a
  // CPU int64 (2,): the call's numbers over the ulysses_group and over the group.
  m.def("ulysses_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, str group_name, "
        "str ulysses_group_name, bool causal, float softmax_scale, int window_left, "
        "int window_right, str layout, str kv_exchange=\"ring\", bool return_lse=False) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns dq, dk, dv (like q, k, v of the forward, which had heads_kv K/V heads); dlse: the
  // gradient of the lse ulysses_fwd returned (None: 0); forward_calls: ulysses_fwd's (None: 0).
  m.def("ulysses_bwd(Tensor dout, Tensor q_heads, Tensor k_heads, Tensor v_heads, "
        "Tensor out_heads, Tensor lse_heads, Tensor? cu_seqlens, str group_name, "
        "str ulysses_group_name, bool causal, float softmax_scale, int window_left, "
        "int window_right, str layout, int heads_kv, bool deterministic=False, "
        "str kv_exchange=\"ring\", Tensor? dlse=None, Tensor? forward_calls=None) "
        "-> (Tensor, Tensor, Tensor)");
  // The same ring over len(qs) virtual ranks in this process (LocalRing): one shard per rank.
  m.def("local_ring_fwd(Tensor[] qs, Tensor[] ks, Tensor[] vs, Tensor? cu_seqlens, bool causal, "
        "float softmax_scale, int window_left, int window_right, str layout, "
        "str kv_exchange=\"ring\") -> (Tensor[], Tensor[])");
  m.def("local_ring_bwd(Tensor[] douts, Tensor[] qs, Tensor[] ks, Tensor[] vs, Tensor[] outs, "
        "Tensor[] lses, Tensor? cu_seqlens, bool causal, float softmax_scale, int window_left, "
        "int window_right, str layout, bool deterministic=False, str kv_exchange=\"ring\", "
        "Tensor[]? dlses=None) -> (Tensor[], Tensor[], Tensor[])");
  // One block pair, merged into the running (out_acc, lse); positions are int32 global positions,
  // q_seg the packed sequences' (seqlen_q, 2) int32 ranges (core/mask.h).
  m.def("block_fwd(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor? q_seg, "
        "Tensor(a!) out_acc, Tensor(b!) lse, bool causal, int window_left, int window_right, "
        "float softmax_scale) -> ()");
  // One block pair's gradients, accumulated (+=) into dq_acc, dk_acc, dv_acc.
  m.def("block_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, "
        "Tensor? q_seg, Tensor lse, Tensor delta, Tensor(a!) dq_acc, Tensor(b!) dk_acc, "
        "Tensor(c!) dv_acc, bool causal, int window_left, int window_right, float softmax_scale, "
        "bool deterministic=False) -> ()");
}

// What the last ring call of this thread did: [steps, blocks computed, exchanges posted, bytes
// sent, messages sent].
std::vector<int64_t> last_ring_stats_op() {
  const RingStats stats = last_ring_stats();
  return {stats.steps, stats.blocks_computed, stats.exchanges_posted, stats.bytes_sent,
          stats.messages_sent};
}

// Bytes this thread has sent in Ulysses all-to-alls so far.
int64_t all_to_all_bytes_sent_op() { return all_to_all_bytes_sent(); }

// The CPU kernels' instruction set and the calling core's measured fp32 FMA rate (benchmarks).
std::string cpu_kernel_isa_op() { return cpu::cpu_kernel_isa(); }
double cpu_fma_peak_gflops_op(double seconds) { return cpu::fma_peak_gflops(seconds); }

// The device of the library's own collectives over the group (comm/group_devices.h), given the
// device of the inputs: "cpu", "cuda:0", ..., or "" when this process has none.
std::string group_collective_device_op(c10::string_view group_name, c10::string_view inputs) {
  const auto group = resolve_group(std::string(group_name));
  const std::optional<at::Device> device = collective_device(*group, at::Device(std::string(inputs)));
  return device ? device->str() : "";
}

// Why the group cannot carry tensors of `device` (in collectives, or point to point), or "".
std::string group_device_error_op(c10::string_view group_name, c10::string_view device,
                                  bool point_to_point) {
  const auto group = resolve_group(std::string(group_name));
  const at::Device d{std::string(device)};
  return point_to_point ? p2p_device_error(*group, d) : collective_device_error(*group, d);
}

// Every rank's int64 `descriptor` (on the group's collective device) over the process group
// registered as group_name, on the CPU, for an agreement of the Python function `call`
// (bindings/agreement.h all_gather_descriptors; RING_ATTN_TIMEOUT applies).
std::vector<at::Tensor> gather_agreement_op(const at::Tensor& descriptor,
                                            c10::string_view group_name, c10::string_view call) {
  const auto group = resolve_group(std::string(group_name));
  return all_gather_descriptors(descriptor, std::string(call), *group, descriptor.device(),
                                ring_timeout_seconds());
}

TORCH_LIBRARY_FRAGMENT(ring_attention, m) {
  m.def("last_ring_stats() -> int[]", &last_ring_stats_op);
  m.def("all_to_all_bytes_sent() -> int", &all_to_all_bytes_sent_op);
  m.def("group_collective_device(str group_name, str inputs_device) -> str",
        &group_collective_device_op);
  m.def("group_device_error(str group_name, str device, bool point_to_point) -> str",
        &group_device_error_op);
  m.def("gather_agreement(Tensor descriptor, str group_name, str call) -> Tensor[]",
        &gather_agreement_op);
  m.def("ring_timeout_seconds() -> float", &ring_timeout_seconds);
  m.def("release_abandoned_works() -> ()", &release_abandoned_works);
  m.def("cpu_kernel_isa() -> str", &cpu_kernel_isa_op);
  m.def("cpu_fma_peak_gflops(float seconds=0.2) -> float", &cpu_fma_peak_gflops_op);
}

TORCH_LIBRARY_IMPL(ring_attention, CPU, m) { register_ring_ops<CpuDevice>(m); }

}  // namespace ring_attn
