// All-to-all benchmark in the nccl-tests table format, and the MoE exchange against the raw collective.
//
// Raw rows (perf/collectives.h): all_to_all and all_to_all_v over a size sweep, on the communicator of
// runtime.device (MPI on the CPU, NCCL on a GPU), each rank checking what it received. size is the bytes
// one rank sends (all_to_all_v: the mean over ranks), algbw = size / time and busbw = algbw (n - 1) / n,
// as nccl-tests reports them; time is the slowest rank's median.
//
// MoE rows: one MoE layer's dispatch + combine (plan, permute, block exchange and back, gate-weighted
// sum) with identity experts, against two raw all_to_alls moving the same bytes per rank. raw/ours is the
// fraction of the collective's speed our exchange keeps (goal >= 0.9). #wrong counts tokens whose
// combined output is not x times the sum of their kept gates.
#include "perf/a2a_bench.h"

#include <algorithm>
#include <cmath>

#include "base/json.h"
#include "model/dispatcher.h"
#include "model/params.h"
#include "model/router.h"
#include "perf/collectives.h"

namespace moe {
namespace {

constexpr uint64_t kSeed = 20261130;

// The keys every MoE row shows in its own columns.
const std::vector<std::string> kShownKeys = {"model.seq_len", "model.hidden", "moe.num_experts", "moe.top_k",
                                             "moe.capacity_factor", "moe.force_routing"};

}  // namespace

BenchFlags a2a_bench_flags() {
  BenchFlags f;
  f.defaults = {"model.seq_len=1024", "model.hidden=512", "moe.top_k=2", "moe.capacity_factor=1.25,0"};
  f.iters = 20;
  f.warmup = 5;
  f.ints = {{"min_bytes", 1024}, {"max_bytes", 16 << 20}, {"factor", 4}, {"moe", 1}};
  f.minimums = {{"min_bytes", 4}, {"factor", 2}};
  return f;
}

struct MoeExchangeBench::State {
  ParamSet params;
  std::unique_ptr<Router> router;
  std::unique_ptr<Dispatcher> dispatcher;
  Tensor x, y;
  const RouteState* route = nullptr;
  bool bf16 = false;
};

MoeExchangeBench::MoeExchangeBench(std::vector<Config> configs, std::vector<std::string> extra_keys)
    : configs_(std::move(configs)), extra_keys_(std::move(extra_keys)), rows_(configs_.size()) {}
MoeExchangeBench::~MoeExchangeBench() = default;

std::vector<std::string> MoeExchangeBench::title(BenchRun& run) {
  return {"MoE exchange: one layer's dispatch + combine (identity experts) against two raw all_to_alls of the same "
          "bytes per rank; raw/ours: the share of the raw speed kept (goal >= 0.9)"};
}

std::vector<Column> MoeExchangeBench::columns() const {
  std::vector<Column> c = {{"op", "", 0, 0},
                           {"ranks", "", 0, 0},
                           {"comm", "", 0, 0},
                           {"bytes", "bytes/rank", 12, 0},
                           {"tokens", "tokens", 7, 0},
                           {"hidden", "hidden", 6, 0},
                           {"experts", "experts", 7, 0},
                           {"top_k", "top_k", 5, 0},
                           {"capacity_factor", "capacity", 8, 0},
                           {"routing", "routing", 8, 0}};
  for (const std::string& k : extra_keys_) c.push_back(swept_column(k));
  c.insert(c.end(), {{"ours_us", "ours(us)", 10, 1}, {"raw_us", "raw(us)", 10, 1}, {"raw_over_ours", "raw/ours", 8, 2}});
  return c;
}

void MoeExchangeBench::setup(BenchRun& run, size_t i) {
  const Config& c = configs_[i];
  Backend& backend = run.backend();
  ProcessGroups& groups = run.groups();
  const int n = groups.ep->size(), rank = groups.ep->rank();
  const int64_t tokens = c.model.seq_len, hidden = c.model.hidden;
  state_ = std::make_unique<State>();
  State& s = *state_;
  s.router = std::make_unique<Router>(s.params, "a2a", c, 0);
  s.params.allocate(backend, DType::kF32, 1);
  s.x = normal_tensor(backend, {tokens, hidden}, DType::kF32, RngStream{kSeed, rng_stream(RngPurpose::kTest, 11)},
                      rank * tokens * hidden);
  StepContext ctx;
  ctx.training = false;
  ctx.seq_len = tokens;
  ctx.token_offset = rank * tokens;
  ctx.global_tokens = tokens * n;
  s.route = &s.router->forward(backend, *groups.world, s.x, ctx);
  s.bf16 = c.runtime.precision == Precision::kBf16;  // rows travel in BF16, as for bf16 experts
  s.dispatcher = std::make_unique<Dispatcher>(c.moe.num_experts, static_cast<int>(hidden), dispatch_layout(c), s.bf16);
}

void MoeExchangeBench::run(BenchRun& run, size_t i) {
  State& s = *state_;
  Backend& backend = run.backend();
  Communicator& ep = *run.groups().ep;
  s.dispatcher->plan(backend, ep, *s.route);
  Tensor expert_in = s.dispatcher->dispatch(backend, ep, s.x, *s.route);
  s.y = backend.empty(s.x.shape(), DType::kF32);
  s.dispatcher->combine(backend, ep, expert_in, *s.route, s.y);  // identity experts
}

int64_t MoeExchangeBench::check(BenchRun& run, size_t i) {
  State& s = *state_;
  Backend& backend = run.backend();
  // y[t] = x[t] * (sum of the gates of t's kept choices)
  const std::vector<double> xs = to_doubles(backend, s.x), ys = to_doubles(backend, s.y),
                            gate = to_doubles(backend, s.route->gate), rows = to_doubles(backend, s.route->row_idx);
  const int k = s.route->top_k();
  const int64_t tokens = s.x.dim(0), hidden = s.x.dim(1);
  int64_t wrong = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    double g = 0;
    for (int j = 0; j < k; ++j)
      if (rows[t * k + j] >= 0) g += gate[t * k + j];
    double err = 0, scale = 1e-30;
    for (int64_t h = 0; h < hidden; ++h) {
      err = std::max(err, std::abs(ys[t * hidden + h] - g * xs[t * hidden + h]));
      scale = std::max(scale, std::abs(xs[t * hidden + h]));
    }
    wrong += !(err <= (s.bf16 ? 1e-2 : 1e-5) * scale);  // bf16: x rounded to 8 bits of mantissa on the way
  }
  rows_[i].wrong = static_cast<int64_t>(run.sum(static_cast<double>(wrong)));
  return rows_[i].wrong;
}

std::vector<Cell> MoeExchangeBench::cells(BenchRun& run, size_t i, double seconds) {
  const Config& c = configs_[i];
  ExchangeRow& r = rows_[i];
  const RawExchange raw = raw_exchange(run, static_cast<double>(state_->dispatcher->send_bytes()), DType::kF32);
  r.bytes = raw.bytes;
  r.ours_s = seconds;
  r.raw_s = raw.seconds;
  const std::string routing = c.moe.force_routing.on() ? forced_routing_name(c.moe.force_routing) : "learned";
  std::vector<Cell> out = {"moe_exchange",
                           run.groups().world->size(),
                           run.groups().ep->name(),
                           r.bytes,
                           int64_t{c.model.seq_len},
                           int64_t{c.model.hidden},
                           int64_t{c.moe.num_experts},
                           int64_t{c.moe.top_k},
                           c.moe.capacity_factor > 0 ? format_double(c.moe.capacity_factor) : "dropless",
                           routing};
  for (const std::string& k : extra_keys_) out.emplace_back(config_field(k).get(c));
  out.insert(out.end(), {seconds * 1e6, raw.seconds * 1e6, raw.seconds / seconds});
  return out;
}

void MoeExchangeBench::teardown(size_t i) { state_.reset(); }

int run_a2a_bench(BenchRun& run) {
  const BenchOptions& o = run.options();
  ProcessGroups& groups = run.groups();
  const int world = groups.world->size();
  std::vector<size_t> sizes;
  for (long bytes = o.get("min_bytes"); bytes <= o.get("max_bytes"); bytes *= o.get("factor")) {
    sizes.push_back(static_cast<size_t>(bytes));
  }
  CollectiveBench even(Collective::kAllToAll, *groups.ep, sizes), uneven(Collective::kAllToAllV, *groups.ep, sizes);
  std::vector<Bench*> benches{&even, &uneven};
  std::vector<Config> configs;
  if (o.get("moe") != 0) {
    bool experts_given = false;
    for (const SweepAxis& a : o.sweep.axes()) experts_given |= a.key == "moe.num_experts";
    for (size_t point = 0; point < o.sweep.size(); ++point) {
      configs.push_back(on_every_rank([&] {
        Config c = parse_config("", "", o.sweep.point(point));
        if (!experts_given) c.moe.num_experts = 2 * world;
        c.parallel.ep = world;
        c.train.batch_size = world;
        validate_config(c, world);
        if (c.moe.num_experts == 0) throw ConfigError("moe.num_experts", "must be > 0 in moe_bench a2a");
        return c;
      }));
    }
  }
  MoeExchangeBench moe(configs, other_swept_keys(o.sweep, kShownKeys));
  if (!configs.empty()) benches.push_back(&moe);
  return run.execute(benches);
}

}  // namespace moe
