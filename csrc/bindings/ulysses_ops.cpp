#include "bindings/ulysses_ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <limits>
#include <vector>

#include "bindings/agreement.h"
#include "bindings/ring_ops.h"
#include "bindings/transport_select.h"
#include "comm/c10d_compat.h"
#include "comm/c10d_transport.h"
#include "comm/group_devices.h"

namespace ring_attn {

namespace {

thread_local int64_t g_all_to_all_bytes = 0;

// parts: (U, ...); returns got with got[j] = rank j's parts[this rank].
at::Tensor all_to_all(const at::Tensor& parts, const UlyssesGrid& grid) {
  const c10::intrusive_ptr<c10d::ProcessGroup>& group = grid.ulysses;
  at::Tensor input = parts.contiguous();
  at::Tensor output = at::empty_like(input);
  const int size = world_of(group);
  if (size == 1) return output.copy_(input);
  std::vector<int64_t> equal_splits;
  auto work = c10d_compat::all_to_all_single(*group, output, input, equal_splits);
  wait_or_raise(work, *group, ring_timeout_seconds(), grid.call,
                "in the all-to-all over the ulysses_group");
  g_all_to_all_bytes += input.nbytes() / size * (size - 1);
  return output;
}

// (batch, L, heads, d) -> (batch, U * L, heads / U, d): the ring shard's tokens in Ulysses rank
// order, this rank's head chunk. Each of these regroupings returns a contiguous tensor, as the ops'
// fake kernels declare: with one head per chunk, reshape would return a strided view instead.
at::Tensor seq_to_heads(const at::Tensor& x, const UlyssesGrid& grid) {
  const int64_t size = grid.ulysses_size;
  const int64_t b = x.size(0), length = x.size(1), heads = x.size(2), d = x.size(3);
  const at::Tensor parts = x.reshape({b, length, size, heads / size, d}).permute({2, 0, 1, 3, 4});
  const at::Tensor got = all_to_all(parts, grid);  // (U, batch, L, heads / U, d)
  return got.permute({1, 0, 2, 3, 4}).reshape({b, size * length, heads / size, d}).contiguous();
}

// The inverse of seq_to_heads: (batch, U * L, h, d) -> (batch, L, U * h, d).
at::Tensor heads_to_seq(const at::Tensor& x, const UlyssesGrid& grid) {
  const int64_t size = grid.ulysses_size;
  const int64_t b = x.size(0), length = x.size(1) / size, heads = x.size(2), d = x.size(3);
  const at::Tensor parts = x.reshape({b, size, length, heads, d}).permute({1, 0, 2, 3, 4});
  const at::Tensor got = all_to_all(parts, grid);  // (U, batch, L, h, d): every head chunk
  return got.permute({1, 2, 0, 3, 4}).reshape({b, length, size * heads, d}).contiguous();
}

// lse: (batch, h, U * L) -> (batch, U * h, L).
at::Tensor lse_to_seq(const at::Tensor& lse, const UlyssesGrid& grid) {
  const int64_t size = grid.ulysses_size;
  const int64_t b = lse.size(0), heads = lse.size(1), length = lse.size(2) / size;
  const at::Tensor parts = lse.reshape({b, heads, size, length}).permute({2, 0, 1, 3});
  const at::Tensor got = all_to_all(parts, grid);  // (U, batch, h, L)
  return got.permute({1, 0, 2, 3}).reshape({b, size * heads, length}).contiguous();
}

// The inverse of lse_to_seq: (batch, U * h, L) -> (batch, h, U * L).
at::Tensor lse_to_heads(const at::Tensor& lse, const UlyssesGrid& grid) {
  const int64_t size = grid.ulysses_size;
  const int64_t b = lse.size(0), heads = lse.size(1) / size, length = lse.size(2);
  const at::Tensor parts = lse.reshape({b, size, heads, length}).permute({1, 0, 2, 3});
  const at::Tensor got = all_to_all(parts, grid);  // (U, batch, h, L): every token chunk
  return got.permute({1, 2, 0, 3}).reshape({b, heads, size * length}).contiguous();
}

UlyssesGrid grid_of(const RingOptions& options, const std::string& ulysses_group_name) {
  UlyssesGrid grid;
  grid.call = ring_call_name(options.cu_seqlens);
  grid.ulysses = resolve_group(ulysses_group_name);
  grid.ring = resolve_group(options.group_name);
  grid.ulysses_rank = rank_of(grid.ulysses);
  grid.ulysses_size = world_of(grid.ulysses);
  grid.ring_rank = rank_of(grid.ring);
  grid.ring_size = world_of(grid.ring);
  return grid;
}

// Packed sequences travel as one batch: (tokens, ...) <-> (1, tokens, ...).
struct Batching {
  bool packed;
  at::Tensor to_batch(const at::Tensor& t) const { return packed ? t.unsqueeze(0) : t; }
  at::Tensor from_batch(const at::Tensor& t) const { return packed ? t.squeeze(0) : t; }
};

// The exchanged tensors as the ring sees them: packed, only the ring shard's `ring_tokens`
// tokens of the U * L (tokens are dim 0 of values, the last dim of lse), without the pad that
// made them divide by U; and the ring's results padded back (out with 0, lse with -inf).
struct RingShard {
  bool packed;
  int64_t tokens;       // U * L
  int64_t ring_tokens;  // of them, the ring shard's

  at::Tensor values(const at::Tensor& t) const { return packed ? t.narrow(0, 0, ring_tokens) : t; }
  at::Tensor lse(const at::Tensor& t) const {
    return packed ? t.narrow(-1, 0, ring_tokens).contiguous() : t;
  }
  at::Tensor padded_values(const at::Tensor& t) const {
    return packed ? at::constant_pad_nd(t, {0, 0, 0, 0, 0, tokens - ring_tokens}) : t;
  }
  at::Tensor padded_lse(const at::Tensor& t) const {
    return packed ? at::constant_pad_nd(t, {0, tokens - ring_tokens},
                                        -std::numeric_limits<double>::infinity())
                  : t;
  }
};

RingShard ring_shard(const RingOptions& options, const UlyssesGrid& grid, int64_t tokens) {
  if (!options.cu_seqlens.defined()) return {false, tokens, tokens};
  Layout layout;
  parse_layout(options.layout, &layout);  // validated by the agreement
  return {true, tokens, ulysses_ring_tokens(options.cu_seqlens, layout, grid.ring_size)};
}

}  // namespace

int64_t all_to_all_bytes_sent() { return g_all_to_all_bytes; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
ulysses_forward(const BlockKernels& kernels, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, const RingOptions& options,
                const std::string& ulysses_group_name, bool return_lse) {
  std::string transport_choice_error;
  const TransportKind kind = transport_kind(q, &transport_choice_error);
  const UlyssesGrid grid = grid_of(options, ulysses_group_name);
  RingCall call{q, k, v, options.layout, options.causal, options.softmax_scale,
                options.window_left, options.window_right, options.cu_seqlens, grid.ring_size};
  call.kv_exchange = options.kv_exchange;
  call.transport = static_cast<int>(kind);
  call.transport_choice_error = transport_choice_error;
  if (grid.ring_size > 1 && kind == TransportKind::kC10d) {
    call.transport_error = p2p_device_error(*grid.ring, q.device());
  }
  const int64_t ulysses_call = agree_on_grid_or_throw(call, grid, return_lse,
                                                      ring_check_enabled(), ring_timeout_seconds());
  const Batching batching{options.cu_seqlens.defined()};
  const int64_t heads_kv = k.size(-2);
  const int64_t repeat = ulysses_heads_kv(heads_kv, grid.ulysses_size) * grid.ulysses_size /
                         heads_kv;
  auto exchanged = [&](const at::Tensor& t, int64_t times) {
    at::Tensor x = batching.to_batch(t);
    return batching.from_batch(seq_to_heads(times > 1 ? x.repeat_interleave(times, 2) : x, grid));
  };
  const at::Tensor q_heads = exchanged(q, 1), k_heads = exchanged(k, repeat),
                   v_heads = exchanged(v, repeat);
  const RingShard shard = ring_shard(options, grid, q_heads.size(batching.packed ? 0 : 1));
  auto [out_ring, lse_ring, ring_call] = ring_forward(kernels, shard.values(q_heads), shard.values(k_heads),
                                           shard.values(v_heads), options);
  const at::Tensor out_heads = shard.padded_values(out_ring);
  const at::Tensor lse_heads = shard.padded_lse(lse_ring);
  const at::Tensor out = batching.from_batch(heads_to_seq(batching.to_batch(out_heads), grid));
  const at::Tensor lse = return_lse
                             ? batching.from_batch(lse_to_seq(batching.to_batch(lse_heads), grid))
                             : at::empty({0}, lse_heads.options());
  const at::Tensor forward_calls = at::cat({at::full({1}, ulysses_call, at::kLong), ring_call});
  return {out, lse, q_heads, k_heads, v_heads, out_heads, lse_heads, forward_calls};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ulysses_backward(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q_heads,
    const at::Tensor& k_heads, const at::Tensor& v_heads, const at::Tensor& out_heads,
    const at::Tensor& lse_heads, const RingOptions& options,
    const std::string& ulysses_group_name, int64_t heads_kv, const at::Tensor& dlse,
    const at::Tensor& forward_calls) {
  // Inputs were validated and agreed on in the forward; autograd guarantees matching shapes.
  const UlyssesGrid grid = grid_of(options, ulysses_group_name);
  const bool numbered = forward_calls.defined() && forward_calls.numel() == 2;
  agree_on_grid_backward(grid, dout, ring_check_enabled(), ring_timeout_seconds(),
                         numbered ? forward_calls[0].item<int64_t>() : 0);
  const Batching batching{options.cu_seqlens.defined()};
  const at::Tensor dout_heads = batching.from_batch(seq_to_heads(batching.to_batch(dout), grid));
  const RingShard shard = ring_shard(options, grid, q_heads.size(batching.packed ? 0 : 1));
  auto [dq_ring, dk_ring, dv_ring] = ring_backward(
      kernels, shard.values(dout_heads), shard.values(q_heads), shard.values(k_heads),
      shard.values(v_heads), shard.values(out_heads), shard.lse(lse_heads), options,
      dlse.defined() ? shard.lse(batching.from_batch(lse_to_heads(batching.to_batch(dlse), grid)))
                     : dlse,
      numbered ? forward_calls.narrow(0, 1, 1) : at::Tensor());
  auto back = [&](const at::Tensor& grad) {
    return heads_to_seq(batching.to_batch(shard.padded_values(grad)), grid);
  };
  const at::Tensor dq = back(dq_ring);
  at::Tensor dk = back(dk_ring), dv = back(dv_ring);  // (batch, L, lcm(U, heads_kv), d)
  TORCH_CHECK_VALUE(heads_kv > 0 && dk.size(2) % heads_kv == 0, grid.call,
                    ": heads_kv (", heads_kv, ") must divide the exchanged ",
                    dk.size(2), " K/V heads");
  const int64_t repeat = dk.size(2) / heads_kv;
  if (repeat > 1) {  // the repeated heads' gradients, summed
    const std::vector<int64_t> shape{dk.size(0), dk.size(1), heads_kv, repeat, dk.size(3)};
    dk = dk.reshape(shape).sum(3);
    dv = dv.reshape(shape).sum(3);
  }
  return {batching.from_batch(dq), batching.from_batch(dk), batching.from_batch(dv)};
}

}  // namespace ring_attn
