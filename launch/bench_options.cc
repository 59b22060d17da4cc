#include "launch/bench_options.h"

#include <algorithm>
#include <cstdlib>

namespace moe {

RawExchange raw_exchange(Backend& backend, ProcessGroups& groups, double bytes_here, DType dtype, int iters,
                         int warmup) {
  std::vector<double> sent{bytes_here};
  groups.world->all_reduce_sum(sent);
  RawExchange r;
  r.bytes = sent[0] / groups.world->size();
  const int n = groups.ep->size();
  const size_t per_peer =
      std::max<size_t>(1, static_cast<size_t>(r.bytes / static_cast<double>(dtype_size(dtype))) / static_cast<size_t>(n));
  Tensor a = backend.zeros({static_cast<int64_t>(per_peer) * n}, dtype);
  Tensor b = backend.empty({static_cast<int64_t>(per_peer) * n}, dtype);
  r.seconds = timed_slowest(backend, *groups.world, iters, warmup, [&] {
    groups.ep->all_to_all(a.raw(), b.raw(), per_peer, dtype);
    groups.ep->all_to_all(b.raw(), a.raw(), per_peer, dtype);
  });
  return r;
}

namespace {

// Short names of the configuration keys the benchmarks are usually run with.
const std::pair<const char*, const char*> kAliases[] = {
    {"tokens", "model.seq_len"},
    {"hidden", "model.hidden"},
    {"experts", "moe.num_experts"},
    {"top_k", "moe.top_k"},
    {"shared", "moe.num_shared_experts"},
    {"ffn_hidden", "moe.ffn_hidden"},
    {"capacity_factor", "moe.capacity_factor"},
    {"expert_type", "moe.expert_type"},
    {"force_routing", "moe.force_routing"},
    {"threads", "runtime.threads"},
    {"dtype", "runtime.dtype"},
    {"device", "runtime.device"},
    {"precision", "runtime.precision"}};

}  // namespace

BenchOptions parse_bench_options(const char* what, const CommandLine& cl, const std::vector<std::string>& defaults,
                                 const std::map<std::string, long>& ints, const std::map<std::string, long>& minimums) {
  return on_every_rank([&] {
    BenchOptions o;
    o.ints = ints;
    o.sweep.add_overrides(defaults);
    if (!cl.config_path.empty()) {
      throw ConfigError("", std::string("moe_bench ") + what + " takes no configuration file (got '" +
                                cl.config_path + "'); give keys as --section.key=value");
    }
    std::vector<std::string> options = cl.flags;
    options.insert(options.end(), cl.overrides.begin(), cl.overrides.end());
    for (const std::string& f : options) {
      const size_t eq = f.find('=');
      std::string k = f.substr(0, eq);
      const std::string v = eq == std::string::npos ? "" : f.substr(eq + 1);
      if (k == "format") {
        if (v != "table" && v != "json" && v != "csv") throw ConfigError(k, "expected table | json | csv, got '" + v + "'");
        o.format = v;
      } else if (ints.count(k)) {
        char* end = nullptr;
        const long n = std::strtol(v.c_str(), &end, 10);
        const long lo = minimums.count(k) ? minimums.at(k) : 0;
        if (v.empty() || *end != '\0' || n < lo) {
          throw ConfigError(k, "expected an integer >= " + std::to_string(lo) + ", got '" + v + "'");
        }
        o.ints[k] = n;
      } else {
        for (const auto& [alias, key] : kAliases)
          if (k == alias) k = key;
        if (eq == std::string::npos || k.find('.') == std::string::npos) {
          throw ConfigError(k, "unknown or malformed option --" + f + " (see moe_bench --help)");
        }
        o.sweep.add_overrides({k + "=" + v});
      }
    }
    for (const char* fixed : {"runtime.device", "runtime.dtype", "runtime.threads"}) {
      for (const std::string& k : o.sweep.swept_keys())
        if (k == fixed) throw ConfigError(k, "takes one value per benchmark run");
    }
    return o;
  });
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace moe
