// CPU attention family (runtime/ops/attention.h): rotary embeddings, head layout, causal softmax (the
// contracts in runtime/ops/attention.cc have checked the arguments).
#include <cstring>

#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/attention.h"

namespace moe::cpu {

void rope(Backend&, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t seq_len, bool inverse,
          Tensor& out) {
  const int64_t t_count = x.dim(0), half = cos.dim(1), d = 2 * half;
  const int64_t heads = x.dim(1) / d;
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t) {
      const int64_t p = t % seq_len;
      const T* c = cos.data<T>() + p * half;
      const T* s = sin.data<T>() + p * half;
      for (int64_t h = 0; h < heads; ++h) {
        const T* in = x.data<T>() + t * x.dim(1) + h * d;
        T* o = out.data<T>() + t * x.dim(1) + h * d;
        for (int64_t i = 0; i < half; ++i) {
          const T si = inverse ? -s[i] : s[i];
          const T a = in[i], b = in[i + half];
          o[i] = a * c[i] - b * si;
          o[i + half] = b * c[i] + a * si;
        }
      }
    }
  });
}

namespace {

// Copies between (B*S, n*d) and (B, n, S, d); to_heads chooses the direction.
void change_heads(const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out, bool to_heads) {
  const Tensor& tokens = to_heads ? x : out;
  const int64_t t_count = tokens.dim(0), d = tokens.dim(1) / num_heads, batch = t_count / seq_len;
  const size_t row = static_cast<size_t>(d) * dtype_size(x.dtype());
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < num_heads; ++h)
      for (int64_t i = 0; i < seq_len; ++i) {
        const size_t tok = static_cast<size_t>(((b * seq_len + i) * num_heads + h)) * row;
        const size_t head = static_cast<size_t>(((b * num_heads + h) * seq_len + i)) * row;
        std::memcpy(dst + (to_heads ? head : tok), src + (to_heads ? tok : head), row);
      }
}

}  // namespace

void split_heads(Backend&, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out) {
  change_heads(x, seq_len, num_heads, out, /*to_heads=*/true);
}

void merge_heads(Backend&, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out) {
  change_heads(x, seq_len, num_heads, out, /*to_heads=*/false);
}

void causal_softmax_forward(Backend&, const Tensor& scores, double scale, Tensor& probs) {
  const int64_t s_len = scores.dim(-1), rows = scores.numel() / std::max<int64_t>(1, s_len);
  dispatch_float(scores.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r % s_len;
      const T* in = scores.data<T>() + r * s_len;
      T* out = probs.data<T>() + r * s_len;
      softmax_row(in, out, i + 1, static_cast<T>(scale));
      for (int64_t j = i + 1; j < s_len; ++j) out[j] = T(0);
    }
  });
}

void causal_softmax_backward(Backend&, const Tensor& dprobs, const Tensor& probs, double scale, Tensor& dscores) {
  const int64_t s_len = probs.dim(-1), rows = probs.numel() / std::max<int64_t>(1, s_len);
  dispatch_float(probs.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T sc = static_cast<T>(scale);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r % s_len;
      const T* p = probs.data<T>() + r * s_len;
      const T* dp = dprobs.data<T>() + r * s_len;
      T* ds = dscores.data<T>() + r * s_len;
      T dot = 0;
      for (int64_t j = 0; j <= i; ++j) dot += p[j] * dp[j];
      for (int64_t j = 0; j <= i; ++j) ds[j] = sc * p[j] * (dp[j] - dot);
      for (int64_t j = i + 1; j < s_len; ++j) ds[j] = T(0);
    }
  });
}

}  // namespace moe::cpu
