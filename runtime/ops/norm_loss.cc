// Contracts of the norm and loss family (runtime/ops/norm_loss.h), run before either device's implementation.
#include "runtime/ops/norm_loss.h"

#include "runtime/ops/contract.h"

namespace moe {

void check_rmsnorm_forward(Backend& b, const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  MOE_CHECK(x.rank() == 2, "rmsnorm_forward: x must be 2-D: ", x.str());
  check_shape(y, x.shape(), "rmsnorm_forward y");
  check_shape(rstd, {x.dim(0)}, "rmsnorm_forward rstd");
  MOE_CHECK(w.numel() == x.dim(1), "rmsnorm_forward: weight ", w.str(), " for ", x.str());
  check_floats(b, "rmsnorm_forward",
               {{x, "x"}, {y, "y"}, {w, "w", FloatRule::kF32OnCuda}, {rstd, "rstd", FloatRule::kF32OnCuda}});
}

void check_rmsnorm_backward(Backend& b, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                            Tensor& dx, Tensor& dw) {
  MOE_CHECK(x.rank() == 2, "rmsnorm_backward: x must be 2-D: ", x.str());
  check_shape(dy, x.shape(), "rmsnorm_backward dy");
  check_shape(dx, x.shape(), "rmsnorm_backward dx");
  check_shape(rstd, {x.dim(0)}, "rmsnorm_backward rstd");
  MOE_CHECK(w.numel() == x.dim(1) && dw.numel() == x.dim(1), "rmsnorm_backward: weight ", w.str(), " / gradient ",
            dw.str(), " for ", x.str());
  check_floats(b, "rmsnorm_backward",
               {{dy, "dy"}, {x, "x"}, {dx, "dx"}, {w, "w", FloatRule::kF32OnCuda},
                {rstd, "rstd", FloatRule::kF32OnCuda}, {dw, "dw", FloatRule::kF32OnCuda}});
}

void check_cross_entropy(Backend& b, const Tensor& logits, const Tensor& targets, double grad_scale, Tensor& dlogits) {
  MOE_CHECK(logits.rank() == 2, "cross_entropy: logits must be 2-D: ", logits.str());
  if (dlogits.defined()) check_shape(dlogits, logits.shape(), "cross_entropy dlogits");
  MOE_CHECK(targets.numel() == logits.dim(0), "cross_entropy: ", targets.numel(), " targets for ", logits.dim(0),
            " rows");
  MOE_CHECK(logits.dim(0) == 0 || logits.dim(1) > 0, "cross_entropy: empty vocabulary in ", logits.str());
  check_dtype("cross_entropy", targets, DType::kI32, "targets");
  check_floats(b, "cross_entropy", {{logits, "logits"}, {dlogits, "dlogits", FloatRule::kDevice, Presence::kOptional}});
}

}  // namespace moe
