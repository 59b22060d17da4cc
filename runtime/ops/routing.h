// Routing family: the router's scores, top-k with gates and GShard capacity slots, the router losses'
// statistics and gradients.
//
// Router tensors are (T, E) rows of one token each. Dtypes: CPU F32 or F64, one per call; CUDA: F32 (the
// router always runs in fp32). The contracts are in runtime/ops/routing.cc. Random draws come from counter-based streams indexed by global token, so they do not depend
// on the number of ranks.
#pragma once

#include "runtime/forced_routing.h"
#include "runtime/ops/op.h"
#include "runtime/rng.h"

namespace moe {

// Which values the combine multiplies expert outputs by. kSoft: the (normalised) router scores. kHard: 1
// per selected expert (1/k when normalised), while the backward still differentiates the soft scores:
// the straight-through estimator, and hard Gumbel-softmax.
enum class GateMode : uint8_t { kSoft, kHard };

// Arguments of the routing op (top-k + gates + capacity slots) for one layer and step.
struct RouteArgs {
  int num_experts = 0;
  int top_k = 0;
  int num_groups = 1;         // capacity groups among the local tokens (tokens % num_groups == 0)
  int64_t capacity = 0;       // slots per expert per group; 0: dropless
  bool normalize = true;      // renormalise the selected scores to sum to 1
  GateMode gate_mode = GateMode::kSoft;
  Priority priority = Priority::kToken;
  bool random_routing = false;  // GShard: keep the 2nd choice only if 2*g2/(g1+g2) > U(0,1); needs top_k == 2
  RngStream rng;                // random-routing coins, indexed by global token index
  int64_t token_offset = 0;     // global index of local token 0
  ForcedRouting forced;         // on: the experts are drawn (forced_choice) instead of the top-k
  RngStream forced_rng;         // its draws, indexed by global token * top_k + choice
};

// Outputs of the routing op. T local tokens, k = top_k, E experts, G groups.
// The send buffer is expert-major: expert e owns rows [row_begin(e), row_begin(e+1)); within it, group g
// owns a block whose first fill(e,g) rows are real tokens in slot order. With a capacity, every block
// has `capacity` rows (padding zero); dropless, a block has exactly fill(e,g) rows.
struct RouteState {
  RouteArgs args;       // what produced this state (top_k, capacity, groups, ...)
  Tensor expert_idx;    // (T, k) I32: chosen experts, best first
  Tensor score;         // (T, k): router scores of the chosen experts (before normalisation, no bias)
  Tensor gate;          // (T, k): combine weights used in the forward
  Tensor row_idx;       // (T, k) I32: row in the send buffer, -1 when not sent (capacity drop or random routing)
  Tensor fill;          // (E, G) I32: rows used per (expert, group)
  Tensor choices;       // (E) I32: top-k choices per expert before capacity (for the load-balance loss)
  Tensor counts;        // (2) I32: [assignments dropped because their expert was full, 2nd choices not sent
                        //           because of random routing]
  int64_t num_rows = 0; // rows of the send buffer (host value: E * G * capacity, or, dropless, the sum of
                        // fill, which a device backend reads back: dropless routing synchronises)
  int top_k() const { return args.top_k; }
  int64_t capacity() const { return args.capacity; }
};

// Layout of the router statistics vector (F64) that router_stats() fills and the world sums.
struct RouterStatsLayout {
  int num_experts = 0;
  int64_t choices() const { return 0; }                   // (E) top-k choices per expert
  int64_t score_sums() const { return num_experts; }      // (E) sum over tokens of the router scores
  int64_t processed() const { return 2 * num_experts; }   // (E) assignments kept, over groups
  int64_t dropped() const { return 3 * num_experts; }     // (1) assignments dropped for capacity
  int64_t z_sum() const { return 3 * num_experts + 1; }   // (1) sum over tokens of logsumexp^2
  int64_t size() const { return 3 * num_experts + 2; }
};

// out (T, H) = x * m, m ~ U(1-eps, 1+eps) per element, drawn from rng at (token_offset + t) * H + j.
// Applying it to a gradient gives the jitter's backward; out may be x.
MOE_OP(void, jitter,
       (Backend& b, const Tensor& x, double eps, const RngStream& rng, int64_t token_offset, Tensor& out),
       (b, x, eps, rng, token_offset, out))
// probs (T, E) = softmax or sigmoid of logits, row-wise
MOE_OP(void, router_probs, (Backend& b, ScoreFn fn, const Tensor& logits, Tensor& probs), (b, fn, logits, probs))
// probs (T, E) = softmax((logits + g) / tau), g ~ Gumbel(0,1) from rng at (token_offset + t) * E + e
MOE_OP(void, gumbel_probs,
       (Backend& b, const Tensor& logits, double tau, const RngStream& rng, int64_t token_offset, Tensor& probs),
       (b, logits, tau, rng, token_offset, probs))
// dlogits += scale * J^T dprobs, J the Jacobian of router_probs (softmax or sigmoid)
MOE_OP(void, router_probs_backward,
       (Backend& b, ScoreFn fn, const Tensor& dprobs, const Tensor& probs, double scale, Tensor& dlogits),
       (b, fn, dprobs, probs, scale, dlogits))
// sum (1) F64 = sum_t lse_t^2 (overwritten); adds coef * 2 * lse_t * softmax(logits_t) to dlogits (the
// z-loss gradient).
MOE_OP(void, z_loss, (Backend& b, const Tensor& logits, double coef, Tensor& dlogits, Tensor& sum),
       (b, logits, coef, dlogits, sum))
// Fills stats (RouterStatsLayout, F64) from a route and the scores probs (T, E): every entry but z_sum.
MOE_OP(void, router_stats, (Backend& b, const RouteState& state, const Tensor& probs, Tensor& stats),
       (b, state, probs, stats))
// x[t, :] += scale * v for every row; v (E) F64 has one value per column
MOE_OP(void, add_row_vector, (Backend& b, Tensor& x, const Tensor& v, double scale), (b, x, v, scale))
// Top-k over (sel_probs + bias), gates, random routing and capacity slots; see RouteArgs/RouteState.
// Allocates out's tensors. bias (E), of sel_probs's dtype, may be undefined. Ties go to the lower expert index. With forced
// routing the experts come from forced_choice() (bias unused) and the scores and gates are still the
// router's values at those experts, so the router gets gradients.
MOE_OP(void, route, (Backend& b, const RouteArgs& args, const Tensor& sel_probs, const Tensor& bias, RouteState& out),
       (b, args, sel_probs, bias, out))
// dsel_probs (T, E) = gradient of the soft gates (normalised or not) given dgate (T, k); overwritten.
MOE_OP(void, route_backward,
       (Backend& b, const Tensor& sel_probs, const RouteState& state, const Tensor& dgate, Tensor& dsel_probs),
       (b, sel_probs, state, dgate, dsel_probs))

}  // namespace moe
