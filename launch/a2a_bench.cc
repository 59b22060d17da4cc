// All-to-all benchmark in the nccl-tests table format, and the MoE exchange against the raw collective.
//
// Raw rows: all_to_all and all_to_all_v over a size sweep, on the communicator of runtime.device (MPI on
// the CPU, NCCL on a GPU). Every element sent is a function of (seed, source rank, destination rank,
// index), so each rank checks what it received on its own (#wrong: elements that differ, over all
// ranks). size is the bytes one rank sends (all_to_all_v: the mean over ranks), algbw = size / time and
// busbw = algbw (n - 1) / n, as nccl-tests reports them; time is the slowest rank's median.
//
// MoE rows: one MoE layer's dispatch + combine (permute, fill counts, exchange, compaction and back,
// gate-weighted sum) with identity experts, against two raw all_to_alls moving the same bytes per rank.
// raw/ours is the fraction of the collective's speed our exchange keeps (goal >= 0.9). #wrong counts
// tokens whose combined output is not x times the sum of their kept gates.
#include "launch/a2a_bench.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "launch/bench_options.h"
#include "model/dispatcher.h"
#include "model/params.h"
#include "model/router.h"
#include "base/json.h"
#include "base/log.h"

namespace moe {
namespace {

constexpr uint64_t kSeed = 20261130;

// The value rank `src` sends to rank `dst` at index k: 20 random bits, exact in F32.
float a2a_value(int src, int dst, uint64_t k) {
  uint64_t z = kSeed ^ (static_cast<uint64_t>(src) << 48) ^ (static_cast<uint64_t>(dst) << 32) ^ k;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64 finaliser
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 44);
}

// Elements rank src sends to rank dst in all_to_all_v: `base` times a weight 1..3 of the pair, so the
// exchange is uneven in both directions.
size_t v_count(size_t base, int src, int dst) {
  return std::max<size_t>(1, base * static_cast<size_t>(1 + (src * 7 + dst * 13) % 3) / 2);
}


}  // namespace

RawRow a2a_row(Backend& backend, Communicator& comm, Communicator& world, bool vary, size_t bytes, int iters,
               int warmup) {
  const int n = comm.size(), me = comm.rank();
  const size_t base = std::max<size_t>(1, bytes / sizeof(float) / static_cast<size_t>(n));
  std::vector<size_t> sc(n), so(n), rc(n), ro(n);
  for (int p = 0; p < n; ++p) {
    sc[p] = vary ? v_count(base, me, p) : base;
    rc[p] = vary ? v_count(base, p, me) : base;
  }
  for (int p = 1; p < n; ++p) so[p] = so[p - 1] + sc[p - 1], ro[p] = ro[p - 1] + rc[p - 1];
  const size_t send_total = so[n - 1] + sc[n - 1], recv_total = ro[n - 1] + rc[n - 1];
  std::vector<float> host(send_total);
  for (int p = 0; p < n; ++p)
    for (size_t k = 0; k < sc[p]; ++k) host[so[p] + k] = a2a_value(me, p, k);
  Tensor send = backend.empty({static_cast<int64_t>(send_total)}, DType::kF32);
  Tensor recv = backend.zeros({static_cast<int64_t>(recv_total)}, DType::kF32);
  backend.copy_from_host(host.data(), send);
  const double t = timed_slowest(backend, world, iters, warmup, [&] {
    if (vary) comm.all_to_all_v(send.raw(), sc, so, recv.raw(), rc, ro, DType::kF32);
    else comm.all_to_all(send.raw(), recv.raw(), base, DType::kF32);
  });
  std::vector<float> got(recv_total);
  backend.copy_to_host(recv, got.data());
  int64_t wrong = 0;
  for (int p = 0; p < n; ++p)
    for (size_t k = 0; k < rc[p]; ++k) wrong += got[ro[p] + k] != a2a_value(p, me, k);
  std::vector<double> sums{static_cast<double>(wrong), static_cast<double>(send_total)};
  world.all_reduce_sum(sums);
  RawRow r;
  r.op = vary ? "all_to_all_v" : "all_to_all";
  r.count = sums[1] / n;
  r.bytes = r.count * sizeof(float);
  r.time_us = t * 1e6;
  r.algbw = r.bytes / t * 1e-9;
  r.busbw = r.algbw * (n - 1) / n;
  r.wrong = static_cast<int64_t>(sums[0]);
  return r;
}


MoeRow moe_exchange_row(Backend& backend, ProcessGroups& groups, const Config& c, int iters, int warmup) {
  Communicator& ep = *groups.ep;
  const int n = ep.size(), rank = ep.rank();
  const int64_t tokens = c.model.seq_len, hidden = c.model.hidden;
  ParamSet params;
  Router router(params, "a2a", c, 0);
  params.allocate(backend, DType::kF32, 1);
  Tensor x = normal_tensor(backend, {tokens, hidden}, DType::kF32, RngStream{kSeed, rng_stream(RngPurpose::kTest, 11)},
                           rank * tokens * hidden);
  StepContext ctx;
  ctx.training = false;
  ctx.seq_len = tokens;
  ctx.token_offset = rank * tokens;
  ctx.global_tokens = tokens * n;
  const RouteState& route = router.forward(backend, *groups.world, x, ctx);
  const bool bf16 = c.runtime.precision == Precision::kBf16;  // rows travel in BF16, as for bf16 experts
  Dispatcher dispatcher(c.moe.num_experts, static_cast<int>(hidden), dispatch_layout(c), bf16);
  Tensor y;
  const double ours = timed_slowest(backend, *groups.world, iters, warmup, [&] {
    dispatcher.plan(backend, ep, route);
    Tensor expert_in = dispatcher.dispatch(backend, ep, x, route);
    y = backend.empty({tokens, hidden}, DType::kF32);
    dispatcher.combine(backend, ep, expert_in, route, y);  // identity experts
  });
  const RawExchange raw =
      raw_exchange(backend, groups, static_cast<double>(dispatcher.send_bytes()), DType::kF32, iters, warmup);
  // y[t] = x[t] * (sum of the gates of t's kept choices)
  std::vector<double> xs = to_doubles(backend, x), ys = to_doubles(backend, y), gate = to_doubles(backend, route.gate),
                      rows = to_doubles(backend, route.row_idx);
  const int k = route.top_k();
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
    wrong += !(err <= (bf16 ? 1e-2 : 1e-5) * scale);  // bf16: x rounded to 8 bits of mantissa on the way
  }
  std::vector<double> sums{static_cast<double>(wrong)};
  groups.world->all_reduce_sum(sums);
  return MoeRow{tokens,
                hidden,
                c.moe.num_experts,
                c.moe.top_k,
                c.moe.capacity_factor > 0 ? format_double(c.moe.capacity_factor) : "dropless",
                forced_routing_name(c.moe.force_routing) == "off" ? "learned" : forced_routing_name(c.moe.force_routing),
                raw.bytes,
                ours * 1e6,
                raw.seconds * 1e6,
                static_cast<int64_t>(sums[0])};
}

int run_a2a_bench(const CommandLine& cl) {
  const BenchOptions o = parse_bench_options(
      "a2a", cl, {"model.seq_len=1024", "model.hidden=512", "moe.top_k=2", "moe.capacity_factor=1.25,0"},
      {{"iters", 20}, {"warmup", 5}, {"min_bytes", 1024}, {"max_bytes", 16 << 20}, {"factor", 4}, {"moe", 1}},
      {{"iters", 1}, {"min_bytes", 4}, {"factor", 2}});
  const int iters = static_cast<int>(o.get("iters")), warmup = static_cast<int>(o.get("warmup"));
  const Config base = parse_config("", "", o.sweep.point(0));
  auto world_comm = make_mpi_world();
  auto backend = make_backend(base, *world_comm);
  const int world = world_comm->size();
  Config group_config = base;
  group_config.parallel.ep = world;
  ProcessGroups groups = make_groups(group_config, *backend, std::move(world_comm));
  Communicator& comm = *groups.ep;  // every rank
  const bool experts_given = [&] {
    for (const SweepAxis& a : o.sweep.axes())
      if (a.key == "moe.num_experts") return true;
    return false;
  }();

  std::vector<RawRow> raw;
  bool wrong = false;
  const auto table = o.format == "table";
  if (table) {
    log_info("# moe_bench a2a: communicator " + comm.name() + " (" + backend->name() + " buffers), " +
             std::to_string(world) + " rank(s), float32, " + std::to_string(iters) + " iters after " +
             std::to_string(warmup) + " warm-up, slowest rank's median");
    log_info("# size: bytes one rank sends (all_to_all_v: the mean over ranks); busbw = algbw * (n-1)/n");
  }
  for (bool vary : {false, true}) {
    if (table) {
      log_info(std::string("# ") + (vary ? "all_to_all_v (uneven: pair weights 1..3)" : "all_to_all"));
      log_info("#        size       count   type     time(us)  algbw(GB/s)  busbw(GB/s)  #wrong");
    }
    for (long bytes = o.get("min_bytes"); bytes <= o.get("max_bytes"); bytes *= o.get("factor")) {
      raw.push_back(a2a_row(*backend, comm, *groups.world, vary, static_cast<size_t>(bytes), iters, warmup));
      const RawRow& r = raw.back();
      wrong |= r.wrong > 0;
      if (table) {
        char line[160];
        std::snprintf(line, sizeof(line), "  %12.0f  %10.0f  float  %11.2f  %11.3f  %11.3f  %6lld", r.bytes, r.count,
                      r.time_us, r.algbw, r.busbw, static_cast<long long>(r.wrong));
        log_info(line);
      }
    }
  }

  std::vector<MoeRow> moe;
  if (o.get("moe") != 0) {
    if (table) {
      log_info("# MoE exchange: one layer's dispatch + combine (identity experts) against two raw all_to_alls of "
               "the same bytes per rank; raw/ours: the share of the raw speed kept (goal >= 0.9)");
      log_info("#  tokens  hidden  experts  top_k  capacity  routing    bytes/rank    ours(us)     raw(us)  raw/ours  "
               "#wrong");
    }
    for (size_t point = 0; point < o.sweep.size(); ++point) {
      const Config c = on_every_rank([&] {
        Config c = parse_config("", "", o.sweep.point(point));
        if (!experts_given) c.moe.num_experts = 2 * world;
        c.parallel.ep = world;
        c.train.batch_size = world;
        validate_config(c, world);
        if (c.moe.num_experts == 0) throw ConfigError("moe.num_experts", "must be > 0 in moe_bench a2a");
        return c;
      });
      moe.push_back(moe_exchange_row(*backend, groups, c, iters, warmup));
      const MoeRow& r = moe.back();
      wrong |= r.wrong > 0;
      if (table) {
        char line[200];
        std::snprintf(line, sizeof(line), "  %7lld  %6lld  %7lld  %5lld  %8s  %-8s  %12.0f  %10.1f  %10.1f  %8.2f  %6lld",
                      (long long)r.tokens, (long long)r.hidden, (long long)r.experts, (long long)r.top_k,
                      r.capacity_factor.c_str(), r.routing.c_str(), r.bytes, r.ours_us, r.raw_us, r.raw_us / r.ours_us,
                      (long long)r.wrong);
        log_info(line);
      }
    }
  }

  if (table) {
    log_info(wrong ? "# WRONG RESULTS" : "# all rows correct");
  } else {
    // json: one object per row; csv: one header for both kinds of row (a kind leaves the other's empty)
    if (o.format == "csv") {
      log_info("op,ranks,comm,bytes,count,time_us,algbw_gbs,busbw_gbs,tokens,hidden,experts,top_k,capacity_factor,"
               "routing,ours_us,raw_us,raw_over_ours,wrong");
    }
    for (const RawRow& r : raw) {
      if (o.format == "json") {
        JsonWriter j;
        j.begin_object().field("op", r.op).field("ranks", world).field("comm", comm.name()).field("bytes", r.bytes);
        j.field("count", r.count).field("time_us", r.time_us).field("algbw_gbs", r.algbw);
        j.field("busbw_gbs", r.busbw).field("wrong", r.wrong).end_object();
        log_info(j.str());
      } else {
        std::ostringstream s;
        s << r.op << "," << world << "," << comm.name() << "," << r.bytes << "," << r.count << "," << r.time_us << ","
          << r.algbw << "," << r.busbw << ",,,,,,,,,," << r.wrong;
        log_info(s.str());
      }
    }
    for (const MoeRow& r : moe) {
      if (o.format == "json") {
        JsonWriter j;
        j.begin_object().field("op", "moe_exchange").field("ranks", world).field("comm", comm.name());
        j.field("bytes", r.bytes).field("tokens", r.tokens).field("hidden", r.hidden).field("experts", r.experts);
        j.field("top_k", r.top_k).field("capacity_factor", r.capacity_factor).field("routing", r.routing);
        j.field("ours_us", r.ours_us).field("raw_us", r.raw_us).field("raw_over_ours", r.raw_us / r.ours_us);
        j.field("wrong", r.wrong).end_object();
        log_info(j.str());
      } else {
        std::ostringstream s;
        s << "moe_exchange," << world << "," << comm.name() << "," << r.bytes << ",,,,," << r.tokens << ","
          << r.hidden << "," << r.experts << "," << r.top_k << "," << r.capacity_factor << "," << r.routing << ","
          << r.ours_us << "," << r.raw_us << "," << r.raw_us / r.ours_us << "," << r.wrong;
        log_info(s.str());
      }
    }
  }
  return wrong ? 1 : 0;
}

}  // namespace moe
