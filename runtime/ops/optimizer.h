// Optimizer family: one fused update per parameter tensor. Dtypes: CPU F32 or F64, one per call; CUDA: F32
// (master weights and optimizer state). The contracts are in runtime/ops/optimizer.cc.
#pragma once

#include "runtime/ops/op.h"

namespace moe {

struct AdamArgs {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;  // 1-based, for bias correction
};

// AdamW with decoupled weight decay, per element:
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
//   p -= lr * ( (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps) + weight_decay * p )
// shadow (may be null): a BF16 tensor of an F32 param's size that gets the updated p rounded to nearest even in
// the same pass (the bf16 experts' weights, model/params.h).
MOE_OP(void, adamw_step,
       (Backend& b, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& args, Tensor* shadow),
       (b, param, grad, m, v, args, shadow))
// p -= lr * (g + weight_decay * p); shadow as for adamw_step.
MOE_OP(void, sgd_step, (Backend& b, Tensor& param, const Tensor& grad, double lr, double weight_decay, Tensor* shadow),
       (b, param, grad, lr, weight_decay, shadow))

}  // namespace moe
