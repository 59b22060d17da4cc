// CPU norm and loss family (runtime/ops/norm_loss.h; the contracts in runtime/ops/norm_loss.cc have
// checked the arguments).
#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/norm_loss.h"

namespace moe::cpu {

void rmsnorm_forward(Backend&, const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  int64_t t_count = x.dim(0), h = x.dim(1);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pw = w.data<T>();
    for (int64_t t = 0; t < t_count; ++t) {
      const T* px = x.data<T>() + t * h;
      T* py = y.data<T>() + t * h;
      double ss = 0;
      for (int64_t j = 0; j < h; ++j) ss += static_cast<double>(px[j]) * px[j];
      T r = static_cast<T>(1.0 / std::sqrt(ss / h + eps));
      rstd.data<T>()[t] = r;
      for (int64_t j = 0; j < h; ++j) py[j] = px[j] * r * pw[j];
    }
  });
}

void rmsnorm_backward(Backend&, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,
                      Tensor& dw) {
  int64_t t_count = x.dim(0), h = x.dim(1);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pw = w.data<T>();
    T* pdw = dw.data<T>();
    for (int64_t t = 0; t < t_count; ++t) {
      const T* px = x.data<T>() + t * h;
      const T* pdy = dy.data<T>() + t * h;
      T* pdx = dx.data<T>() + t * h;
      T r = rstd.data<T>()[t];
      double dot = 0;  // mean over j of (dy * w) * n, n = x * r
      for (int64_t j = 0; j < h; ++j) dot += static_cast<double>(pdy[j]) * pw[j] * px[j] * r;
      T mean = static_cast<T>(dot / h);
      for (int64_t j = 0; j < h; ++j) {
        T n = px[j] * r;
        pdx[j] = r * (pdy[j] * pw[j] - n * mean);
        pdw[j] += pdy[j] * n;
      }
    }
  });
}

double cross_entropy(Backend&, const Tensor& logits, const Tensor& targets, double grad_scale, Tensor& dlogits) {
  int64_t t_count = logits.dim(0), v = logits.dim(1);
  const bool grad = dlogits.defined();
  double total = 0;
  const int32_t* pt = targets.data<int32_t>();
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t) {
      const T* pl = logits.data<T>() + t * v;
      MOE_CHECK(pt[t] >= 0 && pt[t] < v, "target ", pt[t], " outside vocabulary of ", v);
      T lse = logsumexp_row(pl, v);
      total += static_cast<double>(lse - pl[pt[t]]);
      if (!grad) continue;
      T* pd = dlogits.data<T>() + t * v;
      softmax_row(pl, pd, v);
      T s = static_cast<T>(grad_scale);
      for (int64_t j = 0; j < v; ++j) pd[j] *= s;
      pd[pt[t]] -= s;
    }
  });
  return total;
}

}  // namespace moe::cpu
