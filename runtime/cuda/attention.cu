// CUDA attention family (runtime/ops/attention.h). F32.
//
// rope: one thread per (token, head, pair), the angle tables come from the host (computed in double),
// so the CPU and the GPU rotate by the same numbers. split_heads / merge_heads: one thread per element.
// causal softmax: one block per row (128..1024 threads by row length), two passes over the row (an
// online max / sum-of-exp pass, then the writes), masked entries written as 0.
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/attention.h"

namespace moe::cuda {
namespace {

__global__ void rope_kernel(const float* x, const float* cos, const float* sin, float* out, int64_t tokens,
                            int64_t heads, int64_t half, int64_t seq_len, float sign) {
  GRID_STRIDE_LOOP(e, tokens * heads * half) {
    const int64_t i = e % half, th = e / half, t = th / heads;
    const int64_t p = t % seq_len;
    const float c = cos[p * half + i], s = sign * sin[p * half + i];
    const int64_t base = th * 2 * half;  // row t, head h: (t * heads + h) * d
    const float a = x[base + i], b = x[base + i + half];
    out[base + i] = a * c - b * s;
    out[base + i + half] = b * c + a * s;
  }
}

// One element of the (B, n, S, d) layout per iteration; to_heads chooses the direction.
__global__ void heads_kernel(const float* x, float* out, int64_t batch, int64_t heads, int64_t seq_len, int64_t d,
                             bool to_heads) {
  GRID_STRIDE_LOOP(e, batch * heads * seq_len * d) {
    const int64_t c = e % d, i = (e / d) % seq_len, h = (e / (d * seq_len)) % heads, b = e / (d * seq_len * heads);
    const int64_t tok = ((b * seq_len + i) * heads + h) * d + c;
    if (to_heads) {
      out[e] = x[tok];
    } else {
      out[tok] = x[e];
    }
  }
}

__global__ void causal_softmax_kernel(const float* scores, float* probs, int64_t s_len, float scale) {
  const int64_t row = blockIdx.x, base = row * s_len, pos = row % s_len;
  SoftmaxStat stat{-INFINITY, 0.f};
  for (int64_t j = threadIdx.x; j <= pos; j += blockDim.x) softmax_push(stat, scale * scores[base + j]);
  stat = block_reduce(stat, SoftmaxMerge{}, SoftmaxStat{-INFINITY, 0.f});
  const float inv = 1.f / stat.sum;
  for (int64_t j = threadIdx.x; j < s_len; j += blockDim.x) {
    probs[base + j] = j <= pos ? expf(scale * scores[base + j] - stat.max) * inv : 0.f;
  }
}

__global__ void causal_softmax_backward_kernel(const float* dprobs, const float* probs, float* dscores,
                                               int64_t s_len, float scale) {
  const int64_t row = blockIdx.x, base = row * s_len, pos = row % s_len;
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j <= pos; j += blockDim.x) dot += probs[base + j] * dprobs[base + j];
  dot = block_reduce(dot, Sum{}, 0.f);
  for (int64_t j = threadIdx.x; j < s_len; j += blockDim.x) {
    dscores[base + j] = j <= pos ? scale * probs[base + j] * (dprobs[base + j] - dot) : 0.f;
  }
}

void change_heads(Context& ctx, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out, bool to_heads) {
  const Tensor& tokens = to_heads ? x : out;
  const int64_t t_count = tokens.dim(0), d = tokens.dim(1) / num_heads, batch = t_count / seq_len;
  launch_elementwise(ctx, x.numel(), heads_kernel, f32_in(x, "head layout input"), f32_out(out, "head layout output"),
                     batch, num_heads, seq_len, d, to_heads);
}

}  // namespace

void rope(Backend& backend, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t seq_len, bool inverse,
          Tensor& out) {
  Context& ctx = context(backend);
  const int64_t t_count = x.dim(0), half = cos.dim(1), d = 2 * half;
  const int64_t heads = x.dim(1) / d;
  launch_elementwise(ctx, t_count * heads * half, rope_kernel, f32_in(x, "rope x"), f32_in(cos, "rope cos"),
                     f32_in(sin, "rope sin"), f32_out(out, "rope out"), t_count, heads, half, seq_len,
                     inverse ? -1.f : 1.f);
}

void split_heads(Backend& backend, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out) {
  change_heads(context(backend), x, seq_len, num_heads, out, /*to_heads=*/true);
}

void merge_heads(Backend& backend, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out) {
  change_heads(context(backend), x, seq_len, num_heads, out, /*to_heads=*/false);
}

void causal_softmax_forward(Backend& backend, const Tensor& scores, double scale, Tensor& probs) {
  Context& ctx = context(backend);
  const int64_t s_len = scores.dim(-1), rows = s_len > 0 ? scores.numel() / s_len : 0;
  const float* in = f32_in(scores, "causal_softmax scores");
  float* out = f32_out(probs, "causal_softmax probs");
  if (rows == 0) return;
  MOE_CHECK(rows <= INT_MAX, "causal_softmax: ", rows, " rows");
  causal_softmax_kernel<<<static_cast<unsigned>(rows), row_block(s_len), 0, ctx.stream>>>(in, out, s_len,
                                                                                          static_cast<float>(scale));
  MOE_CUDA_LAUNCH_CHECK();
}

void causal_softmax_backward(Backend& backend, const Tensor& dprobs, const Tensor& probs, double scale,
                             Tensor& dscores) {
  Context& ctx = context(backend);
  const int64_t s_len = probs.dim(-1), rows = s_len > 0 ? probs.numel() / s_len : 0;
  const float* dp = f32_in(dprobs, "causal_softmax dprobs");
  const float* p = f32_in(probs, "causal_softmax probs");
  float* ds = f32_out(dscores, "causal_softmax dscores");
  if (rows == 0) return;
  MOE_CHECK(rows <= INT_MAX, "causal_softmax_backward: ", rows, " rows");
  causal_softmax_backward_kernel<<<static_cast<unsigned>(rows), row_block(s_len), 0, ctx.stream>>>(
      dp, p, ds, s_len, static_cast<float>(scale));
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda
