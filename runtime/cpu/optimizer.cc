// CPU optimizer family (runtime/ops/optimizer.h; the contracts in runtime/ops/optimizer.cc have checked
// the arguments).
#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/optimizer.h"

namespace moe::cpu {
namespace {

// The BF16 shadow of an updated F32 parameter (nearest even, as CUDA's __float2bfloat16).
void write_shadow(const Tensor& param, Tensor* shadow) {
  if (!shadow) return;
  const float* p = param.data<float>();
  uint16_t* s = static_cast<uint16_t*>(shadow->raw());
  for (int64_t i = 0, n = param.numel(); i < n; ++i) s[i] = float_to_bf16(p[i]);
}

}  // namespace

void adamw_step(Backend&, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& a,
                Tensor* shadow) {
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
  write_shadow(param, shadow);
}

void sgd_step(Backend&, Tensor& param, const Tensor& grad, double lr, double weight_decay, Tensor* shadow) {
  dispatch_float(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    T l = T(lr), wd = T(weight_decay);
    for (int64_t i = 0, n = param.numel(); i < n; ++i) p[i] -= l * (g[i] + wd * p[i]);
  });
  write_shadow(param, shadow);
}

}  // namespace moe::cpu
