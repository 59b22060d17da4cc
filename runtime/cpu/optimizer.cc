// CPU optimizer family (runtime/ops/optimizer.h).
#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/optimizer.h"

namespace moe::cpu {

void adamw_step(Backend&, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& a) {
  MOE_CHECK(param.numel() == grad.numel() && m.numel() == param.numel() && v.numel() == param.numel(),
            "adamw shapes");
  double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  dispatch_float(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T *p = param.data<T>(), *pm = m.data<T>(), *pv = v.data<T>();
    const T* g = grad.data<T>();
    T b1 = T(a.beta1), b2 = T(a.beta2), lr = T(a.lr), wd = T(a.weight_decay), eps = T(a.eps);
    T ibc1 = T(1.0 / bc1), ibc2 = T(1.0 / bc2);
    for (int64_t i = 0, n = param.numel(); i < n; ++i) {
      pm[i] = b1 * pm[i] + (T(1) - b1) * g[i];
      pv[i] = b2 * pv[i] + (T(1) - b2) * g[i] * g[i];
      T update = (pm[i] * ibc1) / (std::sqrt(pv[i] * ibc2) + eps);
      p[i] -= lr * (update + wd * p[i]);
    }
  });
}

void sgd_step(Backend&, Tensor& param, const Tensor& grad, double lr, double weight_decay) {
  MOE_CHECK(param.numel() == grad.numel(), "sgd shapes");
  dispatch_float(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    T l = T(lr), wd = T(weight_decay);
    for (int64_t i = 0, n = param.numel(); i < n; ++i) p[i] -= l * (g[i] + wd * p[i]);
  });
}

}  // namespace moe::cpu
