// MoE layer forward and backward.
#include "model/moe_layer.h"

namespace moe {

MoeLayer::MoeLayer(ParamSet& params, const std::string& prefix, const Config& config, int layer, int ep_size,
                   int ep_rank)
    : router_(params, prefix + ".router", config, layer),
      experts_(params, prefix + ".experts", config, config.moe.num_experts / ep_size, expert_ffn_hidden(config),
               ParamScope::kExpert, /*fused=*/false, int64_t{config.moe.num_experts / ep_size} * ep_rank),
      dispatcher_(config.moe.num_experts, config.model.hidden) {
  if (config.moe.num_shared_experts > 0) {
    shared_ = std::make_unique<FfnExperts>(params, prefix + ".shared", config, config.moe.num_shared_experts,
                                           shared_ffn_hidden(config), ParamScope::kReplicated, /*fused=*/true, 0);
  }
}

Tensor MoeLayer::forward(Backend& backend, ProcessGroups& groups, const Tensor& x, const StepContext& ctx,
                         RouterStats& stats) {
  PhaseTimes scratch;
  PhaseTimes& times = ctx.times ? *ctx.times : scratch;
  PhaseTimer timer;

  const RouteState& route = router_.forward(backend, *groups.world, x, ctx, stats);
  capacity_ = router_.route_args().capacity;
  timer.lap(times.router);

  Tensor expert_in = dispatcher_.dispatch(backend, *groups.ep, x, route, capacity_);
  timer.lap(times.dispatch);

  Tensor expert_out = experts_.forward(backend, expert_in, dispatcher_.expert_rows());
  timer.lap(times.experts);

  Tensor y = backend.zeros(x.shape(), x.dtype());
  dispatcher_.combine(backend, *groups.ep, expert_out, route, y);
  timer.lap(times.combine);

  if (shared_) {
    Tensor s = shared_->forward(backend, x, {x.dim(0)});
    backend.axpy(1.0, s, y);
    timer.lap(times.shared);
  }
  return y;
}

Tensor MoeLayer::backward(Backend& backend, ProcessGroups& groups, const Tensor& dy) {
  Tensor dx = shared_ ? shared_->backward(backend, dy) : backend.zeros(dy.shape(), dy.dtype());

  const RouteArgs& args = router_.route_args();
  Tensor dgate = backend.empty({dy.dim(0), args.top_k}, dy.dtype());
  // route() state lives in the router; the dispatcher reads the rows and gates from it
  const RouteState& route = router_.state();
  Tensor d_out = dispatcher_.combine_backward(backend, *groups.ep, dy, route, dgate);
  Tensor d_in = experts_.backward(backend, d_out);
  dispatcher_.dispatch_backward(backend, *groups.ep, d_in, route, dx);
  router_.backward(backend, dgate, dx);
  return dx;
}

}  // namespace moe
