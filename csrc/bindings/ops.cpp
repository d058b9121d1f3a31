// Op schemas (one list, every device) and the CPU implementations.
// The Python package loads this library with torch.ops.load_library and registers fake kernels.
#include <torch/library.h>

#include "bindings/ring_ops.h"
#include "bindings/tensor_params.h"
#include "cpu/block_attn_cpu.h"

namespace ring_attn {
namespace {

constexpr BlockKernels kCpuKernels{&cpu::block_attn_fwd, &cpu::block_attn_bwd};

std::tuple<at::Tensor, at::Tensor> ring_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, c10::string_view group_name,
                                                bool causal, double softmax_scale,
                                                c10::string_view layout) {
  return ring_forward(kCpuKernels, q, k, v, std::string(group_name), causal, softmax_scale,
                      std::string(layout));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, c10::string_view group_name, bool causal,
    double softmax_scale, c10::string_view layout) {
  return ring_backward(kCpuKernels, dout, q, k, v, out, lse, std::string(group_name), causal,
                       softmax_scale, std::string(layout));
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> local_ring_fwd_cpu(
    at::TensorList qs, at::TensorList ks, at::TensorList vs, bool causal, double softmax_scale,
    c10::string_view layout) {
  return local_ring_forward(kCpuKernels, qs.vec(), ks.vec(), vs.vec(), causal, softmax_scale,
                            std::string(layout));
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
local_ring_bwd_cpu(at::TensorList douts, at::TensorList qs, at::TensorList ks, at::TensorList vs,
                   at::TensorList outs, at::TensorList lses, bool causal, double softmax_scale,
                   c10::string_view layout) {
  return local_ring_backward(kCpuKernels, douts.vec(), qs.vec(), ks.vec(), vs.vec(), outs.vec(),
                             lses.vec(), causal, softmax_scale, std::string(layout));
}

void block_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& q_pos, const at::Tensor& k_pos, at::Tensor& out_acc,
                   at::Tensor& lse, bool causal, double softmax_scale) {
  cpu::block_attn_fwd(make_fwd_params(q, k, v, q_pos, k_pos, out_acc, lse, causal, softmax_scale));
}

void block_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& q_pos, const at::Tensor& k_pos,
                   const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq_acc,
                   at::Tensor& dk_acc, at::Tensor& dv_acc, bool causal, double softmax_scale) {
  cpu::block_attn_bwd(make_bwd_params(dout, q, k, v, q_pos, k_pos, lse, delta, dq_acc, dk_acc,
                                      dv_acc, causal, softmax_scale));
}

}  // namespace

TORCH_LIBRARY(ring_attention, m) {
  // Ring attention over the process group registered as `group_name` ("" = world size 1).
  // q: (batch, seqlen_local, heads, headdim); k, v: (batch, seqlen_local, heads_kv, headdim).
  // Returns out (like q) and lse (batch, heads, seqlen_local) in the accumulator dtype.
  m.def("ring_fwd(Tensor q, Tensor k, Tensor v, str group_name, bool causal, float softmax_scale, "
        "str layout) -> (Tensor, Tensor)");
  // Returns dq, dk, dv (like q, k, v) given the forward's out and lse.
  m.def("ring_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "str group_name, bool causal, float softmax_scale, str layout) -> (Tensor, Tensor, Tensor)");
  // The same ring over len(qs) virtual ranks in this process (LocalRing): one shard per rank.
  m.def("local_ring_fwd(Tensor[] qs, Tensor[] ks, Tensor[] vs, bool causal, float softmax_scale, "
        "str layout) -> (Tensor[], Tensor[])");
  m.def("local_ring_bwd(Tensor[] douts, Tensor[] qs, Tensor[] ks, Tensor[] vs, Tensor[] outs, "
        "Tensor[] lses, bool causal, float softmax_scale, str layout) "
        "-> (Tensor[], Tensor[], Tensor[])");
  // One block pair, merged into the running (out_acc, lse); positions are int32 global positions.
  m.def("block_fwd(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor(a!) out_acc, "
        "Tensor(b!) lse, bool causal, float softmax_scale) -> ()");
  // One block pair's gradients, accumulated (+=) into dq_acc, dk_acc, dv_acc.
  m.def("block_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, "
        "Tensor lse, Tensor delta, Tensor(a!) dq_acc, Tensor(b!) dk_acc, Tensor(c!) dv_acc, "
        "bool causal, float softmax_scale) -> ()");
}

TORCH_LIBRARY_IMPL(ring_attention, CPU, m) {
  m.impl("ring_fwd", &ring_fwd_cpu);
  m.impl("ring_bwd", &ring_bwd_cpu);
  m.impl("local_ring_fwd", &local_ring_fwd_cpu);
  m.impl("local_ring_bwd", &local_ring_bwd_cpu);
  m.impl("block_fwd", &block_fwd_cpu);
  m.impl("block_bwd", &block_bwd_cpu);
}

}  // namespace ring_attn
