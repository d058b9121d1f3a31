// Thin row-major GEMM on top of the Fortran BLAS symbols that libtorch_cpu.so exports
// (sgemm_ / dgemm_; MKL is linked statically into it, LP64: 32-bit integers).
//
//   C (m x n, ldc) = alpha * op(A) * op(B) + beta * C          all row-major
//   op(A) is m x k: A is m x k (lda >= k) when !trans_a, k x m (lda >= m) when trans_a
//   op(B) is k x n: B is k x n (ldb >= n) when !trans_b, n x k (ldb >= k) when trans_b
//
// BLAS is column-major: a row-major matrix is its column-major transpose, so C^T = op(B)^T op(A)^T
// is one column-major call with the operands swapped and the transpose flags unchanged.
#pragma once

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
// MKL only (weak: null with another BLAS). The C entry point behind mkl_service.h's
// mkl_set_num_threads_local (the lowercase symbol is the Fortran one, taking int*). Sets this
// thread's MKL thread count (0: back to the global setting) and returns the previous local value.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace ring_attn {
namespace cpu {
namespace blas {

inline void gemm_cm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                    const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm_cm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                    const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C = alpha * op(A) op(B) + beta * C. No-op when m or n is 0; k == 0 scales C by beta.
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  // Leading dimensions must be >= 1 and >= the stored row length even when unused.
  const int64_t min_lda = trans_a ? m : k;
  const int64_t min_ldb = trans_b ? k : n;
  // (Values below that are only legal when the matrix has a single row or no columns.)
  if (lda < min_lda) lda = min_lda;
  if (ldb < min_ldb) ldb = min_ldb;
  if (lda < 1) lda = 1;
  if (ldb < 1) ldb = 1;
  if (ldc < n) ldc = n;
  gemm_cm(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', static_cast<int>(n), static_cast<int>(m),
          static_cast<int>(k), alpha, b, static_cast<int>(ldb), a, static_cast<int>(lda), beta, c,
          static_cast<int>(ldc));
}

// Run the enclosing scope's BLAS calls single-threaded in this thread (the caller parallelises).
class ScopedSingleThreadBlas {
 public:
  ScopedSingleThreadBlas()
      : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : -1) {}
  ~ScopedSingleThreadBlas() {
    // 0 restores the global setting; prev_ is 0 when no thread-local value was set before.
    if (MKL_Set_Num_Threads_Local && prev_ >= 0) MKL_Set_Num_Threads_Local(prev_);
  }
  ScopedSingleThreadBlas(const ScopedSingleThreadBlas&) = delete;
  ScopedSingleThreadBlas& operator=(const ScopedSingleThreadBlas&) = delete;

 private:
  int prev_;
};

}  // namespace blas
}  // namespace cpu
}  // namespace ring_attn
