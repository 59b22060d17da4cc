// MoE layer benchmark, nccl-tests style: one row per shape, median of timed repetitions after warm-up,
// derived rates beside the times, and a correctness column (#wrong: sampled tokens whose output differs
// from a direct per-token evaluation of the layer formula). Exit code 1 when any row is wrong.
//
// Expert GFLOP/s counts the useful FLOPs of the expert FFNs (assignments actually processed, plus the
// shared experts on every token), forward and backward, over the whole layer's forward+backward time.
// The dense rate is the BLAS running the same GEMMs (same shapes and FLOPs, one group) in the same run.
#include "launch/layer_bench.h"

#include "launch/main_common.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "model/moe_layer.h"
#include "runtime/json.h"
#include "runtime/log.h"
#include "runtime/ops/gemm.h"

namespace moe {
namespace {

struct BenchOptions {
  std::vector<int64_t> tokens{4096};
  std::vector<int64_t> experts{8};
  std::vector<int64_t> top_k{2};
  std::vector<int64_t> shared{0, 1};
  int hidden = 512;
  int ffn_hidden = 0;
  double capacity_factor = 1.25;
  int iters = 10;
  int warmup = 2;
  int threads = 1;
  DType dtype = DType::kF32;
  Device device = Device::kCpu;
  std::vector<Precision> precisions{Precision::kFp32};
  std::string format = "table";
};

std::vector<int64_t> parse_list(const std::string& key, const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v < 0) throw ConfigError(key, "expected a list of integers, got '" + text + "'");
    out.push_back(v);
  }
  if (out.empty()) throw ConfigError(key, "expected at least one value");
  return out;
}

std::vector<Precision> parse_precisions(const std::string& text) {
  std::vector<Precision> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item == "fp32") out.push_back(Precision::kFp32);
    else if (item == "bf16") out.push_back(Precision::kBf16);
    else throw ConfigError("precision", "expected a list of fp32 | bf16, got '" + text + "'");
  }
  if (out.empty()) throw ConfigError("precision", "expected at least one value");
  return out;
}

BenchOptions parse_options(const CommandLine& cl) {
  BenchOptions o;
  for (const std::string& f : cl.flags) {
    size_t eq = f.find('=');
    std::string k = f.substr(0, eq), v = eq == std::string::npos ? "" : f.substr(eq + 1);
    auto num = [&](double lo) {
      char* end = nullptr;
      double d = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !std::isfinite(d) || d < lo) {
        throw ConfigError(k, "expected a number >= " + format_double(lo) + ", got '" + v + "'");
      }
      return d;
    };
    if (k == "tokens") o.tokens = parse_list(k, v);
    else if (k == "experts") o.experts = parse_list(k, v);
    else if (k == "top_k") o.top_k = parse_list(k, v);
    else if (k == "shared") o.shared = parse_list(k, v);
    else if (k == "hidden") o.hidden = static_cast<int>(num(1));
    else if (k == "ffn_hidden") o.ffn_hidden = static_cast<int>(num(0));
    else if (k == "capacity_factor") o.capacity_factor = num(-1e300);
    else if (k == "iters") o.iters = static_cast<int>(num(1));
    else if (k == "warmup") o.warmup = static_cast<int>(num(0));
    else if (k == "threads") o.threads = static_cast<int>(num(1));
    else if (k == "dtype" && (v == "float32" || v == "float64")) o.dtype = v == "float32" ? DType::kF32 : DType::kF64;
    else if (k == "format" && (v == "table" || v == "json" || v == "csv")) o.format = v;
    else if (k == "device" && (v == "cpu" || v == "cuda")) o.device = v == "cpu" ? Device::kCpu : Device::kCuda;
    else if (k == "precision") o.precisions = parse_precisions(v);
    else throw ConfigError(k, "unknown or malformed option --" + f + " (see moe_bench --help)");
  }
  return o;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

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

struct Row {
  Precision precision;
  int64_t tokens, experts, top_k, shared, ffn;
  double time_ms, tokens_per_s, expert_gflops, dense_gflops, ratio, dropped;
  int wrong;
};

}  // namespace

int run_layer_bench(const CommandLine& cl) {
  BenchOptions o = parse_options(cl);
  Config base;
  base.runtime.device = o.device;
  base.runtime.threads = o.threads;
  base.runtime.dtype = o.dtype;
  auto world_comm = make_mpi_world();
  auto backend = make_backend(base, *world_comm);
  const int world = world_comm->size();
  base.parallel.ep = world;
  ProcessGroups groups = make_groups(base, *backend, std::move(world_comm));  // one EP group over every rank
  const int rank = groups.world->rank();

  std::vector<Row> rows;
  for (int64_t tokens : o.tokens)
    for (int64_t experts : o.experts)
      for (int64_t top_k : o.top_k)
        for (int64_t shared : o.shared)
        for (Precision precision : o.precisions) {
          Config c = base;
          c.runtime.precision = precision;
          const bool bf16 = precision == Precision::kBf16;
          const DType gemm_dt = bf16 ? DType::kBF16 : o.dtype;
          c.model.hidden = o.hidden;
          c.moe.num_experts = static_cast<int>(experts);
          c.moe.top_k = static_cast<int>(top_k);
          c.moe.num_shared_experts = static_cast<int>(shared);
          c.moe.ffn_hidden = o.ffn_hidden;
          c.moe.capacity_factor = o.capacity_factor;
          c.moe.aux_loss_coef = 0.01;
          c.parallel.ep = world;
          c.train.batch_size = world;
          c.model.seq_len = static_cast<int>(tokens);
          validate_config(c, world);
          const int64_t mid = expert_ffn_hidden(c), hidden = o.hidden;

          ParamSet params;
          MoeLayer layer(params, "bench", c, 0, world, rank);
          params.allocate(*backend, o.dtype, 1);
          Tensor x = random_tensor(*backend, {tokens, hidden}, o.dtype, 1, rank * tokens * hidden);
          Tensor dy = random_tensor(*backend, {tokens, hidden}, o.dtype, 2, rank * tokens * hidden);
          StepContext ctx;
          ctx.global_tokens = tokens * world;
          ctx.token_offset = rank * tokens;
          Tensor y;
          std::vector<double> times;
          for (int it = 0; it < o.warmup + o.iters; ++it) {
            params.zero_grads(*backend);
            groups.world->barrier();
            auto t0 = std::chrono::steady_clock::now();
            y = layer.forward(*backend, groups, x, ctx);
            layer.backward(*backend, groups, dy);
            backend->synchronize();
            std::vector<double> t{seconds_since(t0)};
            if (it >= o.warmup) times.push_back(t[0]);
          }
          RouterStats stats = layer.read_stats(*backend);
          double layer_s = median(times);
          std::vector<double> slowest{layer_s};
          // slowest rank sets the pace
          std::vector<double> gathered(static_cast<size_t>(world));
          groups.world->all_gather(slowest.data(), gathered.data(), 1, DType::kF64);
          layer_s = *std::max_element(gathered.begin(), gathered.end());

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
          double dense_s = dense_gemm_seconds(*backend, gemm_dt, my_rows, hidden, mid, swiglu, o.iters, o.warmup);
          double dense_flops = 3.0 * layer.experts().forward_flops_per_row() * my_rows;
          if (shared) {
            dense_s += dense_gemm_seconds(*backend, gemm_dt, tokens, hidden, shared * shared_ffn_hidden(c), swiglu,
                                          o.iters, o.warmup);
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
            groups.ep->all_gather(local.data(), all.data(), local.size(), DType::kF64);
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
          const double tol = o.dtype == DType::kF64 ? 1e-10 : bf16 ? 3e-2 : 2e-4;
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

          rows.push_back(Row{precision, tokens, experts, top_k, shared, mid, layer_s * 1e3, tokens * world / layer_s,
                             expert_rate * 1e-9, dense_rate * 1e-9, expert_rate / dense_rate,
                             stats.dropped / stats.assignments, static_cast<int>(w[0])});
          if (o.format == "table" && rows.size() == 1) {
            std::string threads = o.device == Device::kCpu ? " (" + std::to_string(o.threads) + " BLAS thread(s) per rank)" : "";
            log_info("# moe_bench layer: MoE layer forward+backward, backend " + backend->name() + threads + ", " +
                     dtype_name(o.dtype) + " master weights, communicator " + groups.world->name() + ", " +
                     std::to_string(world) + " rank(s), ep " + std::to_string(world) + ", hidden " +
                     std::to_string(hidden) + ", capacity_factor " + format_double(o.capacity_factor) + ", " +
                     std::to_string(o.iters) + " iters after " + std::to_string(o.warmup) + " warm-up (median)");
            log_info("# expert GF/s: useful expert FFN FLOPs (fwd+bwd) / layer time; dense GF/s: the BLAS (cuBLAS on "
                     "a GPU) on the same GEMM shapes and FLOPs in the same precision, this run; ratio = expert / dense");
            log_info("#  prec  tokens  hidden  experts  top_k  shared   ffn   time(ms)    tokens/s  expert GF/s  dense GF/s  "
                     "ratio  drop%  #wrong");
          }
          const Row& r = rows.back();
          char line[256];
          if (o.format == "table") {
            std::snprintf(line, sizeof(line), "  %4s  %7lld  %6d  %7lld  %5lld  %6lld  %4lld  %9.2f  %10.0f  %11.2f  %10.2f  %5.2f  %5.2f  %6d",
                          r.precision == Precision::kBf16 ? "bf16" : "fp32", (long long)r.tokens, o.hidden, (long long)r.experts, (long long)r.top_k, (long long)r.shared,
                          (long long)r.ffn, r.time_ms, r.tokens_per_s, r.expert_gflops, r.dense_gflops, r.ratio,
                          100 * r.dropped, r.wrong);
            log_info(line);
          }
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
      if (o.format == "json") {
        JsonWriter j;
        j.begin_object().field("tokens", r.tokens).field("hidden", o.hidden).field("experts", r.experts);
        j.field("top_k", r.top_k).field("shared", r.shared).field("ffn", r.ffn).field("time_ms", r.time_ms);
        j.field("tokens_per_s", r.tokens_per_s).field("expert_gflops", r.expert_gflops);
        j.field("dense_gflops", r.dense_gflops).field("ratio", r.ratio).field("dropped_frac", r.dropped);
        j.field("wrong", r.wrong).field("ranks", world).field("dtype", dtype_name(o.dtype));
        j.field("precision", r.precision == Precision::kBf16 ? "bf16" : "fp32").field("device", backend->name());
        j.end_object();
        log_info(j.str());
      } else {
        if (&r == &rows.front()) log_info("precision,tokens,hidden,experts,top_k,shared,ffn,time_ms,tokens_per_s,expert_gflops,dense_gflops,ratio,dropped_frac,wrong");
        std::ostringstream s;
        s << (r.precision == Precision::kBf16 ? "bf16" : "fp32") << "," << r.tokens << "," << o.hidden << "," << r.experts << "," << r.top_k << "," << r.shared << "," << r.ffn << ","
          << r.time_ms << "," << r.tokens_per_s << "," << r.expert_gflops << "," << r.dense_gflops << "," << r.ratio
          << "," << r.dropped << "," << r.wrong;
        log_info(s.str());
      }
    }
  }
  return any_wrong ? 1 : 0;
}

}  // namespace moe
