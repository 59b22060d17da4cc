// A study's plan: the runs of a study file (configs/studies/*.yaml), each configuration parsed and
// validated for its rank count before anything runs, and their run.json descriptions.
#include "perf/study_plan.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <set>
#include <sstream>

#include "base/error.h"
#include "base/json.h"
#include "config/config.h"
#include "config/sweep.h"
#include "train/safetensors.h"

namespace moe {
namespace fs = std::filesystem;
namespace {

std::vector<std::string> as_overrides(const YAML::Node& map, const std::string& where) {
  std::vector<std::string> out;
  if (!map || map.IsNull()) return out;
  if (!map.IsMap()) throw InputError(where, "expected a mapping of section.key: value");
  for (const auto& item : map) {
    const std::string key = item.first.as<std::string>();
    if (!item.second.IsScalar()) throw ConfigError(key, where + ": expected one value (lists go under sweep:)");
    config_field(key);  // an unknown key fails here, naming the nearest one
    out.push_back(key + "=" + item.second.Scalar());
  }
  return out;
}

std::vector<int> as_ints(const YAML::Node& n, const std::string& where) {
  std::vector<int> out;
  auto one = [&](const YAML::Node& v) {
    char* end = nullptr;
    const std::string s = v.Scalar();
    long x = std::strtol(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || x < 1) throw InputError(where, "expected a positive integer, got '" + s + "'");
    out.push_back(static_cast<int>(x));
  };
  if (n && n.IsScalar()) one(n);
  else if (n && n.IsSequence()) for (const auto& v : n) one(v);
  else throw InputError(where, "expected a number or a list of numbers");
  return out;
}

// "moe.top_k=2 moe.capacity_factor=1.25" -> "top_k2-capacity_factor1.25", safe in a file name.
std::string label_slug(const std::string& label) {
  std::string out;
  std::istringstream words(label);
  std::string w;
  while (words >> w) {
    std::string key = w.substr(0, w.find('=')), value = w.substr(w.find('=') + 1);
    key = key.substr(key.find('.') + 1);
    out += (out.empty() ? "" : "-") + key + value;
  }
  for (char& ch : out)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '.' && ch != '_' && ch != '-') ch = '_';
  return out;
}

// The study file, read and checked, with its sweep (the command line's keys last).
struct StudyFile {
  std::string path, kind;
  YAML::Node root;
  Sweep sweep;
};

StudyFile read_study_file(const std::string& path, const StudyOptions& opt) {
  StudyFile f;
  f.path = path;
  const std::string text = read_file(path, "study file");
  try {
    f.root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw InputError(path, detail::concat("line ", e.mark.line + 1, ": not valid YAML: ", e.msg));
  }
  const YAML::Node& root = f.root;
  if (!root.IsMap()) throw InputError(path, "a study file is a mapping (kind, ranks, models, set, sweep, ...)");
  const std::set<std::string> known{"kind", "description", "ranks", "modes", "models", "set", "sweep",
                                    "batch_per_rank", "global_batch", "layer", "repeats"};
  for (const auto& item : root) {
    if (!known.count(item.first.as<std::string>())) {
      throw InputError(path, "unknown study key '" + item.first.as<std::string>() +
                                 "' (known: kind, description, ranks, modes, models, set, sweep, batch_per_rank, "
                                 "global_batch, layer, repeats)");
    }
  }
  f.kind = root["kind"] ? root["kind"].as<std::string>() : "";
  if (f.kind != "compare" && f.kind != "scale") throw InputError(path, "kind must be compare or scale, got '" + f.kind + "'");
  if (f.kind != opt.kind) throw InputError(path, "is a " + f.kind + " study, not a " + opt.kind + " study");
  if (opt.layer && f.kind != "compare") throw InputError(path, "--layer is for compare studies");
  if (!opt.layer && !opt.bench_flags.empty()) throw InputError(opt.bench_flags[0], "is an option of --layer studies");
  f.sweep.add_yaml(root["sweep"], path + ": sweep");
  f.sweep.add_overrides(opt.overrides);
  return f;
}

// compare --layer: one moe_bench layer run per model of the layer: section, the sweep as comma lists.
std::vector<StudyRun> plan_layer_runs(const StudyFile& f, const StudyOptions& opt) {
  const YAML::Node layer = f.root["layer"];
  if (!layer || !layer.IsMap() || !layer["models"] || !layer["models"].IsMap()) {
    throw InputError(f.path, "--layer needs a layer: section with models: (name: {key: value, ...})");
  }
  const std::vector<int> ranks =
      opt.ranks.empty() ? as_ints(layer["ranks"] ? layer["ranks"] : f.root["ranks"], f.path + ": ranks") : opt.ranks;
  const std::vector<std::string> set = as_overrides(layer["set"], f.path + ": layer.set");
  std::string swept;
  for (const std::string& k : f.sweep.swept_keys()) swept += (swept.empty() ? "" : " ") + k;
  std::vector<StudyRun> runs;
  for (const auto& m : layer["models"]) {
    StudyRun r;
    r.model = m.first.as<std::string>();
    r.mode = "layer";
    r.ranks = ranks.front();
    std::vector<std::string> keys = set;
    for (const std::string& o : as_overrides(m.second, f.path + ": layer.models." + r.model)) keys.push_back(o);
    Sweep check;  // every key known and every value well-formed before anything runs
    check.add_overrides(keys);
    for (const SweepAxis& a : f.sweep.axes()) {
      std::string values;
      for (const std::string& v : a.values) values += (values.empty() ? "" : ",") + v;
      keys.push_back(a.key + "=" + values);
    }
    for (const std::string& k : keys) r.args.push_back("--" + k);
    for (const std::string& flag : opt.bench_flags) r.args.push_back(flag);
    r.args.push_back("--format=csv");
    r.label = swept.empty() ? "" : "sweep " + swept;
    r.name = "layer-" + r.model;
    r.index = static_cast<int>(runs.size());
    runs.push_back(r);
  }
  return runs;
}

// The rank counts and modes of a training study, and the batch each mode keeps.
struct Grid {
  std::vector<int> ranks;
  std::vector<std::string> modes{""};  // compare: one unnamed mode
  int batch_per_rank = 0, global_batch = 0;
};

Grid read_grid(const StudyFile& f, const StudyOptions& opt) {
  const YAML::Node& root = f.root;
  Grid g;
  g.ranks = opt.ranks.empty() ? as_ints(root["ranks"], f.path + ": ranks") : opt.ranks;
  if (f.kind == "compare") {
    if (g.ranks.size() != 1) throw InputError(f.path, "a compare study runs every model on one rank count (ranks: N)");
    return g;
  }
  g.modes.clear();
  if (root["modes"] && root["modes"].IsSequence()) {
    for (const auto& m : root["modes"]) g.modes.push_back(m.as<std::string>());
  } else {
    g.modes = {"weak", "strong"};
  }
  for (const std::string& m : g.modes) {
    if (m != "weak" && m != "strong") throw InputError(f.path, "modes: expected weak and/or strong, got '" + m + "'");
  }
  std::sort(g.ranks.begin(), g.ranks.end());
  g.ranks.erase(std::unique(g.ranks.begin(), g.ranks.end()), g.ranks.end());
  g.batch_per_rank = root["batch_per_rank"] ? root["batch_per_rank"].as<int>() : 4;
  g.global_batch = root["global_batch"] ? root["global_batch"].as<int>() : g.batch_per_rank * g.ranks.back();
  if (g.batch_per_rank < 1) throw InputError(f.path, "batch_per_rank must be >= 1");
  for (int r : g.ranks) {
    if (std::count(g.modes.begin(), g.modes.end(), "strong") && g.global_batch % r != 0) {
      throw InputError(f.path, detail::concat("strong scaling keeps global_batch = ", g.global_batch,
                                              " sequences, which ", r, " ranks cannot split evenly"));
    }
  }
  return g;
}

// The overrides of one training run: the model's, the sweep point's, the layout of its rank count, and
// where its metrics and checkpoints go. Validated for the rank count; an error names the study and run.
std::vector<std::string> run_overrides(const StudyFile& f, const Grid& g, const StudyRun& r, const std::string& yaml,
                                       std::vector<std::string> o, const std::string& out) {
  const int n = r.ranks;
  try {
    Config c = parse_config(yaml, r.config, o);
    // The rank count decides the layout: experts spread over as many ranks as divide both.
    int ep = c.parallel.ep;
    if (f.kind == "scale") ep = largest_ep(c, n);
    else if (n % ep != 0) ep = std::gcd(n, ep);
    o.push_back("parallel.ep=" + std::to_string(ep));
    if (f.kind == "scale") {
      o.push_back("train.batch_size=" + std::to_string(r.mode == "weak" ? g.batch_per_rank * n : g.global_batch));
    }
    const std::string dir = (fs::path(out) / r.name).string();
    for (const std::string& d : {"train.metrics_path=" + dir + "/metrics.jsonl", "train.checkpoint_dir=" + dir + "/checkpoints",
                                 std::string("train.resume=auto"), std::string("train.keep_checkpoints=1"),
                                 std::string("train.sample_tokens=0")}) {
      o.push_back(d);
    }
    validate_config(parse_config(yaml, r.config, o), n);
  } catch (const Error& e) {
    throw InputError(f.path, "run " + r.name + " on " + std::to_string(n) + " ranks: " + e.what(), e.key());
  }
  return o;
}

// Adds `repeats` copies of r (named -repN when there are several, with their own output directories).
void add_repeats(std::vector<StudyRun>& runs, const StudyRun& r, int repeats) {
  for (int rep = 1; rep <= repeats; ++rep) {
    StudyRun copy = r;
    copy.repeat = rep;
    copy.index = static_cast<int>(runs.size());
    if (repeats > 1) {
      copy.name += "-rep" + std::to_string(rep);
      const std::string from = "/" + r.name + "/", to = "/" + copy.name + "/";
      for (std::string& a : copy.args) {
        const size_t at = a.find(from);
        if (at != std::string::npos) a.replace(at, from.size(), to);
      }
    }
    runs.push_back(copy);
  }
}

// compare and scale: every model x sweep point (x mode x rank count for scale), repeated.
std::vector<StudyRun> plan_training_runs(const StudyFile& f, const StudyOptions& opt) {
  const YAML::Node models = f.root["models"];
  if (!models || !models.IsMap() || models.size() == 0) {
    throw InputError(f.path, "models: expected a mapping of name: {config: FILE, set: {key: value}}");
  }
  const Grid g = read_grid(f, opt);
  const std::vector<std::string> common = as_overrides(f.root["set"], f.path + ": set");
  // each run this many times (run-to-run variation; launch/moe predict --validate takes the median)
  const int repeats = opt.repeats > 0 ? opt.repeats : f.root["repeats"] ? f.root["repeats"].as<int>() : 1;
  if (repeats < 1) throw InputError(f.path, "repeats must be >= 1");
  std::vector<StudyRun> runs;
  for (const auto& m : models) {
    const std::string model = m.first.as<std::string>(), where = f.path + ": models." + model;
    if (!m.second.IsMap() || !m.second["config"]) throw InputError(where, "expected {config: FILE, set: {...}}");
    const std::string config = m.second["config"].as<std::string>();
    const std::string yaml = read_file(config, "model configuration of " + where);
    std::vector<std::string> model_set = common;
    for (const std::string& o : as_overrides(m.second["set"], where + ".set")) model_set.push_back(o);
    for (size_t point = 0; point < f.sweep.size(); ++point) {
      for (const std::string& mode : g.modes) {
        for (int n : g.ranks) {
          StudyRun r;
          r.model = model;
          r.mode = mode;
          r.label = f.sweep.label(point);
          r.config = config;
          r.ranks = n;
          r.name = model + (r.label.empty() ? "" : "-" + label_slug(r.label)) +
                   (f.kind == "scale" ? "-" + mode + "-r" + std::to_string(n) : "");
          std::vector<std::string> o = model_set;
          for (const std::string& p : f.sweep.point(point)) o.push_back(p);
          r.args = run_overrides(f, g, r, yaml, o, opt.out);
          add_repeats(runs, r, repeats);
        }
      }
    }
  }
  // All first repeats, then all second ones, ...: a configuration's repeats are spread over the study's
  // time, not run back to back in one period of the machine's speed.
  std::stable_sort(runs.begin(), runs.end(), [](const StudyRun& a, const StudyRun& b) { return a.repeat < b.repeat; });
  for (size_t i = 0; i < runs.size(); ++i) runs[i].index = static_cast<int>(i);
  return runs;
}

}  // namespace

std::vector<StudyRun> plan_study(const std::string& study_path, const StudyOptions& options) {
  const StudyFile f = read_study_file(study_path, options);
  return options.layer ? plan_layer_runs(f, options) : plan_training_runs(f, options);
}

void write_plan(const std::string& study_path, const StudyOptions& options, const std::vector<StudyRun>& runs) {
  for (const StudyRun& r : runs) {
    const fs::path dir = fs::path(options.out) / r.name;
    fs::create_directories(dir);
    JsonWriter j;
    j.begin_object().field("index", r.index).field("name", r.name).field("model", r.model).field("mode", r.mode);
    j.field("label", r.label).field("kind", options.kind).field("study", study_path).field("config", r.config);
    j.field("ranks", r.ranks).field("repeat", r.repeat).array("args", r.args).end_object();
    write_file_atomic((dir / "run.json").string(), j.str() + "\n");
  }
}

}  // namespace moe
