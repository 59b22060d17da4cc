// What the CPU op files share: dtype dispatch, row helpers, the CBLAS call, and the scalar formulas
// (sigmoid, softmax, log-sum-exp) every CPU op uses, so each is written once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "runtime/backend.h"
#include "base/error.h"

namespace moe::cpu {

// Calls f(float{}) or f(double{}) by dtype; any other dtype is a broken invariant.
template <typename F>
void dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32: f(float{}); return;
    case DType::kF64: f(double{}); return;
    default: MOE_CHECK(false, "float op called on ", dtype_name(dtype), " tensor");
  }
}

inline void same_dtype(const Tensor& a, const Tensor& b, const char* op) {
  MOE_CHECK(a.dtype() == b.dtype(), op, ": dtype mismatch ", a.str(), " vs ", b.str());
}

// Elements per row: the product of every dimension after the first (defined for zero rows too).
inline int64_t row_len(const Tensor& t) {
  int64_t n = 1;
  for (int i = 1; i < t.rank(); ++i) n *= t.dim(i);
  return n;
}

// c (m, n) = alpha op(a) op(b) + beta c, row-major with leading dimensions; k = 0 gives exactly beta c.
template <typename T>
void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, double beta, T* c, int64_t ldc);

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// out = softmax(in * inv_tau) of one row of n (out may be in)
template <typename T>
void softmax_row(const T* in, T* out, int64_t n, T inv_tau = T(1)) {
  T mx = in[0] * inv_tau;
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, in[i] * inv_tau);
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (out[i] = std::exp(in[i] * inv_tau - mx));
  T inv = T(1) / sum;
  for (int64_t i = 0; i < n; ++i) out[i] *= inv;
}

// log-sum-exp of one row, stable
template <typename T>
T logsumexp_row(const T* in, int64_t n) {
  T mx = in[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, in[i]);
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(in[i] - mx);
  return mx + std::log(sum);
}

}  // namespace moe::cpu
