// Causal self-attention forward and backward.
#include "model/attention.h"

#include <cmath>

#include "runtime/ops/attention.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"

namespace moe {

Attention::Attention(ParamSet& params, const std::string& prefix, const Config& config, int layer)
    : layer_(layer),
      heads_(config.model.heads),
      kv_heads_(kv_heads(config)),
      head_dim_(head_dim(config)),
      max_seq_(config.model.seq_len),
      rope_base_(config.model.rope_base),
      dropout_(config.model.attn_dropout),
      seed_(config.train.seed) {
  const int64_t h = config.model.hidden;
  auto add = [&](const char* name, Shape shape, double std) {
    Param p;
    p.name = prefix + "." + name;
    p.shape = std::move(shape);
    p.init_std = std;
    return params.add(p);
  };
  const double std = config.model.init_std;
  wq_ = add("wq", {heads_ * head_dim_, h}, std);
  wk_ = add("wk", {kv_heads_ * head_dim_, h}, std);
  wv_ = add("wv", {kv_heads_ * head_dim_, h}, std);
  wo_ = add("wo", {h, heads_ * head_dim_}, std / std::sqrt(2.0 * config.model.layers));
}

double Attention::score_flops_per_token(int64_t seq_len) const {
  return 2.0 * 2.0 * static_cast<double>(seq_len) * static_cast<double>(heads_ * head_dim_);
}

void Attention::make_tables(Backend& backend, DType dtype) {
  if (cos_.defined() && cos_.dtype() == dtype) return;
  const int64_t half = head_dim_ / 2;
  Tensor c = host_tensor({max_seq_, half}, dtype), s = host_tensor({max_seq_, half}, dtype);
  for (int64_t p = 0; p < max_seq_; ++p)
    for (int64_t i = 0; i < half; ++i) {
      // theta_i = base^(-2i/d), angle = p * theta_i, all in double
      const double angle = static_cast<double>(p) * std::pow(rope_base_, -2.0 * static_cast<double>(i) /
                                                                            static_cast<double>(head_dim_));
      if (dtype == DType::kF64) {
        c.data<double>()[p * half + i] = std::cos(angle);
        s.data<double>()[p * half + i] = std::sin(angle);
      } else {
        c.data<float>()[p * half + i] = static_cast<float>(std::cos(angle));
        s.data<float>()[p * half + i] = static_cast<float>(std::sin(angle));
      }
    }
  cos_ = backend.empty(c.shape(), dtype);
  sin_ = backend.empty(s.shape(), dtype);
  backend.copy_from_host(c.raw(), cos_);
  backend.copy_from_host(s.raw(), sin_);
}

Tensor Attention::forward(Backend& backend, const Tensor& x, const StepContext& ctx) {
  const int64_t t_count = x.dim(0), h = x.dim(1), seq = ctx.seq_len, d = head_dim_;
  MOE_CHECK(seq >= 1 && seq <= max_seq_ && t_count % seq == 0, "attention: ", t_count, " tokens in sequences of ",
            seq, " (model.seq_len ", max_seq_, ")");
  const int64_t batch = t_count / seq, group = heads_ / kv_heads_;
  const DType ft = x.dtype();
  make_tables(backend, ft);

  Saved s;
  s.x = x;
  s.seq_len = seq;
  Tensor q = backend.empty({t_count, heads_ * d}, ft), k = backend.empty({t_count, kv_heads_ * d}, ft);
  Tensor v = backend.empty({t_count, kv_heads_ * d}, ft);
  gemm(backend, x, Trans::kN, wq_->value, Trans::kT, q, 1.0, 0.0);  // q (T, nh*d) = x W_q^T
  gemm(backend, x, Trans::kN, wk_->value, Trans::kT, k, 1.0, 0.0);
  gemm(backend, x, Trans::kN, wv_->value, Trans::kT, v, 1.0, 0.0);
  rope(backend, q, cos_, sin_, seq, false, q);
  rope(backend, k, cos_, sin_, seq, false, k);
  s.q = backend.empty({batch, heads_, seq, d}, ft);
  s.k = backend.empty({batch, kv_heads_, seq, d}, ft);
  s.v = backend.empty({batch, kv_heads_, seq, d}, ft);
  split_heads(backend, q, seq, heads_, s.q);
  split_heads(backend, k, seq, kv_heads_, s.k);
  split_heads(backend, v, seq, kv_heads_, s.v);

  // One batch entry per (sequence, kv head): its g query heads are g*S consecutive rows.
  const Tensor qg = s.q.reshape({batch * kv_heads_, group * seq, d});
  const Tensor kg = s.k.reshape({batch * kv_heads_, seq, d});
  const Tensor vg = s.v.reshape({batch * kv_heads_, seq, d});
  s.probs = backend.empty({batch * kv_heads_, group * seq, seq}, ft);
  batched_gemm(backend, qg, Trans::kN, kg, Trans::kT, s.probs, 1.0, 0.0);  // scores = q k^T
  causal_softmax_forward(backend, s.probs, 1.0 / std::sqrt(static_cast<double>(d)), s.probs);
  s.probs_used = s.probs;
  if (ctx.training && dropout_ > 0) {
    s.dropout_rng = RngStream{seed_, rng_stream(RngPurpose::kAttnDropout, static_cast<uint64_t>(ctx.step), layer_)};
    s.dropout_offset = ctx.token_offset / seq * heads_ * seq * seq;  // global sequence index * nh * S * S
    s.probs_used = backend.empty(s.probs.shape(), ft);
    dropout(backend, s.probs, dropout_, s.dropout_rng, s.dropout_offset, s.probs_used);
  }
  Tensor oh = backend.empty({batch, heads_, seq, d}, ft);
  Tensor og = oh.reshape({batch * kv_heads_, group * seq, d});
  batched_gemm(backend, s.probs_used, Trans::kN, vg, Trans::kN, og, 1.0, 0.0);  // o = p v
  s.o = backend.empty({t_count, heads_ * d}, ft);
  merge_heads(backend, oh, seq, heads_, s.o);
  Tensor y = backend.empty({t_count, h}, ft);
  gemm(backend, s.o, Trans::kN, wo_->value, Trans::kT, y, 1.0, 0.0);  // y = o W_o^T
  if (ctx.training) saved_ = std::move(s);
  return y;
}

Tensor Attention::backward(Backend& backend, const Tensor& dy) {
  const Saved& s = saved_;
  const int64_t t_count = dy.dim(0), h = dy.dim(1), seq = s.seq_len, d = head_dim_;
  const int64_t batch = t_count / seq, group = heads_ / kv_heads_;
  const DType ft = dy.dtype();

  gemm(backend, dy, Trans::kT, s.o, Trans::kN, wo_->grad, 1.0, 1.0);  // dW_o (H, nh*d) += dy^T o
  Tensor d_o = backend.empty({t_count, heads_ * d}, ft);
  gemm(backend, dy, Trans::kN, wo_->value, Trans::kN, d_o, 1.0, 0.0);  // do = dy W_o
  Tensor doh = backend.empty({batch, heads_, seq, d}, ft);
  split_heads(backend, d_o, seq, heads_, doh);
  const Tensor dog = doh.reshape({batch * kv_heads_, group * seq, d});
  const Tensor qg = s.q.reshape({batch * kv_heads_, group * seq, d});
  const Tensor kg = s.k.reshape({batch * kv_heads_, seq, d});
  const Tensor vg = s.v.reshape({batch * kv_heads_, seq, d});

  Tensor dp = backend.empty(s.probs.shape(), ft);
  batched_gemm(backend, dog, Trans::kN, vg, Trans::kT, dp, 1.0, 0.0);  // dp = do v^T
  Tensor dvh = backend.empty({batch, kv_heads_, seq, d}, ft);
  Tensor dvg = dvh.reshape({batch * kv_heads_, seq, d});
  batched_gemm(backend, s.probs_used, Trans::kT, dog, Trans::kN, dvg, 1.0, 0.0);  // dv = p^T do (sums the group)
  if (s.probs_used.raw() != s.probs.raw()) dropout(backend, dp, dropout_, s.dropout_rng, s.dropout_offset, dp);
  causal_softmax_backward(backend, dp, s.probs, 1.0 / std::sqrt(static_cast<double>(d)), dp);  // dp -> dscores
  Tensor dqh = backend.empty({batch, heads_, seq, d}, ft);
  Tensor dqg = dqh.reshape({batch * kv_heads_, group * seq, d});
  batched_gemm(backend, dp, Trans::kN, kg, Trans::kN, dqg, 1.0, 0.0);  // dq = ds k
  Tensor dkh = backend.empty({batch, kv_heads_, seq, d}, ft);
  Tensor dkg = dkh.reshape({batch * kv_heads_, seq, d});
  batched_gemm(backend, dp, Trans::kT, qg, Trans::kN, dkg, 1.0, 0.0);  // dk = ds^T q (sums the group)

  Tensor dq = backend.empty({t_count, heads_ * d}, ft), dk = backend.empty({t_count, kv_heads_ * d}, ft);
  Tensor dv = backend.empty({t_count, kv_heads_ * d}, ft);
  merge_heads(backend, dqh, seq, heads_, dq);
  merge_heads(backend, dkh, seq, kv_heads_, dk);
  merge_heads(backend, dvh, seq, kv_heads_, dv);
  rope(backend, dq, cos_, sin_, seq, true, dq);  // the rotation's transpose
  rope(backend, dk, cos_, sin_, seq, true, dk);

  gemm(backend, dq, Trans::kT, s.x, Trans::kN, wq_->grad, 1.0, 1.0);  // dW_q += dq^T x
  gemm(backend, dk, Trans::kT, s.x, Trans::kN, wk_->grad, 1.0, 1.0);
  gemm(backend, dv, Trans::kT, s.x, Trans::kN, wv_->grad, 1.0, 1.0);
  Tensor dx = backend.empty({t_count, h}, ft);
  gemm(backend, dq, Trans::kN, wq_->value, Trans::kN, dx, 1.0, 0.0);  // dx = dq W_q + dk W_k + dv W_v
  gemm(backend, dk, Trans::kN, wk_->value, Trans::kN, dx, 1.0, 1.0);
  gemm(backend, dv, Trans::kN, wv_->value, Trans::kN, dx, 1.0, 1.0);
  saved_ = Saved{};
  return dx;
}

}  // namespace moe
