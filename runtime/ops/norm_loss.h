// Norm and loss family: RMSNorm and the language-model cross-entropy.
//
// Row-wise ops over (rows, H) tensors. Dtypes: CPU F32 or F64, one per call. CUDA: x, y, dy, dx, logits,
// dlogits F32 or BF16, each its own; weights, rstd and their gradients F32. The contracts are in
// runtime/ops/norm_loss.cc.
#pragma once

#include "runtime/ops/op.h"

namespace moe {

// y (T, H) = x * rstd * w, rstd (T) = 1 / sqrt(mean_j x_j^2 + eps) (the mean in double), saved for the
// backward.
MOE_OP(void, rmsnorm_forward, (Backend& b, const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd),
       (b, x, w, eps, y, rstd))
// dx (T, H) overwritten, dw (H) accumulated.
MOE_OP(void, rmsnorm_backward,
       (Backend& b, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw),
       (b, dy, x, w, rstd, dx, dw))
// Returns sum over rows of -log softmax(logits)[target] (waits for the device); dlogits (T, V) =
// grad_scale * (softmax - onehot(target)), overwritten, or nothing when dlogits is undefined (evaluation).
// targets (T) I32; a target outside [0, V) is an InternalError.
MOE_OP(double, cross_entropy,
       (Backend& b, const Tensor& logits, const Tensor& targets, double grad_scale, Tensor& dlogits),
       (b, logits, targets, grad_scale, dlogits))

}  // namespace moe
