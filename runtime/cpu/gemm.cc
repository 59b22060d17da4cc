// CPU GEMM family: dense and grouped products through CBLAS (runtime/ops/gemm.h; the contracts in
// runtime/ops/gemm.cc have checked the arguments).
#include <cblas.h>

#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/gemm.h"

namespace moe::cpu {

template <typename T>
void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, double beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves this to the implementation; make it exact: c = beta * c
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0 ? T(0) : static_cast<T>(beta * c[i * ldc + j]);
    return;
  }
  auto op_a = ta ? CblasTrans : CblasNoTrans;
  auto op_b = tb ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, op_a, op_b, (int)m, (int)n, (int)k, (float)alpha, a, (int)lda, b, (int)ldb,
                (float)beta, c, (int)ldc);
  } else {
    cblas_dgemm(CblasRowMajor, op_a, op_b, (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c,
                (int)ldc);
  }
}
template void blas_gemm<float>(bool, bool, int64_t, int64_t, int64_t, double, const float*, int64_t, const float*,
                               int64_t, double, float*, int64_t);
template void blas_gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                                int64_t, double, double*, int64_t);

void gemm(Backend&, const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, double alpha, double beta) {
  const GemmDims d = gemm_dims("gemm", a, ta, b, tb, c);
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    blas_gemm<T>(ta == Trans::kT, tb == Trans::kT, d.m, d.n, d.k, alpha, a.data<T>(), a.dim(1), b.data<T>(), b.dim(1),
                 beta, c.data<T>(), d.n);
  });
}

void grouped_gemm(Backend&, const Tensor& a, const Tensor& b, Trans tb, Tensor& c, const std::vector<int64_t>& group_rows,
                  double alpha, double beta, GroupedGemmPath) {
  bool bt = tb == Trans::kT;
  int64_t k = a.dim(1), n = bt ? b.dim(1) : b.dim(2);
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* pc = c.data<T>();
    int64_t row = 0;
    for (size_t g = 0; g < group_rows.size(); ++g) {
      int64_t m = group_rows[g];
      blas_gemm<T>(false, bt, m, n, k, alpha, pa + row * k, k, pb + g * n * k, bt ? k : n, beta, pc + row * n, n);
      row += m;
    }
  });
}

void grouped_gemm_tn(Backend&, const Tensor& a, const Tensor& b, Tensor& c, const std::vector<int64_t>& group_rows,
                     double alpha, double beta, GroupedGemmPath) {
  int64_t p = a.dim(1), q = b.dim(1);
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    int64_t row = 0;
    for (size_t g = 0; g < group_rows.size(); ++g) {
      int64_t m = group_rows[g];
      blas_gemm<T>(true, false, p, q, m, alpha, a.data<T>() + row * p, p, b.data<T>() + row * q, q, beta,
                   c.data<T>() + g * p * q, q);
      row += m;
    }
  });
}

void batched_gemm(Backend&, const Tensor& a, Trans ta, const Tensor& w, Trans tw, Tensor& c, double alpha,
                  double beta) {
  const GemmDims d = gemm_dims("batched_gemm", a, ta, w, tw, c);
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = 0; i < d.batch; ++i) {
      blas_gemm<T>(ta == Trans::kT, tw == Trans::kT, d.m, d.n, d.k, alpha, a.data<T>() + i * a.dim(1) * a.dim(2),
                   a.dim(2), w.data<T>() + i * w.dim(1) * w.dim(2), w.dim(2), beta, c.data<T>() + i * d.m * d.n, d.n);
    }
  });
}

}  // namespace moe::cpu
