// MoE layer benchmark, nccl-tests style: one row per shape, median of timed repetitions after warm-up,
// derived rates beside the times, and a correctness column (#wrong: sampled tokens whose output differs
// from a direct per-token evaluation of the layer formula). Exit code 1 when any row is wrong.
//
// Expert GFLOP/s counts the useful FLOPs of the expert FFNs (assignments actually processed, plus the
// shared experts on every token), forward and backward, over the whole layer's forward+backward time.
// The dense rate is the BLAS running the same GEMMs (same shapes and FLOPs, one group) in the same run,
// through the GEMM timer (runtime/gemm_timer.h); both rates are the slowest rank's.
//
// a2a(ms) is the forward exchanges inside the layer (to the experts and back: the timeline's `exchange`
// phase, waiting for peers included), raw(ms) two all_to_alls of the ep group moving the same bytes per
// rank (the mean over ranks of what the dispatch put on the wire), timed alone in the same run: the gap
// between them is what arriving at the exchange at different times costs.
#include "perf/layer_bench.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "model/moe_layer.h"
#include "perf/collectives.h"
#include "runtime/cpu/blas.h"
#include "runtime/gemm_timer.h"

namespace moe {
namespace {

// Keys shown in every row; other swept keys get a column of their own.
const std::vector<std::string> kShownKeys = {"runtime.precision", "model.seq_len", "model.hidden", "moe.num_experts",
                                             "moe.top_k", "moe.num_shared_experts"};

Tensor random_tensor(Backend& backend, const Shape& shape, DType dtype, uint64_t stream, int64_t offset) {
  return normal_tensor(backend, shape, dtype, RngStream{7, rng_stream(RngPurpose::kTest, stream)}, offset);
}

// The GEMMs of an FFN forward+backward over `rows` rows, as single dense GEMMs: per weight the forward
// (rows, mid), the data gradient (rows, hidden) and the accumulated weight gradient (mid, hidden).
void ffn_gemms(int64_t rows, int64_t hidden, int64_t mid, bool swiglu, std::vector<GemmShape>& out) {
  if (rows == 0) return;
  for (int g = 0; g < (swiglu ? 3 : 2); ++g) {
    out.push_back({rows, mid, hidden, Trans::kN, Trans::kT});
    out.push_back({rows, hidden, mid, Trans::kN, Trans::kN});
    out.push_back({mid, hidden, rows, Trans::kT, Trans::kN, 1.0});
  }
}

// Direct evaluation of one token through one FFN expert (double precision).
// y += scale * FFN_expert(x). Routed experts: w_gate, w_up (E, F, H), w_down (E, H, F). A fused set
// (num_fused > 0: the shared experts): w_gate, w_up (n*F, H), w_down (H, n*F), expert e owning mid indices
// [eF, (e+1)F).
struct ExpertWeights {
  std::vector<double> gate, up, down;
  int64_t mid = 0, hidden = 0, num_fused = 0;
};
void expert_ref(const ExpertWeights& w, size_t expert, ExpertType type, const double* x, double scale,
                std::vector<double>& y) {
  const int64_t mid = w.mid, hidden = w.hidden;
  const size_t base = expert * static_cast<size_t>(mid * hidden);
  const size_t down_base = w.num_fused > 0 ? expert * static_cast<size_t>(mid) : base;
  const size_t down_row = static_cast<size_t>(w.num_fused > 0 ? mid * w.num_fused : mid);
  for (int64_t f = 0; f < mid; ++f) {
    double a = 0, b = 0;
    for (int64_t h = 0; h < hidden; ++h) {
      b += w.up[base + f * hidden + h] * x[h];
      if (type == ExpertType::kSwiGLU) a += w.gate[base + f * hidden + h] * x[h];
    }
    double act;
    if (type == ExpertType::kSwiGLU) act = a / (1 + std::exp(-a)) * b;
    else if (type == ExpertType::kRelu) act = b > 0 ? b : 0;
    else act = 0.5 * b * (1 + std::tanh(0.7978845608028654 * (b + 0.044715 * b * b * b)));
    for (int64_t h = 0; h < hidden; ++h) y[h] += scale * act * w.down[down_base + h * down_row + f];
  }
}

// ", capacity_factor 1.25, expert_type swiglu, routing learned": the keys of every row, unless swept.
std::string common_keys(const Config& c, const std::vector<std::string>& swept) {
  std::string out;
  for (const char* key : {"moe.capacity_factor", "moe.expert_type", "moe.force_routing"}) {
    if (std::find(swept.begin(), swept.end(), key) != swept.end()) continue;
    const std::string value = config_field(key).get(c);
    if (std::string(key) == "moe.force_routing") out += ", routing " + (value == "off" ? "learned" : "forced " + value);
    else out += std::string(", ") + (key + 4) + " " + value;
  }
  return out;
}

}  // namespace

BenchFlags layer_bench_flags() {
  BenchFlags f;
  f.defaults = {"model.seq_len=4096", "model.hidden=512",        "moe.num_experts=8",     "moe.top_k=2",
                "moe.num_shared_experts=0,1", "moe.capacity_factor=1.25", "moe.aux_loss_coef=0.01"};
  f.iters = 10;
  f.warmup = 2;
  return f;
}

struct LayerBench::State {
  std::unique_ptr<ParamSet> params;
  std::unique_ptr<MoeLayer> layer;
  Tensor x, dy, y;
  StepContext ctx;
  std::unique_ptr<Timeline> timeline;
  PhaseTimes phases;
  std::vector<double> exchange_times;
};

LayerBench::LayerBench(std::vector<Config> configs, std::vector<std::string> extra_keys)
    : configs_(std::move(configs)), extra_keys_(std::move(extra_keys)) {}
LayerBench::~LayerBench() = default;

std::vector<std::string> LayerBench::title(BenchRun& run) {
  const Config& c = configs_.front();
  Backend& backend = run.backend();
  const int world = run.groups().world->size();
  std::vector<std::string> t;
  const std::string threads = c.runtime.device == Device::kCpu ? " (" + blas_setup(c.runtime.threads).str() + ", " +
                                                                     std::to_string(c.runtime.threads) +
                                                                     " thread(s) per rank)"
                                                               : "";
  t.push_back("moe_bench layer: MoE layer forward+backward, backend " + backend.name() + threads + ", " +
              dtype_name(c.runtime.dtype) + " master weights, communicator " + run.groups().world->name() + ", " +
              std::to_string(world) + " rank(s), ep " + std::to_string(world) + common_keys(c, extra_keys_) + ", " +
              std::to_string(run.options().iters) + " iters after " + std::to_string(run.options().warmup) +
              " warm-up (median)");
  if (c.runtime.device == Device::kCpu && !blas_setup(c.runtime.threads).warning.empty()) {
    t.push_back("warning: " + blas_setup(c.runtime.threads).warning);
  }
  t.push_back("expert GF/s: useful expert FFN FLOPs (fwd+bwd) / layer time; dense GF/s: the BLAS (cuBLAS on a GPU) "
              "on the same GEMM shapes and FLOPs in the same precision, this run; ratio = expert / dense");
  return t;
}

std::vector<Column> LayerBench::columns() const {
  std::vector<Column> c = {{"precision", "prec", 4, 0}, {"tokens", "tokens", 7, 0}, {"hidden", "hidden", 6, 0},
                           {"experts", "experts", 7, 0}, {"top_k", "top_k", 5, 0},  {"shared", "shared", 6, 0},
                           {"ffn", "ffn", 4, 0}};
  for (const std::string& k : extra_keys_) c.push_back(swept_column(k));
  c.insert(c.end(), {{"time_ms", "time(ms)", 9, 2},
                     {"tokens_per_s", "tokens/s", 10, 0},
                     {"expert_gflops", "expert GF/s", 11, 2},
                     {"dense_gflops", "dense GF/s", 10, 2},
                     {"ratio", "ratio", 5, 2},
                     {"dropped_frac", "drop%", 5, 2, 100},
                     {"exchange_ms", "a2a(ms)", 7, 2},
                     {"raw_a2a_ms", "raw(ms)", 7, 2},
                     {"ranks", "", 0, 0},
                     {"dtype", "", 0, 0},
                     {"device", "", 0, 0}});
  return c;
}

void LayerBench::setup(BenchRun& run, size_t i) {
  const Config& c = configs_[i];
  Backend& backend = run.backend();
  const int world = run.groups().world->size(), rank = run.groups().world->rank();
  const int64_t tokens = c.model.seq_len, hidden = c.model.hidden;
  // A row of the same shapes as the last one (another precision, routing, capacity) copies its parameters
  // instead of drawing them again; only one earlier set is held at a time.
  std::unique_ptr<ParamSet> previous = state_ ? std::move(state_->params) : nullptr;
  state_ = std::make_unique<State>();
  State& s = *state_;
  s.params = std::make_unique<ParamSet>();
  s.layer = std::make_unique<MoeLayer>(*s.params, "bench", c, 0, world, rank);
  s.params->allocate(backend, c.runtime.dtype, 1, previous.get());
  previous.reset();
  s.x = random_tensor(backend, {tokens, hidden}, c.runtime.dtype, 1, rank * tokens * hidden);
  s.dy = random_tensor(backend, {tokens, hidden}, c.runtime.dtype, 2, rank * tokens * hidden);
  s.ctx.global_tokens = tokens * world;
  s.ctx.token_offset = rank * tokens;
}

void LayerBench::prepare(BenchRun& run, size_t i) { state_->params->zero_grads(run.backend()); }

void LayerBench::run(BenchRun& run, size_t i) {
  State& s = *state_;
  s.timeline = std::make_unique<Timeline>(run.backend());
  s.phases = PhaseTimes{};
  s.ctx.timeline = s.timeline.get();
  s.ctx.times = &s.phases;
  s.y = s.layer->forward(run.backend(), run.groups(), s.x, s.ctx);
  s.layer->backward(run.backend(), run.groups(), s.dy);
}

void LayerBench::after(BenchRun& run, size_t i, bool timed) {
  State& s = *state_;
  s.timeline->resolve(s.phases);
  s.ctx.timeline = nullptr;
  s.ctx.times = nullptr;
  if (timed) s.exchange_times.push_back(s.phases.exchange);
}

int64_t LayerBench::check(BenchRun& run, size_t i) {
  const Config& c = configs_[i];
  State& s = *state_;
  Backend& backend = run.backend();
  ProcessGroups& groups = run.groups();
  const int world = groups.world->size();
  const int64_t tokens = c.model.seq_len, hidden = c.model.hidden, shared = c.moe.num_shared_experts;
  // Every expert's weights: this rank's shard gathered over the ep group.
  auto full = [&](const std::string& name) {
    std::vector<double> local = to_doubles(backend, s.params->find(name)->value);
    std::vector<double> all(local.size() * static_cast<size_t>(world));
    groups.ep->host().all_gather(local.data(), all.data(), local.size(), DType::kF64);
    return all;
  };
  auto local = [&](const std::string& name) {
    Param* p = s.params->find(name);
    return p ? to_doubles(backend, p->value) : std::vector<double>();
  };
  const bool swiglu = c.moe.expert_type == ExpertType::kSwiGLU;
  ExpertWeights routed{swiglu ? full("bench.experts.w_gate") : std::vector<double>(), full("bench.experts.w_up"),
                       full("bench.experts.w_down"), expert_ffn_hidden(c), hidden, 0};
  ExpertWeights fused{local("bench.shared.w_gate"), local("bench.shared.w_up"), local("bench.shared.w_down"),
                      shared_ffn_hidden(c), hidden, shared};
  const RouteState& route = s.layer->router().state();
  const std::vector<double> xs = to_doubles(backend, s.x), ys = to_doubles(backend, s.y);
  const std::vector<double> eidx = to_doubles(backend, route.expert_idx), ridx = to_doubles(backend, route.row_idx),
                            gate = to_doubles(backend, route.gate);
  // bf16: input, weights, the mid activations and the output are each rounded to 8 mantissa bits
  // (relative 2^-9 each) around fp32 accumulation: a few 1e-3 of the largest output element.
  const bool bf16 = c.runtime.precision == Precision::kBf16;
  const double tol = c.runtime.dtype == DType::kF64 ? 1e-10 : bf16 ? 3e-2 : 2e-4;
  int64_t wrong = 0;
  for (int64_t sample = 0; sample < std::min<int64_t>(16, tokens); ++sample) {
    const int64_t t = sample * std::max<int64_t>(1, tokens / 16);
    std::vector<double> ref(static_cast<size_t>(hidden), 0.0);
    const double* xt = &xs[static_cast<size_t>(t * hidden)];
    for (int64_t j = 0; j < c.moe.top_k; ++j) {
      const size_t a = static_cast<size_t>(t * c.moe.top_k + j);
      if (ridx[a] >= 0) expert_ref(routed, static_cast<size_t>(eidx[a]), c.moe.expert_type, xt, gate[a], ref);
    }
    for (int64_t e = 0; e < shared; ++e) expert_ref(fused, static_cast<size_t>(e), c.moe.expert_type, xt, 1.0, ref);
    double err = 0, scale = 1e-30;
    for (int64_t h = 0; h < hidden; ++h) {
      err = std::max(err, std::abs(ref[h] - ys[static_cast<size_t>(t * hidden + h)]));
      scale = std::max(scale, std::abs(ref[h]));
    }
    wrong += !(err <= tol * scale);
  }
  return static_cast<int64_t>(run.sum(static_cast<double>(wrong)));
}

std::vector<Cell> LayerBench::cells(BenchRun& run, size_t i, double layer_s) {
  const Config& c = configs_[i];
  State& s = *state_;
  Backend& backend = run.backend();
  const int world = run.groups().world->size();
  const int64_t tokens = c.model.seq_len, hidden = c.model.hidden, shared = c.moe.num_shared_experts;
  const int64_t mid = expert_ffn_hidden(c);
  const bool bf16 = c.runtime.precision == Precision::kBf16, swiglu = c.moe.expert_type == ExpertType::kSwiGLU;
  const RouterStats stats = s.layer->read_stats(backend);
  const double exchange_s = run.slowest(median(s.exchange_times));
  const double raw_s =
      world > 1 ? raw_exchange(run, static_cast<double>(s.layer->dispatcher().send_bytes()), c.runtime.dtype).seconds
                : 0.0;  // no peers: nothing to compare with
  // useful FLOPs: processed assignments through the routed experts, every token through the shared ones
  double processed = 0;
  for (double v : stats.tokens) processed += v;
  const double flops = 3.0 * s.layer->experts().forward_flops_per_row() * processed +
                       (s.layer->shared() ? 3.0 * s.layer->shared()->forward_flops_per_row() * tokens * world : 0.0);
  const double expert_rate = flops / world / layer_s;
  // dense rate: the same GEMMs on this rank's rows, as single dense GEMMs
  int64_t my_rows = 0;
  for (int64_t r : s.layer->dispatcher().expert_rows()) my_rows += r;
  std::vector<GemmShape> shapes;
  ffn_gemms(my_rows, hidden, mid, swiglu, shapes);
  if (shared) ffn_gemms(tokens, hidden, shared * shared_ffn_hidden(c), swiglu, shapes);
  GemmTimer dense(backend, bf16 ? DType::kBF16 : c.runtime.dtype, shapes);
  const double dense_s = run.time([&] { dense.issue(); });
  const double dense_rate = run.sum(dense.flops()) / world / dense_s;
  ratios_.push_back(expert_rate / dense_rate);
  std::vector<Cell> out = {bf16 ? "bf16" : "fp32", tokens, hidden, int64_t{c.moe.num_experts}, int64_t{c.moe.top_k},
                           shared, mid};
  for (const std::string& k : extra_keys_) out.emplace_back(config_field(k).get(c));
  out.insert(out.end(), {layer_s * 1e3, tokens * world / layer_s, expert_rate * 1e-9, dense_rate * 1e-9,
                         expert_rate / dense_rate, stats.dropped / stats.assignments, exchange_s * 1e3,
                         raw_s * 1e3, world, dtype_name(c.runtime.dtype), backend.name()});
  return out;
}

void LayerBench::teardown(size_t i) {
  // The parameters stay for the next row of the same shapes (setup takes them); the rest goes.
  auto params = std::move(state_->params);
  state_ = std::make_unique<State>();
  state_->params = std::move(params);
}

std::string LayerBench::summary() const {
  double sum = 0;
  for (double r : ratios_) sum += r;
  char line[64];
  std::snprintf(line, sizeof(line), "Avg ratio: %.2f", ratios_.empty() ? 0.0 : sum / ratios_.size());
  return line;
}

int run_layer_bench(BenchRun& run) {
  const BenchOptions& o = run.options();
  const int world = run.groups().world->size();
  std::vector<Config> configs;
  for (size_t point = 0; point < o.sweep.size(); ++point) {
    configs.push_back(on_every_rank([&] {
      Config c = parse_config("", "", o.sweep.point(point));
      c.parallel.ep = world;
      c.train.batch_size = world;  // one sequence of model.seq_len tokens per rank
      validate_config(c, world);
      if (c.moe.num_experts == 0) throw ConfigError("moe.num_experts", "must be > 0 in moe_bench layer");
      return c;
    }));
  }
  LayerBench bench(configs, other_swept_keys(o.sweep, kShownKeys));
  return run.execute({&bench});
}

}  // namespace moe
