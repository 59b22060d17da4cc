// Attention family: rotary position embeddings, the head layout change around the attention GEMMs, and
// the causal softmax. The attention products themselves are batched GEMMs (runtime/ops/gemm.h), one
// batch entry per (sequence, key/value head), so grouped-query heads need no copies:
//
//   q (T, nh*d) --rope, split_heads--> (B, nh, S, d) == (B*nkv, g*S, d)     g = nh / nkv query heads per kv head
//   k, v (T, nkv*d) --rope (k), split_heads--> (B*nkv, S, d)
//   scores (B*nkv, g*S, S) = q k^T;  p = causal_softmax(scores, scale = 1/sqrt(d));  o = p v
//
// Tokens are B sequences of S consecutive tokens; the position of local token t is t mod S. A row of
// scores (or of p) belongs to query position r mod S, because each of its g heads contributes S
// consecutive rows.
//
// Dtypes: the CPU's floats (F32 or F64, one per call); CUDA: F32 only. The contracts are in
// runtime/ops/attention.cc.
#pragma once

#include "runtime/ops/op.h"

namespace moe {

// Rotary embedding, "rotate half" form: for position p = t mod S and dimension pair (i, i + d/2) of every
// head (i < d/2), with c = cos[p, i], s = sin[p, i]:
//   out[i]       = x[i] c - x[i + d/2] s
//   out[i + d/2] = x[i + d/2] c + x[i] s
// x, out (T, n*d) (out may be x); cos, sin (S_max, d/2) tables with S <= S_max; seq_len = S.
// inverse = true rotates by -angle, which is the backward of the forward rotation.
MOE_OP(void, rope,
       (Backend& b, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t seq_len, bool inverse, Tensor& out),
       (b, x, cos, sin, seq_len, inverse, out))

// out (B, n, S, d)[b, h, i, :] = x (T = B*S, n*d)[b*S + i, h*d : (h+1)*d]
MOE_OP(void, split_heads, (Backend& b, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out),
       (b, x, seq_len, num_heads, out))
// The inverse: out (T, n*d) from x (B, n, S, d).
MOE_OP(void, merge_heads, (Backend& b, const Tensor& x, int64_t seq_len, int64_t num_heads, Tensor& out),
       (b, x, seq_len, num_heads, out))

// probs (R, S) row r, query position i = r mod S: softmax over j <= i of scale * scores[r, j]; entries
// j > i are 0. scores and probs may be the same tensor. Rows of any leading shape (R = product).
MOE_OP(void, causal_softmax_forward, (Backend& b, const Tensor& scores, double scale, Tensor& probs),
       (b, scores, scale, probs))
// dscores = scale * probs * (dprobs - sum_j probs_j dprobs_j), overwritten (0 above the diagonal).
MOE_OP(void, causal_softmax_backward,
       (Backend& b, const Tensor& dprobs, const Tensor& probs, double scale, Tensor& dscores),
       (b, dprobs, probs, scale, dscores))

}  // namespace moe
