// What the benchmarks of moe_bench share: options that are configuration keys (with short names) swept
// through one Sweep, the benchmark's own integer flags, the output format, and the timing helpers.
#pragma once

#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "launch/main_common.h"
#include "config/sweep.h"

namespace moe {

struct BenchOptions {
  std::string format = "table";    // table | json | csv
  std::map<std::string, long> ints;  // the benchmark's own flags (iters, warmup, ...), with their defaults
  Sweep sweep;                     // configuration keys; one row per combination
  long get(const std::string& name) const { return ints.at(name); }
};

// Parses `moe_bench <what>` options: --format, the integer flags named in `ints` (name -> default, each
// >= its minimum in `minimums`), and configuration keys given as --section.key=value or by a short name
// (tokens, hidden, experts, top_k, shared, ffn_hidden, capacity_factor, expert_type, force_routing,
// threads, dtype, device, precision), after the `defaults` overrides. Throws ConfigError (collective).
BenchOptions parse_bench_options(const char* what, const CommandLine& cl, const std::vector<std::string>& defaults,
                                 const std::map<std::string, long>& ints, const std::map<std::string, long>& minimums);

double median(std::vector<double> v);
double seconds_since(std::chrono::steady_clock::time_point t);

// Seconds f takes: the median over `iters` runs (after `warmup` more), each started by every rank together
// after a barrier and ended by a device synchronisation; the slowest rank's median. Collective over world.
template <typename F>
double timed_slowest(Backend& backend, Communicator& world, int iters, int warmup, F f) {
  std::vector<double> times;
  for (int it = 0; it < warmup + iters; ++it) {
    world.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    backend.synchronize();
    if (it >= warmup) times.push_back(seconds_since(t0));
  }
  std::vector<double> mine{median(times)}, all(static_cast<size_t>(world.size()));
  world.host().all_gather(mine.data(), all.data(), 1, DType::kF64);
  return *std::max_element(all.begin(), all.end());
}

// The raw collective an MoE exchange is compared with: two all_to_alls over groups.ep (there and back),
// each moving the mean over the world of `bytes_here` per rank (what a rank's dispatch sends depends on its
// routing), evenly split over the ep ranks, in `dtype`. Collective over the world.
struct RawExchange {
  double seconds = 0;  // timed_slowest of the pair
  double bytes = 0;    // per rank, the mean
};
RawExchange raw_exchange(Backend& backend, ProcessGroups& groups, double bytes_here, DType dtype, int iters,
                         int warmup);

}  // namespace moe
