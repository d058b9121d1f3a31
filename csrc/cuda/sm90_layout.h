// Shared-memory layouts of the sm_90a tensor-core operands: the 128-byte swizzle and the wgmma
// shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format" and "Shared Memory Matrix
// Layout" of wgmma). Plain constexpr integer math, used by the kernels (sm90_primitives.cuh), the
// emulator (emu/emu_sm90.h) and the host-only layout test (emu/test_sm90_layout.cpp).
//
// 128-byte swizzle (TMA CU_TENSOR_MAP_SWIZZLE_128B, wgmma layout type 1): within each 1024-byte
// block of 8 rows of 128 bytes, the 16-byte chunk c of row r lies at chunk c ^ r, i.e. for a
// shared-memory byte address a: bits [4, 7) ^= bits [7, 10). The pattern repeats every 1024
// bytes, so a swizzled tile starts 1024-byte aligned (descriptor base offset 0).
//
// Descriptor (64 bits), every address and offset in 16-byte units:
//   bits [0, 14)   start address        bits [16, 30) leading-dimension byte offset (LBO)
//   bits [32, 46)  stride byte offset   bits [49, 52) base offset   bits [62, 64) layout type
// Layout type 1 = 128-byte swizzle. Canonical 16-bit operands of one wgmma (k16), with the byte
// offset of element (mn, k) before the swizzle:
//   K-major  (k contiguous, a 128-byte row holds 64 k of one mn):
//            (mn % 8) * 128 + (mn / 8) * SBO + k * 2                          (LBO unused: 1)
//   MN-major (mn contiguous, a 128-byte row holds 64 mn of one k):
//            (k % 8) * 128 + (k / 8) * SBO + (mn / 64) * LBO + (mn % 64) * 2
// A tile wider than 64 elements in its contiguous dimension is stored as 64-wide column blocks
// (one TMA box each); the next k16 step of a K-major operand starts 32 bytes further.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RA_HOST_DEVICE inline
#endif

namespace ring_attn {
namespace cuda {
namespace sm90 {

constexpr uint32_t kSwizzleBytes = 128;       // one swizzled row
constexpr uint32_t kSwizzleAtomBytes = 1024;  // 8 rows: the period of the pattern
constexpr uint32_t kLayoutSwizzle128 = 1;     // descriptor layout type

// The byte address at which the 128-byte swizzle stores the byte of (unswizzled) address a.
RA_HOST_DEVICE constexpr uint32_t swizzle128(uint32_t a) { return a ^ (((a >> 7) & 7u) << 4); }

// A 128-byte-swizzle descriptor of the operand at shared-memory byte address `addr` (a 16-byte
// multiple; the swizzle atom it lies in 1024-byte aligned), with byte offsets lbo and sbo.
RA_HOST_DEVICE constexpr uint64_t make_smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr >> 4) & 0x3fffu) |
         static_cast<uint64_t>((lbo >> 4) & 0x3fffu) << 16 |
         static_cast<uint64_t>((sbo >> 4) & 0x3fffu) << 32 |
         static_cast<uint64_t>(kLayoutSwizzle128) << 62;
}

// Descriptor d with its start address `bytes` further (a 16-byte multiple): one 32-bit add, as
// shared-memory addresses stay below 256 KiB and so within the start address field.
RA_HOST_DEVICE constexpr uint64_t desc_advance(uint64_t d, uint32_t bytes) {
  const uint32_t low = static_cast<uint32_t>(d) + (bytes >> 4);
  return (d & 0xffffffff00000000ull) | low;
}

// The fields of a descriptor, in bytes where they are addresses or offsets.
RA_HOST_DEVICE constexpr uint32_t desc_start(uint64_t d) {
  return static_cast<uint32_t>(d & 0x3fffu) << 4;
}
RA_HOST_DEVICE constexpr uint32_t desc_lbo(uint64_t d) {
  return static_cast<uint32_t>((d >> 16) & 0x3fffu) << 4;
}
RA_HOST_DEVICE constexpr uint32_t desc_sbo(uint64_t d) {
  return static_cast<uint32_t>((d >> 32) & 0x3fffu) << 4;
}
RA_HOST_DEVICE constexpr uint32_t desc_base_offset(uint64_t d) {
  return static_cast<uint32_t>((d >> 49) & 7u);
}
RA_HOST_DEVICE constexpr uint32_t desc_layout(uint64_t d) { return static_cast<uint32_t>(d >> 62); }

// The shared-memory byte address of 16-bit element (mn, k) of the operand described by d
// (layout type 1, base offset 0); mn_major: the operand's mn dimension is contiguous.
RA_HOST_DEVICE constexpr uint32_t operand_address(uint64_t d, bool mn_major, int mn, int k) {
  const uint32_t off =
      mn_major ? (k % 8) * 128u + (k / 8) * desc_sbo(d) + (mn / 64) * desc_lbo(d) + (mn % 64) * 2u
               : (mn % 8) * 128u + (mn / 8) * desc_sbo(d) + k * 2u;
  return swizzle128(desc_start(d) + off);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
