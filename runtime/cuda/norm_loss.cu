// CUDA norm and loss family (runtime/ops/norm_loss.h). Row ops run one block per row, 128..1024
// threads by row length, with warp-shuffle block reductions. Cross-entropy reads a row twice: an online
// max/sum-of-exp pass, then the gradient pass (vocabularies of 200k do not fit on chip); its loss is
// reduced deterministically (per-row values, then one block in double, in a fixed order) and comes back
// through a pinned buffer. RMSNorm sums in double like the CPU. rmsnorm_backward's dw: each of
// G = min(rows, 2 * SMs) blocks owns a scratch row of H partial sums (each thread its own columns, so no
// atomics) over the rows it handles; a column kernel adds the G partials to dw in a fixed order.
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/norm_loss.h"

namespace moe::cuda {
namespace {

// One block per row: rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w.
__global__ void rmsnorm_forward_kernel(FloatIn x, const float* w, double eps, FloatOut y, float* rstd, int64_t h) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * h;
  double ss = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    double v = x[base + j];
    ss += v * v;
  }
  ss = block_reduce(ss, Sum{}, 0.0);
  const float r = static_cast<float>(1.0 / sqrt(ss / h + eps));
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) y.set(base + j, x[base + j] * r * w[j]);
}

// Block b handles rows b, b + G, ...: dx of each, and its partial dw sums in dw_partial[b] (H floats;
// thread t always owns columns t, t + blockDim, ..., so the partials need no atomics).
__global__ void rmsnorm_backward_kernel(FloatIn dy, FloatIn x, const float* w, const float* rstd, FloatOut dx,
                                        float* dw_partial, int64_t rows, int64_t h) {
  float* partial = dw_partial + static_cast<int64_t>(blockIdx.x) * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) partial[j] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * h;
    const float r = rstd[row];
    double dot = 0;  // sum over j of (dy * w) * n, n = x * r
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x)
      dot += static_cast<double>(dy[base + j]) * w[j] * x[base + j] * r;
    dot = block_reduce(dot, Sum{}, 0.0);
    const float mean = static_cast<float>(dot / h);
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      float g = dy[base + j], n = x[base + j] * r;
      dx.set(base + j, r * (g * w[j] - n * mean));
      partial[j] += g * n;
    }
  }
}

// dw[j] += sum over b of partial[b][j], b in order.
__global__ void column_sum_kernel(const float* partial, int64_t num_partials, int64_t h, float* dw) {
  GRID_STRIDE_LOOP(j, h) {
    float s = 0.f;
    for (int64_t b = 0; b < num_partials; ++b) s += partial[b * h + j];
    dw[j] += s;
  }
}

// One block per row: loss[row] = logsumexp(row) - row[target]; dlogits = scale * (softmax - onehot).
// A target outside [0, vocab) gives loss 0 and is counted in bad = {count, value}.
__global__ void cross_entropy_kernel(FloatIn logits, const int32_t* targets, float scale, FloatOut dlogits,
                                     float* loss, int32_t* bad, int64_t vocab) {
  const int64_t row = blockIdx.x, base = row * vocab;
  SoftmaxStat stat{-INFINITY, 0.f};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) softmax_push(stat, logits[base + j]);
  stat = block_reduce(stat, SoftmaxMerge{}, SoftmaxStat{-INFINITY, 0.f});
  const float inv = 1.f / stat.sum;
  const int64_t target = targets[row];
  if (dlogits.ptr) {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      float p = expf(logits[base + j] - stat.max) * inv * scale;
      dlogits.set(base + j, j == target ? p - scale : p);
    }
  }
  if (threadIdx.x == 0) {
    if (target >= 0 && target < vocab) {
      loss[row] = (stat.max + logf(stat.sum)) - logits[base + target];
    } else {
      loss[row] = 0.f;
      atomicAdd(&bad[0], 1);
      bad[1] = static_cast<int32_t>(target);
    }
  }
}

}  // namespace

void rmsnorm_forward(Backend& backend, const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  Context& ctx = context(backend);
  const int64_t rows = x.dim(0), h = x.dim(1);
  const FloatIn in = float_in(x, "rmsnorm x");
  const FloatOut out = float_out(y, "rmsnorm y");
  const float* pw = f32_in(w, "rmsnorm w");
  float* pr = f32_out(rstd, "rmsnorm rstd");
  if (rows == 0) return;
  MOE_CHECK(rows <= INT_MAX, "rmsnorm: ", rows, " rows");
  const int block = row_block(h);
  rmsnorm_forward_kernel<<<static_cast<unsigned>(rows), block, 0, ctx.stream>>>(in, pw, eps, out, pr, h);
  MOE_CUDA_LAUNCH_CHECK();
}

void rmsnorm_backward(Backend& backend, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Tensor& dx, Tensor& dw) {
  Context& ctx = context(backend);
  const int64_t rows = x.dim(0), h = x.dim(1);
  const FloatIn pdy = float_in(dy, "rmsnorm dy"), px = float_in(x, "rmsnorm x");
  const FloatOut pdx = float_out(dx, "rmsnorm dx");
  const float* pw = f32_in(w, "rmsnorm w");
  const float* pr = f32_in(rstd, "rmsnorm rstd");
  float* pdw = f32_out(dw, "rmsnorm dw");
  if (rows == 0 || h == 0) return;
  const int64_t num_sms = ctx.num_sms > 0 ? ctx.num_sms : 132;
  const int64_t blocks = std::min(rows, 2 * num_sms);
  Scratch partial(ctx.stream, static_cast<size_t>(blocks * h) * sizeof(float));
  rmsnorm_backward_kernel<<<static_cast<unsigned>(blocks), row_block(h), 0, ctx.stream>>>(
      pdy, px, pw, pr, pdx, partial.as<float>(), rows, h);
  MOE_CUDA_LAUNCH_CHECK();
  launch_elementwise(ctx, h, column_sum_kernel, partial.as<float>(), blocks, h, pdw);
}

double cross_entropy(Backend& backend, const Tensor& logits, const Tensor& targets, double grad_scale,
                     Tensor& dlogits) {
  Context& ctx = context(backend);
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  const bool grad = dlogits.defined();
  const FloatIn in = float_in(logits, "cross_entropy logits");
  const FloatOut out = grad ? float_out(dlogits, "cross_entropy dlogits") : FloatOut{nullptr, false};
  const int32_t* pt = i32_in(targets, "cross_entropy targets");
  if (rows == 0) return 0.0;
  MOE_CHECK(rows <= INT_MAX, "cross_entropy: ", rows, " rows");

  Scratch loss(ctx.stream, static_cast<size_t>(rows) * sizeof(float));
  Scratch bad(ctx.stream, 2 * sizeof(int32_t));
  Scratch result(ctx.stream, sizeof(ReduceResult));
  MOE_CUDA_CHECK(cudaMemsetAsync(bad.as<int32_t>(), 0, 2 * sizeof(int32_t), ctx.stream));
  cross_entropy_kernel<<<static_cast<unsigned>(rows), row_block(vocab), 0, ctx.stream>>>(
      in, pt, static_cast<float>(grad_scale), out, loss.as<float>(), bad.as<int32_t>(), vocab);
  MOE_CUDA_LAUNCH_CHECK();
  finish_sum_kernel<float><<<1, 1024, 0, ctx.stream>>>(loss.as<float>(), rows, bad.as<int32_t>(),
                                                        result.as<ReduceResult>());
  MOE_CUDA_LAUNCH_CHECK();
  const ReduceResult r = fetch_result(ctx, result.as<ReduceResult>());
  MOE_CHECK(r.num_bad == 0, "target ", r.bad_value, " outside vocabulary of ", vocab, " (", r.num_bad, " rows)");
  return r.sum;
}

}  // namespace moe::cuda
