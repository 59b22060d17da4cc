// Elementwise family: vector updates, reductions to the host, and the expert activations.
//
// Tensors of one call have the same element count (shapes are not looked at). Dtypes: the device's floats
// (runtime/ops/contract.h): CPU F32 or F64, one per call; CUDA F32 or BF16, each tensor its own (computed
// in float). The contracts are in runtime/ops/elementwise.cc.
#pragma once

#include "runtime/ops/op.h"
#include "runtime/rng.h"

namespace moe {

enum class Activation : uint8_t { kGelu, kRelu };  // GELU is the tanh approximation

// y += alpha * x
MOE_OP(void, axpy, (Backend& b, double alpha, const Tensor& x, Tensor& y), (b, alpha, x, y))
// x *= alpha
MOE_OP(void, scale, (Backend& b, Tensor& x, double alpha), (b, x, alpha))
// Returns sum_i x_i^2, accumulated in double (waits for the device).
MOE_OP(double, sum_squares, (Backend& b, const Tensor& x), (b, x))

// h = silu(a) * g, silu(a) = a * sigmoid(a)
MOE_OP(void, swiglu_forward, (Backend& b, const Tensor& a, const Tensor& g, Tensor& h), (b, a, g, h))
// da = dh * g * s * (1 + a * (1 - s)), dg = dh * silu(a), s = sigmoid(a); both overwritten
MOE_OP(void, swiglu_backward, (Backend& b, const Tensor& dh, const Tensor& a, const Tensor& g, Tensor& da, Tensor& dg),
       (b, dh, a, g, da, dg))
// h = act(a)
MOE_OP(void, activation_forward, (Backend& b, Activation act, const Tensor& a, Tensor& h), (b, act, a, h))
// da = dh * act'(a), overwritten
MOE_OP(void, activation_backward, (Backend& b, Activation act, const Tensor& dh, const Tensor& a, Tensor& da),
       (b, act, dh, a, da))

// Inverted dropout, p in [0, 1): out[i] = x[i] / (1 - p) when rng.uniform(offset + i) >= p, else 0 (out may be x).
// Element i of a tensor whose slice starts at global element `offset` draws the same number on any rank,
// and applying the op with the same arguments to a gradient gives its backward.
MOE_OP(void, dropout, (Backend& b, const Tensor& x, double p, const RngStream& rng, int64_t offset, Tensor& out),
       (b, x, p, rng, offset, out))

}  // namespace moe
