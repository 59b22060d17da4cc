// Contracts of the routing family (runtime/ops/routing.h), run before either device's implementation.
#include "runtime/ops/routing.h"

#include "runtime/ops/contract.h"

namespace moe {
namespace {

constexpr FloatRule kRouter = FloatRule::kF32OnCuda;  // the router runs in fp32 on CUDA

void check_rows(const Tensor& t, const char* what) { MOE_CHECK(t.rank() == 2, what, " must be (T, E): ", t.str()); }

}  // namespace

void check_jitter(Backend& b, const Tensor& x, double eps, const RngStream& rng, int64_t token_offset, Tensor& out) {
  check_rows(x, "jitter x");
  check_shape(out, x.shape(), "jitter out");
  check_floats(b, "jitter", {{x, "x", kRouter}, {out, "out", kRouter}});
}

void check_router_probs(Backend& b, ScoreFn fn, const Tensor& logits, Tensor& probs) {
  check_rows(logits, "router_probs logits");
  check_shape(probs, logits.shape(), "router_probs probs");
  check_floats(b, "router_probs", {{logits, "logits", kRouter}, {probs, "probs", kRouter}});
}

void check_gumbel_probs(Backend& b, const Tensor& logits, double tau, const RngStream& rng, int64_t token_offset,
                        Tensor& probs) {
  check_rows(logits, "gumbel_probs logits");
  check_shape(probs, logits.shape(), "gumbel_probs probs");
  check_floats(b, "gumbel_probs", {{logits, "logits", kRouter}, {probs, "probs", kRouter}});
}

void check_router_probs_backward(Backend& b, ScoreFn fn, const Tensor& dprobs, const Tensor& probs, double scale,
                                 Tensor& dlogits) {
  check_rows(probs, "router_probs_backward probs");
  check_shape(dprobs, probs.shape(), "router_probs_backward dprobs");
  check_shape(dlogits, probs.shape(), "router_probs_backward dlogits");
  check_floats(b, "router_probs_backward",
               {{dprobs, "dprobs", kRouter}, {probs, "probs", kRouter}, {dlogits, "dlogits", kRouter}});
}

void check_z_loss(Backend& b, const Tensor& logits, double coef, Tensor& dlogits, Tensor& sum) {
  check_rows(logits, "z_loss logits");
  check_shape(dlogits, logits.shape(), "z_loss dlogits");
  check_shape(sum, {1}, "z_loss sum");
  check_dtype("z_loss", sum, DType::kF64, "sum");
  check_floats(b, "z_loss", {{logits, "logits", kRouter}, {dlogits, "dlogits", kRouter}});
}

void check_router_stats(Backend& b, const RouteState& state, const Tensor& probs, Tensor& stats) {
  check_rows(probs, "router_stats probs");
  const int64_t e = probs.dim(1);
  MOE_CHECK(stats.numel() == RouterStatsLayout{static_cast<int>(e)}.size(), "router_stats: stats ", stats.str(),
            " for ", e, " experts");
  check_dtype("router_stats", stats, DType::kF64, "stats");
  check_shape(state.choices, {e}, "router_stats state.choices");
  MOE_CHECK(state.fill.rank() == 2 && state.fill.dim(0) == e, "router_stats: state.fill ", state.fill.str(), " for ",
            e, " experts");
  check_shape(state.counts, {2}, "router_stats state.counts");
  check_dtype("router_stats", state.choices, DType::kI32, "state.choices");
  check_dtype("router_stats", state.fill, DType::kI32, "state.fill");
  check_dtype("router_stats", state.counts, DType::kI32, "state.counts");
  check_floats(b, "router_stats", {{probs, "probs", kRouter}});
}

void check_add_row_vector(Backend& b, Tensor& x, const Tensor& v, double scale) {
  check_rows(x, "add_row_vector x");
  MOE_CHECK(v.numel() == x.dim(1), "add_row_vector: ", v.str(), " for ", x.str());
  check_dtype("add_row_vector", v, DType::kF64, "v");
  check_floats(b, "add_row_vector", {{x, "x", kRouter}});
}

void check_route(Backend& b, const RouteArgs& args, const Tensor& sel_probs, const Tensor& bias, RouteState& out) {
  check_rows(sel_probs, "route sel_probs");
  const int64_t t_count = sel_probs.dim(0);
  const int e_count = args.num_experts, k = args.top_k, g_count = args.num_groups;
  MOE_CHECK(sel_probs.dim(1) == e_count, "route: probs ", sel_probs.str(), " for ", e_count, " experts");
  MOE_CHECK(k >= 1 && k <= e_count, "route: top_k ", k, " of ", e_count, " experts");
  MOE_CHECK(g_count >= 1 && t_count % g_count == 0, "route: ", t_count, " tokens in ", g_count, " groups");
  MOE_CHECK(!args.random_routing || k == 2, "route: random routing needs top_k == 2");
  if (bias.defined()) check_shape(bias, {e_count}, "route bias");
  check_floats(b, "route", {{sel_probs, "sel_probs", kRouter}, {bias, "bias", kRouter, Presence::kOptional}});
}

void check_route_backward(Backend& b, const Tensor& sel_probs, const RouteState& state, const Tensor& dgate,
                          Tensor& dsel_probs) {
  check_rows(sel_probs, "route_backward sel_probs");
  const int64_t t_count = sel_probs.dim(0);
  MOE_CHECK(sel_probs.dim(1) == state.args.num_experts, "route_backward: probs ", sel_probs.str(), " for ",
            state.args.num_experts, " experts");
  check_shape(dsel_probs, sel_probs.shape(), "route_backward dsel_probs");
  check_shape(dgate, {t_count, state.top_k()}, "route_backward dgate");
  check_shape(state.expert_idx, {t_count, state.top_k()}, "route_backward state.expert_idx");
  check_shape(state.score, {t_count, state.top_k()}, "route_backward state.score");
  check_dtype("route_backward", state.expert_idx, DType::kI32, "state.expert_idx");
  check_floats(b, "route_backward",
               {{sel_probs, "sel_probs", kRouter}, {state.score, "state.score", kRouter}, {dgate, "dgate", kRouter},
                {dsel_probs, "dsel_probs", kRouter}});
}

}  // namespace moe
