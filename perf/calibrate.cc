// Calibration: each constant is the slowest rank's median time of one op with every rank running it at
// once (on a shared machine this is what a rank gets in training), converted to a rate. Each measurement is
// a row of a benchmark table (perf/bench.h), checked where its result has a reference:
//   gemm grid     C (m, n) = A (m, k) B^T for m, n, k on the grid (16..1024 on a CPU, 64..4096 on a GPU)
//   stream        axpy over 2^17 floats (12 bytes per element)
//   softmax       causal softmax forward + backward over 16 x 128 x 128 scores
//   swiglu        SwiGLU forward + backward over 512 x 512
//   adamw         AdamW over 2^18 parameters
//   op_alpha      axpy of 16 floats (an op's fixed cost)
//   sync          50 rounds of ~1 ms of work ended by an 8-byte all_reduce, minus the work alone
//   all_to_all    4 KiB..4 MiB per rank, fitted alpha-beta in bus bytes ((n-1)/n of the buffer)
//   all_reduce    4 KiB..16 MiB, fitted alpha-beta in bus bytes (2(n-1)/n of the buffer)
//   efficiency    a reference training step, measured over predicted compute (docs/STUDIES.md)
#include "perf/calibrate.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>

#include "base/log.h"
#include "perf/collectives.h"
#include "runtime/gemm_timer.h"
#include "runtime/ops/attention.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/optimizer.h"
#include "train/trainer.h"

namespace moe {

AlphaBeta fit_alpha_beta(const std::vector<double>& x, const std::vector<double>& t) {
  if (x.size() != t.size() || x.size() < 2) throw InternalError("fit_alpha_beta needs 2 or more points");
  // minimise sum w (alpha + b x - t)^2 with w = 1/t^2: the normal equations of a 2-parameter fit
  double sw = 0, sx = 0, sxx = 0, st = 0, sxt = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double w = 1.0 / (t[i] * t[i]);
    sw += w, sx += w * x[i], sxx += w * x[i] * x[i], st += w * t[i], sxt += w * x[i] * t[i];
  }
  const double det = sw * sxx - sx * sx;
  double alpha = det != 0 ? (sxx * st - sx * sxt) / det : 0.0, b = det != 0 ? (sw * sxt - sx * st) / det : 0.0;
  if (alpha < 0 || b <= 0) {  // refit through the origin: t = b x
    alpha = 0;
    b = sxt / sxx;
  }
  AlphaBeta ab;
  ab.alpha_s = alpha;
  ab.bytes_per_s = b > 0 ? 1.0 / b : 1e30;
  return ab;
}

namespace {

// Bytes of distinct operands a GEMM measurement cycles through: more than the caches hold.
constexpr double kColdBytes = 64.0 * (1 << 20);

std::string machine_description(const Backend& backend, int ranks) {
  std::string cpu = "unknown CPU";
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return std::string(host) + ": " + backend.name() + ", " + cpu + ", " + std::to_string(sysconf(_SC_NPROCESSORS_ONLN)) +
         " cores online; measured with " + std::to_string(ranks) + " rank(s) at once";
}

// Rows: C (m, n) = A (m, k) B^T for every m, n, k of the grid, with operands in `dtype` (BF16: into F32).
class GemmGridBench : public Bench {
 public:
  GemmGridBench(DType dtype, std::vector<double> dims) : dtype_(dtype), dims_(std::move(dims)) {
    grid_.dims = dims_;
    grid_.seconds.assign(num_rows(), 0.0);
  }
  std::vector<std::string> title(BenchRun& run) override {
    return {std::string("GEMM grid (") + (dtype_ == DType::kBF16 ? "bf16 in, fp32 out" : dtype_name(dtype_)) +
            "): time per GEMM, operand sets cycled past the caches"};
  }
  std::vector<Column> columns() const override {
    return {{"op", "", 0, 0}, {"m", "m", 6, 0}, {"n", "n", 6, 0}, {"k", "k", 6, 0},
            {"time_us", "time(us)", 11, 2}, {"gflops", "GFLOP/s", 10, 2}};
  }
  size_t num_rows() const override { return dims_.size() * dims_.size() * dims_.size(); }
  void setup(BenchRun& run, size_t i) override {
    const GemmShape s = shape(i);
    const double bytes = static_cast<double>(s.m * s.k + s.n * s.k) * dtype_size(dtype_) + s.m * s.n * 4.0;
    const int sets = static_cast<int>(std::clamp(std::ceil(kColdBytes / bytes), 1.0, 64.0));
    timer_ = std::make_unique<GemmTimer>(run.backend(), dtype_, std::vector<GemmShape>{s}, sets);
    const double per_sample = run.backend().device() == Device::kCuda ? 2e10 : 5e8;  // several ms per sample
    reps_ = static_cast<int>(std::max(1.0, std::min(1000.0, per_sample / s.flops())));
  }
  void run(BenchRun& run, size_t i) override { timer_->issue(reps_); }
  int64_t check(BenchRun& run, size_t i) override { return static_cast<int64_t>(run.sum(timer_->wrong())); }
  std::vector<Cell> cells(BenchRun& run, size_t i, double seconds) override {
    const GemmShape s = shape(i);
    grid_.seconds[i] = seconds / reps_;
    return {"gemm", s.m, s.n, s.k, grid_.seconds[i] * 1e6, s.flops() / grid_.seconds[i] * 1e-9};
  }
  void teardown(size_t i) override { timer_.reset(); }
  const GemmModel& grid() const { return grid_; }

 private:
  GemmShape shape(size_t i) const {  // [i_m][i_n][i_k]
    const size_t g = dims_.size();
    auto d = [&](size_t j) { return static_cast<int64_t>(dims_[j]); };
    return {d(i / (g * g)), d(i / g % g), d(i % g), Trans::kN, Trans::kT};
  }
  DType dtype_;
  std::vector<double> dims_;
  GemmModel grid_;
  std::unique_ptr<GemmTimer> timer_;
  int reps_ = 1;
};

// Rows: the element-wise rates and an op's fixed cost, and the cost of one synchronising collective.
class ElementwiseBench : public Bench {
 public:
  enum Row : size_t { kStream, kOpAlpha, kSoftmax, kSwiglu, kAdamw, kSync, kRows };
  explicit ElementwiseBench(int ranks) : rows_(ranks > 1 ? kRows : kSync) {}
  std::vector<std::string> title(BenchRun& run) override {
    return {"element-wise rates (time per repetition of `reps` ops) and the synchronisation cost"};
  }
  std::vector<Column> columns() const override {
    return {{"op", "op", 8, 0}, {"elements", "elements", 9, 0}, {"reps", "reps", 5, 0},
            {"time_us", "time(us)", 11, 2}, {"rate", "rate", 12, 4}, {"unit", "unit", 10, 0}};
  }
  size_t num_rows() const override { return rows_; }
  void setup(BenchRun& run, size_t i) override;
  void run(BenchRun& run, size_t i) override;
  int64_t check(BenchRun& run, size_t i) override;
  std::vector<Cell> cells(BenchRun& run, size_t i, double seconds) override;
  void teardown(size_t i) override { t_.clear(); }
  NodeConstants& constants() { return e_; }

 private:
  int reps(BenchRun& run, int cpu_reps) const { return run.backend().device() == Device::kCuda ? 50 : cpu_reps; }
  void work(BenchRun& run) {  // about 1 ms of one core's work
    for (int r = 0; r < 25; ++r) axpy(run.backend(), 1e-3, t_[0], t_[1]);
  }
  size_t rows_;
  std::vector<Tensor> t_;
  NodeConstants e_;
};

void ElementwiseBench::setup(BenchRun& run, size_t i) {
  Backend& b = run.backend();
  RngStream rng{1, rng_stream(RngPurpose::kTest, 2000)};
  auto normal = [&](const Shape& shape, int64_t offset) { return normal_tensor(b, shape, DType::kF32, rng, offset); };
  const int64_t len = int64_t{1} << 17, bh = 16, s = 128, rows = 512, mid = 512, params = int64_t{1} << 18;
  switch (i) {
    case kStream: case kSync: t_ = {normal({len}, 0), normal({len}, len)}; break;
    case kOpAlpha: t_ = {normal({16}, 0), normal({16}, 16)}; break;
    case kSoftmax:
      t_ = {normal({bh, s, s}, 0), b.empty({bh, s, s}, DType::kF32), normal({bh, s, s}, 1), b.empty({bh, s, s}, DType::kF32)};
      break;
    case kSwiglu:
      t_ = {normal({rows, mid}, 0), normal({rows, mid}, 1), b.empty({rows, mid}, DType::kF32), normal({rows, mid}, 2),
            b.empty({rows, mid}, DType::kF32), b.empty({rows, mid}, DType::kF32)};
      break;
    case kAdamw:
      t_ = {normal({params}, 0), normal({params}, 1), b.zeros({params}, DType::kF32), b.zeros({params}, DType::kF32)};
      break;
  }
}

void ElementwiseBench::run(BenchRun& run, size_t i) {
  Backend& b = run.backend();
  switch (i) {
    case kStream: for (int r = 0; r < reps(run, 200); ++r) axpy(b, 1e-3, t_[0], t_[1]); break;
    case kOpAlpha: for (int r = 0; r < 1000; ++r) axpy(b, 1e-3, t_[0], t_[1]); break;
    case kSoftmax:
      for (int r = 0; r < reps(run, 12); ++r) {
        causal_softmax_forward(b, t_[0], 0.125, t_[1]);
        causal_softmax_backward(b, t_[2], t_[1], 0.125, t_[3]);
      }
      break;
    case kSwiglu:
      for (int r = 0; r < reps(run, 8); ++r) {
        swiglu_forward(b, t_[0], t_[1], t_[2]);
        swiglu_backward(b, t_[3], t_[0], t_[1], t_[4], t_[5]);
      }
      break;
    case kAdamw: {
      AdamArgs args;
      for (int r = 0; r < reps(run, 16); ++r) adamw_step(b, t_[0], t_[1], t_[2], t_[3], args, nullptr);
      break;
    }
    case kSync: {
      double one = 0, sum = 0;
      for (int round = 0; round < 50; ++round) {
        work(run);
        run.groups().world->host().all_reduce_sum(&one, &sum, 1, DType::kF64);
      }
      break;
    }
  }
}

int64_t ElementwiseBench::check(BenchRun& run, size_t i) {
  int64_t wrong = 0;
  if (i == kSoftmax) {  // every causal row of probabilities sums to 1
    const std::vector<double> p = to_doubles(run.backend(), t_[1]);
    for (size_t row = 0; row < p.size() / 128; ++row) {
      double sum = 0;
      for (size_t c = 0; c < 128; ++c) sum += p[row * 128 + c];
      wrong += !(std::abs(sum - 1) < 1e-4);
    }
  } else if (i == kSwiglu) {  // h = silu(a) * g
    const std::vector<double> a = to_doubles(run.backend(), t_[0]), g = to_doubles(run.backend(), t_[1]),
                              h = to_doubles(run.backend(), t_[2]);
    for (size_t k = 0; k < h.size(); k += 997) {
      const double want = a[k] / (1 + std::exp(-a[k])) * g[k];
      wrong += !(std::abs(h[k] - want) <= 1e-5 * (1 + std::abs(want)));
    }
  } else {
    return -1;  // accumulating ops (axpy, AdamW) and the synchronisation: no single reference
  }
  return static_cast<int64_t>(run.sum(static_cast<double>(wrong)));
}

std::vector<Cell> ElementwiseBench::cells(BenchRun& run, size_t i, double t) {
  const int64_t len = int64_t{1} << 17;
  switch (i) {
    case kStream:
      e_.stream_bytes_per_s = 12.0 * len * reps(run, 200) / t;
      return {"stream", len, reps(run, 200), t * 1e6, e_.stream_bytes_per_s * 1e-9, "GB/s"};
    case kOpAlpha:
      e_.op_alpha_s = t / 1000;
      return {"op_alpha", int64_t{16}, 1000, t * 1e6, e_.op_alpha_s * 1e6, "us per op"};
    case kSoftmax:
      e_.softmax_elems_per_s = 16.0 * 128 * 128 * reps(run, 12) / t;
      return {"softmax", int64_t{16 * 128 * 128}, reps(run, 12), t * 1e6, e_.softmax_elems_per_s * 1e-6, "M/s"};
    case kSwiglu:
      e_.swiglu_elems_per_s = 512.0 * 512 * reps(run, 8) / t;
      return {"swiglu", int64_t{512 * 512}, reps(run, 8), t * 1e6, e_.swiglu_elems_per_s * 1e-6, "M/s"};
    case kAdamw:
      e_.adamw_params_per_s = static_cast<double>(int64_t{1} << 18) * reps(run, 16) / t;
      return {"adamw", int64_t{1} << 18, reps(run, 16), t * 1e6, e_.adamw_params_per_s * 1e-6, "M/s"};
    default: {  // the rounds with their collective against the same work alone
      const double without = run.time([&] {
        for (int round = 0; round < 50; ++round) work(run);
      });
      e_.sync_s = std::max(0.0, (t - without) / 50);
      return {"sync", len, 50, t * 1e6, e_.sync_s * 1e6, "us per sync"};
    }
  }
}

// One row: a reference training step (a small MoE transformer on synthetic tokens with balanced forced
// routing), whose measured compute time over the time the constants predict is the step efficiency.
class StepBench : public Bench {
 public:
  // constants: the node's constants measured by the rows before this one, asked for at setup.
  StepBench(const Config& ref, std::function<CostConstants()> constants) : ref_(ref), constants_(std::move(constants)) {}
  std::vector<std::string> title(BenchRun& run) override {
    return {"reference training step: measured against the constants above (the step efficiency)"};
  }
  std::vector<Column> columns() const override {
    return {{"op", "op", 4, 0}, {"time_ms", "measured(ms)", 12, 3}, {"predicted_ms", "predicted(ms)", 13, 3},
            {"comm_ms", "comm(ms)", 8, 3}, {"efficiency", "efficiency", 10, 2}};
  }
  size_t num_rows() const override { return 1; }
  void setup(BenchRun& run, size_t i) override {
    k_ = constants_();
    trainer_ = std::make_unique<Trainer>(ref_, run.backend(), run.groups());
  }
  void run(BenchRun& run, size_t i) override { trainer_->train_step(); }
  // 8 steps of warm-up (allocations, routing), then the median of 16
  double seconds(BenchRun& run, size_t i) override {
    return run.time([&] { this->run(run, i); }, 16, 8);
  }
  int64_t check(BenchRun& run, size_t i) override { return -1; }
  std::vector<Cell> cells(BenchRun& run, size_t i, double measured) override {
    PredictOptions o;
    o.ranks = o.ep = run.groups().world->size();
    const StepPrediction p = predict_step(ref_, k_, o);
    efficiency_ = std::clamp((measured - p.comm_s) / (p.step_s - p.comm_s), 0.25, 8.0);
    return {"step", measured * 1e3, p.step_s * 1e3, p.comm_s * 1e3, efficiency_};
  }
  void teardown(size_t i) override { trainer_.reset(); }
  double efficiency() const { return efficiency_; }

 private:
  Config ref_;
  std::function<CostConstants()> constants_;
  CostConstants k_;
  std::unique_ptr<Trainer> trainer_;
  double efficiency_ = 1;
};

Config reference_step_config(const Config& base, int n) {
  return on_every_rank([&] {
    Config ref = parse_config("", "", {"model.hidden=192", "model.layers=2", "model.heads=3", "model.seq_len=64",
                                       "moe.top_k=2", "moe.ffn_hidden=256", "moe.force_routing=uniform",
                                       "train.steps=24", "train.warmup_steps=2", "train.log_every=1000"});
    ref.runtime = base.runtime;
    ref.moe.num_experts = n * ((4 + n - 1) / n);
    ref.parallel.ep = n;
    ref.train.batch_size = 8 * n;
    validate_config(ref, n);
    return ref;
  });
}

// alpha-beta of a collective's rows: bus bytes against seconds
AlphaBeta fit_rows(const CollectiveBench& b, const std::vector<size_t>& sizes) {
  std::vector<double> x, t;
  for (size_t i = 0; i < sizes.size(); ++i) {
    x.push_back(b.result(i).bus_bytes);
    t.push_back(b.result(i).seconds);
  }
  return fit_alpha_beta(x, t);
}

std::vector<size_t> sizes_from(size_t lo, size_t hi) {
  std::vector<size_t> out;
  for (size_t bytes = lo; bytes <= hi; bytes *= 4) out.push_back(bytes);
  return out;
}

}  // namespace

BenchFlags calibrate_flags() {
  BenchFlags f;
  f.iters = 7;
  f.warmup = 1;
  f.ints = {{"quick", 0}};
  f.strings = {{"out", ""}};
  return f;
}

int run_calibrate(BenchRun& run) {
  const std::string out = run.options().strings.at("out");
  on_every_rank([&] {
    if (out.empty()) throw ConfigError("--out", "moe_bench calibrate needs --out=FILE");
  });
  Backend& backend = run.backend();
  ProcessGroups& groups = run.groups();
  const int n = groups.world->size();
  const bool gpu = backend.device() == Device::kCuda;
  const Config base = parse_config("", "", run.options().sweep.point(0));
  std::vector<double> dims = gpu ? std::vector<double>{64, 256, 1024, 4096} : std::vector<double>{16, 64, 256, 1024};
  if (run.options().get("quick") != 0) dims = {16, 64, 256};

  CostConstants c;
  c.device = gpu ? "cuda" : "cpu";
  c.description = machine_description(backend, n);
  c.overlap = gpu;
  GemmGridBench fp32(DType::kF32, dims), bf16(DType::kBF16, dims);
  ElementwiseBench elementwise(n);
  const std::vector<size_t> a2a_sizes = sizes_from(4096, size_t{4} << 20), ar_sizes = sizes_from(4096, size_t{16} << 20);
  CollectiveBench a2a(Collective::kAllToAll, *groups.ep, a2a_sizes), ar(Collective::kAllReduce, *groups.world, ar_sizes);
  std::vector<Bench*> benches{&fp32};
  if (gpu) benches.push_back(&bf16);
  benches.push_back(&elementwise);
  if (n > 1) benches.insert(benches.end(), {&a2a, &ar});
  NodeConstants e;
  auto measured = [&] {  // the node's constants from the rows above
    e = elementwise.constants();
    e.ranks = n;
    e.gemm = fp32.grid();
    if (gpu) e.gemm_bf16 = bf16.grid();
    if (n > 1) {
      e.all_to_all = fit_rows(a2a, a2a_sizes);
      e.all_reduce = fit_rows(ar, ar_sizes);
    } else {
      e.all_to_all.bytes_per_s = e.all_reduce.bytes_per_s = 1e30;  // nothing crosses a link
    }
    CostConstants one = c;
    one.nodes = {e};
    return one;
  };
  StepBench step(reference_step_config(base, n), measured);
  benches.push_back(&step);
  const int rc = run.execute(benches);
  e.step_efficiency = step.efficiency();
  c.nodes.push_back(e);
  if (groups.world->rank() == 0) {
    merge_constants_file(out, c);
    char line[400];
    std::snprintf(line, sizeof(line),
                  "calibrate (%d ranks): GEMM %.0f^3 %.2f GFLOP/s per rank, stream %.2f GB/s, softmax %.0f M/s, swiglu "
                  "%.0f M/s, adamw %.0f M/s, all_to_all %.1f us + %.3f GB/s, all_reduce %.1f us + %.3f GB/s, sync "
                  "%.1f us, step efficiency %.2f -> %s",
                  n, dims.back(), 2e-9 * std::pow(dims.back(), 3) / e.gemm.seconds.back(), e.stream_bytes_per_s * 1e-9,
                  e.softmax_elems_per_s * 1e-6, e.swiglu_elems_per_s * 1e-6, e.adamw_params_per_s * 1e-6,
                  e.all_to_all.alpha_s * 1e6, e.all_to_all.bytes_per_s * 1e-9, e.all_reduce.alpha_s * 1e6,
                  e.all_reduce.bytes_per_s * 1e-9, e.sync_s * 1e6, e.step_efficiency, out.c_str());
    log_info(line);
  }
  return rc;
}

}  // namespace moe
