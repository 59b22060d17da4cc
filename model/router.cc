// Router forward/backward and the router losses.
#include "model/router.h"

#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"

#include <cmath>

namespace moe {

Router::Router(ParamSet& params, const std::string& prefix, const Config& config, int layer)
    : moe_(config.moe), layer_(layer), seed_(config.train.seed) {
  Param w;
  w.name = prefix + ".weight";
  w.shape = {config.moe.num_experts, config.model.hidden};
  w.init_std = config.model.init_std;
  weight_ = params.add(w);
  Param b;
  b.name = prefix + ".balance_bias";
  b.shape = {config.moe.num_experts};
  b.init = ParamInit::kZeros;
  b.trainable = false;
  b.decay = false;
  bias_ = params.add(b);
}

const RouteState& Router::forward(Backend& backend, Communicator& world, const Tensor& x, const StepContext& ctx) {
  const int64_t t_count = x.dim(0);
  const int e_count = moe_.num_experts, k = moe_.top_k;
  const DType ft = x.dtype();
  const double t_global = static_cast<double>(ctx.global_tokens);
  MOE_CHECK(ctx.global_tokens > 0, "router: global token count not set");

  const int64_t group_size = ctx.dropless ? 0 : ctx.group_size >= 0 ? ctx.group_size : moe_.group_size;
  const int64_t groups = group_size > 0 ? t_count / group_size : 1;
  MOE_CHECK(groups >= 1 && t_count % groups == 0, "router: ", t_count, " tokens do not split into groups of ",
            group_size);
  RouteArgs args;
  args.num_experts = e_count;
  args.top_k = k;
  args.num_groups = static_cast<int>(groups);
  args.capacity = ctx.dropless ? 0 : moe_capacity(moe_, t_count / groups);
  args.normalize = moe_.normalize_topk;
  bool hard = moe_.router_grad == RouterGrad::kStraightThrough ||
              (moe_.router_grad == RouterGrad::kGumbel && moe_.gumbel_hard);
  args.gate_mode = hard ? GateMode::kHard : GateMode::kSoft;
  args.priority = moe_.priority;
  args.random_routing = moe_.random_routing && ctx.training;
  args.rng = RngStream{seed_, rng_stream(RngPurpose::kRandomRouting, static_cast<uint64_t>(ctx.step), layer_)};
  args.token_offset = ctx.token_offset;
  args.forced = moe_.force_routing;
  args.forced_rng = RngStream{seed_, rng_stream(RngPurpose::kForcedRouting, static_cast<uint64_t>(ctx.step), layer_)};

  Saved s;
  s.token_offset = ctx.token_offset;
  // logits (T, E) = x_in (T, H) W_r^T
  s.jittered = ctx.training && moe_.router_jitter > 0;
  if (s.jittered) {
    s.jitter_rng = RngStream{seed_, rng_stream(RngPurpose::kJitter, static_cast<uint64_t>(ctx.step), layer_)};
    s.x_in = backend.empty(x.shape(), ft);
    jitter(backend, x, moe_.router_jitter, s.jitter_rng, ctx.token_offset, s.x_in);
  } else {
    s.x_in = x;
  }
  s.logits = backend.empty({t_count, e_count}, ft);
  gemm(backend, s.x_in, Trans::kN, weight_->value, Trans::kT, s.logits, 1.0, 0.0);
  s.probs = backend.empty({t_count, e_count}, ft);
  router_probs(backend, moe_.score, s.logits, s.probs);
  if (moe_.router_grad == RouterGrad::kGumbel && ctx.training) {
    s.sel_probs = backend.empty({t_count, e_count}, ft);
    RngStream g{seed_, rng_stream(RngPurpose::kGumbel, static_cast<uint64_t>(ctx.step), layer_)};
    gumbel_probs(backend, s.logits, moe_.gumbel_tau, g, ctx.token_offset, s.sel_probs);
  } else {
    s.sel_probs = s.probs;
  }
  route(backend, args, s.sel_probs, bias_->value, state_);

  // Statistics for the losses and the metrics, summed over the world in one all-reduce. They stay where
  // the backend keeps them: the forward never waits for the device.
  RouterStatsLayout layout{e_count};
  stats_ = backend.empty({layout.size()}, DType::kF64);
  router_stats(backend, state_, s.probs, stats_);
  Tensor z_sum = stats_.rows(layout.z_sum(), layout.z_sum() + 1);
  if (moe_.z_loss_coef > 0) {
    s.dlogits_z = backend.zeros({t_count, e_count}, ft);
    z_loss(backend, s.logits, moe_.z_loss_coef / t_global, s.dlogits_z, z_sum);
  } else {
    backend.fill(z_sum, 0.0);
  }
  if (world.size() > 1) world.all_reduce_sum(stats_);
  global_tokens_ = t_global;
  saved_ = std::move(s);
  return state_;
}

RouterStats Router::read_stats(Backend& backend) {
  const int e_count = moe_.num_experts, k = moe_.top_k;
  RouterStatsLayout layout{e_count};
  std::vector<double> packed = to_doubles(backend, stats_);
  const double t_global = global_tokens_;
  RouterStats stats;
  stats.load.assign(packed.begin() + layout.choices(), packed.begin() + layout.choices() + e_count);
  stats.tokens.assign(packed.begin() + layout.processed(), packed.begin() + layout.processed() + e_count);
  stats.dropped = packed[layout.dropped()];
  stats.assignments = k * t_global;
  stats.z_loss = moe_.z_loss_coef * packed[layout.z_sum()] / t_global;
  for (int e = 0; e < e_count; ++e) {
    double f = packed[layout.choices() + e] / (k * t_global);
    double p = packed[layout.score_sums() + e] / t_global;
    stats.aux_loss += moe_.aux_loss_coef * e_count * f * p;
  }
  last_load_ = stats.load;
  return stats;
}

void Router::backward(Backend& backend, const Tensor& dgate, Tensor& dx) {
  const Saved& s = saved_;
  const int64_t t_count = s.probs.dim(0);
  const int e_count = moe_.num_experts;
  const DType ft = s.probs.dtype();
  Tensor dsel = backend.empty({t_count, e_count}, ft);
  route_backward(backend, s.sel_probs, state_, dgate, dsel);

  Tensor dlogits = backend.empty({t_count, e_count}, ft);
  if (s.dlogits_z.defined()) {
    backend.copy(s.dlogits_z, dlogits);
  } else {
    backend.fill(dlogits, 0.0);
  }
  Tensor dprobs = dsel;
  if (s.sel_probs.raw() != s.probs.raw()) {  // gumbel: selection scores are softmax((u + g) / tau)
    router_probs_backward(backend, ScoreFn::kSoftmax, dsel, s.sel_probs, 1.0 / moe_.gumbel_tau, dlogits);
    dprobs = backend.zeros({t_count, e_count}, ft);
  }
  if (moe_.aux_loss_coef > 0) {
    // d aux / d s_te = alpha * E * f_e / T for every local token t, with f_e = choices_e / (k T)
    const double t_global = global_tokens_;
    RouterStatsLayout layout{e_count};
    add_row_vector(backend, dprobs, stats_.rows(layout.choices(), layout.choices() + e_count),
                   moe_.aux_loss_coef * e_count / (moe_.top_k * t_global * t_global));
  }
  router_probs_backward(backend, moe_.score, dprobs, s.probs, 1.0, dlogits);

  gemm(backend, dlogits, Trans::kT, s.x_in, Trans::kN, weight_->grad, 1.0, 1.0);  // dW_r (E, H) += dlogits^T x_in
  Tensor dx_in = backend.empty({t_count, s.x_in.dim(1)}, ft);
  gemm(backend, dlogits, Trans::kN, weight_->value, Trans::kN, dx_in, 1.0, 0.0);  // (T, H)
  if (s.jittered) jitter(backend, dx_in, moe_.router_jitter, s.jitter_rng, s.token_offset, dx_in);
  axpy(backend, 1.0, dx_in, dx);
  saved_ = Saved{};
}

void Router::update_bias(Backend& backend, double rate) {
  if (rate <= 0 || last_load_.empty()) return;
  const int e_count = moe_.num_experts;
  double mean = 0;
  for (double l : last_load_) mean += l;
  mean /= e_count;
  Tensor host = host_tensor({e_count}, bias_->value.dtype());
  backend.copy_to_host(bias_->value, host.raw());
  for (int e = 0; e < e_count; ++e) {
    double diff = mean - last_load_[e];
    double step = rate * static_cast<double>((diff > 0) - (diff < 0));
    if (host.dtype() == DType::kF64) {
      host.data<double>()[e] += step;
    } else {
      host.data<float>()[e] += static_cast<float>(step);
    }
  }
  backend.copy_from_host(host.raw(), bias_->value);
}

}  // namespace moe
