#include "engine/ops/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

namespace moeserve::engine::cpu {

void Linear(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out) {
  MatMulTransposedB(x, w, y, rows, out, in, 1.0f, 0.0f);
}

void LinearAccumulate(const float* x, const float* w, float* y, int64_t rows, int64_t in,
                      int64_t out) {
  MatMulTransposedB(x, w, y, rows, out, in, 1.0f, 1.0f);
}

void MatMulTransposedB(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k,
                       float alpha, float beta) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, alpha, a, k, b, k, beta, c, n);
}

void MatMul(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, float beta) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, beta, c, n);
}

void Gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
              transpose_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c,
              ldc);
}

void RmsNorm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
             float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    double sum_squares = 0.0;
    for (int64_t i = 0; i < dim; ++i) sum_squares += static_cast<double>(row[i]) * row[i];
    const float inv_rms = 1.0f / std::sqrt(static_cast<float>(sum_squares / dim) + eps);
    float* dst = out + r * dim;
    for (int64_t i = 0; i < dim; ++i) dst[i] = row[i] * inv_rms * weight[i];
  }
}

void SiluMul(float* gate, const float* up, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void SoftmaxInPlace(float* values, int64_t count) {
  if (count == 0) return;
  const float max_value = *std::max_element(values, values + count);
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    values[i] = std::exp(values[i] - max_value);
    sum += values[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < count; ++i) values[i] *= inv;
}

void ConfigureBlasThreads(int threads) { openblas_set_num_threads(threads); }

}  // namespace moeserve::engine::cpu
