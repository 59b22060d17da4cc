#include "perf/cost_model.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "model/transformer.h"
#include "base/error.h"
#include "runtime/forced_routing.h"
#include "base/json.h"
#include "runtime/rng.h"
#include "train/safetensors.h"

namespace moe {

// ---------------------------------------------------------------------------------------------------
// constants

double GemmModel::time(double m, double n, double k) const {
  if (m <= 0 || n <= 0 || k <= 0) return 0.0;
  const double flops = 2.0 * m * n * k;
  const size_t g = dims.size();
  if (g < 2 || seconds.size() != g * g * g) return alpha_s + flops / flops_per_s;
  // Position of x on the grid in log space: cell index i and weight w of dims[i + 1].
  auto locate = [&](double x, size_t* i, double* w) {
    const double c = std::clamp(x, dims.front(), dims.back());
    size_t j = 0;
    while (j + 2 < g && c > dims[j + 1]) ++j;
    *i = j;
    *w = std::log(c / dims[j]) / std::log(dims[j + 1] / dims[j]);
  };
  size_t im, in, ik;
  double wm, wn, wk;
  locate(m, &im, &wm);
  locate(n, &in, &wn);
  locate(k, &ik, &wk);
  double log_t = 0;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b)
      for (int d = 0; d < 2; ++d) {
        const double w = (a ? wm : 1 - wm) * (b ? wn : 1 - wn) * (d ? wk : 1 - wk);
        if (w == 0) continue;
        log_t += w * std::log(seconds[((im + a) * g + in + b) * g + ik + d]);
      }
  // Outside the grid the time scales with the FLOPs beyond its edge (compute-bound above; below the
  // grid a GEMM costs what the smallest measured one does, its overhead).
  const double cm = std::clamp(m, dims.front(), dims.back()), cn = std::clamp(n, dims.front(), dims.back()),
               ck = std::clamp(k, dims.front(), dims.back());
  const double beyond = std::max(1.0, m / cm) * std::max(1.0, n / cn) * std::max(1.0, k / ck);
  return std::exp(log_t) * beyond;
}

const NodeConstants& CostConstants::node(int ranks) const {
  if (nodes.empty()) throw InputError("cost constants", "no calibrated rank count (run launch/moe calibrate)");
  for (const NodeConstants& n : nodes)
    if (n.ranks >= ranks) return n;
  return nodes.back();
}

namespace {

void write_gemm(JsonWriter& j, const std::string& name, const GemmModel& g) {
  j.key(name).begin_object();
  j.field("alpha_s", g.alpha_s).field("flops_per_s", g.flops_per_s);
  if (!g.dims.empty()) j.array("dims", g.dims).array("seconds", g.seconds);
  j.end_object();
}

void write_ab(JsonWriter& j, const std::string& name, const AlphaBeta& ab) {
  j.key(name).begin_object().field("alpha_s", ab.alpha_s).field("bytes_per_s", ab.bytes_per_s).end_object();
}

void write_node(JsonWriter& j, const NodeConstants& n) {
  j.begin_object().field("ranks", n.ranks);
  write_gemm(j, "gemm", n.gemm);
  if (n.gemm_bf16.flops_per_s > 0 || !n.gemm_bf16.dims.empty()) write_gemm(j, "gemm_bf16", n.gemm_bf16);
  j.field("stream_bytes_per_s", n.stream_bytes_per_s).field("softmax_elems_per_s", n.softmax_elems_per_s);
  j.field("swiglu_elems_per_s", n.swiglu_elems_per_s).field("adamw_params_per_s", n.adamw_params_per_s);
  j.field("op_alpha_s", n.op_alpha_s).field("sync_s", n.sync_s).field("step_efficiency", n.step_efficiency);
  write_ab(j, "all_to_all", n.all_to_all);
  write_ab(j, "all_reduce", n.all_reduce);
  j.end_object();
}

// Field readers that name the file and the field when something is missing or not a number.
struct Reader {
  std::string path;
  double num(const YAML::Node& n, const std::string& field, bool required = true) const {
    const YAML::Node v = n[field];
    if (!v) {
      if (required) throw InputError(path, "missing field '" + field + "'");
      return 0.0;
    }
    try {
      return v.as<double>();
    } catch (const YAML::Exception&) {
      throw InputError(path, "field '" + field + "' is not a number");
    }
  }
  std::vector<double> list(const YAML::Node& n, const std::string& field) const {
    std::vector<double> out;
    const YAML::Node v = n[field];
    if (!v) return out;
    if (!v.IsSequence()) throw InputError(path, "field '" + field + "' is not a list");
    for (const YAML::Node& x : v) out.push_back(x.as<double>());
    return out;
  }
  GemmModel gemm(const YAML::Node& n, const std::string& field) const {
    GemmModel g;
    const YAML::Node v = n[field];
    if (!v) return g;
    g.alpha_s = num(v, "alpha_s", false);
    g.flops_per_s = num(v, "flops_per_s", false);
    g.dims = list(v, "dims");
    g.seconds = list(v, "seconds");
    const size_t d = g.dims.size();
    if (d > 0 && g.seconds.size() != d * d * d)
      throw InputError(path, "'" + field + "': " + std::to_string(g.seconds.size()) + " times for a grid of " +
                                 std::to_string(d) + "^3 shapes");
    if (d == 0 && g.flops_per_s <= 0) throw InputError(path, "'" + field + "' has neither a grid nor flops_per_s");
    return g;
  }
  AlphaBeta ab(const YAML::Node& n, const std::string& field, bool required = true) const {
    AlphaBeta a;
    const YAML::Node v = n[field];
    if (!v) {
      if (required) throw InputError(path, "missing field '" + field + "'");
      return a;
    }
    a.alpha_s = num(v, "alpha_s");
    a.bytes_per_s = num(v, "bytes_per_s");
    if (a.bytes_per_s <= 0) throw InputError(path, "'" + field + ".bytes_per_s' must be > 0");
    return a;
  }
};

CostConstants constants_from_json(const std::string& text, const std::string& path) {
  const YAML::Node j = parse_json(text, path);
  const Reader r{path};
  CostConstants c;
  c.device = j["device"] ? j["device"].as<std::string>() : "cpu";
  c.description = j["description"] ? j["description"].as<std::string>() : "";
  c.overlap = j["overlap"] ? j["overlap"].as<bool>() : false;
  c.inter_all_to_all = r.ab(j, "inter_all_to_all", false);
  c.inter_all_reduce = r.ab(j, "inter_all_reduce", false);
  if (!j["nodes"] || !j["nodes"].IsSequence() || j["nodes"].size() == 0)
    throw InputError(path, "no 'nodes' entries (run launch/moe calibrate)");
  for (const YAML::Node& n : j["nodes"]) {
    NodeConstants e;
    e.ranks = static_cast<int>(r.num(n, "ranks"));
    if (e.ranks < 1) throw InputError(path, "a node entry has ranks < 1");
    e.gemm = r.gemm(n, "gemm");
    if (e.gemm.dims.empty() && e.gemm.flops_per_s <= 0) throw InputError(path, "missing field 'gemm'");
    e.gemm_bf16 = r.gemm(n, "gemm_bf16");
    e.stream_bytes_per_s = r.num(n, "stream_bytes_per_s");
    e.softmax_elems_per_s = r.num(n, "softmax_elems_per_s");
    e.swiglu_elems_per_s = r.num(n, "swiglu_elems_per_s");
    e.adamw_params_per_s = r.num(n, "adamw_params_per_s");
    e.op_alpha_s = r.num(n, "op_alpha_s", false);
    e.sync_s = r.num(n, "sync_s", false);
    e.step_efficiency = n["step_efficiency"] ? r.num(n, "step_efficiency") : 1.0;
    if (e.step_efficiency <= 0) throw InputError(path, "step_efficiency must be > 0");
    if (e.stream_bytes_per_s <= 0 || e.softmax_elems_per_s <= 0 || e.swiglu_elems_per_s <= 0 ||
        e.adamw_params_per_s <= 0)
      throw InputError(path, "node entry for " + std::to_string(e.ranks) + " ranks has a rate <= 0");
    e.all_to_all = r.ab(n, "all_to_all");
    e.all_reduce = r.ab(n, "all_reduce");
    c.nodes.push_back(e);
  }
  std::sort(c.nodes.begin(), c.nodes.end(), [](const NodeConstants& a, const NodeConstants& b) { return a.ranks < b.ranks; });
  return c;
}

}  // namespace

std::string constants_to_json(const CostConstants& c) {
  JsonWriter j;
  j.begin_object().field("format", "moe-cost-constants/1").field("device", c.device);
  j.field("description", c.description).field("overlap", c.overlap);
  if (c.inter_all_to_all.bytes_per_s > 0) write_ab(j, "inter_all_to_all", c.inter_all_to_all);
  if (c.inter_all_reduce.bytes_per_s > 0) write_ab(j, "inter_all_reduce", c.inter_all_reduce);
  j.key("nodes").begin_array();
  for (const NodeConstants& n : c.nodes) write_node(j, n);
  j.end_array().end_object();
  return j.str() + "\n";
}

CostConstants median_constants(const std::vector<CostConstants>& runs) {
  if (runs.empty()) throw InputError("median_constants", "no calibration to take the median of");
  auto med = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  CostConstants out = runs.front();
  for (const CostConstants& r : runs)
    if (r.device != out.device) throw InputError("median_constants", "calibrations of different devices");
  for (NodeConstants& e : out.nodes) {
    std::vector<const NodeConstants*> same;
    for (const CostConstants& r : runs)
      for (const NodeConstants& n : r.nodes)
        if (n.ranks == e.ranks) same.push_back(&n);
    auto field = [&](auto member) {
      std::vector<double> v;
      for (const NodeConstants* n : same) v.push_back(member(*n));
      return med(v);
    };
    for (GemmModel NodeConstants::*g : {&NodeConstants::gemm, &NodeConstants::gemm_bf16}) {
      for (size_t i = 0; i < (e.*g).seconds.size(); ++i) {
        std::vector<double> v;
        for (const NodeConstants* n : same) {
          if ((n->*g).dims != (e.*g).dims) throw InputError("median_constants", "calibrations with different GEMM grids");
          v.push_back((n->*g).seconds[i]);
        }
        (e.*g).seconds[i] = med(v);
      }
      (e.*g).alpha_s = field([&](const NodeConstants& n) { return (n.*g).alpha_s; });
      (e.*g).flops_per_s = field([&](const NodeConstants& n) { return (n.*g).flops_per_s; });
    }
    e.stream_bytes_per_s = field([](const NodeConstants& n) { return n.stream_bytes_per_s; });
    e.softmax_elems_per_s = field([](const NodeConstants& n) { return n.softmax_elems_per_s; });
    e.swiglu_elems_per_s = field([](const NodeConstants& n) { return n.swiglu_elems_per_s; });
    e.adamw_params_per_s = field([](const NodeConstants& n) { return n.adamw_params_per_s; });
    e.op_alpha_s = field([](const NodeConstants& n) { return n.op_alpha_s; });
    e.sync_s = field([](const NodeConstants& n) { return n.sync_s; });
    e.step_efficiency = field([](const NodeConstants& n) { return n.step_efficiency; });
    e.all_to_all.alpha_s = field([](const NodeConstants& n) { return n.all_to_all.alpha_s; });
    e.all_to_all.bytes_per_s = field([](const NodeConstants& n) { return n.all_to_all.bytes_per_s; });
    e.all_reduce.alpha_s = field([](const NodeConstants& n) { return n.all_reduce.alpha_s; });
    e.all_reduce.bytes_per_s = field([](const NodeConstants& n) { return n.all_reduce.bytes_per_s; });
  }
  out.description += " (element-wise median of " + std::to_string(runs.size()) + " calibrations)";
  return out;
}

CostConstants read_constants(const std::string& path) {
  return constants_from_json(read_file(path, "cost constants"), path);
}

void merge_constants_file(const std::string& path, const CostConstants& c) {
  CostConstants merged = c;
  if (std::filesystem::exists(path)) {
    CostConstants old = read_constants(path);
    if (old.device == c.device) {
      for (const NodeConstants& n : old.nodes) {
        bool replaced = false;
        for (const NodeConstants& m : c.nodes) replaced = replaced || m.ranks == n.ranks;
        if (!replaced) merged.nodes.push_back(n);
      }
    }
  }
  std::sort(merged.nodes.begin(), merged.nodes.end(),
            [](const NodeConstants& a, const NodeConstants& b) { return a.ranks < b.ranks; });
  write_file_atomic(path, constants_to_json(merged));
}

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

StepPrediction predict_step(const Config& c, const CostConstants& k, const PredictOptions& opt) {
  StepPrediction s;
  s.ranks = opt.ranks;
  s.ep = opt.ep > 0 ? opt.ep : c.parallel.ep;
  if (s.ep < 1 || s.ranks % s.ep != 0)
    throw ConfigError("parallel.ep", "ep " + std::to_string(s.ep) + " does not divide " + std::to_string(s.ranks) + " ranks");
  if (c.moe.num_experts > 0 && c.moe.num_experts % s.ep != 0)
    throw ConfigError("parallel.ep", "ep " + std::to_string(s.ep) + " does not divide moe.num_experts " +
                                         std::to_string(c.moe.num_experts));
  s.dp = s.ranks / s.ep;
  const int rpn = opt.ranks_per_node > 0 ? std::min(opt.ranks_per_node, s.ranks) : s.ranks;
  s.nodes = (s.ranks + rpn - 1) / rpn;
  if (s.nodes > 1 && (k.inter_all_to_all.bytes_per_s <= 0 || k.inter_all_reduce.bytes_per_s <= 0))
    throw InputError("cost constants", "no inter-node constants (inter_all_to_all, inter_all_reduce) for " +
                                           std::to_string(s.nodes) + " nodes");
  const NodeConstants& n = k.node(rpn);
  // How much faster one rank computes alone than with all the node's ranks busy (shared cores, or SMT
  // siblings): a 256^3 GEMM's time with rpn ranks over its time with one, when both were calibrated.
  double share = 1.0;
  if (rpn > 1 && k.nodes.front().ranks == 1 && n.ranks > 1)
    share = std::max(1.0, n.gemm.time(256, 256, 256) / k.nodes.front().gemm.time(256, 256, 256));

  const double seqs = static_cast<double>(c.train.batch_size) / s.ranks;
  const double S = c.model.seq_len, T = seqs * S;
  s.tokens_per_rank = static_cast<int64_t>(T);
  const double h = c.model.hidden, V = c.model.vocab_size, d = head_dim(c), nh = c.model.heads, nkv = kv_heads(c);
  // GEMM models: the experts' (bf16 under runtime.precision bf16) and everything else's (fp32 today);
  // a node without a bf16 model runs bf16 at the fp32 rate.
  const bool has_bf16 = n.gemm_bf16.flops_per_s > 0 || !n.gemm_bf16.dims.empty();
  const GemmModel& bf16 = has_bf16 ? n.gemm_bf16 : n.gemm;
  const GemmModel& gexp = c.runtime.precision == Precision::kBf16 || opt.bf16_everywhere ? bf16 : n.gemm;
  const GemmModel& gdense = opt.bf16_everywhere ? bf16 : n.gemm;
  // exchanged bytes per element: rows travel in bf16 with bf16 experts (model/dispatcher.h)
  const double xbytes = c.runtime.precision == Precision::kBf16 || opt.bf16_everywhere ? 2.0 : 4.0;

  // Compute terms, each scaled by the node's step efficiency.
  const double eff = n.step_efficiency;
  auto gemm = [&](const GemmModel& g, double rows, double cols, double inner) { return eff * g.time(rows, cols, inner); };
  // y (m, out) = x (m, in) W^T: forward y; backward dx = dy W and dW += dy^T x.
  auto linear_f = [&](const GemmModel& g, double m, double out, double in) { return gemm(g, m, out, in); };
  auto linear_b = [&](const GemmModel& g, double m, double out, double in) {
    return gemm(g, m, in, out) + gemm(g, out, in, m);
  };
  auto stream = [&](double bytes, double ops) { return eff * (bytes / n.stream_bytes_per_s + ops * n.op_alpha_s); };
  // softmax and SwiGLU were calibrated forward + backward; kFwd of it is the forward's
  constexpr double kFwd = 0.4, kBwd = 1 - kFwd;
  auto swiglu = [&](double elems) { return eff * (elems / n.swiglu_elems_per_s + 2 * n.op_alpha_s); };
  auto softmax = [&](double elems) { return eff * (elems / n.softmax_elems_per_s + 2 * n.op_alpha_s); };
  // A collective over `g` ranks of which `local` share a node (all_to_all: each rank's buffer; all_reduce:
  // the reduced buffer): within a node at the node's rate, across nodes at the inter-node rate.
  auto a2a = [&](double bytes, int g) {
    if (g <= 1 || bytes <= 0) return 0.0;
    const int local = std::min(g, rpn);
    const double intra = bytes * (local - 1) / g, inter = bytes * (g - local) / g;
    double t = n.all_to_all.seconds(intra);
    if (inter > 0) t = std::max(t, k.inter_all_to_all.seconds(inter));
    return t;
  };
  auto all_reduce = [&](double bytes, int g) {
    if (g <= 1 || bytes <= 0) return 0.0;
    const double bus = 2.0 * bytes * (g - 1) / g;
    const double t = g <= rpn ? n.all_reduce.seconds(bus) : k.inter_all_reduce.seconds(bus);
    s.comm_s += t;
    return t;
  };
  // a point where every rank of a group of g waits for the others
  auto sync = [&](int g) {
    const double t = g > 1 ? n.sync_s : 0.0;
    s.comm_s += t;
    return t;
  };

  PhaseTimes& ph = s.phases;
  const double mats = c.moe.expert_type == ExpertType::kSwiGLU ? 3 : 2;
  double hidden_shared = 0, backward_compute = 0;
  double max_rows_total = 0, mean_rows_total = 0, kept = 0;
  int moe_layers = 0;
  // the routing's own choice probabilities (drawn once: forced routing samples 20,000 tokens)
  const std::vector<double> routing =
      c.moe.num_experts > 0 && opt.observed_load.empty() ? expert_choice_probability(c) : std::vector<double>{};
  for (int l = 0; l < c.model.layers; ++l) {
    // attention: projections, rope, heads split and merged, scores, softmax, p v; two norms and residuals
    const double bh = seqs * nh, qd = nh * d, kvd = nkv * d;
    double fwd = linear_f(gdense, T, qd, h) + 2 * linear_f(gdense, T, kvd, h) + linear_f(gdense, T, h, qd);
    double bwd = linear_b(gdense, T, qd, h) + 2 * linear_b(gdense, T, kvd, h) + linear_b(gdense, T, h, qd);
    fwd += bh * (gemm(gdense, S, S, d) + gemm(gdense, S, d, S));
    bwd += bh * (gemm(gdense, S, S, d) + 3 * gemm(gdense, S, d, S));
    const double score_elems = bh * S * S;
    const double sm = softmax(score_elems);
    fwd += kFwd * sm;
    bwd += kBwd * sm;
    const double copies = 8 * T * (2 * (qd + kvd) + (qd + 2 * kvd) + qd);  // rope, split, merge
    fwd += stream(copies / 2, 6);
    bwd += stream(copies / 2, 6);
    const double norm_res = 8 * T * h * 5;  // two norms and two residual adds per direction
    fwd += stream(norm_res, 4);
    bwd += stream(norm_res * 1.5, 4);
    ph.attention += fwd;
    backward_compute += bwd;

    if (!is_moe_layer(c, l)) {
      const double f = dense_ffn_hidden(c);
      ph.dense += 2 * linear_f(gdense, T, f, h) + linear_f(gdense, T, h, f) + kFwd * swiglu(T * f);
      backward_compute += 2 * linear_b(gdense, T, f, h) + linear_b(gdense, T, h, f) + kBwd * swiglu(T * f);
      continue;
    }
    ++moe_layers;
    const double e_count = c.moe.num_experts, topk = c.moe.top_k, local = e_count / s.ep;
    // router: logits GEMM, scores, top-k and capacity slots, the statistics' all-reduce over the world
    ph.router += linear_f(gdense, T, e_count, h) + softmax(T * e_count) + stream(16 * T * e_count, 4) +
                    all_reduce(8 * (2 * e_count + 4), s.ranks) + sync(s.ranks);
    backward_compute += linear_b(gdense, T, e_count, h) + stream(16 * T * e_count, 2);
    LayerLoad load;
    if (opt.observed_load.empty()) {
      load = layer_load(c, routing, static_cast<int64_t>(T), s.ep, s.ranks);
    } else {  // the mean over the observed steps of each step's expected rows
      const auto& samples = opt.observed_load[static_cast<size_t>(moe_layers - 1) % opt.observed_load.size()];
      for (const std::vector<double>& share : samples) {
        const LayerLoad one = layer_load(c, expert_choice_probability(c, share), static_cast<int64_t>(T), s.ep, s.ranks);
        load.mean_rows += one.mean_rows / samples.size();
        load.max_rows += one.max_rows / samples.size();
        load.kept_frac += (one.kept_frac - 1) / samples.size();
      }
    }
    max_rows_total += load.max_rows;
    mean_rows_total += load.mean_rows;
    kept += load.kept_frac;
    const double f = expert_ffn_hidden(c);
    // exchange buffer per rank: what it sends (its kept choices) or receives (its experts' rows)
    const double sent = T * topk * load.kept_frac;
    double buffer_rows = std::max(sent, load.max_rows);
    if (dispatch_layout(c) == DispatchLayout::kPadded && c.moe.capacity_factor > 0) {
      const int64_t group = c.moe.group_size > 0 ? c.moe.group_size : static_cast<int64_t>(T);
      buffer_rows = e_count * std::max(1.0, T / group) * moe_capacity(c.moe, group);  // padded slots
    }
    const double exchange =
        a2a(buffer_rows * h * xbytes, s.ep) + (s.ep > 1 ? n.all_to_all.alpha_s + n.sync_s : 0);  // + the counts
    s.comm_s += 4 * exchange;  // dispatch and combine, forward and backward
    const double perm = stream(8 * T * topk * h, 1);
    ph.dispatch += perm;
    ph.exchange += 2 * exchange;
    ph.combine += perm;
    // the experts of a rank with `rows` rows, forward and backward
    auto experts = [&](double rows, double* fwd_s, double* bwd_s) {
      const double per_expert = rows / local;
      *fwd_s = kFwd * swiglu(rows * f);
      *bwd_s = kBwd * swiglu(rows * f);
      if (per_expert <= 0) return;
      *fwd_s += local * ((mats - 1) * linear_f(gexp, per_expert, f, h) + linear_f(gexp, per_expert, h, f));
      *bwd_s += local * ((mats - 1) * linear_b(gexp, per_expert, f, h) + linear_b(gexp, per_expert, h, f));
    };
    double expert_f = 0, expert_b = 0, mean_f = 0, mean_b = 0;
    experts(load.max_rows, &expert_f, &expert_b);
    experts(load.mean_rows, &mean_f, &mean_b);
    // While the other ranks wait, the most loaded rank computes up to `share` times faster than the
    // all-busy rates say (it gets the core time of the ranks waiting beside it).
    expert_f = std::max(mean_f, expert_f / share);
    expert_b = std::max(mean_b, expert_b / share);
    ph.experts += expert_f;
    backward_compute += expert_b + 2 * perm + 2 * exchange;
    if (c.moe.num_shared_experts > 0) {
      const double fs = shared_ffn_hidden(c), ns = c.moe.num_shared_experts;
      const double sf = ns * ((mats - 1) * linear_f(gexp, T, fs, h) + linear_f(gexp, T, h, fs)) + kFwd * swiglu(ns * T * fs);
      const double sb = ns * ((mats - 1) * linear_b(gexp, T, fs, h) + linear_b(gexp, T, h, fs)) + kBwd * swiglu(ns * T * fs);
      ph.shared += sf;
      backward_compute += sb;
      if (k.overlap) hidden_shared += std::min(sf, 2 * exchange) + std::min(sb, 2 * exchange);
    }
  }
  // embedding, head and loss (forward in "other", as the metrics book them), the loss's all-reduce
  ph.other += linear_f(gdense, T, V, h) + softmax(T * V) * 0.5 + stream(8 * T * h, 2) + all_reduce(16, s.ranks) +
                 sync(s.ranks);
  backward_compute += linear_b(gdense, T, V, h) + softmax(T * V) * 0.5 + stream(8 * T * h, 2);

  // gradients: replicated ones over the world, the expert shards over the dp group, in 16 MiB buckets
  const ModelSize size = model_size(c);
  const double mats_e = mats * h * (c.moe.num_experts > 0 ? expert_ffn_hidden(c) : 0);
  const double expert_params = static_cast<double>(num_moe_layers(c)) * c.moe.num_experts * mats_e;
  const double replicated = static_cast<double>(size.total_params) - expert_params;
  const double local_expert = expert_params / s.ep;
  const double bucket = 16.0 * (1 << 20);
  auto bucketed = [&](double bytes, int g) {
    double t = 0;
    for (double left = bytes; left > 0; left -= bucket) t += all_reduce(std::min(left, bucket), g);
    return t;
  };
  const double comm_before = s.comm_s;
  const double grad_sum = bucketed(4 * replicated, s.ranks) + (s.dp > 1 ? bucketed(4 * local_expert, s.dp) : 0.0);
  const double buckets = std::ceil(4 * replicated / bucket) + (s.dp > 1 ? std::ceil(4 * local_expert / bucket) : 0.0);
  double hidden_ar = 0;
  if (k.overlap && buckets > 1) hidden_ar = std::min(grad_sum * (1 - 1 / buckets), backward_compute);
  ph.backward = backward_compute;
  ph.allreduce = grad_sum - hidden_ar;
  s.comm_s = comm_before + grad_sum - hidden_ar;
  ph.allreduce += sync(s.ranks);  // the wait for the last bucket
  // optimizer: zero the gradients, clip (a sum of squares), AdamW over this rank's parameters
  const double params = replicated + local_expert;
  ph.optimizer = eff * params / n.adamw_params_per_s + stream(8 * params, 4) + all_reduce(8, s.ranks) + sync(s.ranks);

  // overlapped time is not in its phase (as the metrics book it) but in hidden_s
  s.hidden_s = hidden_shared + hidden_ar;
  ph.shared = std::max(0.0, ph.shared - hidden_shared);
  s.step_s = ph.total();
  s.tokens_per_s = s.step_s > 0 ? T * s.ranks / s.step_s : 0.0;
  s.imbalance = mean_rows_total > 0 ? max_rows_total / mean_rows_total : 1.0;
  s.dropped_frac = moe_layers > 0 ? 1.0 - kept / moe_layers : 0.0;
  return s;
}

}  // namespace moe
