// The device half of the sm_90a conformance check (sm90_conformance_cases.cuh): runs every case
// once on the GPU and compares its bytes with the emulator's (sm90_conformance_emu --write FILE).
//
//   sm90_conformance_gpu FILE
//
// Prints one line per case (name, OK or MISMATCH with the first differing 32-bit word). Exit
// status 0 when every case matches, 1 on a mismatch or a CUDA error, 77 (skipped) when the
// device is not of compute capability 9.x, 2 on a bad FILE.
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <vector>

#include "cuda/emu/sm90_conformance_cases.cuh"
#include "cuda/sm90_tensor_map.h"

namespace ring_attn {
namespace cuda {
namespace sm90 {
namespace conformance {

template <bool kBF16, int N, Kind kForm>
__global__ void __launch_bounds__(kWgmmaThreads, 1)
    wgmma_kernel(const uint16_t* a, const uint16_t* b, float* out) {
  extern __shared__ __align__(1024) char smem[];
  wgmma_case<kBF16, N, kForm>(a, b, out, smem);
}

__global__ void __launch_bounds__(kStmatrixThreads, 1) stmatrix_kernel(uint32_t* out) {
  extern __shared__ __align__(1024) char smem[];
  stmatrix_case(out, smem);
}

__global__ void __launch_bounds__(kTmaThreads, 1)
    tma_kernel(const __grid_constant__ CUtensorMap map, uint32_t* out) {
  extern __shared__ __align__(1024) char smem[];
  tma_case(&map, out, smem);
}

__global__ void __launch_bounds__(kPipelineThreads, 1)
    pipeline_kernel(const __grid_constant__ CUtensorMap map, uint32_t* out) {
  extern __shared__ __align__(1024) char smem[];
  pipeline_case(&map, out, smem);
}

__global__ void __launch_bounds__(kRedThreads, 1)
    tensor_reduce_kernel(const __grid_constant__ CUtensorMap map, const float* src) {
  extern __shared__ __align__(1024) char smem[];
  tensor_reduce_case(&map, src, smem);
}

namespace {

bool check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) std::printf("CUDA error in %s: %s\n", what, cudaGetErrorString(e));
  return e == cudaSuccess;
}

// Copies host data to a new device buffer.
template <typename T>
T* to_device(const std::vector<T>& v) {
  void* p = nullptr;
  if (!check(cudaMalloc(&p, v.size() * sizeof(T)), "cudaMalloc")) return nullptr;
  if (!check(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy"))
    return nullptr;
  return static_cast<T*>(p);
}

// Runs launch(device output buffer of `bytes` bytes) and returns the buffer's bytes (empty on a
// CUDA error).
template <typename Launch>
std::vector<uint8_t> run(size_t bytes, Launch&& launch) {
  void* out = nullptr;
  std::vector<uint8_t> host(bytes);
  bool ok = check(cudaMalloc(&out, bytes), "cudaMalloc") &&
            check(cudaMemset(out, 0xff, bytes), "cudaMemset");
  if (ok) {
    launch(out);
    ok = check(cudaGetLastError(), "launch") && check(cudaDeviceSynchronize(), "kernel") &&
         check(cudaMemcpy(host.data(), out, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  }
  cudaFree(out);
  return ok ? host : std::vector<uint8_t>{};
}

template <bool kBF16, int N, Kind kForm>
std::vector<uint8_t> run_wgmma() {
  uint16_t* a = to_device(operand_bits(0, 64, kBF16));
  uint16_t* b = to_device(operand_bits(1, N, kBF16));
  std::vector<uint8_t> r;
  if (a != nullptr && b != nullptr) {
    r = run(wgmma_out_floats(N) * 4, [&](void* out) {
      wgmma_kernel<kBF16, N, kForm><<<1, kWgmmaThreads, wgmma_smem_bytes(N)>>>(
          a, b, static_cast<float*>(out));
    });
  }
  cudaFree(a);
  cudaFree(b);
  return r;
}

std::vector<uint8_t> run_stmatrix() {
  return run(kDsTileBytes, [](void* out) {
    stmatrix_kernel<<<1, kStmatrixThreads, kDsTileBytes>>>(static_cast<uint32_t*>(out));
  });
}

// The TMA cases' tensor map: bf16, 128-byte swizzle, zero fill out of bounds (the forward's).
bool make_map(CUtensorMap* map, const uint16_t* tensor) {
  return check(make_tensor_map_2d(map, tensor, true, kTmaCols, kTmaRows, kTmaPitch * 2, kBoxCols,
                                  kBoxRows),
               "the TMA cases' tensor map (cuTensorMapEncodeTiled)");
}

std::vector<uint8_t> run_tma(bool pipeline) {
  uint16_t* tensor = to_device(tma_tensor());
  CUtensorMap map;
  std::vector<uint8_t> r;
  if (tensor != nullptr && make_map(&map, tensor)) {
    if (pipeline) {
      r = run(kPipelineOutWords * 4, [&](void* out) {
        pipeline_kernel<<<1, kPipelineThreads, kPipelineSmemBytes>>>(map,
                                                                     static_cast<uint32_t*>(out));
      });
    } else {
      r = run(kTmaOutWords * 4, [&](void* out) {
        tma_kernel<<<1, kTmaThreads, kTmaSmemBytes>>>(map, static_cast<uint32_t*>(out));
      });
    }
  }
  cudaFree(tensor);
  return r;
}

// The launcher's accumulator map (make_accumulator_map) of dst, which starts from red_initial().
std::vector<uint8_t> run_tensor_reduce() {
  float* src = to_device(red_sources());
  float* dst = to_device(red_initial());
  CUtensorMap map;
  std::vector<uint8_t> r;
  if (src != nullptr && dst != nullptr &&
      check(make_accumulator_map(&map, dst, red_strides(), kRedBatch, kRedSeq, kRedHeads,
                                 kRedCols, kRedBoxRows, kRedBoxBlocks),
            "the tensor reduction's map (cuTensorMapEncodeTiled)")) {
    tensor_reduce_kernel<<<kRedCtas, kRedThreads, kRedSmemBytes>>>(map, src);
    r.resize(kRedTensorFloats * 4);
    if (!check(cudaGetLastError(), "launch") || !check(cudaDeviceSynchronize(), "kernel") ||
        !check(cudaMemcpy(r.data(), dst, r.size(), cudaMemcpyDeviceToHost), "cudaMemcpy")) {
      r.clear();
    }
  }
  cudaFree(src);
  cudaFree(dst);
  return r;
}

// This program's runner of the shared cases.
struct Device {
  template <bool kBF16, int N, Kind kForm>
  static std::vector<uint8_t> wgmma() { return run_wgmma<kBF16, N, kForm>(); }
  static std::vector<uint8_t> stmatrix() { return run_stmatrix(); }
  static std::vector<uint8_t> tma(bool pipeline) { return run_tma(pipeline); }
  static std::vector<uint8_t> tensor_reduce() { return run_tensor_reduce(); }
};

}  // namespace
}  // namespace conformance
}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn

int main(int argc, char** argv) {
  using namespace ring_attn::cuda::sm90::conformance;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s FILE (from sm90_conformance_emu --write FILE)\n", argv[0]);
    return 2;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each case's line as soon as it is known
  const std::vector<std::vector<uint8_t>> expected = read_results(argv[1]);
  if (expected.empty()) {
    std::fprintf(stderr, "%s: not the emulator's results of these cases\n", argv[1]);
    return 2;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  if (prop.major != 9) {
    std::printf("%s is compute capability %d.%d, not 9.x: skipped\n", prop.name, prop.major,
                prop.minor);
    return 77;
  }
  std::printf("%s (compute capability %d.%d) against the emulator (%s)\n", prop.name, prop.major,
              prop.minor, argv[1]);
  bool ok = true;
  size_t i = 0;
  for (const Case& c : kCases) {
    ok &= report(c.name, run_case<Device>(c), expected[i++], "emulator");
  }
  return ok ? 0 : 1;
}
