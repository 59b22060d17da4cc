// CPU elementwise family (runtime/ops/elementwise.h; the contracts in runtime/ops/elementwise.cc have
// checked the arguments).
#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/elementwise.h"

namespace moe::cpu {
namespace {
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)
}  // namespace

void axpy(Backend&, double alpha, const Tensor& x, Tensor& y) {
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = x.data<T>();
    T* py = y.data<T>();
    T a = static_cast<T>(alpha);
    for (int64_t i = 0, n = x.numel(); i < n; ++i) py[i] += a * px[i];
  });
}

void scale(Backend&, Tensor& x, double alpha) {
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = x.data<T>();
    T a = static_cast<T>(alpha);
    for (int64_t i = 0, n = x.numel(); i < n; ++i) p[i] *= a;
  });
}

double sum_squares(Backend&, const Tensor& x) {
  double total = 0;
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = x.data<T>();
    for (int64_t i = 0, n = x.numel(); i < n; ++i) total += static_cast<double>(p[i]) * p[i];
  });
  return total;
}

// ---- activations. F32: branch-free loops over a vectorisable exp (below), compiled once per vector
// width (AVX-512, AVX2, baseline) and chosen at load time; no per-element switch. F64, the reference:
// the same formulas through std::exp / std::tanh, element by element.

// exp(x) in float without a library call: x = n ln2 + r (n rounded to nearest, Cody-Waite split of
// ln2), e^r by the Cephes degree-6 polynomial, 2^n through the exponent bits. Inputs are clamped to
// [-87, 88], where 2^n stays a normal float; relative error within 2 ulp there.
namespace {

inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

#if defined(__x86_64__) && !defined(__clang__)
#define MOE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOE_VECTOR_CLONES
#endif

MOE_VECTOR_CLONES void swiglu_forward_f32(const float* __restrict a, const float* __restrict b, float* __restrict h,
                                          int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] = a[i] * sigmoid_f32(a[i]) * b[i];
}

MOE_VECTOR_CLONES void swiglu_backward_f32(const float* __restrict dh, const float* __restrict a,
                                           const float* __restrict b, float* __restrict da, float* __restrict db,
                                           int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid_f32(a[i]);
    db[i] = dh[i] * a[i] * s;
    da[i] = dh[i] * b[i] * s * (1.0f + a[i] * (1.0f - s));
  }
}

MOE_VECTOR_CLONES void relu_forward_f32(const float* __restrict a, float* __restrict h, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] = a[i] > 0.0f ? a[i] : 0.0f;
}

MOE_VECTOR_CLONES void relu_backward_f32(const float* __restrict dh, const float* __restrict a,
                                         float* __restrict da, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) da[i] = a[i] > 0.0f ? dh[i] : 0.0f;
}

MOE_VECTOR_CLONES void gelu_forward_f32(const float* __restrict a, float* __restrict h, int64_t n) {
  const float c = static_cast<float>(kGeluC);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = a[i];  // 0.5 x (1 + tanh u) = x sigmoid(2u): no cancellation where tanh u is near -1
    h[i] = x * sigmoid_f32(2.0f * c * (x + 0.044715f * x * x * x));
  }
}

MOE_VECTOR_CLONES void gelu_backward_f32(const float* __restrict dh, const float* __restrict a,
                                         float* __restrict da, int64_t n) {
  const float c = static_cast<float>(kGeluC);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = a[i];  // with s = sigmoid(2u): 0.5 (1 + tanh u) = s and 0.5 (1 - tanh^2 u) = 2 s (1 - s)
    const float e = exp_f32(-2.0f * c * (x + 0.044715f * x * x * x));
    const float sg = 1.0f / (1.0f + e), one_minus = e * sg;  // 1 - s without cancellation
    const float du = c * (1.0f + 3.0f * 0.044715f * x * x);
    da[i] = dh[i] * (sg + 2.0f * x * sg * one_minus * du);
  }
}

}  // namespace

void swiglu_forward(Backend& backend, const Tensor& a, const Tensor& b, Tensor& h) {
  if (a.dtype() == DType::kF32) return swiglu_forward_f32(a.data<float>(), b.data<float>(), h.data<float>(), a.numel());
  const double *pa = a.data<double>(), *pb = b.data<double>();
  double* ph = h.data<double>();
  for (int64_t i = 0, n = a.numel(); i < n; ++i) ph[i] = pa[i] * sigmoid(pa[i]) * pb[i];
}

void swiglu_backward(Backend& backend, const Tensor& dh, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db) {
  if (a.dtype() == DType::kF32) {
    return swiglu_backward_f32(dh.data<float>(), a.data<float>(), b.data<float>(), da.data<float>(), db.data<float>(),
                               a.numel());
  }
  const double *pdh = dh.data<double>(), *pa = a.data<double>(), *pb = b.data<double>();
  double *pda = da.data<double>(), *pdb = db.data<double>();
  for (int64_t i = 0, n = a.numel(); i < n; ++i) {
    const double s = sigmoid(pa[i]);
    pdb[i] = pdh[i] * (pa[i] * s);
    pda[i] = pdh[i] * pb[i] * s * (1.0 + pa[i] * (1.0 - s));
  }
}

void activation_forward(Backend&, Activation act, const Tensor& a, Tensor& h) {
  const int64_t n = a.numel();
  if (a.dtype() == DType::kF32) {
    if (act == Activation::kRelu) return relu_forward_f32(a.data<float>(), h.data<float>(), n);
    return gelu_forward_f32(a.data<float>(), h.data<float>(), n);
  }
  const double* pa = a.data<double>();
  double* ph = h.data<double>();
  if (act == Activation::kRelu) {
    for (int64_t i = 0; i < n; ++i) ph[i] = pa[i] > 0.0 ? pa[i] : 0.0;
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double x = pa[i];
    ph[i] = 0.5 * x * (1.0 + std::tanh(kGeluC * (x + 0.044715 * x * x * x)));
  }
}

void activation_backward(Backend& backend, Activation act, const Tensor& dh, const Tensor& a, Tensor& da) {
  const int64_t n = a.numel();
  if (a.dtype() == DType::kF32) {
    if (act == Activation::kRelu) return relu_backward_f32(dh.data<float>(), a.data<float>(), da.data<float>(), n);
    return gelu_backward_f32(dh.data<float>(), a.data<float>(), da.data<float>(), n);
  }
  const double *pdh = dh.data<double>(), *pa = a.data<double>();
  double* pda = da.data<double>();
  if (act == Activation::kRelu) {
    for (int64_t i = 0; i < n; ++i) pda[i] = pa[i] > 0.0 ? pdh[i] : 0.0;
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double x = pa[i];
    const double u = kGeluC * (x + 0.044715 * x * x * x);
    const double th = std::tanh(u);
    const double du = kGeluC * (1.0 + 3 * 0.044715 * x * x);
    pda[i] = pdh[i] * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du);
  }
}

void dropout(Backend&, const Tensor& x, double p, const RngStream& rng, int64_t offset, Tensor& out) {
  const double keep_scale = 1.0 / (1.0 - p);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = x.data<T>();
    T* po = out.data<T>();
    const T s = static_cast<T>(keep_scale);
    for (int64_t i = 0, n = x.numel(); i < n; ++i) {
      po[i] = rng.uniform(static_cast<uint64_t>(offset + i)) >= p ? px[i] * s : T(0);
    }
  });
}

}  // namespace moe::cpu
