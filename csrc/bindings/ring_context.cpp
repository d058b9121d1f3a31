#include "bindings/ring_context.h"

#include <ATen/ATen.h>

#include <mutex>

#include "core/bounded_cache.h"
#include "core/ring_scheduler.h"

#if defined(RING_ATTN_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace ring_attn {

namespace {

// Is the current stream of `device` capturing a CUDA graph?
bool capturing_graph(const at::Device& device) {
#if defined(RING_ATTN_WITH_CUDA)
  if (device.is_cuda()) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(),
                                         &status));
    return status != cudaStreamCaptureStatusNone;
  }
#endif
  (void)device;
  return false;
}

// A cached device copy outlives the call that reads it, and its memory belongs to the stream that
// made it: a call on another stream records its stream, so that the copy's memory, once evicted,
// is not handed out again before that stream's kernels have read it.
void used_on_current_stream(const at::Tensor& copy) {
#if defined(RING_ATTN_WITH_CUDA)
  if (copy.is_cuda()) {
    c10::cuda::CUDACachingAllocator::recordStream(
        copy.storage().data_ptr(), c10::cuda::getCurrentCUDAStream(copy.device().index()));
  }
#endif
  (void)copy;
}

// Device copies of the rings' token positions and sequence ranges, kept across calls and keyed
// by what determines them (device, layout, world size, rank, local length, cu_seqlens), within
// 64 MiB (least recently used first). Once a configuration has run, a ring call copies nothing
// from host to device: no pageable copy that holds up the host, and the call can be captured in
// a CUDA graph. A copy used under capture is pinned: the graph keeps its address.
at::Tensor device_copy(const std::string& key, const at::Tensor& host, const at::Device& device) {
  static std::mutex mutex;
  static BoundedCache<at::Tensor> copies(size_t{64} << 20);
  const std::string full_key = device.str() + "|" + key;
  const bool capturing = capturing_graph(device);
  std::lock_guard<std::mutex> lock(mutex);
  if (const at::Tensor* found = copies.find(full_key, capturing)) {
    used_on_current_stream(*found);
    return *found;
  }
  TORCH_CHECK(!capturing,
              "ring attention: this ring configuration (layout, world size, lengths, cu_seqlens) "
              "has not run on ", device, " yet, so its token positions would be copied from the "
              "host during CUDA graph capture; run one call of the same configuration before "
              "capturing");
  return copies.insert(full_key, host.to(device), host.nbytes(), false);
}

}  // namespace

RingContext::RingContext(int rank_, int world_, const RingOptions& options, int64_t local_len_)
    : rank(rank_), world(world_), local_len(local_len_), packed(options.cu_seqlens.defined()),
      positions(world_), segments(world_), query_bounds(world_), key_ranges(world_) {
  parse_layout(options.layout, &layout);
  parse_kv_exchange(options.kv_exchange, &kv_exchange);
  mask.causal = options.causal;
  mask.window_left = options.window_left;
  mask.window_right = options.window_right;
  if (packed) cu_seqlens_host_ = options.cu_seqlens.cpu().contiguous();
  for (int r = 0; r < world; ++r) {
    positions[r] = at::empty({local_len}, at::kInt);
    int32_t* rank_positions = positions[r].data_ptr<int32_t>();
    const int32_t* rank_segments = nullptr;
    if (packed) {
      segments[r] = at::empty({local_len, 2}, at::kInt);
      fill_varlen_positions(layout, r, world, cu_seqlens_host_.data_ptr<int32_t>(),
                            cu_seqlens_host_.size(0) - 1, rank_positions,
                            segments[r].data_ptr<int32_t>());
      rank_segments = segments[r].data_ptr<int32_t>();
    } else {
      fill_positions(layout, r, world, local_len, rank_positions);
    }
    query_bounds[r] = tile_bounds(mask, rank_positions, rank_segments, 0, local_len);
    key_ranges[r] = range_of(rank_positions, 0, local_len);
  }
  reaches = block_reaches(world, [this](int r, int source) { return needs(r, source); });
  steps = ring_steps(reaches);
}

bool RingContext::needs(int query_rank, int source) const {
  return classify_tile(query_bounds[query_rank], key_ranges[source]) != TileKind::kSkip;
}

const at::Tensor& RingContext::positions_of(int source, const at::Device& device) {
  return on_device(positions[source], "positions", source, device);
}

at::Tensor RingContext::segments_of_rank(const at::Device& device) {
  return packed ? on_device(segments[rank], "segments", rank, device) : at::Tensor();
}

const at::Tensor& RingContext::on_device(at::Tensor& tensor, const char* what, int owner,
                                         const at::Device& device) {
  if (tensor.device() == device) return tensor;
  if (cache_key_.empty()) {
    cache_key_ = std::to_string(static_cast<int>(layout)) + "|" + std::to_string(world) + "|" +
                 std::to_string(local_len);
    for (int64_t i = 0; packed && i < cu_seqlens_host_.size(0); ++i) {
      cache_key_ += "|" + std::to_string(cu_seqlens_host_.data_ptr<int32_t>()[i]);
    }
  }
  tensor = device_copy(std::string(what) + "|" + std::to_string(owner) + "|" + cache_key_, tensor,
                       device);
  return tensor;
}

}  // namespace ring_attn
