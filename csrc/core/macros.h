// Portable qualifiers so that core headers compile in host C++ and in CUDA device code.
#pragma once

#if defined(__CUDACC__)
#define RA_HD __host__ __device__ __forceinline__
#else
#define RA_HD inline
#endif
