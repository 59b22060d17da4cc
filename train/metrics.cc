// The metrics and events files: writing them during a run, cutting them back on resume, reading them back.
#include "train/metrics.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <sstream>

#include "base/error.h"
#include "base/json.h"
#include "base/log.h"
#include "config/config.h"
#include "train/safetensors.h"

namespace moe {
namespace fs = std::filesystem;

std::string metrics_events_path(const std::string& metrics_path) {
  const std::string ext = ".jsonl";
  const bool jsonl = metrics_path.size() > ext.size() &&
                     metrics_path.compare(metrics_path.size() - ext.size(), ext.size(), ext) == 0;
  return (jsonl ? metrics_path.substr(0, metrics_path.size() - ext.size()) : metrics_path) + ".events.jsonl";
}

std::string metrics_line(const StepRecord& r, const ForcedRouting& routing) {
  JsonWriter j;
  j.begin_object();
  j.field("step", r.step).field("loss", r.stats.loss).field("ce", r.stats.ce_loss);
  j.field("aux", r.stats.aux_loss).field("z", r.stats.z_loss).field("lr", r.lr).field("grad_norm", r.grad_norm);
  j.field("dropped_frac", r.dropped_frac).field("max_mean_load", r.max_mean_load);
  j.field("tokens_per_s", r.tokens_per_s).field("mfu", r.mfu);
  if (routing.on()) j.field("forced_routing", forced_routing_name(routing));
  if (r.eval) {
    j.field("val_loss", r.eval->loss).field("val_bits_per_token", r.eval->bits_per_token);
    if (r.eval->byte_level) j.field("val_bpb", r.eval->bits_per_token);
  }
  const PhaseTimes& t = r.times;
  j.key("time_s").begin_object();
  for (const Phase& p : kPhases) j.field(p.name, t.*p.field);
  j.field("total", t.total()).field("wall", r.wall_s);
  j.field("hidden_shared", t.hidden_shared).field("hidden_allreduce", t.hidden_allreduce);
  j.end_object();
  j.key("layers").begin_array();
  for (const RouterStats& l : r.stats.layers) {
    j.begin_object().field("aux", l.aux_loss).field("z", l.z_loss);
    j.field("dropped_frac", l.assignments > 0 ? l.dropped / l.assignments : 0.0);
    std::vector<int64_t> load, tokens;
    for (double v : l.load) load.push_back(static_cast<int64_t>(v));
    for (double v : l.tokens) tokens.push_back(static_cast<int64_t>(v));
    j.array("load", load).array("tokens_per_expert", tokens);
    j.end_object();
  }
  j.end_array();
  j.end_object();
  return j.str();
}

namespace {

// The lines of a metrics file and of its events file to keep when a run resumes at `step`.
struct KeptLines {
  std::string steps, events;
  int64_t last_logged = 0;  // the last step the run before logged
};

KeptLines lines_up_to(const std::string& path, const std::string& events_path, int64_t step) {
  KeptLines kept;
  std::string inline_events;  // events inside a metrics file of the earlier format
  auto keep = [&](const std::string& text, const std::string& what, bool from_metrics) {
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
      if (line.empty() || line.back() != '}') continue;  // a torn last line
      try {
        YAML::Node j = parse_json(line, what);
        const int64_t at = j["step"].as<int64_t>(0);
        const bool event = static_cast<bool>(j["event"]);
        if (!event) kept.last_logged = std::max(kept.last_logged, at);
        if (at > step) continue;  // a line of the run this one replaces
        (event ? (from_metrics ? inline_events : kept.events) : kept.steps) += line + "\n";
      } catch (const std::exception&) {
      }
    }
  };
  std::error_code ec;
  if (fs::exists(path, ec)) keep(read_file(path, "metrics file"), path, true);
  if (fs::exists(events_path, ec)) {
    keep(read_file(events_path, "events file"), events_path, false);
  } else {
    kept.events = inline_events;  // the earlier format: its events move to the events file
  }
  return kept;
}

}  // namespace

MetricsLog::MetricsLog(const std::string& path, int64_t resumed_step, const RunStart& start) : path_(path) {
  const fs::path parent = fs::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty()) fs::create_directories(parent, ec);
  if (ec) throw InputError(parent.string(), "cannot create the metrics directory: " + ec.message());
  const std::string events_path = metrics_events_path(path);
  KeptLines kept;
  if (resumed_step > 0) {
    kept = lines_up_to(path, events_path, resumed_step);
    write_file_atomic(path, kept.steps);
  }
  file_ = std::fopen(path.c_str(), resumed_step > 0 ? "a" : "w");
  if (!file_) throw InputError(path, std::string("cannot open the metrics file: ") + std::strerror(errno));
  JsonWriter j;
  if (resumed_step > 0) {
    const int64_t lost = std::max<int64_t>(0, kept.last_logged - resumed_step);
    if (lost > 0) {
      log_info("resumed at step " + std::to_string(resumed_step) + ": steps " + std::to_string(resumed_step + 1) +
               ".." + std::to_string(kept.last_logged) + " of the run before were lost and are redone");
    }
    j.begin_object().field("event", "resume").field("step", resumed_step).field("lost_steps", lost);
  } else {
    j.begin_object().field("event", "start").field("ranks", start.ranks).field("ep", start.ep);
    j.field("params_total", start.params_total).field("params_active", start.params_active);
    j.field("flops_per_token", start.flops_per_token).field("tokens_per_step", start.tokens_per_step);
    j.field("dense_gflops_per_rank", start.dense_gflops_per_rank);
    j.field("routing", forced_routing_name(start.routing));
  }
  j.end_object();
  write_file_atomic(events_path, kept.events + j.str() + "\n");
}

MetricsLog::~MetricsLog() {
  if (file_) std::fclose(file_);
}

void MetricsLog::write(const StepRecord& r, const ForcedRouting& routing) {
  const std::string line = metrics_line(r, routing) + "\n";
  if (std::fputs(line.c_str(), file_) < 0 || std::fflush(file_) != 0) {
    throw InputError(path_, std::string("cannot write metrics: ") + std::strerror(errno), "train.metrics_path");
  }
}

// ---------------------------------------------------------------------------------------------------
// reading back

RunSummary summarize_metrics_file(const std::string& metrics_path, double warmup) {
  const std::string events_path = metrics_events_path(metrics_path);
  std::string events = fs::exists(events_path) ? read_file(events_path, "events file") : std::string();
  if (!events.empty() && events.back() != '\n') events += '\n';  // a torn last event stays on its own line
  return summarize_metrics(events + read_file(metrics_path, "metrics file"), metrics_path + " (and its events file)",
                           warmup);
}

namespace {

void read_start(const YAML::Node& j, RunSummary& s) {
  s.started = true;
  s.ranks = j["ranks"].as<int>(0);
  s.ep = j["ep"].as<int>(0);
  s.params_total = j["params_total"].as<int64_t>(0);
  s.params_active = j["params_active"].as<int64_t>(0);
  s.tokens_per_step = j["tokens_per_step"].as<int64_t>(0);
  s.flops_per_token = j["flops_per_token"].as<double>(0);
  s.routing = j["routing"].as<std::string>("off");
}

// Per MoE layer, the step's load of each expert over the mean load, appended to s.load.
void read_load(const YAML::Node& layers, RunSummary& s) {
  if (!layers || !layers.IsSequence()) return;
  if (s.load.size() < layers.size()) s.load.resize(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    std::vector<double> row;
    for (const auto& v : layers[l]["load"]) row.push_back(v.as<double>());
    const double mean = row.empty() ? 0 : std::accumulate(row.begin(), row.end(), 0.0) / row.size();
    for (double& v : row) v = mean > 0 ? v / mean : 0;
    s.load[l].push_back(row);
  }
}

}  // namespace

RunSummary summarize_metrics(const std::string& jsonl, const std::string& what, double warmup) {
  RunSummary s;
  std::istringstream lines(jsonl);
  std::string line;
  std::vector<YAML::Node> steps;
  while (std::getline(lines, line)) {
    if (line.empty() || line.back() != '}') continue;  // a torn last line of a killed run
    YAML::Node j = parse_json(line, what);
    if (j["event"]) {
      if (j["event"].as<std::string>() == "start") read_start(j, s);
      continue;
    }
    if (!j["step"]) continue;
    // A resumed run repeats the steps after its checkpoint: the later line of a step wins.
    const int64_t step = j["step"].as<int64_t>();
    while (!steps.empty() && steps.back()["step"].as<int64_t>() >= step) steps.pop_back();
    steps.push_back(j);
  }
  s.steps = static_cast<int64_t>(steps.size());
  if (steps.empty()) return s;
  s.last_step = steps.back()["step"].as<int64_t>();
  const size_t skip = std::min(steps.size() - 1, std::max<size_t>(1, static_cast<size_t>(steps.size() * warmup)));
  s.skipped = static_cast<int64_t>(skip);
  std::vector<double> tps, mfu;
  double load = 0, dropped = 0, wall = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    const YAML::Node& j = steps[i];
    const YAML::Node t = j["time_s"];
    wall += t["wall"].as<double>(0);
    if (j["val_loss"]) {
      const double bits = j["val_bpb"] ? j["val_bpb"].as<double>() : j["val_bits_per_token"].as<double>(0);
      s.evals.push_back({j["step"].as<int64_t>(), static_cast<double>(j["step"].as<int64_t>()) * s.tokens_per_step,
                         wall, j["val_loss"].as<double>(), bits});
    }
    read_load(j["layers"], s);
    if (i < skip) continue;
    tps.push_back(j["tokens_per_s"].as<double>(0));
    mfu.push_back(j["mfu"].as<double>(0));
    load += j["max_mean_load"].as<double>(0);
    dropped += j["dropped_frac"].as<double>(0);
    for (const Phase& p : kPhases) s.times.*p.field += t[p.name].as<double>(0);
    s.times.hidden_shared += t["hidden_shared"].as<double>(0);
    s.times.hidden_allreduce += t["hidden_allreduce"].as<double>(0);
    s.wall_s += t["wall"].as<double>(0);
  }
  const double measured = static_cast<double>(steps.size() - skip);
  for (const Phase& p : kPhases) s.times.*p.field /= measured;
  s.times.hidden_shared /= measured;
  s.times.hidden_allreduce /= measured;
  s.wall_s /= measured;
  auto med = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  s.tokens_per_s = med(tps);
  s.mfu = med(mfu);
  s.max_mean_load = load / measured;
  s.dropped_frac = dropped / measured;
  return s;
}

}  // namespace moe
