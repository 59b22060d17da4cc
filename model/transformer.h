// The model: a decoder-only MoE transformer over token ids.
//
//   x_0 = E[ids]                                                   E (V, H) "embedding"
//   per layer l:  x += Attention_l(RMSNorm(x; a_l))                a_l (H) "layers.l.attn_norm"
//                 x += FFN_l(RMSNorm(x; f_l))                      f_l (H) "layers.l.ffn_norm"
//                 FFN_l is an MoE layer (moe.*) or a dense SwiGLU FFN (is_moe_layer())
//   logits = RMSNorm(x; n) W^T                                     n (H) "final_norm"; W (V, H) "head", or
//                                                                  E itself with model.tie_embeddings
//   loss = mean over the global batch of -log softmax(logits)[target] + sum over MoE layers of aux + z
//
// A training step is forward() (the loss; also what evaluation runs, keeping nothing), then backward()
// (gradients, announcing after the head and after each block which parameters are final, so the trainer
// can start reducing them), then the trainer's gradient reduction and optimizer step.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "model/attention.h"
#include "model/moe_layer.h"

namespace moe {

// Global losses and statistics of one forward/backward.
struct StepStats {
  double loss = 0;      // total: ce + aux + z
  double ce_loss = 0;   // mean cross-entropy over the global batch
  double aux_loss = 0;  // summed over MoE layers
  double z_loss = 0;    // summed over MoE layers
  std::vector<RouterStats> layers;  // per MoE layer
};

// Parameter and FLOP counts of a configuration (whatever the number of ranks).
struct ModelSize {
  int64_t total_params = 0;       // every trainable parameter, each routed expert once
  int64_t active_params = 0;      // per token: routed experts counted top_k times per MoE layer
  int64_t embedding_params = 0;   // the token embedding (and the head when untied)
  double flops_per_token = 0;     // training (forward + backward = 3 x forward), see model_size()
};
// Forward FLOPs per token = 2 x (active parameters that enter a matrix product: everything but the
// embedding lookup and the norm weights, the head included, the router included) + the attention
// products 4 x S x nh x d per layer (full square); training is 3 x that.
ModelSize model_size(const Config& config);

// What one rank of a run on world_size ranks holds, in bytes (an estimate from the shapes, before
// anything is allocated): parameters with their gradients, optimizer state, the activations a training
// step keeps for its backward plus the logits, and the token exchange buffers of the MoE layers.
struct MemoryEstimate {
  double parameters = 0;   // values and gradients, replicated tensors and this rank's experts
  double optimizer = 0;    // AdamW moments
  double activations = 0;  // saved for the backward, with the logits and their gradient
  double exchange = 0;     // send/receive rows of the dispatch and combine, and the expert rows
  double total() const { return parameters + optimizer + activations + exchange; }
};
MemoryEstimate estimate_memory(const Config& config, int world_size);

class Transformer {
 public:
  Transformer(const Config& config, Backend& backend, ProcessGroups& groups);

  // inputs, targets (T) I32 on this rank, T = B * ctx.seq_len. Returns the mean cross-entropy over the
  // global batch (ctx.global_tokens, summed over the world). With ctx.training the activations and the
  // logits' gradient are kept for backward(); otherwise nothing is kept (evaluation). *vote, when given,
  // is summed over the world in the same collective as the loss (the trainer's stop request).
  double forward(const Tensor& inputs, const Tensor& targets, const StepContext& ctx, double* vote = nullptr);
  // Gradients of the last forward's loss (cross-entropy + every aux and z loss), accumulated into the
  // parameters' gradient buffers. After the head and after each block, `ready(p)` says that p and
  // every parameter declared after it are final.
  void backward(const std::function<void(const Param*)>& ready);
  // logits (T, V) of inputs (T) (evaluation mode: nothing kept).
  Tensor logits(const Tensor& inputs, const StepContext& ctx);

  // Router statistics and losses of the last forward, per MoE layer (waits for the device).
  StepStats read_stats();
  // Loss-free balancing update of every MoE layer (after the optimizer step).
  void update_balance_bias(double rate);

  ParamSet& params() { return params_; }
  std::vector<MoeLayer*> moe_layers();
  const Config& config() const { return config_; }
  Backend* backend() { return &backend_; }
  ProcessGroups& groups() { return groups_; }

 private:
  struct Block {
    Param* attn_norm;  // (H)
    Param* ffn_norm;   // (H)
    std::unique_ptr<Attention> attention;
    std::unique_ptr<MoeLayer> moe;     // one of moe / dense
    std::unique_ptr<FfnExperts> dense;
    // What the backward needs.
    struct Saved {
      Tensor x;                // (T, H) block input
      Tensor attn_in, rstd1;   // (T, H), (T): RMSNorm(x; a) and its 1/rms
      Tensor x_mid;            // (T, H) x + attention
      Tensor ffn_in, rstd2;    // (T, H), (T)
    } saved;
  };
  // Runs the blocks and the final norm: returns RMSNorm(x_L) (T, H).
  Tensor body(const Tensor& inputs, const StepContext& ctx);
  Tensor head_weight() { return head_ ? head_->value : embedding_->value; }

  Config config_;
  Backend& backend_;
  ProcessGroups& groups_;
  ParamSet params_;
  Param* embedding_;      // (V, H)
  Param* final_norm_;     // (H)
  Param* head_ = nullptr; // (V, H), none when tied
  std::vector<Block> blocks_;
  // What backward() needs from the last forward().
  struct Saved {
    Tensor inputs;        // (T) I32
    Tensor x_last;        // (T, H) output of the last block
    Tensor xf, rstd_f;    // (T, H), (T): the final norm
    Tensor dlogits;       // (T, V) gradient of the mean cross-entropy
    StepContext ctx;
  } saved_;
};

}  // namespace moe
