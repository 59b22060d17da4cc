// Calibration: each constant is the slowest rank's median time of one op with every rank running it at
// once (on a shared machine this is what a rank gets in training), converted to a rate:
//   gemm grid     C (m, n) = A (m, k) B^T for m, n, k on the grid (16..1024 on a CPU, 64..4096 on a GPU)
//   stream        axpy over 2^17 floats (12 bytes per element)
//   softmax       causal softmax forward + backward over 16 x 128 x 128 scores
//   swiglu        SwiGLU forward + backward over 512 x 512
//   adamw         AdamW over 2^18 parameters
//   op_alpha      axpy of 16 floats (an op's fixed cost)
//   all_to_all    4 KiB..4 MiB per rank, fitted alpha-beta in bus bytes ((n-1)/n of the buffer)
//   all_reduce    4 KiB..16 MiB, fitted alpha-beta in bus bytes (2(n-1)/n of the buffer)
//   sync          50 rounds of ~1 ms of work ended by an 8-byte all_reduce, minus the work alone
//   efficiency    a reference training step, measured over predicted compute (docs/STUDIES.md)
#include "launch/calibrate.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>

#include "comm/mpi/mpi_communicator.h"
#include "launch/a2a_bench.h"
#include "launch/bench_options.h"
#include "base/log.h"
#include "runtime/ops/attention.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"
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

// Bytes of distinct operands a measurement cycles through: more than the caches hold.
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

GemmModel measure_gemm_grid(Backend& backend, Communicator& world, DType in, const std::vector<double>& dims,
                            int iters) {
  GemmModel g;
  g.dims = dims;
  const bool gpu = backend.device() == Device::kCuda;
  const double per_sample = gpu ? 2e10 : 5e8;  // FLOPs per timed sample: several ms, many time slices
  for (double m : dims)
    for (double n : dims)
      for (double k : dims) {
        const int64_t mi = static_cast<int64_t>(m), ni = static_cast<int64_t>(n), ki = static_cast<int64_t>(k);
        // operand sets used in turn, as many as make kColdBytes: a training step's GEMMs find their
        // operands in memory, not in the cache of the previous identical call
        const double bytes = (m * k + n * k) * dtype_size(in) + m * n * 4.0;
        const int sets = static_cast<int>(std::clamp(std::ceil(kColdBytes / bytes), 1.0, 64.0));
        std::vector<Tensor> a, w, c;
        for (int i = 0; i < sets; ++i) {
          a.push_back(backend.zeros({mi, ki}, in));
          w.push_back(backend.zeros({ni, ki}, in));
          c.push_back(backend.zeros({mi, ni}, DType::kF32));
        }
        const double flops = 2 * m * n * k;
        const int reps = static_cast<int>(std::max(1.0, std::min(1000.0, per_sample / flops)));
        const double t = timed_slowest(backend, world, iters, 1, [&] {
          for (int r = 0; r < reps; ++r) gemm(backend, a[r % sets], Trans::kN, w[r % sets], Trans::kT, c[r % sets], 1.0, 0.0);
        });
        g.seconds.push_back(t / reps);
      }
  return g;
}

}  // namespace

int run_calibrate(const CommandLine& cl) {
  CommandLine rest = cl;  // --out is calibrate's own string option
  std::string out;
  rest.flags.clear();
  for (const std::string& f : cl.flags) {
    if (f.rfind("out=", 0) == 0) out = f.substr(4);
    else rest.flags.push_back(f);
  }
  const BenchOptions o = parse_bench_options("calibrate", rest, {}, {{"iters", 7}, {"quick", 0}}, {{"iters", 1}});
  on_every_rank([&] {
    if (out.empty()) throw ConfigError("--out", "moe_bench calibrate needs --out=FILE");
  });
  const int iters = static_cast<int>(o.get("iters"));
  const bool quick = o.get("quick") != 0;
  const Config base = parse_config("", "", o.sweep.point(0));
  auto world_comm = make_mpi_world();
  auto backend_ptr = make_backend(base, *world_comm);
  Backend& backend = *backend_ptr;
  Communicator& world = *world_comm;
  const int n = world.size();
  const bool gpu = backend.device() == Device::kCuda;
  auto say = [&](const std::string& s) {
    if (world.rank() == 0) log_info("calibrate (" + std::to_string(n) + " ranks): " + s);
  };

  CostConstants c;
  c.device = gpu ? "cuda" : "cpu";
  c.description = machine_description(backend, n);
  c.overlap = gpu;
  NodeConstants e;
  e.ranks = n;
  std::vector<double> dims = gpu ? std::vector<double>{64, 256, 1024, 4096} : std::vector<double>{16, 64, 256, 1024};
  if (quick) dims = {16, 64, 256};
  say("GEMM grid, " + std::to_string(dims.size() * dims.size() * dims.size()) + " shapes (fp32)");
  e.gemm = measure_gemm_grid(backend, world, DType::kF32, dims, iters);
  if (gpu) {
    say("GEMM grid (bf16 in, fp32 out)");
    e.gemm_bf16 = measure_gemm_grid(backend, world, DType::kBF16, dims, iters);
  }
  // repetitions per timed sample: about 10 ms of work on one CPU core (a GPU: 50 launches)
  auto reps_of = [&](int cpu_reps) { return gpu ? 50 : cpu_reps; };
  RngStream rng{1, rng_stream(RngPurpose::kTest, 2000)};
  {
    say("element-wise rates");
    const int64_t len = int64_t{1} << 17;
    Tensor x = normal_tensor(backend, {len}, DType::kF32, rng, 0), y = normal_tensor(backend, {len}, DType::kF32, rng, len);
    double t = timed_slowest(backend, world, iters, 1, [&] {
      for (int r = 0; r < reps_of(200); ++r) axpy(backend, 1e-3, x, y);
    });
    e.stream_bytes_per_s = 12.0 * len * reps_of(200) / t;
    Tensor xs = normal_tensor(backend, {16}, DType::kF32, rng, 0), ys = normal_tensor(backend, {16}, DType::kF32, rng, 16);
    t = timed_slowest(backend, world, iters, 1, [&] {
      for (int r = 0; r < 1000; ++r) axpy(backend, 1e-3, xs, ys);
    });
    e.op_alpha_s = t / 1000;

    const int64_t bh = 16, s = 128;
    Tensor scores = normal_tensor(backend, {bh, s, s}, DType::kF32, rng, 0), probs = backend.empty({bh, s, s}, DType::kF32);
    Tensor dprobs = normal_tensor(backend, {bh, s, s}, DType::kF32, rng, 1), ds = backend.empty({bh, s, s}, DType::kF32);
    t = timed_slowest(backend, world, iters, 1, [&] {
      for (int r = 0; r < reps_of(12); ++r) {
        causal_softmax_forward(backend, scores, 0.125, probs);
        causal_softmax_backward(backend, dprobs, probs, 0.125, ds);
      }
    });
    e.softmax_elems_per_s = static_cast<double>(bh * s * s) * reps_of(12) / t;

    const int64_t rows = 512, mid = 512;
    Tensor a = normal_tensor(backend, {rows, mid}, DType::kF32, rng, 0), g = normal_tensor(backend, {rows, mid}, DType::kF32, rng, 1);
    Tensor hh = backend.empty({rows, mid}, DType::kF32), dh = normal_tensor(backend, {rows, mid}, DType::kF32, rng, 2);
    Tensor da = backend.empty({rows, mid}, DType::kF32), dg = backend.empty({rows, mid}, DType::kF32);
    t = timed_slowest(backend, world, iters, 1, [&] {
      for (int r = 0; r < reps_of(8); ++r) {
        swiglu_forward(backend, a, g, hh);
        swiglu_backward(backend, dh, a, g, da, dg);
      }
    });
    e.swiglu_elems_per_s = static_cast<double>(rows * mid) * reps_of(8) / t;

    const int64_t params = int64_t{1} << 18;
    Tensor p = normal_tensor(backend, {params}, DType::kF32, rng, 0), gr = normal_tensor(backend, {params}, DType::kF32, rng, 1);
    Tensor m = backend.zeros({params}, DType::kF32), v = backend.zeros({params}, DType::kF32);
    AdamArgs args;
    t = timed_slowest(backend, world, iters, 1, [&] {
      for (int r = 0; r < reps_of(16); ++r) adamw_step(backend, p, gr, m, v, args, nullptr);
    });
    e.adamw_params_per_s = static_cast<double>(params) * reps_of(16) / t;

    // synchronisation: rounds of about 1 ms of one-core work, each ended by an 8-byte all_reduce,
    // against the same work with no collective in between
    if (n > 1) {
      say("synchronisation cost");
      double one = 0, sum = 0;
      const int rounds = 50;
      auto work = [&] {
        for (int r = 0; r < 25; ++r) axpy(backend, 1e-3, x, y);
      };
      const double with = timed_slowest(backend, world, iters, 1, [&] {
        for (int i = 0; i < rounds; ++i) {
          work();
          world.host().all_reduce_sum(&one, &sum, 1, DType::kF64);
        }
      });
      const double without = timed_slowest(backend, world, iters, 1, [&] {
        for (int i = 0; i < rounds; ++i) work();
      });
      e.sync_s = std::max(0.0, (with - without) / rounds);
    }
  }
  // collectives over the world (the communicator of the device: MPI on a CPU, NCCL on a GPU)
  Config group_config = base;
  group_config.parallel.ep = n;
  ProcessGroups groups = make_groups(group_config, backend, std::move(world_comm));
  if (n > 1) {
    say("all_to_all and all_reduce, alpha-beta fits");
    std::vector<double> x, t;
    for (size_t bytes = 4096; bytes <= (size_t{4} << 20); bytes *= 4) {
      const RawRow r = a2a_row(backend, *groups.ep, *groups.world, false, bytes, iters, 1);
      x.push_back(r.bytes * (n - 1) / n);
      t.push_back(r.time_us * 1e-6);
    }
    e.all_to_all = fit_alpha_beta(x, t);
    x.clear(), t.clear();
    for (size_t bytes = 4096; bytes <= (size_t{16} << 20); bytes *= 4) {
      Tensor buf = backend.zeros({static_cast<int64_t>(bytes / 4)}, DType::kF32);
      const double s = timed_slowest(backend, *groups.world, iters, 1, [&] {
        groups.world->all_reduce_sum(buf.raw(), buf.raw(), bytes / 4, DType::kF32);
      });
      x.push_back(2.0 * bytes * (n - 1) / n);
      t.push_back(s);
    }
    e.all_reduce = fit_alpha_beta(x, t);
  } else {
    e.all_to_all.bytes_per_s = e.all_reduce.bytes_per_s = 1e30;  // nothing crosses a link
  }
  // The reference step: a small MoE transformer (not a validation configuration) trained on synthetic
  // tokens with balanced forced routing; its measured compute time over the time the constants above
  // predict is the step efficiency.
  {
    say("reference training step");
    Config ref = base;
    ref.model.hidden = 192;
    ref.model.layers = 2;
    ref.model.heads = 3;
    ref.model.seq_len = 64;
    ref.moe.num_experts = n * ((4 + n - 1) / n);
    ref.moe.top_k = 2;
    ref.moe.ffn_hidden = 256;
    ref.moe.force_routing = parse_forced_routing("uniform");
    ref.parallel.ep = n;
    ref.train.batch_size = 8 * n;
    ref.train.steps = 24;
    ref.train.warmup_steps = 2;
    ref.train.log_every = 1000;
    on_every_rank([&] { validate_config(ref, n); });
    Trainer trainer(ref, backend, groups);
    std::vector<double> walls;
    for (int i = 0; i < ref.train.steps; ++i) {
      const StepRecord r = trainer.train_step();
      if (i >= 8) walls.push_back(r.wall_s);
    }
    std::vector<double> mine{median(walls)}, all(static_cast<size_t>(n));
    groups.world->host().all_gather(mine.data(), all.data(), 1, DType::kF64);
    const double measured = *std::max_element(all.begin(), all.end());
    CostConstants one = c;
    one.nodes = {e};
    PredictOptions o;
    o.ranks = n;
    o.ep = n;
    const StepPrediction p = predict_step(ref, one, o);
    e.step_efficiency = std::clamp((measured - p.comm_s) / (p.step_s - p.comm_s), 0.25, 8.0);
  }
  c.nodes.push_back(e);
  if (groups.world->rank() == 0) {
    merge_constants_file(out, c);
    char line[400];
    std::snprintf(line, sizeof(line),
                  "calibrate (%d ranks): GEMM %.0f^3 %.2f GFLOP/s per rank, stream %.2f GB/s, softmax %.0f M/s, swiglu "
                  "%.0f M/s, adamw %.0f M/s, all_to_all %.1f us + %.3f GB/s, all_reduce %.1f us + %.3f GB/s, sync %.1f us, step efficiency %.2f -> %s",
                  n, dims.back(), 2e-9 * std::pow(dims.back(), 3) / e.gemm.seconds.back(), e.stream_bytes_per_s * 1e-9,
                  e.softmax_elems_per_s * 1e-6, e.swiglu_elems_per_s * 1e-6, e.adamw_params_per_s * 1e-6,
                  e.all_to_all.alpha_s * 1e6, e.all_to_all.bytes_per_s * 1e-9, e.all_reduce.alpha_s * 1e6,
                  e.all_reduce.bytes_per_s * 1e-9, e.sync_s * 1e6, e.step_efficiency, out.c_str());
    log_info(line);
  }
  return 0;
}

}  // namespace moe
