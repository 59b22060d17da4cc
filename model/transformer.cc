// Transformer forward/backward.
#include "model/transformer.h"

#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"
#include "runtime/ops/norm_loss.h"
#include "runtime/ops/permute.h"

namespace moe {

ModelSize model_size(const Config& c) {
  const int64_t h = c.model.hidden, v = c.model.vocab_size, d = head_dim(c);
  const int64_t nh = c.model.heads, nkv = kv_heads(c);
  const int64_t ffn_mats = c.moe.expert_type == ExpertType::kSwiGLU ? 3 : 2;
  ModelSize s;
  s.embedding_params = v * h * (c.model.tie_embeddings ? 1 : 2);
  int64_t matmul_active = v * h;  // the head (E itself when tied)
  int64_t total = s.embedding_params + h, active = s.embedding_params + h;  // + final norm
  for (int l = 0; l < c.model.layers; ++l) {
    const int64_t attn = 2 * nh * d * h + 2 * nkv * d * h;
    int64_t ffn_total = 0, ffn_active = 0;
    if (is_moe_layer(c, l)) {
      const int64_t e = c.moe.num_experts, per_expert = ffn_mats * h * expert_ffn_hidden(c);
      const int64_t shared = int64_t{c.moe.num_shared_experts} * ffn_mats * h * shared_ffn_hidden(c);
      ffn_total = e * h + e * per_expert + shared;
      ffn_active = e * h + int64_t{c.moe.top_k} * per_expert + shared;
    } else {
      ffn_total = ffn_active = 3 * h * dense_ffn_hidden(c);
    }
    total += 2 * h + attn + ffn_total;
    active += 2 * h + attn + ffn_active;
    matmul_active += attn + ffn_active;
  }
  s.total_params = total;
  s.active_params = active;
  const double attention = static_cast<double>(c.model.layers) * 4.0 * c.model.seq_len * nh * d;
  s.flops_per_token = 3.0 * (2.0 * static_cast<double>(matmul_active) + attention);
  return s;
}

MemoryEstimate estimate_memory(const Config& c, int world) {
  const double b = static_cast<double>(dtype_size(c.runtime.dtype));
  const double h = c.model.hidden, v = c.model.vocab_size, s = c.model.seq_len, d = head_dim(c);
  const double nh = c.model.heads, nkv = kv_heads(c), ep = c.parallel.ep;
  const double seqs = static_cast<double>(c.train.batch_size / std::max(1, world)), t = seqs * s;
  const ModelSize size = model_size(c);
  const double e = c.moe.num_experts, k = c.moe.top_k, mats = c.moe.expert_type == ExpertType::kSwiGLU ? 3 : 2;
  const double per_expert = mats * h * expert_ffn_hidden(c);
  const double moe_layers = num_moe_layers(c);
  // This rank's parameters: everything but the routed experts, plus its E/ep of them.
  const double local = static_cast<double>(size.total_params) - moe_layers * e * per_expert * (1 - 1 / ep);
  MemoryEstimate m;
  m.parameters = 2 * local * b;
  m.optimizer = c.train.optimizer == OptimizerType::kAdamW ? 2 * local * b : 0;
  // Per layer: the block's four (T, H) tensors, attention's q, k, v, o and its probabilities (twice with
  // dropout), the FFN's mid activations.
  const double attention = t * (2 * nh + 2 * nkv) * d + seqs * nh * s * s * (c.model.attn_dropout > 0 ? 2 : 1);
  const double cf = c.moe.capacity_factor > 0 ? std::max(1.0, c.moe.capacity_factor) : 2.0;  // dropless: a guess
  double layers = 0, exchange = 0;
  for (int l = 0; l < c.model.layers; ++l) {
    layers += 4 * t * h + attention;
    if (is_moe_layer(c, l)) {
      const double rows = k * t * cf;
      layers += 4 * t * e + rows * (h + 3 * expert_ffn_hidden(c)) +
                3 * t * c.moe.num_shared_experts * shared_ffn_hidden(c);
      exchange += 3 * rows * h;
    } else {
      layers += 3 * t * dense_ffn_hidden(c);
    }
  }
  m.activations = (layers + 2 * t * v) * b;
  m.exchange = exchange * b;
  return m;
}

Transformer::Transformer(const Config& config, Backend& backend, ProcessGroups& groups)
    : config_(config), backend_(backend), groups_(groups) {
  const int64_t h = config.model.hidden, v = config.model.vocab_size;
  auto matrix = [&](const std::string& name, Shape shape) {
    Param p;
    p.name = name;
    p.shape = std::move(shape);
    p.init_std = config.model.init_std;
    return params_.add(p);
  };
  auto norm = [&](const std::string& name) {
    Param p;
    p.name = name;
    p.shape = {h};
    p.init = ParamInit::kOnes;
    p.decay = false;
    return params_.add(p);
  };
  embedding_ = matrix("embedding", {v, h});
  for (int l = 0; l < config.model.layers; ++l) {
    const std::string prefix = "layers." + std::to_string(l);
    Block b;
    b.attn_norm = norm(prefix + ".attn_norm");
    b.attention = std::make_unique<Attention>(params_, prefix + ".attn", config, l);
    b.ffn_norm = norm(prefix + ".ffn_norm");
    if (is_moe_layer(config, l)) {
      b.moe = std::make_unique<MoeLayer>(params_, prefix + ".moe", config, l, groups.ep_size(), groups.ep->rank());
    } else {
      b.dense = std::make_unique<FfnExperts>(params_, prefix + ".ffn", config, ExpertType::kSwiGLU, 1,
                                             dense_ffn_hidden(config), ParamScope::kReplicated, /*fused=*/true, 0);
    }
    blocks_.push_back(std::move(b));
  }
  final_norm_ = norm("final_norm");
  if (!config.model.tie_embeddings) head_ = matrix("head", {v, h});
  params_.allocate(backend, config.runtime.dtype, config.train.seed);
}

std::vector<MoeLayer*> Transformer::moe_layers() {
  std::vector<MoeLayer*> out;
  for (Block& b : blocks_)
    if (b.moe) out.push_back(b.moe.get());
  return out;
}

Tensor Transformer::body(const Tensor& inputs, const StepContext& ctx) {
  const int64_t t_count = inputs.numel(), h = config_.model.hidden;
  const DType ft = config_.runtime.dtype;
  const double eps = config_.model.norm_eps;
  Tensor x = backend_.empty({t_count, h}, ft);
  embedding_forward(backend_, inputs, embedding_->value, x);
  ctx.lap(&PhaseTimes::other);
  for (Block& b : blocks_) {
    Block::Saved s;
    s.x = x;
    s.attn_in = backend_.empty({t_count, h}, ft);
    s.rstd1 = backend_.empty({t_count}, ft);
    rmsnorm_forward(backend_, x, b.attn_norm->value, eps, s.attn_in, s.rstd1);
    Tensor a = b.attention->forward(backend_, s.attn_in, ctx);
    s.x_mid = backend_.empty({t_count, h}, ft);
    backend_.copy(x, s.x_mid);
    axpy(backend_, 1.0, a, s.x_mid);
    s.ffn_in = backend_.empty({t_count, h}, ft);
    s.rstd2 = backend_.empty({t_count}, ft);
    rmsnorm_forward(backend_, s.x_mid, b.ffn_norm->value, eps, s.ffn_in, s.rstd2);
    ctx.lap(&PhaseTimes::attention);
    Tensor f;
    if (b.moe) {
      f = b.moe->forward(backend_, groups_, s.ffn_in, ctx);
    } else {
      f = b.dense->forward(backend_, s.ffn_in, {t_count}, ctx.training);
    }
    Tensor next = backend_.empty({t_count, h}, ft);
    backend_.copy(s.x_mid, next);
    axpy(backend_, 1.0, f, next);
    ctx.lap(b.moe ? &PhaseTimes::combine : &PhaseTimes::dense);
    x = next;
    if (ctx.training) b.saved = std::move(s);
  }
  Tensor xf = backend_.empty({t_count, h}, ft), rstd_f = backend_.empty({t_count}, ft);
  rmsnorm_forward(backend_, x, final_norm_->value, eps, xf, rstd_f);
  if (ctx.training) {
    saved_.x_last = x;
    saved_.xf = xf;
    saved_.rstd_f = rstd_f;
  }
  return xf;
}

double Transformer::forward(const Tensor& inputs, const Tensor& targets, const StepContext& ctx, double* vote) {
  const int64_t t_count = inputs.numel(), v = config_.model.vocab_size;
  const DType ft = config_.runtime.dtype;
  MOE_CHECK(ctx.global_tokens > 0 && ctx.seq_len > 0, "forward: global token count or sequence length not set");
  saved_ = Saved{};
  Tensor xf = body(inputs, ctx);
  Tensor logits = backend_.empty({t_count, v}, ft);
  gemm(backend_, xf, Trans::kN, head_weight(), Trans::kT, logits, 1.0, 0.0);  // (T, V)
  const double inv_tokens = 1.0 / static_cast<double>(ctx.global_tokens);
  Tensor dlogits = ctx.training ? backend_.empty({t_count, v}, ft) : Tensor();
  std::vector<double> ce{cross_entropy(backend_, logits, targets, inv_tokens, dlogits), vote ? *vote : 0.0};
  if (groups_.world->size() > 1) groups_.world->all_reduce_sum(ce);
  if (vote) *vote = ce[1];
  ctx.lap(&PhaseTimes::other);
  if (ctx.training) {
    saved_.inputs = inputs;
    saved_.dlogits = dlogits;
    saved_.ctx = ctx;
  }
  return ce[0] * inv_tokens;
}

Tensor Transformer::logits(const Tensor& inputs, const StepContext& ctx) {
  MOE_CHECK(!ctx.training, "logits() is for evaluation");
  Tensor xf = body(inputs, ctx);
  Tensor out = backend_.empty({inputs.numel(), int64_t{config_.model.vocab_size}}, config_.runtime.dtype);
  gemm(backend_, xf, Trans::kN, head_weight(), Trans::kT, out, 1.0, 0.0);
  return out;
}

void Transformer::backward(const std::function<void(const Param*)>& ready) {
  Saved& s = saved_;
  MOE_CHECK(s.dlogits.defined(), "backward() without a training forward()");
  const int64_t t_count = s.inputs.numel(), h = config_.model.hidden;
  const DType ft = config_.runtime.dtype;
  // The head: dW (V, H) += dlogits^T xf (into the embedding's gradient when tied), dxf = dlogits W.
  Param* head = head_ ? head_ : embedding_;
  gemm(backend_, s.dlogits, Trans::kT, s.xf, Trans::kN, head->grad, 1.0, 1.0);
  Tensor dxf = backend_.empty({t_count, h}, ft);
  gemm(backend_, s.dlogits, Trans::kN, head_weight(), Trans::kN, dxf, 1.0, 0.0);
  Tensor dx = backend_.empty({t_count, h}, ft);
  rmsnorm_backward(backend_, dxf, s.x_last, final_norm_->value, s.rstd_f, dx, final_norm_->grad);
  ready(final_norm_);
  for (size_t l = blocks_.size(); l-- > 0;) {
    Block& b = blocks_[l];
    Block::Saved& bs = b.saved;
    // dx is the gradient at the block output: it flows through both residuals unchanged, plus the branches.
    Tensor dffn = b.moe ? b.moe->backward(backend_, groups_, dx) : b.dense->backward(backend_, dx);
    Tensor dbranch = backend_.empty({t_count, h}, ft);
    rmsnorm_backward(backend_, dffn, bs.x_mid, b.ffn_norm->value, bs.rstd2, dbranch, b.ffn_norm->grad);
    axpy(backend_, 1.0, dbranch, dx);  // dx is now the gradient at x_mid
    Tensor dattn = b.attention->backward(backend_, dx);
    rmsnorm_backward(backend_, dattn, bs.x, b.attn_norm->value, bs.rstd1, dbranch, b.attn_norm->grad);
    axpy(backend_, 1.0, dbranch, dx);  // the gradient at the block input
    bs = Block::Saved{};
    ready(b.attn_norm);  // the first parameter of block l
  }
  embedding_backward(backend_, s.inputs, dx, embedding_->grad);
  ready(embedding_);
  s.ctx.lap(&PhaseTimes::backward);
  saved_ = Saved{};
}

StepStats Transformer::read_stats() {
  StepStats stats;
  for (MoeLayer* m : moe_layers()) {
    stats.layers.push_back(m->read_stats(backend_));
    stats.aux_loss += stats.layers.back().aux_loss;
    stats.z_loss += stats.layers.back().z_loss;
  }
  return stats;
}

void Transformer::update_balance_bias(double rate) {
  for (MoeLayer* m : moe_layers()) m->router().update_bias(backend_, rate);
}

}  // namespace moe
