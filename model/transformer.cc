// Transformer forward/backward over byte tokens.
#include "model/transformer.h"

#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"
#include "runtime/ops/norm_loss.h"
#include "runtime/ops/permute.h"

namespace moe {

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
    std::string prefix = "layers." + std::to_string(l);
    blocks_.push_back(Block{norm(prefix + ".moe_norm"), {}, {}, {}});
    moe_.push_back(std::make_unique<MoeLayer>(params_, prefix + ".moe", config, l, groups.ep_size(),
                                              groups.ep->rank()));
  }
  final_norm_ = norm("final_norm");
  head_ = matrix("head", {v, h});
  params_.allocate(backend, config.runtime.dtype, config.train.seed);
  reducer_ = std::make_unique<GradReducer>(params_, groups, kGradBucketBytes);
}

StepStats Transformer::forward_backward(const Tensor& inputs, const Tensor& targets, const StepContext& ctx) {
  const int64_t t_count = inputs.numel(), h = config_.model.hidden, v = config_.model.vocab_size;
  const DType ft = config_.runtime.dtype;
  const double eps = config_.model.norm_eps;
  StepStats stats;
  stats.layers.resize(blocks_.size());

  // ---- forward
  Tensor x = backend_.empty({t_count, h}, ft);
  embedding_forward(backend_, inputs, embedding_->value, x);
  for (size_t l = 0; l < blocks_.size(); ++l) {
    Block& b = blocks_[l];
    b.x = x;
    b.normed = backend_.empty({t_count, h}, ft);
    b.rstd = backend_.empty({t_count}, ft);
    rmsnorm_forward(backend_, x, b.norm->value, eps, b.normed, b.rstd);
    ctx.lap(&PhaseTimes::other);
    Tensor y = moe_[l]->forward(backend_, groups_, b.normed, ctx);
    Tensor next = backend_.empty({t_count, h}, ft);
    backend_.copy(x, next);
    axpy(backend_, 1.0, y, next);
    x = next;
  }
  Tensor xf = backend_.empty({t_count, h}, ft), rstd_f = backend_.empty({t_count}, ft);
  rmsnorm_forward(backend_, x, final_norm_->value, eps, xf, rstd_f);
  Tensor logits = backend_.empty({t_count, v}, ft);
  gemm(backend_, xf, Trans::kN, head_->value, Trans::kT, logits, 1.0, 0.0);  // (T, V)
  Tensor dlogits = backend_.empty({t_count, v}, ft);
  const double inv_tokens = 1.0 / static_cast<double>(ctx.global_tokens);
  double ce_sum = cross_entropy(backend_, logits, targets, inv_tokens, dlogits);
  std::vector<double> ce{ce_sum};
  if (groups_.world->size() > 1) groups_.world->all_reduce_sum(ce);
  stats.ce_loss = ce[0] * inv_tokens;
  ctx.lap(&PhaseTimes::other);

  // ---- backward
  gemm(backend_, dlogits, Trans::kT, xf, Trans::kN, head_->grad, 1.0, 1.0);  // dW_head (V, H) += dlogits^T xf
  Tensor dxf = backend_.empty({t_count, h}, ft);
  gemm(backend_, dlogits, Trans::kN, head_->value, Trans::kN, dxf, 1.0, 0.0);
  Tensor dx = backend_.empty({t_count, h}, ft);
  rmsnorm_backward(backend_, dxf, x, final_norm_->value, rstd_f, dx, final_norm_->grad);
  reducer_->ready_from(final_norm_);
  for (size_t l = blocks_.size(); l-- > 0;) {
    Block& b = blocks_[l];
    Tensor dnormed = moe_[l]->backward(backend_, groups_, dx);
    Tensor dxb = backend_.empty({t_count, h}, ft);
    rmsnorm_backward(backend_, dnormed, b.x, b.norm->value, b.rstd, dxb, b.norm->grad);
    axpy(backend_, 1.0, dxb, dx);  // residual: dx flows through unchanged, plus the branch
    b = Block{b.norm, {}, {}, {}};
    reducer_->ready_from(b.norm);  // the first parameter of block l
  }
  embedding_backward(backend_, inputs, dx, embedding_->grad);
  ctx.lap(&PhaseTimes::backward);
  reducer_->finish();
  ctx.lap(&PhaseTimes::allreduce);

  // Statistics and losses: read back once the step's work is issued.
  for (size_t l = 0; l < moe_.size(); ++l) {
    stats.layers[l] = moe_[l]->read_stats(backend_);
    stats.aux_loss += stats.layers[l].aux_loss;
    stats.z_loss += stats.layers[l].z_loss;
  }
  stats.loss = stats.ce_loss + stats.aux_loss + stats.z_loss;
  ctx.lap(&PhaseTimes::other);
  return stats;
}

void Transformer::update_balance_bias(double rate) {
  for (auto& layer : moe_) layer->router().update_bias(backend_, rate);
}

}  // namespace moe
