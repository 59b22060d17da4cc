// What the benchmarks of moe_bench share: options that are configuration keys (with short names) swept
// through one Sweep, the benchmark's own integer flags, the output format, and the timing helpers.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "launch/main_common.h"
#include "runtime/sweep.h"

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

}  // namespace moe
