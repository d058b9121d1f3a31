// CUDA implementations of the ring attention ops (schemas in ops.cpp): the shared op
// implementations (op_impls.h: validation, agreement, buffers, transports, schedule) over the CUDA
// block kernels (csrc/cuda). Compiled only when the CUDA half is built (RING_ATTN_WITH_CUDA).
//
// Also defines two CUDA-only ops:
//   cuda_build_info() -> str       what was compiled (archs, nvcc) and how many devices the runtime
//                                  sees; callable without a driver (tests/test_cuda_build.py).
//   _cuda_block_fwd(<block_fwd's arguments>, bool merge) -> ()
//                                  block_fwd with the fused merge switchable off (merge = False
//                                  ignores the incoming state: plain attention of the block), to time
//                                  what the merge costs (benchmarks/kernels/bench_cuda.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/op_impls.h"
#include "cuda/block_attn_cuda.h"

namespace ring_attn {
namespace {

void check_support(DType dtype, const BlockShape& shape) {
  const std::string error = cuda::support_error(dtype, shape);
  TORCH_CHECK_VALUE(error.empty(), "ring attention: ", error);
}

// The kernels' shared memory, or their kSmallSmem variant's, fits the current device (GPUs of
// compute capability 8.6 and 8.9 allow 99 KiB).
void check_shared_memory(int headdim, bool backward, bool deterministic) {
  const std::string error = cuda::device_shared_memory_error(headdim, backward, deterministic);
  TORCH_CHECK_VALUE(error.empty(), "ring attention: ", error);
}

void check_cuda_environment() {
  cuda::KernelChoice choice;
  const std::string error = cuda::kernel_choice(&choice);
  TORCH_CHECK_VALUE(error.empty(), "ring attention: ", error);
  int max_smem_kib = 0;
  const std::string smem_error = cuda::max_smem_kib(&max_smem_kib);
  TORCH_CHECK_VALUE(smem_error.empty(), "ring attention: ", smem_error);
}

void check_aligned(const void* ptr, const Strides& st, int batch, int seqlen, int heads,
                   const char* name, int elem_bytes = 2) {
  const std::string error = cuda::alignment_error(ptr, st, batch, seqlen, heads, name, elem_bytes);
  TORCH_CHECK_VALUE(error.empty(), "ring attention: ", error);
}

// The block ops take tensors on any device combination the dispatcher lets through (CUDA when any
// argument is on CUDA): every pointer must be memory of the current CUDA device.
void check_on_device(std::initializer_list<std::pair<const void*, const char*>> pointers) {
  for (const auto& [ptr, name] : pointers) {
    const std::string error = cuda::device_pointer_error(ptr, name);
    TORCH_CHECK_VALUE(error.empty(), "ring attention (CUDA): ", error);
  }
}

void check_launch(int error, const char* what) {
  TORCH_CHECK(error == 0, "ring attention: CUDA ", what, " kernel failed to launch: ",
              cuda::error_string(error));
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void launch_fwd(const BlockFwdParams& p, bool merge) {
  const BlockShape& s = p.shape;
  check_support(p.dtype, s);
  check_aligned(p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads, "q");
  check_aligned(p.k, p.k_strides, s.batch, s.seqlen_k, s.nheads_kv, "k");
  check_aligned(p.v, p.v_strides, s.batch, s.seqlen_k, s.nheads_kv, "v");
  check_on_device({{p.q, "q"}, {p.k, "k"}, {p.v, "v"}, {p.q_pos, "q_pos"}, {p.k_pos, "k_pos"},
                   {p.q_seg, "q_seg"}, {p.out_acc, "out_acc"}, {p.lse, "lse"}});
  check_shared_memory(s.headdim, false, false);
  check_launch(cuda::block_fwd(cuda::FwdArgs{p, merge}, current_stream()), "forward");
}

void fwd_kernel(const BlockFwdParams& p) { launch_fwd(p, true); }

void bwd_kernel(const BlockBwdParams& p) {
  const BlockShape& s = p.shape;
  check_support(p.dtype, s);
  check_aligned(p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads, "q");
  check_aligned(p.dout, p.dout_strides, s.batch, s.seqlen_q, s.nheads, "dout");
  check_aligned(p.k, p.k_strides, s.batch, s.seqlen_k, s.nheads_kv, "k");
  check_aligned(p.v, p.v_strides, s.batch, s.seqlen_k, s.nheads_kv, "v");
  check_aligned(p.dq_acc, p.dq_strides, s.batch, s.seqlen_q, s.nheads, "dq_acc", 4);
  check_aligned(p.dk_acc, p.dk_strides, s.batch, s.seqlen_k, s.nheads_kv, "dk_acc", 4);
  check_aligned(p.dv_acc, p.dv_strides, s.batch, s.seqlen_k, s.nheads_kv, "dv_acc", 4);
  check_on_device({{p.q, "q"}, {p.k, "k"}, {p.v, "v"}, {p.dout, "dout"}, {p.q_pos, "q_pos"},
                   {p.k_pos, "k_pos"}, {p.q_seg, "q_seg"}, {p.lse, "lse"}, {p.delta, "delta"},
                   {p.dq_acc, "dq_acc"}, {p.dk_acc, "dk_acc"}, {p.dv_acc, "dv_acc"}});
  check_shared_memory(s.headdim, true, p.deterministic);
  check_launch(cuda::block_bwd(p, current_stream()), "backward");
}

struct CudaDevice {
  static constexpr BlockKernels kKernels{&fwd_kernel, &bwd_kernel, &check_cuda_environment};
};

void block_fwd_merge_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& q_pos, const at::Tensor& k_pos,
                          const std::optional<at::Tensor>& q_seg, at::Tensor& out_acc,
                          at::Tensor& lse, bool causal, int64_t window_left, int64_t window_right,
                          double softmax_scale, bool merge) {
  c10::DeviceGuard guard(q.device());
  check_cuda_environment();
  launch_fwd(make_fwd_params(q, k, v, q_pos, k_pos, q_seg.value_or(at::Tensor()), out_acc, lse,
                             mask_spec(causal, window_left, window_right), softmax_scale),
             merge);
}

std::string cuda_build_info() { return cuda::build_info(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ring_attention, m) {
  m.def("cuda_build_info() -> str", &cuda_build_info);
  m.def("_cuda_block_fwd(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor? q_seg, "
        "Tensor(a!) out_acc, Tensor(b!) lse, bool causal, int window_left, int window_right, "
        "float softmax_scale, bool merge) -> ()");
}

TORCH_LIBRARY_IMPL(ring_attention, CUDA, m) {
  register_ring_ops<CudaDevice>(m);
  m.impl("_cuda_block_fwd", &block_fwd_merge_cuda);
}

}  // namespace ring_attn
