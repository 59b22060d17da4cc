// Contracts of the attention family (runtime/ops/attention.h), run before either device's implementation.
#include "runtime/ops/attention.h"

#include "runtime/ops/contract.h"

namespace moe {
namespace {

constexpr FloatRule kAttention = FloatRule::kF32OnCuda;  // the CUDA attention kernels take F32

// tokens (T = B*S, n*d) and heads (B, n, S, d) of split_heads / merge_heads.
void check_heads(Backend& b, const char* op, const Tensor& x, int64_t seq_len, int64_t num_heads, const Tensor& out,
                 const Tensor& tokens, const Tensor& heads) {
  MOE_CHECK(tokens.rank() == 2 && heads.rank() == 4, op, " shapes: ", x.str(), " -> ", out.str());
  MOE_CHECK(seq_len >= 1 && num_heads >= 1, op, ": ", num_heads, " heads of sequences of ", seq_len);
  const int64_t t_count = tokens.dim(0), d = tokens.dim(1) / num_heads, batch = t_count / seq_len;
  MOE_CHECK(batch * seq_len == t_count && d * num_heads == tokens.dim(1), op, ": ", tokens.str(), " as ", num_heads,
            " heads of sequences of ", seq_len);
  check_shape(heads, {batch, num_heads, seq_len, d}, op);
  check_floats(b, op, {{x, "x", kAttention}, {out, "out", kAttention}});
}

}  // namespace

void check_rope(Backend& b, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t seq_len, bool inverse,
                Tensor& out) {
  MOE_CHECK(x.rank() == 2 && cos.rank() == 2 && sin.shape() == cos.shape(), "rope shapes: ", x.str(), cos.str(),
            sin.str());
  check_shape(out, x.shape(), "rope out");
  const int64_t half = cos.dim(1), d = 2 * half;
  MOE_CHECK(half > 0 && x.dim(1) % d == 0, "rope: rows of ", x.dim(1), " for head size ", d);
  MOE_CHECK(seq_len >= 1 && seq_len <= cos.dim(0) && x.dim(0) % seq_len == 0, "rope: ", x.dim(0),
            " tokens in sequences of ", seq_len, " (table of ", cos.dim(0), " positions)");
  check_floats(b, "rope",
               {{x, "x", kAttention}, {cos, "cos", kAttention}, {sin, "sin", kAttention}, {out, "out", kAttention}});
}

void check_split_heads(Backend& b, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out) {
  check_heads(b, "split_heads", x, seq_len, num_heads, out, x, out);
}

void check_merge_heads(Backend& b, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out) {
  check_heads(b, "merge_heads", x, seq_len, num_heads, out, out, x);
}

void check_causal_softmax_forward(Backend& b, const Tensor& scores, double scale, Tensor& probs) {
  MOE_CHECK(scores.rank() >= 2 && scores.numel() == probs.numel(), "causal_softmax_forward shapes: ", scores.str(),
            " -> ", probs.str());
  check_floats(b, "causal_softmax_forward", {{scores, "scores", kAttention}, {probs, "probs", kAttention}});
}

void check_causal_softmax_backward(Backend& b, const Tensor& dprobs, const Tensor& probs, double scale,
                                   Tensor& dscores) {
  MOE_CHECK(probs.rank() >= 2 && dprobs.numel() == probs.numel() && dscores.numel() == probs.numel(),
            "causal_softmax_backward shapes: ", dprobs.str(), probs.str(), dscores.str());
  check_floats(b, "causal_softmax_backward",
               {{dprobs, "dprobs", kAttention}, {probs, "probs", kAttention}, {dscores, "dscores", kAttention}});
}

}  // namespace moe
