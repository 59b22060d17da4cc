// MoE layer benchmark, nccl-tests style: one row per shape, median of timed repetitions after warm-up,
// derived rates beside the times, and a correctness column (#wrong: sampled tokens whose output differs
// from a direct per-token evaluation of the layer formula). Exit code 1 when any row is wrong.
//
// Expert GFLOP/s counts the useful FLOPs of the expert FFNs (assignments actually processed, plus the
// shared experts on every token), forward and backward, over the whole layer's forward+backward time.
// The dense rate is the BLAS running the same GEMMs (same shapes and FLOPs, one group) in the same run.
//
// a2a(ms) is the forward exchanges inside the layer (to the experts and back: the timeline's `exchange`
// phase, waiting for peers included), raw(ms) two all_to_alls of the ep group moving the same bytes per
// rank (the mean over ranks of what the dispatch put on the wire), timed alone in the same run: the gap
// between them is what arriving at the exchange at different times costs.
#include "launch/layer_bench.h"

#include "launch/bench_options.h"
#include "runtime/cpu/blas.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "model/moe_layer.h"
#include "base/json.h"
#include "base/log.h"
#include "runtime/ops/gemm.h"

namespace moe {
namespace {

// Keys shown in every row; other swept keys get a column of their own.
const char* kRowKeys[] = {"runtime.precision", "model.seq_len", "model.hidden", "moe.num_experts", "moe.top_k",
                          "moe.num_shared_experts"};

Tensor random_tensor(Backend& backend, const Shape& shape, DType dtype, uint64_t stream, int64_t offset) {
  return normal_tensor(backend, shape, dtype, RngStream{7, rng_stream(RngPurpose::kTest, stream)}, offset);
}

// Time of the pure GEMMs of an FFN forward+backward (same shapes as one expert group of `rows` rows).
// dt: the GEMM operand dtype (BF16 for precision bf16: operands converted from F32 random values).
double dense_gemm_seconds(Backend& backend, DType dt, int64_t rows, int64_t hidden, int64_t mid, bool swiglu,
                          int iters, int warmup) {
  if (rows == 0) return 0;
  auto operand = [&](const Shape& shape, uint64_t stream) {
    if (dt != DType::kBF16) return random_tensor(backend, shape, dt, stream, 0);
    Tensor f = random_tensor(backend, shape, DType::kF32, stream, 0), b = backend.empty(shape, DType::kBF16);
    backend.convert(f, b);
    return b;
  };
  Tensor x = operand({rows, hidden}, 101), w = operand({mid, hidden}, 102);
  Tensor a = backend.empty({rows, mid}, dt), dw = backend.zeros({mid, hidden}, dt), y = backend.empty({rows, hidden}, dt);
  int gemms = swiglu ? 3 : 2;
  std::vector<double> times;
  for (int it = 0; it < warmup + iters; ++it) {
    auto t0 = std::chrono::steady_clock::now();
    for (int g = 0; g < gemms; ++g) {
      gemm(backend, x, Trans::kN, w, Trans::kT, a, 1.0, 0.0);   // forward: (rows, mid)
      gemm(backend, a, Trans::kN, w, Trans::kN, y, 1.0, 0.0);   // backward data: (rows, hidden)
      gemm(backend, a, Trans::kT, x, Trans::kN, dw, 1.0, 1.0);  // backward weight: (mid, hidden)
    }
    backend.synchronize();
    if (it >= warmup) times.push_back(seconds_since(t0));
  }
  return median(times);
}

// Direct evaluation of one token through one FFN expert (double precision).
// y += scale * FFN_expert(x). Routed experts: w_gate, w_up (E, F, H), w_down (E, H, F). Fused shared
// experts (fused = true): w_gate, w_up (n*F, H), w_down (H, n*F), expert e owning mid indices [eF, (e+1)F).
void expert_ref(const std::vector<double>& wg, const std::vector<double>& wu, const std::vector<double>& wd,
                size_t expert, int64_t mid, int64_t hidden, ExpertType type, const double* x, double scale,
                std::vector<double>& y, bool fused = false, int64_t num_fused = 1) {
  size_t base = expert * static_cast<size_t>(mid * hidden);
  const size_t down_base = fused ? expert * static_cast<size_t>(mid) : base;
  const size_t down_row = static_cast<size_t>(fused ? mid * num_fused : mid);
  for (int64_t f = 0; f < mid; ++f) {
    double a = 0, b = 0;
    for (int64_t h = 0; h < hidden; ++h) {
      b += wu[base + f * hidden + h] * x[h];
      if (type == ExpertType::kSwiGLU) a += wg[base + f * hidden + h] * x[h];
    }
    double act;
    if (type == ExpertType::kSwiGLU) act = a / (1 + std::exp(-a)) * b;
    else if (type == ExpertType::kRelu) act = b > 0 ? b : 0;
    else act = 0.5 * b * (1 + std::tanh(0.7978845608028654 * (b + 0.044715 * b * b * b)));
    for (int64_t h = 0; h < hidden; ++h) y[h] += scale * act * wd[down_base + h * down_row + f];
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

struct Row {
  Precision precision;
  int64_t tokens, hidden, experts, top_k, shared, ffn;
  std::vector<std::string> extra;  // values of the other swept keys
  double time_ms, tokens_per_s, expert_gflops, dense_gflops, ratio, dropped, exchange_ms, raw_ms;
  int wrong;
};

}  // namespace

int run_layer_bench(const CommandLine& cl) {
  const BenchOptions o = parse_bench_options(
      "layer", cl,
      {"model.seq_len=4096", "model.hidden=512", "moe.num_experts=8", "moe.top_k=2", "moe.num_shared_experts=0,1",
       "moe.capacity_factor=1.25", "moe.aux_loss_coef=0.01"},
      {{"iters", 10}, {"warmup", 2}}, {{"iters", 1}});
  const int iters = static_cast<int>(o.get("iters")), warmup = static_cast<int>(o.get("warmup"));
  const Config base = parse_config("", "", o.sweep.point(0));
  const DType dtype = base.runtime.dtype;
  auto world_comm = make_mpi_world();
  auto backend = make_backend(base, *world_comm);
  const int world = world_comm->size();
  Config group_config = base;
  group_config.parallel.ep = world;
  ProcessGroups groups = make_groups(group_config, *backend, std::move(world_comm));  // one EP group of every rank
  const int rank = groups.world->rank();
  std::vector<std::string> extra_keys;
  for (const std::string& k : o.sweep.swept_keys()) {
    if (std::find(std::begin(kRowKeys), std::end(kRowKeys), k) == std::end(kRowKeys)) extra_keys.push_back(k);
  }

  std::vector<Row> rows;
  // The last row's parameters: a row of the same shapes (another precision, routing, capacity) copies
  // them instead of drawing them again.
  std::unique_ptr<ParamSet> previous;
  for (size_t point = 0; point < o.sweep.size(); ++point) {
    const Config c = on_every_rank([&] {
      Config c = parse_config("", "", o.sweep.point(point));
      c.parallel.ep = world;
      c.train.batch_size = world;  // one sequence of model.seq_len tokens per rank
      validate_config(c, world);
      if (c.moe.num_experts == 0) throw ConfigError("moe.num_experts", "must be > 0 in moe_bench layer");
      return c;
    });
    const Precision precision = c.runtime.precision;
    const bool bf16 = precision == Precision::kBf16;
    const DType gemm_dt = bf16 ? DType::kBF16 : dtype;
    const int64_t tokens = c.model.seq_len, hidden = c.model.hidden, experts = c.moe.num_experts,
                  top_k = c.moe.top_k, shared = c.moe.num_shared_experts;
    const int64_t mid = expert_ffn_hidden(c);
    std::vector<std::string> extra;
    for (const std::string& k : extra_keys) extra.push_back(config_field(k).get(c));

    auto owned = std::make_unique<ParamSet>();
    ParamSet& params = *owned;
    MoeLayer layer(params, "bench", c, 0, world, rank);
    params.allocate(*backend, dtype, 1, previous.get());
    previous.reset();  // only one earlier set held at a time
    Tensor x = random_tensor(*backend, {tokens, hidden}, dtype, 1, rank * tokens * hidden);
    Tensor dy = random_tensor(*backend, {tokens, hidden}, dtype, 2, rank * tokens * hidden);
    StepContext ctx;
    ctx.global_tokens = tokens * world;
    ctx.token_offset = rank * tokens;
    Tensor y;
    std::vector<double> times, exchange_times;
    for (int it = 0; it < warmup + iters; ++it) {
      params.zero_grads(*backend);
      groups.world->barrier();
      auto t0 = std::chrono::steady_clock::now();
      Timeline timeline(*backend);
      PhaseTimes phases;
      ctx.timeline = &timeline;
      ctx.times = &phases;
      y = layer.forward(*backend, groups, x, ctx);
      layer.backward(*backend, groups, dy);
      backend->synchronize();
      const double t = seconds_since(t0);
      timeline.resolve(phases);
      ctx.timeline = nullptr;
      ctx.times = nullptr;
      if (it >= warmup) times.push_back(t), exchange_times.push_back(phases.exchange);
    }
    RouterStats stats = layer.read_stats(*backend);
    double layer_s = median(times);
    std::vector<double> slowest{layer_s};
    // slowest rank sets the pace
    std::vector<double> gathered(static_cast<size_t>(world));
    groups.world->host().all_gather(slowest.data(), gathered.data(), 1, DType::kF64);
    layer_s = *std::max_element(gathered.begin(), gathered.end());
    std::vector<double> exchange_s{median(exchange_times)};
    groups.world->host().all_gather(exchange_s.data(), gathered.data(), 1, DType::kF64);
    const double exchange_slowest = *std::max_element(gathered.begin(), gathered.end());
    const double sent = static_cast<double>(layer.dispatcher().send_bytes());
    const double raw_s =
        world > 1 ? raw_exchange(*backend, groups, sent, dtype, iters, warmup).seconds : 0.0;  // no peers: 0

    // useful FLOPs: processed assignments through the routed experts, every token through the shared ones
    double processed = 0;
    for (double v : stats.tokens) processed += v;
    bool swiglu = c.moe.expert_type == ExpertType::kSwiGLU;
    double flops = 3.0 * layer.experts().forward_flops_per_row() * processed +
                   (layer.shared() ? 3.0 * layer.shared()->forward_flops_per_row() * tokens * world : 0.0);
    double expert_rate = flops / world / layer_s;
    // dense rate: the same GEMMs on this rank's rows, as single dense GEMMs
    int64_t my_rows = 0;
    for (int64_t r : layer.dispatcher().expert_rows()) my_rows += r;
    double dense_s = dense_gemm_seconds(*backend, gemm_dt, my_rows, hidden, mid, swiglu, iters, warmup);
    double dense_flops = 3.0 * layer.experts().forward_flops_per_row() * my_rows;
    if (shared) {
      dense_s += dense_gemm_seconds(*backend, gemm_dt, tokens, hidden, shared * shared_ffn_hidden(c), swiglu,
                                    iters, warmup);
      dense_flops += 3.0 * layer.shared()->forward_flops_per_row() * tokens;
    }
    std::vector<double> dense{dense_flops, dense_s};
    groups.world->all_reduce_sum(dense);
    double dense_rate = dense[0] / dense[1];

    // correctness: sampled tokens against a direct evaluation with the full expert weights
    auto full = [&](Param* p) {
      if (!p) return std::vector<double>();
      std::vector<double> local = to_doubles(*backend, p->value);
      std::vector<double> all(local.size() * static_cast<size_t>(world));
      groups.ep->host().all_gather(local.data(), all.data(), local.size(), DType::kF64);
      return all;
    };
    auto* wg = params.find("bench.experts.w_gate");
    std::vector<double> eg = full(wg), eu = full(params.find("bench.experts.w_up")),
                        ed = full(params.find("bench.experts.w_down"));
    std::vector<double> sg, su, sd;
    if (shared) {
      auto local = [&](const char* n) { auto* p = params.find(n); return p ? to_doubles(*backend, p->value) : std::vector<double>(); };
      sg = local("bench.shared.w_gate"), su = local("bench.shared.w_up"), sd = local("bench.shared.w_down");
    }
    const RouteState& route = layer.router().state();
    std::vector<double> xs = to_doubles(*backend, x), ys = to_doubles(*backend, y);
    std::vector<double> eidx = to_doubles(*backend, route.expert_idx), ridx = to_doubles(*backend, route.row_idx),
                        gate = to_doubles(*backend, route.gate);
    int wrong = 0;
    // bf16: input, weights, the mid activations and the output are each rounded to 8 mantissa bits
    // (relative 2^-9 each) around fp32 accumulation: a few 1e-3 of the largest output element.
    const double tol = dtype == DType::kF64 ? 1e-10 : bf16 ? 3e-2 : 2e-4;
    for (int64_t s = 0; s < std::min<int64_t>(16, tokens); ++s) {
      int64_t t = s * std::max<int64_t>(1, tokens / 16);
      std::vector<double> ref(static_cast<size_t>(hidden), 0.0);
      const double* xt = &xs[static_cast<size_t>(t * hidden)];
      for (int64_t j = 0; j < top_k; ++j) {
        size_t a = static_cast<size_t>(t * top_k + j);
        if (ridx[a] < 0) continue;
        expert_ref(eg, eu, ed, static_cast<size_t>(eidx[a]), mid, hidden, c.moe.expert_type, xt, gate[a], ref);
      }
      if (shared) {
        for (int64_t e = 0; e < shared; ++e)
          expert_ref(sg, su, sd, static_cast<size_t>(e), shared_ffn_hidden(c), hidden, c.moe.expert_type, xt, 1.0,
                     ref, /*fused=*/true, shared);
      }
      double err = 0, scale = 1e-30;
      for (int64_t h = 0; h < hidden; ++h) {
        err = std::max(err, std::abs(ref[h] - ys[static_cast<size_t>(t * hidden + h)]));
        scale = std::max(scale, std::abs(ref[h]));
      }
      if (!(err <= tol * scale)) ++wrong;
    }
    std::vector<double> w{static_cast<double>(wrong)};
    groups.world->all_reduce_sum(w);

    rows.push_back(Row{precision, tokens, hidden, experts, top_k, shared, mid, extra, layer_s * 1e3,
                       tokens * world / layer_s, expert_rate * 1e-9, dense_rate * 1e-9, expert_rate / dense_rate,
                       stats.dropped / stats.assignments, exchange_slowest * 1e3, raw_s * 1e3,
                       static_cast<int>(w[0])});
    if (o.format == "table" && rows.size() == 1) {
      std::string threads = c.runtime.device == Device::kCpu
                                ? " (" + blas_setup(c.runtime.threads).str() + ", " +
                                      std::to_string(c.runtime.threads) + " thread(s) per rank)"
                                : "";
      log_info("# moe_bench layer: MoE layer forward+backward, backend " + backend->name() + threads + ", " +
               dtype_name(dtype) + " master weights, communicator " + groups.world->name() + ", " +
               std::to_string(world) + " rank(s), ep " + std::to_string(world) + common_keys(c, extra_keys) + ", " +
               std::to_string(iters) + " iters after " + std::to_string(warmup) + " warm-up (median)");
      if (c.runtime.device == Device::kCpu && !blas_setup(c.runtime.threads).warning.empty()) {
        log_info("# warning: " + blas_setup(c.runtime.threads).warning);
      }
      log_info("# expert GF/s: useful expert FFN FLOPs (fwd+bwd) / layer time; dense GF/s: the BLAS (cuBLAS on "
               "a GPU) on the same GEMM shapes and FLOPs in the same precision, this run; ratio = expert / dense");
      std::string header = "#  prec  tokens  hidden  experts  top_k  shared   ffn";
      for (const std::string& k : extra_keys) header += "  " + k.substr(k.find('.') + 1);
      log_info(header + "   time(ms)    tokens/s  expert GF/s  dense GF/s  ratio  drop%  a2a(ms)  raw(ms)  #wrong");
    }
    const Row& r = rows.back();
    if (o.format == "table") {
      char head[128], tail[128];
      std::snprintf(head, sizeof(head), "  %4s  %7lld  %6lld  %7lld  %5lld  %6lld  %4lld",
                    r.precision == Precision::kBf16 ? "bf16" : "fp32", (long long)r.tokens, (long long)r.hidden,
                    (long long)r.experts, (long long)r.top_k, (long long)r.shared, (long long)r.ffn);
      std::string line = head;
      for (size_t e = 0; e < extra_keys.size(); ++e) {
        const std::string name = extra_keys[e].substr(extra_keys[e].find('.') + 1);
        line += "  " + std::string(name.size() > r.extra[e].size() ? name.size() - r.extra[e].size() : 0, ' ') +
                r.extra[e];
      }
      std::snprintf(tail, sizeof(tail), "  %9.2f  %10.0f  %11.2f  %10.2f  %5.2f  %5.2f  %7.2f  %7.2f  %6d", r.time_ms,
                    r.tokens_per_s, r.expert_gflops, r.dense_gflops, r.ratio, 100 * r.dropped, r.exchange_ms, r.raw_ms,
                    r.wrong);
      log_info(line + tail);
    }
    previous = std::move(owned);
  }
  bool any_wrong = false;
  double ratio_sum = 0;
  for (const Row& r : rows) any_wrong |= r.wrong > 0, ratio_sum += r.ratio;
  if (o.format == "table") {
    char line[128];
    std::snprintf(line, sizeof(line), "# Avg ratio: %.2f   %s", ratio_sum / rows.size(),
                  any_wrong ? "WRONG RESULTS" : "all rows correct");
    log_info(line);
  } else {
    for (const Row& r : rows) {
      const char* prec = r.precision == Precision::kBf16 ? "bf16" : "fp32";
      if (o.format == "json") {
        JsonWriter j;
        j.begin_object().field("tokens", r.tokens).field("hidden", r.hidden).field("experts", r.experts);
        j.field("top_k", r.top_k).field("shared", r.shared).field("ffn", r.ffn);
        for (size_t e = 0; e < extra_keys.size(); ++e) j.field(extra_keys[e], r.extra[e]);
        j.field("time_ms", r.time_ms).field("tokens_per_s", r.tokens_per_s).field("expert_gflops", r.expert_gflops);
        j.field("dense_gflops", r.dense_gflops).field("ratio", r.ratio).field("dropped_frac", r.dropped);
        j.field("exchange_ms", r.exchange_ms).field("raw_a2a_ms", r.raw_ms);
        j.field("wrong", r.wrong).field("ranks", world).field("dtype", dtype_name(dtype));
        j.field("precision", prec).field("device", backend->name());
        j.end_object();
        log_info(j.str());
      } else {
        if (&r == &rows.front()) {
          std::string header = "precision,tokens,hidden,experts,top_k,shared,ffn";
          for (const std::string& k : extra_keys) header += "," + k;
          log_info(header + ",time_ms,tokens_per_s,expert_gflops,dense_gflops,ratio,dropped_frac,exchange_ms,raw_a2a_ms,"
                   "wrong");
        }
        std::ostringstream s;
        s << prec << "," << r.tokens << "," << r.hidden << "," << r.experts << "," << r.top_k << "," << r.shared
          << "," << r.ffn;
        for (const std::string& v : r.extra) s << "," << v;
        s << "," << r.time_ms << "," << r.tokens_per_s << "," << r.expert_gflops << "," << r.dense_gflops << ","
          << r.ratio << "," << r.dropped << "," << r.exchange_ms << "," << r.raw_ms << "," << r.wrong;
        log_info(s.str());
      }
    }
  }
  return any_wrong ? 1 : 0;
}

}  // namespace moe
