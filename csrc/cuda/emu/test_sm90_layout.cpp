// Host-only check of sm90_layout.h (the 128-byte swizzle, the wgmma shared-memory descriptor and
// the operand address function the emulator decodes descriptors with) against CUTLASS/CuTe:
//  * always: the PTX ISA's description (16-byte chunk j of 128-byte row r at chunk j ^ (r % 8);
//    descriptor fields at bits 0, 16, 32, 49, 62) and a handful of values computed with CuTe 4.2
//    (cute::Swizzle<3,4,3>, SM90::GMMA::make_gmma_desc, and byte addresses of elements of
//    GMMA::Layout_{K,MN}_SW128_Atom<half_t> tiles through an smem pointer), written out here;
//  * built with RA_TEST_WITH_CUTE (CMake RING_ATTN_CUTE_INCLUDE: CuTe's headers, e.g. from the
//    nvidia-cutlass wheel, and CUDA's include directories), the same exhaustively against CuTe's
//    code at test time. CuTe's host build has no shared-window addresses: make_gmma_desc prints a
//    notice and gives start address 0, so there the start address field is compared on its own.
// Exit status 0 when every check passes.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda/emu/test_check.h"
#include "cuda/sm90_layout.h"

#if defined(RA_TEST_WITH_CUTE)
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#endif

using namespace ring_attn::cuda::sm90;
using ring_attn::emu_test::check;
using ring_attn::emu_test::g_failures;

namespace {

// The byte address of 16-bit element (mn, k) of a K-major tile (rows mn of 64-k column blocks
// of mn_rows x 128 bytes, 8-row groups 1024 bytes apart: SBO 1024) through the descriptor of the
// wgmma whose k16 step contains k, as the kernels build it.
uint32_t k_major_address(int mn_rows, int mn, int k) {
  const int k0 = k / 16 * 16;
  const uint32_t start = uint32_t(k0 / 64) * mn_rows * 128 + (k0 % 64) * 2;
  return operand_address(make_smem_desc(start, 16, 1024), false, mn, k - k0);
}

// The same for an MN-major tile whose 64-mn column blocks are lbo bytes apart and 8-k row groups
// sbo bytes apart.
uint32_t mn_major_address(uint32_t lbo, uint32_t sbo, int mn, int k) {
  const int k0 = k / 16 * 16;
  const uint32_t start = uint32_t(k0 / 8) * sbo;
  return operand_address(make_smem_desc(start, lbo, sbo), true, mn, k - k0);
}

void test_documented() {
  int bad = 0;
  for (uint32_t a = 0; a < (1u << 16); ++a) {
    const uint32_t row = a / 128 % 8, chunk = a / 16 % 8;
    bad += swizzle128(a) != (a & ~0x70u) + ((chunk ^ row) << 4);
  }
  check(bad == 0,
        "swizzle128 differs from the chunk form on " + std::to_string(bad) + " addresses");
  // cute::Swizzle<3,4,3>{}(a)
  const uint32_t sw[][2] = {{0x10, 0x10},     {0x90, 0x80},     {0x3f0, 0x380},
                            {0x1234, 0x1274}, {0xbeef, 0xbebf}, {0x12345, 0x12325}};
  for (const auto& p : sw)
    check(swizzle128(p[0]) == p[1], "swizzle128 vs Swizzle<3,4,3> at " + std::to_string(p[0]));

  // GmmaDescriptor with start_address_ 0x123, leading_byte_offset_ 1, stride_byte_offset_ 64,
  // base_offset_ 0, layout_type_ B128.
  check(make_smem_desc(0x1230, 16, 1024) == 0x4000004000010123ull, "descriptor bit layout");
  // make_gmma_desc<Major::K> of a 64 x 16 slice of tile_to_shape(Layout_K_SW128_Atom<half_t>,
  // (64, 128)) and <Major::MN> of a 128 x 16 slice of tile_to_shape(Layout_MN_SW128_Atom<half_t>,
  // (128, 128)) (start address 0 on the host).
  check(make_smem_desc(0, 16, 1024) == 0x4000004000010000ull,
        "K-major descriptor vs make_gmma_desc");
  check(make_smem_desc(0, 1024, 2048) == 0x4000008000400000ull,
        "MN-major descriptor vs make_gmma_desc");
  const uint64_t d = make_smem_desc(0x3fff0, 0x12340, 0x2a0);
  check(desc_start(d) == 0x3fff0 && desc_lbo(d) == 0x12340 && desc_sbo(d) == 0x2a0 &&
            desc_base_offset(d) == 0 && desc_layout(d) == kLayoutSwizzle128,
        "descriptor fields do not round-trip");
  // A descriptor moved on by desc_advance is the one made at the later address.
  for (uint32_t start : {0x0u, 0x4000u, 0x1fc00u}) {
    for (uint32_t bytes : {0x20u, 0x2000u, 0x18000u}) {
      check(desc_advance(make_smem_desc(start, 16, 1024), bytes) ==
                    make_smem_desc(start + bytes, 16, 1024) &&
                desc_advance(make_smem_desc(start, 0x8000, 1024), bytes) ==
                    make_smem_desc(start + bytes, 0x8000, 1024),
            "desc_advance vs make_smem_desc at " + std::to_string(start + bytes));
    }
  }

  // Byte addresses of elements of those tiles through cute::make_smem_ptr (CuTe's interleaved
  // MN-major tile: 64-mn blocks 1024 bytes apart, 8-k groups 2048).
  const int pts[][3] = {
      {9, 70, 9372}, {63, 127, 16270}, {5, 16, 752}, {40, 33, 5186}, {3, 17, 402}};
  for (const auto& p : pts) {
    check(k_major_address(64, p[0], p[1]) == uint32_t(p[2]),
          "K-major address of (" + std::to_string(p[0]) + ", " + std::to_string(p[1]) + ")");
  }
  const int mn_pts[][3] = {
      {70, 9, 3228}, {127, 63, 16270}, {16, 5, 752}, {33, 40, 10306}, {17, 3, 402}};
  for (const auto& p : mn_pts) {
    check(mn_major_address(1024, 2048, p[0], p[1]) == uint32_t(p[2]),
          "MN-major address of (" + std::to_string(p[0]) + ", " + std::to_string(p[1]) + ")");
  }
}

#if defined(RA_TEST_WITH_CUTE)
void test_against_cute() {
  using namespace cute;
  int bad = 0;
  for (uint32_t a = 0; a < (1u << 18); ++a)
    bad += swizzle128(a) != uint32_t(Swizzle<3, 4, 3>{}(int(a)));
  check(bad == 0,
        "swizzle128 differs from cute::Swizzle<3,4,3> on " + std::to_string(bad) + " addresses");

  bad = 0;
  for (uint32_t i = 0; i < 4096; ++i) {
    const uint32_t start = (i * 2654435761u) & 0x3fff, lbo = (i * 40503u) & 0x3fff,
                   sbo = (i * 9973u + 7) & 0x3fff;
    GmmaDescriptor g;
    g.bitfield.start_address_ = uint16_t(start);
    g.bitfield.leading_byte_offset_ = uint16_t(lbo);
    g.bitfield.stride_byte_offset_ = uint16_t(sbo);
    g.bitfield.base_offset_ = 0;
    g.bitfield.layout_type_ = uint8_t(SM90::GMMA::LayoutType::B128);
    bad += make_smem_desc(start << 4, lbo << 4, sbo << 4) != g.desc_;
  }
  check(bad == 0,
        "descriptor bits differ from cute::GmmaDescriptor in " + std::to_string(bad) + " cases");

  // Canonical tiles, their descriptors and every element's byte address.
  alignas(4096) static half_t buf[128 * 256];
  auto k_tile =
      tile_to_shape(GMMA::Layout_K_SW128_Atom<half_t>{}, make_shape(Int<64>{}, Int<128>{}));
  auto mn_tile =
      tile_to_shape(GMMA::Layout_MN_SW128_Atom<half_t>{}, make_shape(Int<256>{}, Int<128>{}));
  Tensor tk = make_tensor(make_smem_ptr(buf), k_tile);
  Tensor tm = make_tensor(make_smem_ptr(buf), mn_tile);
  const uint64_t dk = SM90::GMMA::make_gmma_desc<GMMA::Major::K>(
      local_tile(tk, Shape<_64, _16>{}, make_coord(0, 0)));
  const uint64_t dm = SM90::GMMA::make_gmma_desc<GMMA::Major::MN>(
      local_tile(tm, Shape<_256, _16>{}, make_coord(0, 0)));
  check(dk == make_smem_desc(0, 16, 1024), "K-major descriptor differs from make_gmma_desc");
  const uint32_t lbo = desc_lbo(dm), sbo = desc_sbo(dm);
  check(dm == make_smem_desc(0, lbo, sbo) && lbo == 1024 && sbo == 4096,
        "MN-major descriptor differs from make_gmma_desc");
  auto byte_of = [&](const auto& p) {
    return uint32_t(reinterpret_cast<const char*>(raw_pointer_cast(p)) -
                    reinterpret_cast<const char*>(buf));
  };
  bad = 0;
  for (int mn = 0; mn < 64; ++mn) {
    for (int k = 0; k < 128; ++k) bad += k_major_address(64, mn, k) != byte_of(&tk(mn, k));
  }
  for (int mn = 0; mn < 256; ++mn) {
    for (int k = 0; k < 128; ++k) bad += mn_major_address(lbo, sbo, mn, k) != byte_of(&tm(mn, k));
  }
  check(bad == 0,
        "operand addresses differ from CuTe's tiles at " + std::to_string(bad) + " elements");
}
#endif

}  // namespace

int main() {
  test_documented();
#if defined(RA_TEST_WITH_CUTE)
  test_against_cute();
  std::printf("test_sm90_layout: checked against CuTe's headers\n");
#endif
  if (g_failures == 0) std::printf("test_sm90_layout: all checks passed\n");
  return g_failures == 0 ? 0 : 1;
}
