// The benchmark engine: options, timing, printers, exit code.
#include "perf/bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "base/error.h"
#include "base/json.h"
#include "base/log.h"

namespace moe {
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

long parse_int(const std::string& key, const std::string& v, long lo) {
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || n < lo) {
    throw ConfigError(key, "expected an integer >= " + std::to_string(lo) + ", got '" + v + "'");
  }
  return n;
}

}  // namespace

BenchOptions parse_bench_options(const std::string& what, const std::vector<std::string>& options,
                                 const BenchFlags& flags) {
  return on_every_rank([&] {
    BenchOptions o;
    o.iters = flags.iters;
    o.warmup = flags.warmup;
    o.ints = flags.ints;
    o.strings = flags.strings;
    o.sweep.add_overrides(flags.defaults);
    for (const std::string& f : options) {
      const size_t eq = f.find('=');
      std::string k = f.substr(0, eq);
      const std::string v = eq == std::string::npos ? "" : f.substr(eq + 1);
      if (k == "format") {
        if (v == "table") o.format = BenchFormat::kTable;
        else if (v == "json") o.format = BenchFormat::kJson;
        else if (v == "csv") o.format = BenchFormat::kCsv;
        else throw ConfigError(k, "expected table | json | csv, got '" + v + "'");
      } else if (k == "iters") {
        o.iters = static_cast<int>(parse_int(k, v, 1));
      } else if (k == "warmup") {
        o.warmup = static_cast<int>(parse_int(k, v, 0));
      } else if (flags.ints.count(k)) {
        o.ints[k] = parse_int(k, v, flags.minimums.count(k) ? flags.minimums.at(k) : 0);
      } else if (flags.strings.count(k)) {
        o.strings[k] = v;
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
        if (k == fixed) throw ConfigError(k, "takes one value per moe_bench " + what + " run");
    }
    return o;
  });
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::vector<std::string> other_swept_keys(const Sweep& sweep, const std::vector<std::string>& shown) {
  std::vector<std::string> out;
  for (const std::string& k : sweep.swept_keys())
    if (std::find(shown.begin(), shown.end(), k) == shown.end()) out.push_back(k);
  return out;
}

Column swept_column(const std::string& key) {
  const std::string name = key.substr(key.find('.') + 1);
  return {key, name, static_cast<int>(name.size()), 0};
}

double Bench::seconds(BenchRun& run, size_t i) {
  return run.time([&] { this->run(run, i); }, -1, -1, [&] { prepare(run, i); },
                  [&](bool timed) { after(run, i, timed); });
}

BenchRun::BenchRun(Backend& backend, ProcessGroups& groups, const BenchOptions& options)
    : backend_(backend), groups_(groups), options_(options) {}

double BenchRun::time(const std::function<void()>& f, int iters, int warmup, const std::function<void()>& prepare,
                      const std::function<void(bool)>& after) {
  if (iters < 0) iters = options_.iters;
  if (warmup < 0) warmup = options_.warmup;
  std::vector<double> times;
  for (int it = 0; it < warmup + iters; ++it) {
    if (prepare) prepare();
    backend_.synchronize();  // what prepare issued is done before the clock starts
    groups_.world->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    backend_.synchronize();
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (it >= warmup) times.push_back(t);
    if (after) after(it >= warmup);
  }
  return slowest(median(times));
}

double BenchRun::slowest(double v) {
  std::vector<double> all(static_cast<size_t>(groups_.world->size()));
  groups_.world->host().all_gather(&v, all.data(), 1, DType::kF64);
  return *std::max_element(all.begin(), all.end());
}

double BenchRun::sum(double v) {
  std::vector<double> s{v};
  groups_.world->all_reduce_sum(s);
  return s[0];
}

RowResult BenchRun::measure(Bench& bench, size_t i) {
  RowResult r;
  bench.setup(*this, i);
  r.seconds = bench.seconds(*this, i);
  r.wrong = bench.check(*this, i);
  r.cells = bench.cells(*this, i, r.seconds);
  bench.teardown(i);
  return r;
}

namespace {

std::string table_cell(const Cell& c, const Column& col) {
  std::string s = c.is_text ? c.text : [&] {
    char buf[64];
    if (c.integer) std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(c.number));
    else std::snprintf(buf, sizeof(buf), "%.*f", col.digits, c.number * col.table_scale);
    return std::string(buf);
  }();
  const size_t w = static_cast<size_t>(std::max(col.width, static_cast<int>(col.header.size())));
  return std::string(s.size() < w ? w - s.size() : 0, ' ') + s;
}

std::string plain_cell(const Cell& c) {
  if (c.is_text) return c.text;
  if (c.integer) return std::to_string(static_cast<long long>(c.number));
  return format_double(c.number);
}

// The table line of a row (or of the header, whose first character becomes '#').
std::string table_line(const std::vector<Column>& cols, const std::vector<Cell>& cells, const std::string& wrong) {
  std::string line;
  for (size_t c = 0; c < cols.size(); ++c) {
    if (cols[c].header.empty()) continue;
    line += "  " + table_cell(cells[c], cols[c]);
  }
  return line + "  " + std::string(wrong.size() < 6 ? 6 - wrong.size() : 0, ' ') + wrong;
}

}  // namespace

int BenchRun::execute(const std::vector<Bench*>& benches) {
  const bool print = groups_.world->rank() == 0;
  auto out = [&](const std::string& s) {
    if (print) log_info(s);
  };
  // CSV: one header, the union of the benches' keys in order of appearance.
  std::vector<std::string> csv_keys;
  for (Bench* b : benches)
    for (const Column& c : b->columns())
      if (std::find(csv_keys.begin(), csv_keys.end(), c.key) == csv_keys.end()) csv_keys.push_back(c.key);
  if (options_.format == BenchFormat::kCsv) {
    std::string h;
    for (const std::string& k : csv_keys) h += k + ",";
    out(h + "wrong");
  }
  bool any_wrong = false;
  std::string summary;
  for (Bench* b : benches) {
    const std::vector<Column> cols = b->columns();
    for (size_t i = 0; i < b->num_rows(); ++i) {
      b->setup(*this, i);
      if (i == 0 && options_.format == BenchFormat::kTable) {
        for (const std::string& t : b->title(*this)) out("# " + t);
        std::vector<Cell> heads;
        for (const Column& c : cols) heads.emplace_back(c.header);
        std::string head = table_line(cols, heads, "#wrong");
        head[0] = '#';
        out(head);
      }
      RowResult r;
      r.seconds = b->seconds(*this, i);
      r.wrong = b->check(*this, i);
      r.cells = b->cells(*this, i, r.seconds);
      b->teardown(i);
      MOE_CHECK(r.cells.size() == cols.size(), "bench row of ", r.cells.size(), " cells for ", cols.size(), " columns");
      any_wrong |= r.wrong > 0;  // -1: a row with nothing to check
      if (options_.format == BenchFormat::kTable) {
        out(table_line(cols, r.cells, r.wrong < 0 ? "-" : std::to_string(r.wrong)));
      } else if (options_.format == BenchFormat::kJson) {
        JsonWriter j;
        j.begin_object();
        for (size_t c = 0; c < cols.size(); ++c) {
          const Cell& cell = r.cells[c];
          if (cell.is_text) j.field(cols[c].key, cell.text);
          else if (cell.integer) j.field(cols[c].key, static_cast<int64_t>(cell.number));
          else j.field(cols[c].key, cell.number);
        }
        j.field("wrong", r.wrong).end_object();
        out(j.str());
      } else {
        std::string line;
        for (const std::string& k : csv_keys) {
          size_t c = 0;
          while (c < cols.size() && cols[c].key != k) ++c;
          line += (c < cols.size() ? plain_cell(r.cells[c]) : "") + ",";
        }
        out(line + std::to_string(r.wrong));
      }
    }
    if (!b->summary().empty()) summary = b->summary() + "   ";
  }
  if (options_.format == BenchFormat::kTable) out("# " + summary + (any_wrong ? "WRONG RESULTS" : "all rows correct"));
  return any_wrong ? 1 : 0;
}

}  // namespace moe
