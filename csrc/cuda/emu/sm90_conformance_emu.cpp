// The emulator half of the sm_90a conformance check (sm90_conformance_cases.cuh): runs every case
// under the emulator, checks its bytes against the plain host reference (wgmma: float(A B^T) in
// fragment order; stmatrix: each fragment element at its 128-byte-swizzled place in the tile;
// TMA: the row-major box, zero outside the tensor, 128-byte swizzled; tensor reductions: the
// boxes' sums inside the tensor) and, with --write FILE, writes them for sm90_conformance_gpu to
// compare the device's bytes with.
//
//   sm90_conformance_emu [--write FILE]
//
// Prints one line per case; exit status 0 when every case matches its reference.
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/emu/sm90_conformance_cases.cuh"
#include "cuda/sm90_fwd_geometry.h"

using namespace ring_attn::cuda;
using namespace ring_attn::cuda::sm90::conformance;

namespace {

template <bool kBF16, int N, Kind kForm>
std::vector<uint8_t> run_wgmma() {
  const std::vector<uint16_t> a = operand_bits(0, 64, kBF16), b = operand_bits(1, N, kBF16);
  std::vector<float> out(wgmma_out_floats(N));
  emu::launch(1, 1, 1, kWgmmaThreads, wgmma_smem_bytes(N), [&](char* smem) {
    wgmma_case<kBF16, N, kForm>(a.data(), b.data(), out.data(), smem);
  });
  return as_bytes(out.data(), out.size() * 4);
}

std::vector<uint8_t> run_stmatrix() {
  std::vector<uint32_t> out(kDsTileBytes / 4);
  emu::launch(1, 1, 1, kStmatrixThreads, kDsTileBytes,
              [&](char* smem) { stmatrix_case(out.data(), smem); });
  return as_bytes(out.data(), out.size() * 4);
}

std::vector<uint8_t> run_tma(bool pipeline) {
  const std::vector<uint16_t> tensor = tma_tensor();
  const emu::TensorMap map =
      emu::make_tensor_map_2d(tensor.data(), 2, kTmaCols, kTmaRows, int64_t(kTmaPitch) * 2,
                              kBoxCols, kBoxRows, emu::TmaSwizzle::k128B);
  std::vector<uint32_t> out(pipeline ? kPipelineOutWords : kTmaOutWords);
  if (pipeline) {
    emu::launch(1, 1, 1, kPipelineThreads, kPipelineSmemBytes,
                [&](char* smem) { pipeline_case(&map, out.data(), smem); });
  } else {
    emu::launch(1, 1, 1, kTmaThreads, kTmaSmemBytes,
                [&](char* smem) { tma_case(&map, out.data(), smem); });
  }
  return as_bytes(out.data(), out.size() * 4);
}

// The accumulator map as make_accumulator_map (sm90_tensor_map.h) encodes it: the 5-D view of
// sm90_fwd_geometry.h accumulator_tensor.
std::vector<uint8_t> run_tensor_reduce() {
  const std::vector<float> src = red_sources();
  std::vector<float> dst = red_initial();
  const sm90::AccumulatorTensor a = sm90::accumulator_tensor(
      red_strides(), kRedBatch, kRedSeq, kRedHeads, kRedCols, kRedBoxRows, kRedBoxBlocks);
  const emu::TensorMap map = emu::make_tensor_map(dst.data(), 4, 5, a.dims, a.outer_strides,
                                                  a.box, emu::TmaSwizzle::k128B);
  emu::launch(kRedCtas, 1, 1, kRedThreads, kRedSmemBytes,
              [&](char* smem) { tensor_reduce_case(&map, src.data(), smem); });
  return as_bytes(dst.data(), dst.size() * 4);
}

// This program's runner of the shared cases.
struct Emulator {
  template <bool kBF16, int N, Kind kForm>
  static std::vector<uint8_t> wgmma() { return run_wgmma<kBF16, N, kForm>(); }
  static std::vector<uint8_t> stmatrix() { return run_stmatrix(); }
  static std::vector<uint8_t> tma(bool pipeline) { return run_tma(pipeline); }
  static std::vector<uint8_t> tensor_reduce() { return run_tensor_reduce(); }
};

}  // namespace

int main(int argc, char** argv) {
  const char* write_path = nullptr;
  if (argc == 3 && std::strcmp(argv[1], "--write") == 0) {
    write_path = argv[2];
  } else if (argc != 1) {
    std::fprintf(stderr, "usage: %s [--write FILE]\n", argv[0]);
    return 2;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each case's line as soon as it is known
  std::vector<std::vector<uint8_t>> results;
  bool ok = true;
  for (const Case& c : kCases) {
    results.push_back(run_case<Emulator>(c));
    ok &= report(c.name, results.back(), reference_bytes(c), "reference");
  }
  if (write_path != nullptr && !write_results(write_path, results)) {
    std::fprintf(stderr, "cannot write %s\n", write_path);
    return 1;
  }
  return ok ? 0 : 1;
}
