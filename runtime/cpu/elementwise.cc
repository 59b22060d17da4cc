// CPU elementwise family (runtime/ops/elementwise.h).
#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/elementwise.h"

namespace moe::cpu {
namespace {
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)
}  // namespace

void axpy(Backend&, double alpha, const Tensor& x, Tensor& y) {
  same_dtype(x, y, "axpy");
  MOE_CHECK(x.numel() == y.numel(), "axpy: ", x.str(), " vs ", y.str());
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

void swiglu_forward(Backend& backend, const Tensor& a, const Tensor& b, Tensor& h) {
  MOE_CHECK(a.numel() == b.numel() && a.numel() == h.numel(), "swiglu: ", a.str(), b.str(), h.str());
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *pa = a.data<T>(), *pb = b.data<T>();
    T* ph = h.data<T>();
    for (int64_t i = 0, n = a.numel(); i < n; ++i) ph[i] = pa[i] * sigmoid(pa[i]) * pb[i];
  });
}

void swiglu_backward(Backend& backend, const Tensor& dh, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db) {
  MOE_CHECK(dh.numel() == a.numel() && a.numel() == b.numel() && da.numel() == a.numel() && db.numel() == a.numel(),
            "swiglu_backward shapes");
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *pdh = dh.data<T>(), *pa = a.data<T>(), *pb = b.data<T>();
    T *pda = da.data<T>(), *pdb = db.data<T>();
    for (int64_t i = 0, n = a.numel(); i < n; ++i) {
      T s = sigmoid(pa[i]);
      T silu = pa[i] * s;
      pdb[i] = pdh[i] * silu;
      pda[i] = pdh[i] * pb[i] * s * (T(1) + pa[i] * (T(1) - s));
    }
  });
}

void activation_forward(Backend&, Activation act, const Tensor& a, Tensor& h) {
  MOE_CHECK(a.numel() == h.numel(), "activation: ", a.str(), h.str());
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pa = a.data<T>();
    T* ph = h.data<T>();
    for (int64_t i = 0, n = a.numel(); i < n; ++i) {
      T x = pa[i];
      if (act == Activation::kRelu) {
        ph[i] = x > T(0) ? x : T(0);
      } else {
        ph[i] = T(0.5) * x * (T(1) + std::tanh(T(kGeluC) * (x + T(0.044715) * x * x * x)));
      }
    }
  });
}

void activation_backward(Backend& backend, Activation act, const Tensor& dh, const Tensor& a, Tensor& da) {
  MOE_CHECK(a.numel() == dh.numel() && a.numel() == da.numel(), "activation_backward shapes");
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *pdh = dh.data<T>(), *pa = a.data<T>();
    T* pda = da.data<T>();
    for (int64_t i = 0, n = a.numel(); i < n; ++i) {
      T x = pa[i];
      if (act == Activation::kRelu) {
        pda[i] = x > T(0) ? pdh[i] : T(0);
      } else {
        T u = T(kGeluC) * (x + T(0.044715) * x * x * x);
        T th = std::tanh(u);
        T du = T(kGeluC) * (T(1) + T(3 * 0.044715) * x * x);
        pda[i] = pdh[i] * (T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * du);
      }
    }
  });
}

void dropout(Backend&, const Tensor& x, double p, const RngStream& rng, int64_t offset, Tensor& out) {
  MOE_CHECK(x.numel() == out.numel(), "dropout: ", x.str(), " -> ", out.str());
  same_dtype(x, out, "dropout");
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
