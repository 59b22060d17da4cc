// AdamW / SGD updates and the learning-rate schedule.
#include "train/optimizer.h"

#include "runtime/ops/elementwise.h"
#include "runtime/ops/optimizer.h"

#include <cmath>

namespace moe {

double learning_rate(const TrainConfig& c, int64_t step) {
  if (c.warmup_steps > 0 && step < c.warmup_steps) {
    return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  }
  int64_t decay_steps = std::max<int64_t>(1, c.steps - c.warmup_steps);
  double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / static_cast<double>(decay_steps));
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(M_PI * progress));
}

Optimizer::Optimizer(const TrainConfig& config, Backend& backend, ParamSet& params)
    : config_(config), backend_(backend), set_(params), params_(params.trainable()) {
  if (config_.optimizer == OptimizerType::kAdamW) {
    for (Param* p : params_) {
      m_.push_back(backend.zeros(p->shape, p->value.dtype()));
      v_.push_back(backend.zeros(p->shape, p->value.dtype()));
    }
  }
}

void Optimizer::step(double lr) {
  ++steps_;
  set_.values_changed();
  for (size_t i = 0; i < params_.size(); ++i) {
    Param* p = params_[i];
    double wd = p->decay ? config_.weight_decay : 0.0;
    Tensor* shadow = p->shadow.defined() ? &p->shadow : nullptr;
    if (config_.optimizer == OptimizerType::kAdamW) {
      AdamArgs a;
      a.lr = lr;
      a.beta1 = config_.beta1;
      a.beta2 = config_.beta2;
      a.eps = config_.eps;
      a.weight_decay = wd;
      a.step = steps_;
      adamw_step(backend_, p->value, p->grad, m_[i], v_[i], a, shadow);
    } else {
      sgd_step(backend_, p->value, p->grad, lr, wd, shadow);
    }
    if (shadow) p->shadow_version = set_.version();
  }
}

std::vector<Optimizer::State> Optimizer::state() {
  std::vector<State> out;
  for (size_t i = 0; i < m_.size(); ++i) out.push_back(State{params_[i], &m_[i], &v_[i]});
  return out;
}

double clip_gradients(ParamSet& params, Backend& backend, double norm, double max_norm) {
  if (max_norm <= 0 || !(norm > max_norm)) return 1.0;
  double factor = max_norm / norm;
  for (ParamScope s : {ParamScope::kReplicated, ParamScope::kExpert}) {
    Tensor& g = params.grads(s);
    if (g.numel()) scale(backend, g, factor);
  }
  return factor;
}

}  // namespace moe
