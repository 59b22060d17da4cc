// The router of one MoE layer: logits, scores, top-k with capacity slots, and the router losses.
//
//   u = W_r x (fp32)             logits (T, E); x jittered by U(1-eps, 1+eps) in training when enabled
//   s = softmax(u) | sigmoid(u)  scores (T, E)
//   selection scores: s, or softmax((u + gumbel) / tau) with router_grad = gumbel
//   route: top-k over selection + bias, gates, random routing, GShard capacity (the `route` op)
//   aux  = alpha * E * sum_i f_i P_i,  f_i = choices_i / (k T), P_i = sum_t s_ti / T   (global T)
//   z    = beta / T * sum_t logsumexp(u_t)^2
//
// Load statistics are summed over every rank in one all-reduce before the losses are formed, so the
// losses and their gradients are those of the global batch.
#pragma once

#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/context.h"
#include "model/params.h"
#include "config/config.h"
#include "runtime/ops/routing.h"

namespace moe {

// Global routing statistics of one layer and step.
struct RouterStats {
  double aux_loss = 0;
  double z_loss = 0;
  std::vector<double> load;    // (E) top-k choices per expert before capacity, summed over ranks
  std::vector<double> tokens;  // (E) assignments each expert processed, summed over ranks
  double dropped = 0;          // assignments dropped for capacity, summed over ranks
  double assignments = 0;      // k * global tokens
};

class Router {
 public:
  Router(ParamSet& params, const std::string& prefix, const Config& config, int layer);

  // Routes x (T, H). The returned state (top_k and capacity in its args) describes the send buffer of the
  // dispatcher and stays valid until the next forward. Does not wait for the device (except dropless
  // routing, whose row count the host needs). ctx.dropless routes without capacity, in one group.
  const RouteState& forward(Backend& backend, Communicator& world, const Tensor& x, const StepContext& ctx);
  // The global statistics and losses of the last forward (waits for the device).
  RouterStats read_stats(Backend& backend);
  // dgate (T, k): gradient of the gate values. Adds the router's input gradient to dx (T, H) and
  // accumulates dW_r. Includes the aux and z-loss gradients. Releases the saved activations.
  void backward(Backend& backend, const Tensor& dgate, Tensor& dx);
  // Drops what the backward would need (evaluation).
  void release() { saved_ = Saved{}; }

  // Loss-free balancing: b_i += rate * sign(mean load - load_i) with the global loads of the last
  // read_stats().
  void update_bias(Backend& backend, double rate);

  const RouteState& state() const { return state_; }
  Param* weight() { return weight_; }
  Param* balance_bias() { return bias_; }

 private:
  MoeConfig moe_;
  int layer_;
  uint64_t seed_;
  Param* weight_;  // (E, H) W_r
  Param* bias_;    // (E) loss-free balancing bias ("balance_bias"): added to the scores for selection only
  RouteState state_;  // of the last forward
  Tensor stats_;      // (RouterStatsLayout) F64 of the last forward, summed over the world
  double global_tokens_ = 0;
  std::vector<double> last_load_;
  // What the backward needs.
  struct Saved {
    Tensor x_in;       // (T, H) router input (jittered in training when enabled)
    Tensor logits;     // (T, E) u = x_in W_r^T
    Tensor probs;      // (T, E) s = softmax(u) or sigmoid(u)
    Tensor sel_probs;  // (T, E) selection scores (probs, or the Gumbel softmax)
    Tensor dlogits_z;  // (T, E) z-loss gradient, or undefined
    int64_t token_offset = 0;
    RngStream jitter_rng;
    bool jittered = false;
  } saved_;
};

}  // namespace moe
