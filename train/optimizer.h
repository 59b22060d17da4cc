// Optimizers (AdamW with decoupled weight decay, SGD), the learning-rate schedule, gradient clipping.
#pragma once

#include <string>
#include <vector>

#include "model/params.h"
#include "config/config.h"

namespace moe {

// Linear warm-up to train.lr over warmup_steps, then cosine decay to train.min_lr at train.steps.
// `step` is 0-based.
double learning_rate(const TrainConfig& config, int64_t step);

class Optimizer {
 public:
  Optimizer(const TrainConfig& config, Backend& backend, ParamSet& params);

  // One update of every trainable parameter with the (already reduced and clipped) gradients; BF16
  // shadows are written in the same pass (ParamSet::bf16_value).
  void step(double lr);

  int64_t steps_taken() const { return steps_; }
  void set_steps_taken(int64_t n) { steps_ = n; }
  // Named state tensors for checkpoints: "optim.m.<param>", "optim.v.<param>" (AdamW only).
  struct State {
    Param* param;
    Tensor* m;
    Tensor* v;
  };
  std::vector<State> state();

 private:
  TrainConfig config_;
  Backend& backend_;
  ParamSet& set_;
  std::vector<Param*> params_;
  std::vector<Tensor> m_, v_;
  int64_t steps_ = 0;
};

// Scales every gradient by max_norm / norm when norm > max_norm > 0. Returns the factor applied.
double clip_gradients(ParamSet& params, Backend& backend, double norm, double max_norm);

}  // namespace moe
