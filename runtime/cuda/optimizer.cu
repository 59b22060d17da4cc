// CUDA optimizer family (runtime/ops/optimizer.h): one fused grid-stride kernel per update (AdamW
// updates m, v and the parameter in one pass, and writes the parameter's BF16 shadow when it has one).
#include <cmath>

#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/optimizer.h"

namespace moe::cuda {
namespace {

// shadow (may be null): the updated parameter rounded to BF16, written in the same pass.
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, __nv_bfloat16* shadow, int64_t n,
                             float beta1, float beta2, float lr, float wd, float eps, float inv_bc1, float inv_bc2) {
  GRID_STRIDE_LOOP(i, n) {
    float gi = g[i];
    float mi = beta1 * m[i] + (1.f - beta1) * gi;
    float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps);
    const float pi = p[i] - lr * (update + wd * p[i]);
    p[i] = pi;
    if (shadow) shadow[i] = __float2bfloat16(pi);
  }
}

__global__ void sgd_kernel(float* p, const float* g, __nv_bfloat16* shadow, int64_t n, float lr, float wd) {
  GRID_STRIDE_LOOP(i, n) {
    const float pi = p[i] - lr * (g[i] + wd * p[i]);
    p[i] = pi;
    if (shadow) shadow[i] = __float2bfloat16(pi);
  }
}

__nv_bfloat16* shadow_ptr(Tensor* shadow) {
  return shadow ? static_cast<__nv_bfloat16*>(shadow->raw()) : nullptr;
}

}  // namespace

void adamw_step(Backend& backend, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& args,
                Tensor* shadow) {
  Context& ctx = context(backend);
  const int64_t n = param.numel();
  const double bc1 = 1.0 - std::pow(args.beta1, static_cast<double>(args.step));
  const double bc2 = 1.0 - std::pow(args.beta2, static_cast<double>(args.step));
  launch_elementwise(ctx, n, adamw_kernel, f32_out(param, "adamw param"), f32_in(grad, "adamw grad"),
                     f32_out(m, "adamw m"), f32_out(v, "adamw v"), shadow_ptr(shadow), n,
                     static_cast<float>(args.beta1),
                     static_cast<float>(args.beta2), static_cast<float>(args.lr),
                     static_cast<float>(args.weight_decay), static_cast<float>(args.eps),
                     static_cast<float>(1.0 / bc1), static_cast<float>(1.0 / bc2));
}

void sgd_step(Backend& backend, Tensor& param, const Tensor& grad, double lr, double weight_decay, Tensor* shadow) {
  Context& ctx = context(backend);
  const int64_t n = param.numel();
  launch_elementwise(ctx, n, sgd_kernel, f32_out(param, "sgd param"), f32_in(grad, "sgd grad"),
                     shadow_ptr(shadow), n,
                     static_cast<float>(lr), static_cast<float>(weight_decay));
}

}  // namespace moe::cuda
