// CUDA elementwise family (runtime/ops/elementwise.h), plus the fill and dtype conversion behind the
// backend's memory methods. Grid-stride loops, 256 threads per block; each op is one kernel (SwiGLU
// forward and backward compute silu, both gradients and the casts in one pass). A float tensor is passed
// as (pointer, is_bf16) and read or written as float, so every input and output can be F32 or BF16
// independently (the branch is uniform across the grid). sum_squares reduces per block, then one block
// sums the partials in double in a fixed order.
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/elementwise.h"

namespace moe::cuda {
namespace {

// ---------------------------------------------------------------------------------------------------
// elementwise kernels

template <typename T>
__global__ void fill_kernel(T* p, int64_t n, T value) {
  GRID_STRIDE_LOOP(i, n) p[i] = value;
}

__global__ void convert_kernel(FloatIn src, FloatOut dst, int64_t n) {
  GRID_STRIDE_LOOP(i, n) dst.set(i, src[i]);
}

__global__ void axpy_kernel(float alpha, FloatIn x, FloatOut y, int64_t n) {
  GRID_STRIDE_LOOP(i, n) y.set(i, y.get(i) + alpha * x[i]);
}

__global__ void scale_kernel(FloatOut x, int64_t n, float alpha) {
  GRID_STRIDE_LOOP(i, n) x.set(i, x.get(i) * alpha);
}

__global__ void sum_squares_kernel(FloatIn x, int64_t n, double* partial) {
  double s = 0;
  GRID_STRIDE_LOOP(i, n) {
    double v = x[i];
    s += v * v;
  }
  s = block_reduce(s, Sum{}, 0.0);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__device__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__global__ void swiglu_forward_kernel(FloatIn a, FloatIn b, FloatOut h, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    float x = a[i];
    h.set(i, x * sigmoid(x) * b[i]);
  }
}

__global__ void swiglu_backward_kernel(FloatIn dh, FloatIn a, FloatIn b, FloatOut da, FloatOut db, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    float x = a[i], g = dh[i];
    float s = sigmoid(x);
    db.set(i, g * (x * s));
    da.set(i, g * b[i] * s * (1.f + x * (1.f - s)));
  }
}

// GELU, tanh approximation (as the CPU backend).
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;
constexpr float kGeluA3 = static_cast<float>(3 * 0.044715);

__global__ void activation_forward_kernel(Activation act, FloatIn a, FloatOut h, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    float x = a[i];
    if (act == Activation::kRelu) {
      h.set(i, x > 0.f ? x : 0.f);
    } else {
      h.set(i, 0.5f * x * (1.f + tanhf(kGeluC * (x + kGeluA * x * x * x))));
    }
  }
}

__global__ void activation_backward_kernel(Activation act, FloatIn dh, FloatIn a, FloatOut da, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    float x = a[i];
    if (act == Activation::kRelu) {
      da.set(i, x > 0.f ? dh[i] : 0.f);
    } else {
      float th = tanhf(kGeluC * (x + kGeluA * x * x * x));
      float du = kGeluC * (1.f + kGeluA3 * x * x);
      da.set(i, dh[i] * (0.5f * (1.f + th) + 0.5f * x * (1.f - th * th) * du));
    }
  }
}

__global__ void dropout_kernel(FloatIn x, FloatOut out, int64_t n, double p, float keep_scale, RngStream rng,
                               int64_t offset) {
  GRID_STRIDE_LOOP(i, n) out.set(i, rng.uniform(static_cast<uint64_t>(offset + i)) >= p ? x[i] * keep_scale : 0.f);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// memory (the backend's fill and convert)

void fill_tensor(Context& ctx, Tensor& t, double value) {
  const int64_t n = t.numel();
  if (n == 0) return;
  if (value == 0.0) {  // every dtype's zero is all-zero bits
    MOE_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, t.nbytes(), ctx.stream));
    return;
  }
  switch (t.dtype()) {
    case DType::kF32:
      launch_elementwise(ctx, n, fill_kernel<float>, static_cast<float*>(t.raw()), n, static_cast<float>(value));
      return;
    case DType::kF64:
      launch_elementwise(ctx, n, fill_kernel<double>, static_cast<double*>(t.raw()), n, value);
      return;
    case DType::kI32:
      launch_elementwise(ctx, n, fill_kernel<int32_t>, static_cast<int32_t*>(t.raw()), n,
                         static_cast<int32_t>(value));
      return;
    case DType::kBF16:
      launch_elementwise(ctx, n, fill_kernel<__nv_bfloat16>, static_cast<__nv_bfloat16*>(t.raw()), n,
                         __float2bfloat16(static_cast<float>(value)));
      return;
  }
  MOE_CHECK(false, "fill: unknown dtype of ", t.str());
}

void convert_tensor(Context& ctx, const Tensor& src, Tensor& dst) {
  MOE_CHECK(src.numel() == dst.numel(), "convert: ", src.str(), " to ", dst.str());
  const int64_t n = src.numel();
  if (n == 0) return;
  if (src.dtype() == dst.dtype()) {
    MOE_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, ctx.stream));
    return;
  }
  launch_elementwise(ctx, n, convert_kernel, float_in(src, "convert source"), float_out(dst, "convert target"), n);
}

// ---------------------------------------------------------------------------------------------------
// ops

void axpy(Backend& backend, double alpha, const Tensor& x, Tensor& y) {
  Context& ctx = context(backend);
  const int64_t n = x.numel();
  if (n == 0) return;
  launch_elementwise(ctx, n, axpy_kernel, static_cast<float>(alpha), float_in(x, "axpy x"), float_out(y, "axpy y"),
                     n);
}

void scale(Backend& backend, Tensor& x, double alpha) {
  Context& ctx = context(backend);
  const int64_t n = x.numel();
  if (n == 0) return;
  launch_elementwise(ctx, n, scale_kernel, float_out(x, "scale x"), n, static_cast<float>(alpha));
}

double sum_squares(Backend& backend, const Tensor& x) {
  Context& ctx = context(backend);
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  const FloatIn in = float_in(x, "sum_squares x");
  const unsigned blocks = std::min<unsigned>(grid_for(n, kBlock), kMaxPartials);
  Scratch partial(ctx.stream, blocks * sizeof(double));
  Scratch result(ctx.stream, sizeof(ReduceResult));
  sum_squares_kernel<<<blocks, kBlock, 0, ctx.stream>>>(in, n, partial.as<double>());
  MOE_CUDA_LAUNCH_CHECK();
  finish_sum_kernel<double><<<1, 1024, 0, ctx.stream>>>(partial.as<double>(), blocks, nullptr,
                                                          result.as<ReduceResult>());
  MOE_CUDA_LAUNCH_CHECK();
  return fetch_result(ctx, result.as<ReduceResult>()).sum;
}

// ---------------------------------------------------------------------------------------------------
// activations

void swiglu_forward(Backend& backend, const Tensor& a, const Tensor& b, Tensor& h) {
  Context& ctx = context(backend);
  launch_elementwise(ctx, a.numel(), swiglu_forward_kernel, float_in(a, "swiglu a"), float_in(b, "swiglu b"),
                     float_out(h, "swiglu h"), a.numel());
}

void swiglu_backward(Backend& backend, const Tensor& dh, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db) {
  Context& ctx = context(backend);
  const int64_t n = a.numel();
  launch_elementwise(ctx, n, swiglu_backward_kernel, float_in(dh, "swiglu dh"), float_in(a, "swiglu a"),
                     float_in(b, "swiglu b"), float_out(da, "swiglu da"), float_out(db, "swiglu db"), n);
}

void activation_forward(Backend& backend, Activation act, const Tensor& a, Tensor& h) {
  Context& ctx = context(backend);
  launch_elementwise(ctx, a.numel(), activation_forward_kernel, act, float_in(a, "activation a"),
                     float_out(h, "activation h"), a.numel());
}

void activation_backward(Backend& backend, Activation act, const Tensor& dh, const Tensor& a, Tensor& da) {
  Context& ctx = context(backend);
  launch_elementwise(ctx, a.numel(), activation_backward_kernel, act, float_in(dh, "activation dh"),
                     float_in(a, "activation a"), float_out(da, "activation da"), a.numel());
}

void dropout(Backend& backend, const Tensor& x, double p, const RngStream& rng, int64_t offset, Tensor& out) {
  Context& ctx = context(backend);
  launch_elementwise(ctx, x.numel(), dropout_kernel, float_in(x, "dropout x"), float_out(out, "dropout out"),
                     x.numel(), p, static_cast<float>(1.0 / (1.0 - p)), rng, offset);
}

}  // namespace moe::cuda
