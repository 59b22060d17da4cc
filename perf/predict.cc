// `moe_study predict` and `moe_study validate`: the cost model against configurations and measurements.
#include "perf/predict.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>

#include "model/transformer.h"
#include "base/error.h"
#include "base/json.h"
#include "train/safetensors.h"

namespace moe {
namespace fs = std::filesystem;

namespace {


std::string ms(double seconds) { return fixed(seconds * 1e3, seconds < 0.01 ? 3 : 1); }

}  // namespace

std::vector<std::vector<std::vector<double>>> observed_expert_load(const RunSummary& m) {
  std::vector<std::vector<std::vector<double>>> out;
  for (const auto& layer : m.load) {
    if (layer.empty()) continue;
    // the measured steps, as for the times
    const size_t skip = std::min(static_cast<size_t>(m.skipped), layer.size() - 1);
    out.emplace_back(layer.begin() + static_cast<std::ptrdiff_t>(skip), layer.end());
  }
  return out;
}

Table predict_table(const Config& config, const CostConstants& k, const PredictRequest& request) {
  Table t;
  t.columns = {"ranks", "nodes", "ep", "dp", "tokens/rank", "step ms", "tokens/s", "tokens/s/rank", "TFLOP/s/rank"};
  for (const Phase& p : kPhases) t.columns.push_back(std::string(p.name) + " ms");
  t.columns.insert(t.columns.end(), {"hidden ms", "imbalance", "dropped %"});
  std::vector<std::vector<std::vector<double>>> observed;
  if (!request.load_from.empty()) {
    observed = observed_expert_load(summarize_metrics_file(request.load_from));
    if (observed.empty()) throw InputError(request.load_from, "records no expert load (no MoE layer or no step)");
  }
  const double flops_per_token = model_size(config).flops_per_token;
  for (int ranks : request.ranks) {
    Config c = config;
    if (request.batch_per_rank > 0) c.train.batch_size = request.batch_per_rank * ranks;
    if (c.train.batch_size % ranks != 0)
      throw ConfigError("train.batch_size", std::to_string(c.train.batch_size) + " sequences do not divide over " +
                                                std::to_string(ranks) + " ranks (give --batch-per-rank)");
    PredictOptions o;
    o.ranks = ranks;
    o.ranks_per_node = request.ranks_per_node;
    o.ep = request.ep > 0 ? request.ep : largest_ep(c, ranks);
    o.observed_load = observed;
    o.bf16_everywhere = request.bf16_everywhere;
    const StepPrediction s = predict_step(c, k, o);
    std::vector<std::string> row{std::to_string(ranks), std::to_string(s.nodes), std::to_string(s.ep),
                                 std::to_string(s.dp), std::to_string(s.tokens_per_rank), ms(s.step_s),
                                 fixed(s.tokens_per_s, 0), fixed(s.tokens_per_s / ranks, 0),
                                 fixed(s.tokens_per_s / ranks * flops_per_token * 1e-12, 3)};
    for (const Phase& p : kPhases) row.push_back(ms(s.phases.*p.field));
    row.insert(row.end(), {ms(s.hidden_s), fixed(s.imbalance, 2), fixed(100 * s.dropped_frac, 2)});
    t.rows.push_back(row);
  }
  return t;
}

Table validate_study(const std::string& dir, const CostConstants& k, std::string* summary) {
  if (!fs::is_directory(dir)) throw InputError(dir, "no such study directory");
  // One configuration: its runs (repeats of it), measured, and the one prediction.
  struct Group {
    int index = 0;
    std::string name, routing;
    int ranks = 0;
    std::vector<double> measured;  // each repeat's mean step wall time
    std::vector<RunSummary> m;
    StepPrediction s;
  };
  std::map<std::string, Group> groups;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const fs::path info = entry.path() / "run.json", metrics = entry.path() / "metrics.jsonl";
    if (!entry.is_directory() || !fs::exists(info) || !fs::exists(metrics)) continue;
    const YAML::Node j = parse_json(read_file(info.string(), "run description"), info.string());
    if (j["mode"].as<std::string>("") == "layer") continue;
    // the second half of the steps: allocation and routing settle over the first ones
    const RunSummary m = summarize_metrics_file(metrics.string(), 0.5);
    if (m.steps < 3 || m.tokens_per_s <= 0) continue;
    // the mean wall time of the measured steps (the prediction is an expectation over steps too)
    const double measured = m.wall_s > 0 ? m.wall_s : static_cast<double>(m.tokens_per_step) / m.tokens_per_s;
    std::string name = j["name"].as<std::string>();
    const std::string suffix = "-rep" + std::to_string(j["repeat"].as<int>(1));
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
      name.resize(name.size() - suffix.size());
    Group& g = groups[name];
    g.measured.push_back(measured);
    g.m.push_back(m);
    if (g.measured.size() > 1) {
      g.index = std::min(g.index, j["index"].as<int>());
      continue;
    }
    // Repeats run the same configuration with the same seed (the same routing): one prediction.
    std::vector<std::string> overrides;
    for (const YAML::Node& a : j["args"]) overrides.push_back(a.as<std::string>());
    const std::string config_path = j["config"].as<std::string>();
    const Config c = parse_config(read_file(config_path, "model configuration"), config_path, overrides);
    PredictOptions o;
    o.ranks = j["ranks"].as<int>();
    o.ep = c.parallel.ep;
    if (m.routing == "off") o.observed_load = observed_expert_load(m);
    g.index = j["index"].as<int>();
    g.name = name;
    g.ranks = o.ranks;
    g.routing = m.routing == "off" ? "learned" : "forced " + m.routing;
    g.s = predict_step(c, k, o);
  }
  if (groups.empty()) throw InputError(dir, "holds no finished training runs to compare with (run a study first)");
  std::vector<const Group*> order;
  for (const auto& [name, g] : groups) order.push_back(&g);
  std::sort(order.begin(), order.end(), [](const Group* a, const Group* b) { return a->index < b->index; });
  Table t;
  t.columns = {"run", "ranks", "ep", "routing", "repeats", "measured ms", "range", "predicted ms", "error %",
               "experts ms", "pred", "dispatch+combine ms", "pred", "backward ms", "pred", "max/mean load",
               "pred imbalance"};
  std::vector<double> abs_err;
  for (const Group* g : order) {
    // the repeat at the median (the lower middle one for an even count) stands for the configuration
    std::vector<size_t> by(g->measured.size());
    std::iota(by.begin(), by.end(), 0);
    std::sort(by.begin(), by.end(), [&](size_t a, size_t b) { return g->measured[a] < g->measured[b]; });
    const size_t mid = by[(by.size() - 1) / 2];
    const RunSummary& m = g->m[mid];
    const double measured = g->measured[mid], err = g->s.step_s / measured - 1;
    abs_err.push_back(std::fabs(err));
    const StepPrediction& s = g->s;
    t.rows.push_back({g->name, std::to_string(g->ranks), std::to_string(s.ep), g->routing,
                      std::to_string(g->measured.size()), ms(measured),
                      g->measured.size() > 1 ? ms(g->measured[by.front()]) + "-" + ms(g->measured[by.back()]) : "-",
                      ms(s.step_s), fixed(100 * err, 1), ms(m.times.experts), ms(s.phases.experts),
                      ms(m.times.dispatch + m.times.exchange + m.times.combine),
                      ms(s.phases.dispatch + s.phases.exchange + s.phases.combine), ms(m.times.backward),
                      ms(s.phases.backward), fixed(m.max_mean_load, 2), fixed(s.imbalance, 2)});
  }
  std::sort(abs_err.begin(), abs_err.end());
  const double med = abs_err.size() % 2 ? abs_err[abs_err.size() / 2]
                                        : 0.5 * (abs_err[abs_err.size() / 2 - 1] + abs_err[abs_err.size() / 2]);
  if (summary) {
    *summary = std::to_string(order.size()) + " configurations: median |error| " + fixed(100 * med, 1) + "%, worst " +
               fixed(100 * abs_err.back(), 1) + "% (goal: median <= 15%, worst <= 30%)";
  }
  return t;
}

}  // namespace moe
