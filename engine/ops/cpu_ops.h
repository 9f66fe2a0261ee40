// CPU tensor operations used by the model: fp32, row-major, matrix products through OpenBLAS.
//
// Stateless free functions; safe to call from any thread (OpenBLAS is used single-threaded per
// call site through the calling thread).
#pragma once

#include <cstdint>

namespace moeserve::engine::cpu {

// y[rows, out] = x[rows, in] · w[out, in]^T   (Hugging Face linear layout). Overwrites y.
void Linear(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out);
// y += x · w^T.
void LinearAccumulate(const float* x, const float* w, float* y, int64_t rows, int64_t in,
                      int64_t out);
// c[m, n] = alpha * a[m, k] · b[n, k]^T (+ beta * c).
void MatMulTransposedB(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k,
                       float alpha, float beta);
// c[m, n] = a[m, k] · b[k, n] (+ beta * c).
void MatMul(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, float beta);

// out = x / rms(x) * weight, per row of `dim` values. `out` may alias `x`.
void RmsNorm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim, float eps);

// gate[i] = silu(gate[i]) * up[i].
void SiluMul(float* gate, const float* up, int64_t count);

// Numerically stable softmax over `count` values in place.
void SoftmaxInPlace(float* values, int64_t count);

// General strided product: c[m, n] = alpha * op(a) · op(b) + beta * c, row-major, where op(a) is
// a[m, k] (lda) or, transposed, a stored as [k, m]; likewise b is [k, n] or, transposed, [n, k].
void Gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);

// Limits OpenBLAS to one thread per call; the engine parallelizes across ranks and requests.
void ConfigureBlasThreads(int threads);

}  // namespace moeserve::engine::cpu
