// Multi-head causal self-attention with rotary positions and optional grouped-query heads.
//
//   q = x W_q^T (T, nh*d), k = x W_k^T (T, nkv*d), v = x W_v^T (T, nkv*d)      d = H / nh
//   q, k <- rope(q), rope(k)                                                  position t mod S
//   per sequence and query head h (kv head h / (nh / nkv)):
//     p = causal_softmax(q_h k^T / sqrt(d)),  o_h = dropout(p) v              (S, d)
//   y = concat_h(o_h) W_o^T (T, H)
//
// Weights stored (out, in): W_q (nh*d, H), W_k, W_v (nkv*d, H), W_o (H, nh*d); no biases. The local
// tokens are B whole sequences of S tokens; attention never crosses a sequence (nor a rank).
#pragma once

#include <string>

#include "model/context.h"
#include "model/params.h"
#include "config/config.h"

namespace moe {

class Attention {
 public:
  Attention(ParamSet& params, const std::string& prefix, const Config& config, int layer);

  // x (T, H) -> y (T, H), T = B * ctx.seq_len. Keeps what the backward needs when ctx.training.
  Tensor forward(Backend& backend, const Tensor& x, const StepContext& ctx);
  // dy (T, H) -> dx (T, H); accumulates the weight gradients. Releases the saved activations.
  Tensor backward(Backend& backend, const Tensor& dy);

  Param* first_param() { return wq_; }
  // Forward FLOPs of the attention products (scores and values) per token for sequences of seq_len,
  // counting the full S x S square (the causal half is not subtracted, as in PaLM's MFU).
  double score_flops_per_token(int64_t seq_len) const;

 private:
  // The rotary tables (positions, d/2) on the backend, built on first use in double (then cast).
  void make_tables(Backend& backend, DType dtype);

  int layer_;
  int64_t heads_, kv_heads_, head_dim_, max_seq_;
  double rope_base_, dropout_;
  uint64_t seed_;
  Param* wq_;  // (nh*d, H)
  Param* wk_;  // (nkv*d, H)
  Param* wv_;  // (nkv*d, H)
  Param* wo_;  // (H, nh*d)
  Tensor cos_, sin_;  // (max_seq, d/2)

  // What the backward needs.
  struct Saved {
    Tensor x;           // (T, H) input
    Tensor q, k, v;     // (B, nh, S, d), (B, nkv, S, d) x2: after rope, head-major
    Tensor probs;       // (B*nkv, g*S, S) causal softmax, before dropout
    Tensor probs_used;  // the same after dropout (probs itself without dropout)
    Tensor o;           // (T, nh*d) merged head outputs
    int64_t seq_len = 0;
    int64_t dropout_offset = 0;  // global element index of probs[0] (dropout draws)
    RngStream dropout_rng;
  } saved_;
};

}  // namespace moe
