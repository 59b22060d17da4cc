// The MoE FFN layer: route -> dispatch -> experts -> combine, plus shared experts.
//
//   y = sum_{selected e} g_e * Expert_e(x) + sum_j Shared_j(x)
//
// Routed experts are sharded over the expert-parallel group (this rank holds num_experts / ep of them,
// consecutive); shared experts are replicated and see every local token. Losses (aux, z) are computed
// over the global batch by the router.
#pragma once

#include <memory>
#include <string>

#include "model/dispatcher.h"
#include "model/experts.h"
#include "model/router.h"

namespace moe {

class MoeLayer {
 public:
  // groups: the mesh (world for the router statistics, ep for dispatch). ep_rank picks the expert shard.
  MoeLayer(ParamSet& params, const std::string& prefix, const Config& config, int layer, int ep_size, int ep_rank);

  // x (T, H) -> y (T, H). Books its phases to ctx's timeline; does not wait for the device. Keeps what
  // the backward needs when ctx.training.
  Tensor forward(Backend& backend, ProcessGroups& groups, const Tensor& x, const StepContext& ctx);
  // dy (T, H) -> dx (T, H); accumulates every parameter gradient of the layer.
  Tensor backward(Backend& backend, ProcessGroups& groups, const Tensor& dy);

  // The global routing statistics and losses of the last forward (waits for the device).
  RouterStats read_stats(Backend& backend) { return router_.read_stats(backend); }

  Router& router() { return router_; }
  FfnExperts& experts() { return experts_; }
  FfnExperts* shared() { return shared_.get(); }
  const Dispatcher& dispatcher() const { return dispatcher_; }

 private:
  Router router_;
  FfnExperts experts_;
  std::unique_ptr<FfnExperts> shared_;
  Dispatcher dispatcher_;
  StepContext ctx_;  // of the last forward: where the backward books its side-stream time
};

}  // namespace moe
