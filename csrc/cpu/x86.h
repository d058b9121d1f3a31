// What this compiler can target: RA_CPU_X86 (x86-64 with GCC or clang: the AVX2 and AVX-512 tile
// kernels, <immintrin.h>) and RA_CPU_AMX (the AMX intrinsics: GCC 11, clang 12).
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define RA_CPU_X86 1
#include <immintrin.h>
#else
#define RA_CPU_X86 0
#endif

#if RA_CPU_X86 && ((defined(__clang__) && __clang_major__ >= 12) || \
                   (!defined(__clang__) && __GNUC__ >= 11))
#define RA_CPU_AMX 1
#else
#define RA_CPU_AMX 0
#endif

// Force-inline, for the vector helpers of the tile kernels.
#define RA_VI inline __attribute__((always_inline))

// GCC flags the _mm512_undefined_*() inside its own AVX-512 intrinsics (e.g. _mm512_reduce_max_pd)
// once they are inlined into the tile kernels: false positives.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
