// Contracts of the optimizer family (runtime/ops/optimizer.h), run before either device's implementation.
#include "runtime/ops/optimizer.h"

#include "runtime/ops/contract.h"

namespace moe {
namespace {

constexpr FloatRule kState = FloatRule::kF32OnCuda;  // master weights and optimizer state: F32 on CUDA

// The BF16 shadow, when there is one, of an F32 parameter, element for element.
void check_shadow(const char* op, const Tensor& param, const Tensor* shadow) {
  if (!shadow) return;
  check_dtype(op, *shadow, DType::kBF16, "shadow");
  check_dtype(op, param, DType::kF32, "param (with a shadow)");
  MOE_CHECK(shadow->numel() == param.numel(), op, ": shadow ", shadow->str(), " of ", param.str());
}

}  // namespace

void check_adamw_step(Backend& b, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& args,
                      Tensor* shadow) {
  const int64_t n = param.numel();
  MOE_CHECK(grad.numel() == n && m.numel() == n && v.numel() == n, "adamw_step shapes: ", param.str(), grad.str(),
            m.str(), v.str());
  check_floats(b, "adamw_step", {{param, "param", kState}, {grad, "grad", kState}, {m, "m", kState}, {v, "v", kState}});
  check_shadow("adamw_step", param, shadow);
}

void check_sgd_step(Backend& b, Tensor& param, const Tensor& grad, double lr, double weight_decay, Tensor* shadow) {
  MOE_CHECK(grad.numel() == param.numel(), "sgd_step shapes: ", param.str(), grad.str());
  check_floats(b, "sgd_step", {{param, "param", kState}, {grad, "grad", kState}});
  check_shadow("sgd_step", param, shadow);
}

}  // namespace moe
