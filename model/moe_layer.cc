// MoE layer forward and backward.
#include "model/moe_layer.h"

#include "runtime/ops/elementwise.h"

namespace moe {

MoeLayer::MoeLayer(ParamSet& params, const std::string& prefix, const Config& config, int layer, int ep_size,
                   int ep_rank)
    : router_(params, prefix + ".router", config, layer),
      experts_(params, prefix + ".experts", config, config.moe.expert_type, config.moe.num_experts / ep_size,
               expert_ffn_hidden(config), ParamScope::kExpert, /*fused=*/false,
               int64_t{config.moe.num_experts / ep_size} * ep_rank),
      dispatcher_(config.moe.num_experts, config.model.hidden, dispatch_layout(config),
                  /*bf16_rows=*/config.runtime.precision == Precision::kBf16) {
  if (config.moe.num_shared_experts > 0) {
    shared_ = std::make_unique<FfnExperts>(params, prefix + ".shared", config, config.moe.expert_type,
                                           config.moe.num_shared_experts, shared_ffn_hidden(config),
                                           ParamScope::kReplicated, /*fused=*/true, 0);
  }
}

Tensor MoeLayer::forward(Backend& backend, ProcessGroups& groups, const Tensor& x, const StepContext& ctx) {
  ctx_ = ctx;
  const RouteState& route = router_.forward(backend, *groups.world, x, ctx);
  ctx.lap(&PhaseTimes::router);

  // Shared experts need no communication: on a device they run on the side stream while the tokens
  // travel to the routed experts and back.
  Tensor shared_y;
  int side = -1;
  if (shared_) {
    side = side_begin(backend, ctx, &PhaseTimes::shared);
    shared_y = shared_->forward(backend, x, {x.dim(0)}, ctx.training);
    side_end(backend, ctx, side);
  }

  // The dispatcher's steps, each booked on its own: plan and permutation, the exchange, the experts, the
  // exchange back, the gate-weighted sum.
  dispatcher_.plan(backend, *groups.ep, route);
  Tensor send = dispatcher_.permute(backend, x, route);
  ctx.lap(&PhaseTimes::dispatch);
  Tensor expert_in = dispatcher_.exchange(backend, *groups.ep, send, Exchange::kToExperts);
  ctx.lap(&PhaseTimes::exchange);

  Tensor expert_out = experts_.forward(backend, expert_in, dispatcher_.expert_rows(), ctx.training);
  ctx.lap(&PhaseTimes::experts);

  Tensor returned = dispatcher_.exchange(backend, *groups.ep, expert_out, Exchange::kFromExperts);
  ctx.lap(&PhaseTimes::exchange);
  Tensor y = backend.empty(x.shape(), x.dtype());
  dispatcher_.unpermute(backend, returned, route, y);
  ctx.lap(&PhaseTimes::combine);

  if (shared_) {
    side_join(backend, ctx, side);
    axpy(backend, 1.0, shared_y, y);
    ctx.lap(&PhaseTimes::shared);
  }
  if (!ctx.training) router_.release();
  return y;
}

Tensor MoeLayer::backward(Backend& backend, ProcessGroups& groups, const Tensor& dy) {
  // The shared experts' backward runs beside the routed path's exchanges; its dx seeds the sum.
  Tensor dx;
  int side = -1;
  if (shared_) {
    side = side_begin(backend, ctx_, &PhaseTimes::backward);
    dx = shared_->backward(backend, dy);
    side_end(backend, ctx_, side);
  }

  const RouteState& route = router_.state();
  Tensor dgate = backend.empty({dy.dim(0), route.top_k()}, dy.dtype());
  Tensor d_out = dispatcher_.combine_backward(backend, *groups.ep, dy, route, dgate);
  Tensor d_in = experts_.backward(backend, d_out);
  if (shared_) {
    side_join(backend, ctx_, side);
  } else {
    dx = backend.zeros(dy.shape(), dy.dtype());
  }
  dispatcher_.dispatch_backward(backend, *groups.ep, d_in, route, dx);
  router_.backward(backend, dgate, dx);
  return dx;
}

}  // namespace moe
