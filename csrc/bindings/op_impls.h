// The implementations of the op schemas (ops.cpp) for one device, given its block kernels:
//     struct CpuDevice { static constexpr BlockKernels kKernels{...}; };
//     TORCH_LIBRARY_IMPL(ring_attention, CPU, m) { register_ring_ops<CpuDevice>(m); }
// Every device shares validation, agreement, buffers, transports and the schedule (ring_ops.h).
#pragma once

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>

#include "bindings/ring_ops.h"
#include "bindings/tensor_params.h"
#include "bindings/ulysses_ops.h"

namespace ring_attn {

inline RingOptions ring_options(const std::optional<at::Tensor>& cu_seqlens,
                                c10::string_view group_name, bool causal, double softmax_scale,
                                int64_t window_left, int64_t window_right,
                                c10::string_view layout, bool deterministic = false,
                                c10::string_view kv_exchange = "ring") {
  RingOptions options;
  options.group_name = std::string(group_name);
  options.causal = causal;
  options.softmax_scale = softmax_scale;
  options.window_left = window_left;
  options.window_right = window_right;
  options.layout = std::string(layout);
  options.deterministic = deterministic;
  options.kv_exchange = std::string(kv_exchange);
  if (cu_seqlens) options.cu_seqlens = *cu_seqlens;
  return options;
}

inline MaskSpec mask_spec(bool causal, int64_t window_left, int64_t window_right) {
  MaskSpec mask;
  mask.causal = causal;
  mask.window_left = window_left;
  mask.window_right = window_right;
  return mask;
}

template <typename Device>
struct RingOpImpls {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_fwd(
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const std::optional<at::Tensor>& cu_seqlens, c10::string_view group_name, bool causal,
      double softmax_scale, int64_t window_left, int64_t window_right, c10::string_view layout,
      c10::string_view kv_exchange) {
    c10::DeviceGuard guard(q.device());
    Device::kKernels.check_environment();
    return ring_forward(Device::kKernels, q, k, v,
                        ring_options(cu_seqlens, group_name, causal, softmax_scale, window_left,
                                     window_right, layout, false, kv_exchange));
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_bwd(
      const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens,
      c10::string_view group_name, bool causal, double softmax_scale, int64_t window_left,
      int64_t window_right, c10::string_view layout, bool deterministic,
      c10::string_view kv_exchange, const std::optional<at::Tensor>& dlse,
      const std::optional<at::Tensor>& forward_call) {
    c10::DeviceGuard guard(q.device());
    Device::kKernels.check_environment();
    return ring_backward(Device::kKernels, dout, q, k, v, out, lse,
                         ring_options(cu_seqlens, group_name, causal, softmax_scale, window_left,
                                      window_right, layout, deterministic, kv_exchange),
                         dlse.value_or(at::Tensor()), forward_call.value_or(at::Tensor()));
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor, at::Tensor>
  ulysses_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& cu_seqlens, c10::string_view group_name,
              c10::string_view ulysses_group_name, bool causal, double softmax_scale,
              int64_t window_left, int64_t window_right, c10::string_view layout,
              c10::string_view kv_exchange, bool return_lse) {
    c10::DeviceGuard guard(q.device());
    Device::kKernels.check_environment();
    return ulysses_forward(Device::kKernels, q, k, v,
                           ring_options(cu_seqlens, group_name, causal, softmax_scale,
                                        window_left, window_right, layout, false, kv_exchange),
                           std::string(ulysses_group_name), return_lse);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> ulysses_bwd(
      const at::Tensor& dout, const at::Tensor& q_heads, const at::Tensor& k_heads,
      const at::Tensor& v_heads, const at::Tensor& out_heads, const at::Tensor& lse_heads,
      const std::optional<at::Tensor>& cu_seqlens, c10::string_view group_name,
      c10::string_view ulysses_group_name, bool causal, double softmax_scale, int64_t window_left,
      int64_t window_right, c10::string_view layout, int64_t heads_kv, bool deterministic,
      c10::string_view kv_exchange, const std::optional<at::Tensor>& dlse,
      const std::optional<at::Tensor>& forward_calls) {
    c10::DeviceGuard guard(q_heads.device());
    Device::kKernels.check_environment();
    return ulysses_backward(Device::kKernels, dout, q_heads, k_heads, v_heads, out_heads,
                            lse_heads,
                            ring_options(cu_seqlens, group_name, causal, softmax_scale,
                                         window_left, window_right, layout, deterministic,
                                         kv_exchange),
                            std::string(ulysses_group_name), heads_kv,
                            dlse.value_or(at::Tensor()), forward_calls.value_or(at::Tensor()));
  }

  static std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> local_ring_fwd(
      at::TensorList qs, at::TensorList ks, at::TensorList vs,
      const std::optional<at::Tensor>& cu_seqlens, bool causal, double softmax_scale,
      int64_t window_left, int64_t window_right, c10::string_view layout,
      c10::string_view kv_exchange) {
    TORCH_CHECK_VALUE(!qs.empty(), "LocalRing: at least one virtual rank is needed");
    c10::DeviceGuard guard(qs[0].device());
    Device::kKernels.check_environment();
    return local_ring_forward(Device::kKernels, qs.vec(), ks.vec(), vs.vec(),
                              ring_options(cu_seqlens, "", causal, softmax_scale, window_left,
                                           window_right, layout, false, kv_exchange));
  }

  static std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
  local_ring_bwd(at::TensorList douts, at::TensorList qs, at::TensorList ks, at::TensorList vs,
                 at::TensorList outs, at::TensorList lses,
                 const std::optional<at::Tensor>& cu_seqlens, bool causal, double softmax_scale,
                 int64_t window_left, int64_t window_right, c10::string_view layout,
                 bool deterministic, c10::string_view kv_exchange,
                 const std::optional<std::vector<at::Tensor>>& dlses) {
    TORCH_CHECK_VALUE(!qs.empty(), "LocalRing: at least one virtual rank is needed");
    c10::DeviceGuard guard(qs[0].device());
    Device::kKernels.check_environment();
    return local_ring_backward(Device::kKernels, douts.vec(), qs.vec(), ks.vec(), vs.vec(),
                               outs.vec(), lses.vec(),
                               ring_options(cu_seqlens, "", causal, softmax_scale, window_left,
                                            window_right, layout, deterministic, kv_exchange),
                               dlses.value_or(std::vector<at::Tensor>()));
  }

  static void block_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& q_pos, const at::Tensor& k_pos,
                        const std::optional<at::Tensor>& q_seg, at::Tensor& out_acc,
                        at::Tensor& lse, bool causal, int64_t window_left, int64_t window_right,
                        double softmax_scale) {
    c10::DeviceGuard guard(q.device());
    Device::kKernels.check_environment();
    Device::kKernels.fwd(make_fwd_params(q, k, v, q_pos, k_pos, q_seg.value_or(at::Tensor()),
                                         out_acc, lse,
                                         mask_spec(causal, window_left, window_right),
                                         softmax_scale));
  }

  static void block_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& q_pos, const at::Tensor& k_pos,
                        const std::optional<at::Tensor>& q_seg, const at::Tensor& lse,
                        const at::Tensor& delta, at::Tensor& dq_acc, at::Tensor& dk_acc,
                        at::Tensor& dv_acc, bool causal, int64_t window_left,
                        int64_t window_right, double softmax_scale, bool deterministic) {
    c10::DeviceGuard guard(q.device());
    Device::kKernels.check_environment();
    BlockBwdParams params = make_bwd_params(dout, q, k, v, q_pos, k_pos,
                                            q_seg.value_or(at::Tensor()), lse, delta, dq_acc,
                                            dk_acc, dv_acc,
                                            mask_spec(causal, window_left, window_right),
                                            softmax_scale);
    params.deterministic = deterministic;
    Device::kKernels.bwd(params);
  }
};

template <typename Device>
void register_ring_ops(torch::Library& m) {
  using Impl = RingOpImpls<Device>;
  m.impl("ring_fwd", &Impl::ring_fwd);
  m.impl("ring_bwd", &Impl::ring_bwd);
  m.impl("ulysses_fwd", &Impl::ulysses_fwd);
  m.impl("ulysses_bwd", &Impl::ulysses_bwd);
  m.impl("local_ring_fwd", &Impl::local_ring_fwd);
  m.impl("local_ring_bwd", &Impl::local_ring_bwd);
  m.impl("block_fwd", &Impl::block_fwd);
  m.impl("block_bwd", &Impl::block_bwd);
}

}  // namespace ring_attn
