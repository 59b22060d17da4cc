// The step-time model: routing's expected loads and one training step's time, phase by phase.
#include "perf/cost_model.h"

#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "model/transformer.h"
#include "runtime/forced_routing.h"
#include "runtime/rng.h"

namespace moe {

// ---------------------------------------------------------------------------------------------------
// routing

std::vector<double> expert_choice_probability(const Config& c, const std::vector<double>& observed, int samples) {
  const int e_count = c.moe.num_experts, k = c.moe.top_k;
  std::vector<double> p(static_cast<size_t>(e_count), static_cast<double>(k) / e_count);
  if (!observed.empty()) {
    if (static_cast<int>(observed.size()) != e_count)
      throw InputError("observed load", std::to_string(observed.size()) + " experts, the configuration has " +
                                            std::to_string(e_count), "moe.num_experts");
    double total = 0;
    for (double x : observed) total += std::max(0.0, x);
    if (total <= 0) return p;
    for (int e = 0; e < e_count; ++e) p[e] = std::min(1.0, k * std::max(0.0, observed[e]) / total);
    return p;
  }
  if (!c.moe.force_routing.on()) return p;
  std::fill(p.begin(), p.end(), 0.0);
  const RngStream rng{c.train.seed, rng_stream(RngPurpose::kForcedRouting, 0, 0)};
  std::vector<int> idx(static_cast<size_t>(k));
  for (int t = 0; t < samples; ++t) {
    forced_choice(c.moe.force_routing, e_count, k, rng, static_cast<uint64_t>(t), idx.data());
    for (int j = 0; j < k; ++j) p[idx[j]] += 1.0 / samples;
  }
  return p;
}

KeptRows kept_rows(int64_t n, double p, int64_t capacity) {
  KeptRows r;
  const double nd = static_cast<double>(n);
  if (capacity <= 0 || capacity >= n) {
    r.mean = nd * p;
    r.variance = nd * p * (1 - p);
    return r;
  }
  // E[min(X, C)] and E[min(X, C)^2] from the binomial pmf, in log space for large n.
  double m1 = 0, m2 = 0, tail = 1;  // tail: P(X >= C) after the loop
  if (p <= 0) return r;
  if (p >= 1) {
    r.mean = static_cast<double>(capacity);
    return r;
  }
  const double lp = std::log(p), lq = std::log1p(-p);
  for (int64_t x = 0; x < capacity; ++x) {
    const double xd = static_cast<double>(x);
    const double lpmf = std::lgamma(nd + 1) - std::lgamma(xd + 1) - std::lgamma(nd - xd + 1) + xd * lp + (nd - xd) * lq;
    const double pmf = std::exp(lpmf);
    m1 += xd * pmf;
    m2 += xd * xd * pmf;
    tail -= pmf;
  }
  tail = std::max(0.0, tail);
  const double cd = static_cast<double>(capacity);
  r.mean = m1 + cd * tail;
  r.variance = std::max(0.0, m2 + cd * cd * tail - r.mean * r.mean);
  return r;
}

// ---------------------------------------------------------------------------------------------------
// the step

namespace {

// Rows each rank's experts process in one MoE layer: the mean over ranks and the expected maximum.
struct LayerLoad {
  double mean_rows = 0, max_rows = 0, kept_frac = 1;
};

LayerLoad layer_load(const Config& c, const std::vector<double>& p, int64_t tokens, int ep, int ranks) {
  const int e_count = c.moe.num_experts, local = e_count / ep;
  const int64_t group = c.moe.group_size > 0 && c.moe.capacity_factor > 0 ? c.moe.group_size : tokens;
  const int64_t groups = std::max<int64_t>(1, tokens / group);
  const int64_t cap = moe_capacity(c.moe, group);
  LayerLoad out;
  double kept = 0, max_mu = 0, max_sd = 0, total = 0;
  for (int r = 0; r < ep; ++r) {
    double mu = 0, var = 0;
    for (int e = r * local; e < (r + 1) * local; ++e) {
      const KeptRows k = kept_rows(group, p[e], cap);
      // ep source ranks send their groups to this rank's experts
      mu += static_cast<double>(ep * groups) * k.mean;
      var += static_cast<double>(ep * groups) * k.variance;
      kept += static_cast<double>(groups) * k.mean;
    }
    total += mu;
    max_mu = std::max(max_mu, mu);
    max_sd = std::max(max_sd, std::sqrt(var));
  }
  out.mean_rows = total / ep;
  // Expected maximum over the ranks: the most loaded rank's mean plus the spread of the largest of
  // `ranks` draws (sqrt(2 ln n) standard deviations, the Gaussian extreme-value scale).
  out.max_rows = max_mu + (ranks > 1 ? std::sqrt(2.0 * std::log(static_cast<double>(ranks))) * max_sd : 0.0);
  out.kept_frac = tokens > 0 ? kept / (static_cast<double>(tokens) * c.moe.top_k) : 1.0;
  return out;
}

}  // namespace

namespace {

// One step's prediction, built phase by phase: the terms every phase uses (the node's rates scaled by its
// step efficiency, the collectives within and across nodes), and one method per phase of kPhases. The
// backward of every layer is accumulated while its forward is booked, and booked last.
class StepModel {
 public:
  StepModel(const Config& c, const CostConstants& k, const PredictOptions& opt, StepPrediction& s);

  void attention();                        // one attention sublayer: attention, and its backward
  void dense_ffn();                        // one dense FFN sublayer: dense, and its backward
  void moe_layer(const LayerLoad& load);   // router, dispatch, exchange, experts, combine, shared
  void head_and_loss();                    // other: embedding, head, loss and its all-reduce
  void gradient_sums();                    // backward, and allreduce: the buckets not hidden behind it
  void optimizer();                        // optimizer: zeroing, clipping's norm, AdamW
  void finish();                           // hidden time out of the phases, the totals

  double tokens() const { return T_; }
  double moe_rows_max = 0, moe_rows_mean = 0, kept = 0;  // summed over the MoE layers
  int moe_layers = 0;

 private:
  double gemm(const GemmModel& g, double rows, double cols, double inner) const { return eff_ * g.time(rows, cols, inner); }
  // y (m, out) = x (m, in) W^T: forward y; backward dx = dy W and dW += dy^T x.
  double linear_f(const GemmModel& g, double m, double out, double in) const { return gemm(g, m, out, in); }
  double linear_b(const GemmModel& g, double m, double out, double in) const {
    return gemm(g, m, in, out) + gemm(g, out, in, m);
  }
  double stream(double bytes, double ops) const { return eff_ * (bytes / n_.stream_bytes_per_s + ops * n_.op_alpha_s); }
  double swiglu(double elems) const { return eff_ * (elems / n_.swiglu_elems_per_s + 2 * n_.op_alpha_s); }
  double softmax(double elems) const { return eff_ * (elems / n_.softmax_elems_per_s + 2 * n_.op_alpha_s); }
  double a2a(double bytes, int g) const;
  double all_reduce(double bytes, int g);
  double sync(int g);
  double bucketed(double bytes, int g);

  // softmax and SwiGLU were calibrated forward + backward; kFwd of it is the forward's
  static constexpr double kFwd = 0.4, kBwd = 1 - kFwd;

  const Config& c_;
  const CostConstants& k_;
  StepPrediction& s_;
  PhaseTimes& ph_;
  int rpn_ = 1;
  const NodeConstants& n_;
  double share_ = 1.0, eff_ = 1.0;
  double seqs_ = 0, S_ = 0, T_ = 0, h_ = 0, V_ = 0, d_ = 0, nh_ = 0, nkv_ = 0, xbytes_ = 4;
  const GemmModel* gexp_ = nullptr;    // the experts' GEMMs (bf16 under runtime.precision bf16)
  const GemmModel* gdense_ = nullptr;  // everything else's
  double mats_ = 3;                    // weight matrices per expert FFN
  double backward_ = 0, hidden_shared_ = 0, hidden_ar_ = 0;
  double params_ = 0;  // this rank's parameters (the optimizer's)
};

int ranks_per_node(const PredictOptions& opt) {
  return opt.ranks_per_node > 0 ? std::min(opt.ranks_per_node, opt.ranks) : opt.ranks;
}

StepModel::StepModel(const Config& c, const CostConstants& k, const PredictOptions& opt, StepPrediction& s)
    : c_(c), k_(k), s_(s), ph_(s.phases), rpn_(ranks_per_node(opt)), n_(k.node(rpn_)) {
  // How much faster one rank computes alone than with all the node's ranks busy (shared cores, or SMT
  // siblings): a 256^3 GEMM's time with rpn ranks over its time with one, when both were calibrated.
  if (rpn_ > 1 && k.nodes.front().ranks == 1 && n_.ranks > 1)
    share_ = std::max(1.0, n_.gemm.time(256, 256, 256) / k.nodes.front().gemm.time(256, 256, 256));
  seqs_ = static_cast<double>(c.train.batch_size) / s.ranks;
  S_ = c.model.seq_len;
  T_ = seqs_ * S_;
  h_ = c.model.hidden, V_ = c.model.vocab_size, d_ = head_dim(c), nh_ = c.model.heads, nkv_ = kv_heads(c);
  // GEMM models: the experts' (bf16 under runtime.precision bf16) and everything else's (fp32 today);
  // a node without a bf16 model runs bf16 at the fp32 rate.
  const bool has_bf16 = n_.gemm_bf16.flops_per_s > 0 || !n_.gemm_bf16.dims.empty();
  const GemmModel& bf16 = has_bf16 ? n_.gemm_bf16 : n_.gemm;
  gexp_ = c.runtime.precision == Precision::kBf16 || opt.bf16_everywhere ? &bf16 : &n_.gemm;
  gdense_ = opt.bf16_everywhere ? &bf16 : &n_.gemm;
  // exchanged bytes per element: rows travel in bf16 with bf16 experts (model/dispatcher.h)
  xbytes_ = c.runtime.precision == Precision::kBf16 || opt.bf16_everywhere ? 2.0 : 4.0;
  eff_ = n_.step_efficiency;
  mats_ = c.moe.expert_type == ExpertType::kSwiGLU ? 3 : 2;
}

// A collective over `g` ranks of which `local` share a node (all_to_all: each rank's buffer; all_reduce:
// the reduced buffer): within a node at the node's rate, across nodes at the inter-node rate.
double StepModel::a2a(double bytes, int g) const {
  if (g <= 1 || bytes <= 0) return 0.0;
  const int local = std::min(g, rpn_);
  const double intra = bytes * (local - 1) / g, inter = bytes * (g - local) / g;
  double t = n_.all_to_all.seconds(intra);
  if (inter > 0) t = std::max(t, k_.inter_all_to_all.seconds(inter));
  return t;
}

double StepModel::all_reduce(double bytes, int g) {
  if (g <= 1 || bytes <= 0) return 0.0;
  const double bus = 2.0 * bytes * (g - 1) / g;
  const double t = g <= rpn_ ? n_.all_reduce.seconds(bus) : k_.inter_all_reduce.seconds(bus);
  s_.comm_s += t;
  return t;
}

// a point where every rank of a group of g waits for the others
double StepModel::sync(int g) {
  const double t = g > 1 ? n_.sync_s : 0.0;
  s_.comm_s += t;
  return t;
}

double StepModel::bucketed(double bytes, int g) {
  const double bucket = 16.0 * (1 << 20);
  double t = 0;
  for (double left = bytes; left > 0; left -= bucket) t += all_reduce(std::min(left, bucket), g);
  return t;
}

// projections, rope, heads split and merged, scores, softmax, p v; two norms and residuals
void StepModel::attention() {
  const GemmModel& g = *gdense_;
  const double bh = seqs_ * nh_, qd = nh_ * d_, kvd = nkv_ * d_;
  double fwd = linear_f(g, T_, qd, h_) + 2 * linear_f(g, T_, kvd, h_) + linear_f(g, T_, h_, qd);
  double bwd = linear_b(g, T_, qd, h_) + 2 * linear_b(g, T_, kvd, h_) + linear_b(g, T_, h_, qd);
  fwd += bh * (gemm(g, S_, S_, d_) + gemm(g, S_, d_, S_));
  bwd += bh * (gemm(g, S_, S_, d_) + 3 * gemm(g, S_, d_, S_));
  const double sm = softmax(bh * S_ * S_);
  fwd += kFwd * sm;
  bwd += kBwd * sm;
  const double copies = 8 * T_ * (2 * (qd + kvd) + (qd + 2 * kvd) + qd);  // rope, split, merge
  fwd += stream(copies / 2, 6);
  bwd += stream(copies / 2, 6);
  const double norm_res = 8 * T_ * h_ * 5;  // two norms and two residual adds per direction
  fwd += stream(norm_res, 4);
  bwd += stream(norm_res * 1.5, 4);
  ph_.attention += fwd;
  backward_ += bwd;
}

void StepModel::dense_ffn() {
  const GemmModel& g = *gdense_;
  const double f = dense_ffn_hidden(c_);
  ph_.dense += 2 * linear_f(g, T_, f, h_) + linear_f(g, T_, h_, f) + kFwd * swiglu(T_ * f);
  backward_ += 2 * linear_b(g, T_, f, h_) + linear_b(g, T_, h_, f) + kBwd * swiglu(T_ * f);
}

void StepModel::moe_layer(const LayerLoad& load) {
  const GemmModel &gd = *gdense_, &ge = *gexp_;
  ++moe_layers;
  const double e_count = c_.moe.num_experts, topk = c_.moe.top_k, local = e_count / s_.ep;
  // router: logits GEMM, scores, top-k and capacity slots, the statistics' all-reduce over the world
  ph_.router += linear_f(gd, T_, e_count, h_) + softmax(T_ * e_count) + stream(16 * T_ * e_count, 4) +
                all_reduce(8 * (2 * e_count + 4), s_.ranks) + sync(s_.ranks);
  backward_ += linear_b(gd, T_, e_count, h_) + stream(16 * T_ * e_count, 2);
  moe_rows_max += load.max_rows;
  moe_rows_mean += load.mean_rows;
  kept += load.kept_frac;
  const double f = expert_ffn_hidden(c_);
  // exchange buffer per rank: what it sends (its kept choices) or receives (its experts' rows)
  const double buffer_rows = expert_buffer_rows(c_, static_cast<int64_t>(T_), load.max_rows, T_ * topk * load.kept_frac);
  const double exchange =
      a2a(buffer_rows * h_ * xbytes_, s_.ep) + (s_.ep > 1 ? n_.all_to_all.alpha_s + n_.sync_s : 0);  // + the counts
  s_.comm_s += 4 * exchange;  // dispatch and combine, forward and backward
  const double perm = stream(8 * T_ * topk * h_, 1);
  ph_.dispatch += perm;
  ph_.exchange += 2 * exchange;
  ph_.combine += perm;
  // the experts of a rank with `rows` rows, forward and backward
  auto experts = [&](double rows, double* fwd_s, double* bwd_s) {
    const double per_expert = rows / local;
    *fwd_s = kFwd * swiglu(rows * f);
    *bwd_s = kBwd * swiglu(rows * f);
    if (per_expert <= 0) return;
    *fwd_s += local * ((mats_ - 1) * linear_f(ge, per_expert, f, h_) + linear_f(ge, per_expert, h_, f));
    *bwd_s += local * ((mats_ - 1) * linear_b(ge, per_expert, f, h_) + linear_b(ge, per_expert, h_, f));
  };
  double expert_f = 0, expert_b = 0, mean_f = 0, mean_b = 0;
  experts(load.max_rows, &expert_f, &expert_b);
  experts(load.mean_rows, &mean_f, &mean_b);
  // While the other ranks wait, the most loaded rank computes up to `share` times faster than the
  // all-busy rates say (it gets the core time of the ranks waiting beside it).
  expert_f = std::max(mean_f, expert_f / share_);
  expert_b = std::max(mean_b, expert_b / share_);
  ph_.experts += expert_f;
  backward_ += expert_b + 2 * perm + 2 * exchange;
  if (c_.moe.num_shared_experts > 0) {
    const double fs = shared_ffn_hidden(c_), ns = c_.moe.num_shared_experts;
    const double sf = ns * ((mats_ - 1) * linear_f(ge, T_, fs, h_) + linear_f(ge, T_, h_, fs)) + kFwd * swiglu(ns * T_ * fs);
    const double sb = ns * ((mats_ - 1) * linear_b(ge, T_, fs, h_) + linear_b(ge, T_, h_, fs)) + kBwd * swiglu(ns * T_ * fs);
    ph_.shared += sf;
    backward_ += sb;
    if (k_.overlap) hidden_shared_ += std::min(sf, 2 * exchange) + std::min(sb, 2 * exchange);
  }
}

// embedding, head and loss (forward in "other", as the metrics book them), the loss's all-reduce
void StepModel::head_and_loss() {
  const GemmModel& g = *gdense_;
  ph_.other += linear_f(g, T_, V_, h_) + softmax(T_ * V_) * 0.5 + stream(8 * T_ * h_, 2) + all_reduce(16, s_.ranks) +
               sync(s_.ranks);
  backward_ += linear_b(g, T_, V_, h_) + softmax(T_ * V_) * 0.5 + stream(8 * T_ * h_, 2);
}

// gradients: replicated ones over the world, the expert shards over the dp group, in 16 MiB buckets
void StepModel::gradient_sums() {
  const ModelSize size = model_size(c_);
  const double mats_e = mats_ * h_ * (c_.moe.num_experts > 0 ? expert_ffn_hidden(c_) : 0);
  const double expert_params = static_cast<double>(num_moe_layers(c_)) * c_.moe.num_experts * mats_e;
  const double replicated = static_cast<double>(size.total_params) - expert_params;
  const double local_expert = expert_params / s_.ep;
  const double bucket = 16.0 * (1 << 20);
  const double comm_before = s_.comm_s;
  const double grad_sum = bucketed(4 * replicated, s_.ranks) + (s_.dp > 1 ? bucketed(4 * local_expert, s_.dp) : 0.0);
  const double buckets = std::ceil(4 * replicated / bucket) + (s_.dp > 1 ? std::ceil(4 * local_expert / bucket) : 0.0);
  if (k_.overlap && buckets > 1) hidden_ar_ = std::min(grad_sum * (1 - 1 / buckets), backward_);
  ph_.backward = backward_;
  ph_.allreduce = grad_sum - hidden_ar_;
  s_.comm_s = comm_before + grad_sum - hidden_ar_;
  ph_.allreduce += sync(s_.ranks);  // the wait for the last bucket
  params_ = replicated + local_expert;
}

// zero the gradients, clip (a sum of squares), AdamW over this rank's parameters
void StepModel::optimizer() {
  ph_.optimizer =
      eff_ * params_ / n_.adamw_params_per_s + stream(8 * params_, 4) + all_reduce(8, s_.ranks) + sync(s_.ranks);
}

// overlapped time is not in its phase (as the metrics book it) but in hidden_s
void StepModel::finish() {
  s_.hidden_s = hidden_shared_ + hidden_ar_;
  ph_.shared = std::max(0.0, ph_.shared - hidden_shared_);
  s_.step_s = ph_.total();
  s_.tokens_per_s = s_.step_s > 0 ? T_ * s_.ranks / s_.step_s : 0.0;
  s_.imbalance = moe_rows_mean > 0 ? moe_rows_max / moe_rows_mean : 1.0;
  s_.dropped_frac = moe_layers > 0 ? 1.0 - kept / moe_layers : 0.0;
}

// The layout of the step: checks, ranks per node, nodes.
void check_layout(const Config& c, const CostConstants& k, const PredictOptions& opt, StepPrediction& s) {
  s.ranks = opt.ranks;
  s.ep = opt.ep > 0 ? opt.ep : c.parallel.ep;
  if (s.ep < 1 || s.ranks % s.ep != 0)
    throw ConfigError("parallel.ep", "ep " + std::to_string(s.ep) + " does not divide " + std::to_string(s.ranks) + " ranks");
  if (c.moe.num_experts > 0 && c.moe.num_experts % s.ep != 0)
    throw ConfigError("parallel.ep", "ep " + std::to_string(s.ep) + " does not divide moe.num_experts " +
                                         std::to_string(c.moe.num_experts));
  s.dp = s.ranks / s.ep;
  const int rpn = ranks_per_node(opt);
  s.nodes = (s.ranks + rpn - 1) / rpn;
  if (s.nodes > 1 && (k.inter_all_to_all.bytes_per_s <= 0 || k.inter_all_reduce.bytes_per_s <= 0))
    throw InputError("cost constants", "no inter-node constants (inter_all_to_all, inter_all_reduce) for " +
                                           std::to_string(s.nodes) + " nodes");
}

// The expected rows of MoE layer `moe_index`: from the routing's own distribution, or the mean over the
// observed steps of each step's expected rows.
LayerLoad expected_load(const Config& c, const PredictOptions& opt, const StepPrediction& s, double tokens,
                        const std::vector<double>& routing, int moe_index) {
  if (opt.observed_load.empty()) return layer_load(c, routing, static_cast<int64_t>(tokens), s.ep, s.ranks);
  LayerLoad load;
  const auto& samples = opt.observed_load[static_cast<size_t>(moe_index) % opt.observed_load.size()];
  for (const std::vector<double>& share : samples) {
    const LayerLoad one = layer_load(c, expert_choice_probability(c, share), static_cast<int64_t>(tokens), s.ep, s.ranks);
    load.mean_rows += one.mean_rows / samples.size();
    load.max_rows += one.max_rows / samples.size();
    load.kept_frac += (one.kept_frac - 1) / samples.size();
  }
  return load;
}

}  // namespace

double expert_buffer_rows(const Config& c, int64_t tokens, double max_rows, double sent_rows) {
  if (dispatch_layout(c) == DispatchLayout::kPadded && c.moe.capacity_factor > 0) {
    const int64_t group = c.moe.group_size > 0 ? c.moe.group_size : tokens;
    // every slot of every (expert, group) travels, padding included
    return static_cast<double>(c.moe.num_experts) * std::max(1.0, static_cast<double>(tokens) / group) *
           static_cast<double>(moe_capacity(c.moe, group));
  }
  return std::max(sent_rows, max_rows);
}

StepPrediction predict_step(const Config& c, const CostConstants& k, const PredictOptions& opt) {
  StepPrediction s;
  check_layout(c, k, opt, s);
  StepModel m(c, k, opt, s);
  s.tokens_per_rank = static_cast<int64_t>(m.tokens());
  // the routing's own choice probabilities (drawn once: forced routing samples 20,000 tokens)
  const std::vector<double> routing =
      c.moe.num_experts > 0 && opt.observed_load.empty() ? expert_choice_probability(c) : std::vector<double>{};
  for (int l = 0; l < c.model.layers; ++l) {
    m.attention();
    if (is_moe_layer(c, l)) m.moe_layer(expected_load(c, opt, s, m.tokens(), routing, m.moe_layers));
    else m.dense_ffn();
  }
  m.head_and_loss();
  m.gradient_sums();
  m.optimizer();
  m.finish();
  return s;
}

}  // namespace moe
