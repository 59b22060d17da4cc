// The model: byte embedding -> L x [RMSNorm -> MoE FFN -> residual] -> RMSNorm -> LM head.
//
// Each block is pre-norm residual: x = x + moe(norm(x)). Attention, when it comes, is a second sublayer
// in front of the MoE one, x = x + attn(norm_attn(x)), with its own slot in Block; nothing else moves.
// The loss is the mean next-token cross-entropy over the global batch plus every layer's aux and z
// losses. forward_backward also reduces the gradients over the ranks that share each parameter, in
// buckets that start while the backward is still running (GradReducer).
#pragma once

#include <memory>
#include <vector>

#include "model/moe_layer.h"

namespace moe {

// Global losses and statistics of one forward/backward.
struct StepStats {
  double loss = 0;      // total: ce + aux + z
  double ce_loss = 0;   // mean cross-entropy over the global batch
  double aux_loss = 0;  // summed over layers
  double z_loss = 0;    // summed over layers
  std::vector<RouterStats> layers;
};

class Transformer {
 public:
  Transformer(const Config& config, Backend& backend, ProcessGroups& groups);

  // inputs, targets (T) I32 on this rank. Runs forward and backward, accumulating gradients, and sums
  // them over the ranks (replicated: world; experts: dp group).
  StepStats forward_backward(const Tensor& inputs, const Tensor& targets, const StepContext& ctx);

  // Device seconds of the last step's gradient sums (valid after the device is synchronised).
  double take_gradient_sum_seconds() { return reducer_->take_sum_seconds(); }

  // Loss-free balancing update of every layer (after the optimizer step).
  void update_balance_bias(double rate);

  ParamSet& params() { return params_; }
  std::vector<std::unique_ptr<MoeLayer>>& layers() { return moe_; }
  const Config& config() const { return config_; }
  Backend* backend() { return &backend_; }

 private:
  struct Block {
    Param* norm;  // (H) RMSNorm before the MoE FFN
    // saved by forward
    Tensor x, normed, rstd;
  };

  Config config_;
  Backend& backend_;
  ProcessGroups& groups_;
  ParamSet params_;
  Param* embedding_;   // (V, H)
  Param* final_norm_;  // (H)
  Param* head_;        // (V, H)
  std::vector<Block> blocks_;
  std::vector<std::unique_ptr<MoeLayer>> moe_;
  std::unique_ptr<GradReducer> reducer_;
};

// Bytes per gradient bucket: large enough to reach NCCL's bandwidth, small enough that the first
// buckets start early in the backward.
constexpr size_t kGradBucketBytes = size_t{16} << 20;

}  // namespace moe
