#include "perf/study.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <set>
#include <sstream>

#include "config/config.h"
#include "base/error.h"
#include "base/json.h"
#include "config/sweep.h"
#include "train/safetensors.h"
#include "train/trainer.h"

namespace moe {
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------------
// tables

std::string Table::markdown() const {
  auto cell = [](std::string s) {
    for (size_t p = 0; (p = s.find('|', p)) != std::string::npos; p += 2) s.replace(p, 1, "\\|");
    return s;
  };
  std::vector<size_t> width(columns.size(), 3);
  for (size_t c = 0; c < columns.size(); ++c) width[c] = std::max(width[c], cell(columns[c]).size());
  for (const auto& row : rows)
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) width[c] = std::max(width[c], cell(row[c]).size());
  auto line = [&](const std::vector<std::string>& values) {
    std::string out = "|";
    for (size_t c = 0; c < columns.size(); ++c) {
      std::string v = c < values.size() ? cell(values[c]) : "";
      out += " " + v + std::string(width[c] - v.size(), ' ') + " |";
    }
    return out + "\n";
  };
  std::string out = line(columns) + "|";
  for (size_t w : width) out += std::string(w + 2, '-') + "|";
  out += "\n";
  for (const auto& row : rows) out += line(row);
  return out;
}

std::string Table::csv() const {
  auto cell = [](const std::string& s) {
    if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
    std::string q = "\"";
    for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
    return q + "\"";
  };
  auto line = [&](const std::vector<std::string>& values) {
    std::string out;
    for (size_t c = 0; c < columns.size(); ++c) out += (c ? "," : "") + cell(c < values.size() ? values[c] : "");
    return out + "\n";
  };
  std::string out = line(columns);
  for (const auto& row : rows) out += line(row);
  return out;
}

namespace {

// ---------------------------------------------------------------------------------------------------
// the study file

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

int gcd_int(int a, int b) { return b == 0 ? a : gcd_int(b, a % b); }

}  // namespace

std::vector<StudyRun> plan_study(const std::string& path, const StudyOptions& opt) {
  const std::string text = read_file(path, "study file");
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw InputError(path, detail::concat("line ", e.mark.line + 1, ": not valid YAML: ", e.msg));
  }
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
  const std::string kind = root["kind"] ? root["kind"].as<std::string>() : "";
  if (kind != "compare" && kind != "scale") throw InputError(path, "kind must be compare or scale, got '" + kind + "'");
  if (kind != opt.kind) throw InputError(path, "is a " + kind + " study, not a " + opt.kind + " study");
  if (opt.layer && kind != "compare") throw InputError(path, "--layer is for compare studies");
  if (!opt.layer && !opt.bench_flags.empty()) throw InputError(opt.bench_flags[0], "is an option of --layer studies");

  Sweep sweep;
  sweep.add_yaml(root["sweep"], path + ": sweep");
  sweep.add_overrides(opt.overrides);
  std::vector<StudyRun> runs;

  if (opt.layer) {
    const YAML::Node layer = root["layer"];
    if (!layer || !layer.IsMap() || !layer["models"] || !layer["models"].IsMap()) {
      throw InputError(path, "--layer needs a layer: section with models: (name: {key: value, ...})");
    }
    const std::vector<int> ranks = opt.ranks.empty() ? as_ints(layer["ranks"] ? layer["ranks"] : root["ranks"], path + ": ranks")
                                                     : opt.ranks;
    const std::vector<std::string> set = as_overrides(layer["set"], path + ": layer.set");
    for (const auto& m : layer["models"]) {
      StudyRun r;
      r.model = m.first.as<std::string>();
      r.mode = "layer";
      r.ranks = ranks.front();
      std::vector<std::string> keys = set;
      for (const std::string& o : as_overrides(m.second, path + ": layer.models." + r.model)) keys.push_back(o);
      Sweep check;  // every key known and every value well-formed before anything runs
      check.add_overrides(keys);
      for (const SweepAxis& a : sweep.axes()) {
        std::string values;
        for (const std::string& v : a.values) values += (values.empty() ? "" : ",") + v;
        keys.push_back(a.key + "=" + values);
      }
      for (const std::string& k : keys) r.args.push_back("--" + k);
      for (const std::string& f : opt.bench_flags) r.args.push_back(f);
      r.args.push_back("--format=csv");
      r.label = sweep.swept_keys().empty() ? "" : "sweep " + [&] {
        std::string s;
        for (const std::string& k : sweep.swept_keys()) s += (s.empty() ? "" : " ") + k;
        return s;
      }();
      r.name = "layer-" + r.model;
      r.index = static_cast<int>(runs.size());
      runs.push_back(r);
    }
    return runs;
  }

  const YAML::Node models = root["models"];
  if (!models || !models.IsMap() || models.size() == 0) {
    throw InputError(path, "models: expected a mapping of name: {config: FILE, set: {key: value}}");
  }
  std::vector<int> ranks = opt.ranks.empty() ? as_ints(root["ranks"], path + ": ranks") : opt.ranks;
  std::vector<std::string> modes{""};
  int batch_per_rank = 0, global_batch = 0;
  if (kind == "compare") {
    if (ranks.size() != 1) throw InputError(path, "a compare study runs every model on one rank count (ranks: N)");
  } else {
    modes.clear();
    if (root["modes"] && root["modes"].IsSequence()) {
      for (const auto& m : root["modes"]) modes.push_back(m.as<std::string>());
    } else {
      modes = {"weak", "strong"};
    }
    for (const std::string& m : modes) {
      if (m != "weak" && m != "strong") throw InputError(path, "modes: expected weak and/or strong, got '" + m + "'");
    }
    std::sort(ranks.begin(), ranks.end());
    ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
    batch_per_rank = root["batch_per_rank"] ? root["batch_per_rank"].as<int>() : 4;
    global_batch = root["global_batch"] ? root["global_batch"].as<int>() : batch_per_rank * ranks.back();
    if (batch_per_rank < 1) throw InputError(path, "batch_per_rank must be >= 1");
    for (int r : ranks) {
      if (std::count(modes.begin(), modes.end(), "strong") && global_batch % r != 0) {
        throw InputError(path, detail::concat("strong scaling keeps global_batch = ", global_batch,
                                              " sequences, which ", r, " ranks cannot split evenly"));
      }
    }
  }
  const std::vector<std::string> common = as_overrides(root["set"], path + ": set");
  // each run this many times (run-to-run variation; launch/moe predict --validate takes the median)
  const int repeats = opt.repeats > 0 ? opt.repeats : root["repeats"] ? root["repeats"].as<int>() : 1;
  if (repeats < 1) throw InputError(path, "repeats must be >= 1");

  for (const auto& m : models) {
    const std::string model = m.first.as<std::string>();
    const std::string where = path + ": models." + model;
    if (!m.second.IsMap() || !m.second["config"]) throw InputError(where, "expected {config: FILE, set: {...}}");
    const std::string config = m.second["config"].as<std::string>();
    const std::string yaml = read_file(config, "model configuration of " + where);
    std::vector<std::string> model_set = common;
    for (const std::string& o : as_overrides(m.second["set"], where + ".set")) model_set.push_back(o);
    for (size_t point = 0; point < sweep.size(); ++point) {
      for (const std::string& mode : modes) {
        for (int n : ranks) {
          StudyRun r;
          r.model = model;
          r.mode = mode;
          r.label = sweep.label(point);
          r.config = config;
          r.ranks = n;
          r.name = model;
          if (!r.label.empty()) r.name += "-" + label_slug(r.label);
          if (kind == "scale") r.name += "-" + mode + "-r" + std::to_string(n);
          r.index = static_cast<int>(runs.size());
          std::vector<std::string> o = model_set;
          for (const std::string& p : sweep.point(point)) o.push_back(p);
          try {
            Config c = parse_config(yaml, config, o);
            // The rank count decides the layout: experts spread over as many ranks as divide both.
            int ep = c.parallel.ep;
            if (kind == "scale") ep = c.moe.num_experts > 0 ? gcd_int(n, c.moe.num_experts) : 1;
            else if (n % ep != 0) ep = gcd_int(n, ep);
            o.push_back("parallel.ep=" + std::to_string(ep));
            if (kind == "scale") {
              o.push_back("train.batch_size=" + std::to_string(mode == "weak" ? batch_per_rank * n : global_batch));
            }
            const std::string dir = (fs::path(opt.out) / r.name).string();
            for (const std::string& d : {"train.metrics_path=" + dir + "/metrics.jsonl",
                                         "train.checkpoint_dir=" + dir + "/checkpoints", std::string("train.resume=auto"),
                                         std::string("train.keep_checkpoints=1"), std::string("train.sample_tokens=0")}) {
              o.push_back(d);
            }
            c = parse_config(yaml, config, o);
            validate_config(c, n);
          } catch (const Error& e) {
            throw InputError(path, "run " + r.name + " on " + std::to_string(n) + " ranks: " + e.what(), e.key());
          }
          r.args = o;
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
      }
    }
  }
  // All first repeats, then all second ones, ...: a configuration's repeats are spread over the study's
  // time, not run back to back in one period of the machine's speed.
  std::stable_sort(runs.begin(), runs.end(), [](const StudyRun& a, const StudyRun& b) { return a.repeat < b.repeat; });
  for (size_t i = 0; i < runs.size(); ++i) runs[i].index = static_cast<int>(i);
  return runs;
}

// ---------------------------------------------------------------------------------------------------
// metrics

// ---------------------------------------------------------------------------------------------------
// the report

namespace {

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

std::string millions(int64_t n) { return n > 0 ? fixed(static_cast<double>(n) * 1e-6, 3) + "M" : "-"; }

struct ReportRun {
  int index = 0;
  std::string name, model, mode, label, kind;
  int ranks = 0, repeat = 1;
  bool done = false;  // launch/moe marks a run that exited 0
  std::string status;
  RunSummary m;
  std::string bench_csv;
};

void write_text(const fs::path& p, const std::string& text) { write_file_atomic(p.string(), text); }

// A shell word: single-quoted.
std::string sh_quote(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

// gnuplot text for a string: single-quoted, quotes doubled.
std::string gq(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("''") : std::string(1, ch);
  return out + "'";
}

const char* kTerminal = "set terminal pngcairo size 960,600 noenhanced font ',10'\n";

// The plots of a study: data files and gnuplot scripts in dir; returns the script names.
std::vector<std::string> write_plots(const fs::path& dir, const std::vector<ReportRun>& runs, const std::string& kind) {
  fs::create_directories(dir);
  std::vector<std::string> scripts;
  auto script = [&](const std::string& name, const std::string& body) {
    write_text(dir / (name + ".gp"), kTerminal + std::string("set output ") + gq(name + ".png") + "\n" + body);
    scripts.push_back(name + ".gp");
  };
  std::vector<const ReportRun*> ok;
  for (const ReportRun& r : runs)
    if (r.m.steps > 0) ok.push_back(&r);
  if (ok.empty()) return scripts;

  // The step split: one row per run, ms per step of every phase (rowstacked bars).
  {
    std::string data = "# run tokens_per_s";
    for (const Phase& p : kPhases) data += std::string(" ") + p.name;
    data += "\n";
    for (const ReportRun* r : ok) {
      std::string name = r->name;
      std::replace(name.begin(), name.end(), ' ', '_');
      data += name + " " + fixed(r->m.tokens_per_s, 1);
      for (const Phase& p : kPhases) data += " " + fixed(r->m.times.*p.field * 1e3, 4);
      data += "\n";
    }
    write_text(dir / "split.dat", data);
    std::string plot = "set style data histograms\nset style histogram rowstacked\nset style fill solid 0.8 border -1\n"
                       "set boxwidth 0.7\nset key outside right\nset xtics rotate by -30\nset grid ytics\n";
    plot += "set multiplot layout 1,2 title " +
            gq(kind == "scale" ? "Throughput and step split against ranks" : "Throughput and step split per model") +
            "\nset title 'tokens/s'\nset ylabel 'tokens/s'\nunset key\n"
            "plot 'split.dat' using 2:xtic(1) title 'tokens/s' lc rgb '#4477aa'\n"
            "set title 'step time by phase (ms)'\nset ylabel 'ms per step'\nset key outside right\nplot ";
    for (size_t p = 0; p < std::size(kPhases); ++p) {  // each phase in its own colour (model/context.h)
      plot += (p ? ", '' " : "'split.dat' ") + std::string("using ") + std::to_string(p + 3) +
              (p == 0 ? ":xtic(1)" : "") + " title " + gq(kPhases[p].name) + " lc rgb " + gq(kPhases[p].colour);
    }
    plot += "\nunset multiplot\n";
    script(kind == "scale" ? "scale_split" : "throughput_split", plot);
  }

  if (kind == "compare") {
    // Validation loss over tokens and over wall time, one line per run.
    std::string data;
    std::vector<std::string> names;
    for (const ReportRun* r : ok) {
      if (r->m.evals.empty()) continue;
      data += "# " + r->name + "\n";
      for (const auto& e : r->m.evals) {
        data += fixed(e.tokens, 0) + " " + fixed(e.wall_s, 3) + " " + format_double(e.loss) + " " +
                format_double(e.bpb) + "\n";
      }
      data += "\n\n";
      names.push_back(r->name);
    }
    if (!names.empty()) {
      write_text(dir / "val.dat", data);
      for (const auto& [file, x, xlabel] : {std::tuple{"val_loss_tokens", 1, "training tokens"},
                                            std::tuple{"val_loss_time", 2, "training wall time (s, steps only)"}}) {
        std::string plot = "set xlabel " + gq(xlabel) + "\nset ylabel 'validation loss (nats/token)'\nset grid\n"
                           "set key top right\nplot ";
        for (size_t i = 0; i < names.size(); ++i) {
          plot += (i ? ", " : "") + std::string("'val.dat' index ") + std::to_string(i) + " using " +
                  std::to_string(x) + ":3 with linespoints title " + gq(names[i]);
        }
        script(file, plot + "\n");
      }
    }
    // Expert load heat maps: rows are (layer, expert), columns steps, colour the load over the mean.
    for (const ReportRun* r : ok) {
      const auto& load = r->m.load;
      if (load.empty() || load[0].empty()) continue;
      std::string data;
      int row = 0;
      std::vector<std::string> ticks;
      size_t steps = 0;
      for (size_t l = 0; l < load.size(); ++l) {
        if (load[l].empty()) continue;
        steps = std::max(steps, load[l].size());
        const size_t experts = load[l][0].size();
        for (size_t e = 0; e < experts; ++e, ++row) {
          for (size_t s = 0; s < load[l].size(); ++s) {
            data += std::to_string(s + 1) + " " + std::to_string(row) + " " + fixed(load[l][s][e], 4) + "\n";
          }
          data += "\n";
          if (e == 0) ticks.push_back(gq("L" + std::to_string(l)) + " " + std::to_string(row));
        }
      }
      const std::string file = "load_" + r->name;
      write_text(dir / (file + ".dat"), data);
      std::string tics;
      for (size_t i = 0; i < ticks.size(); ++i) tics += (i ? ", " : "") + ticks[i];
      script(file, "set title " + gq("Expert load / mean load, " + r->name + " (rows: MoE layer x expert)") +
                       "\nset xlabel 'step'\nset ylabel 'MoE layer, expert'\nset ytics (" + tics +
                       ")\nset xrange [0.5:" + std::to_string(steps) + ".5]\nset yrange [-0.5:" +
                       std::to_string(row) + "-0.5]\nset cbrange [0:*]\nset palette defined (0 'white', 1 '#4477aa', 2 '#ee6677')\n"
                       "plot " + gq(file + ".dat") + " using 1:2:3 with image notitle\n");
    }
  } else {
    // tokens/s and parallel efficiency against ranks, one line per (model, mode, sweep point).
    std::map<std::string, std::vector<const ReportRun*>> lines;
    std::vector<std::string> order;
    for (const ReportRun* r : ok) {
      std::string key = r->model + " " + r->mode + (r->label.empty() ? "" : " " + r->label) +
                        (r->repeat > 1 ? " rep" + std::to_string(r->repeat) : "");
      if (!lines.count(key)) order.push_back(key);
      lines[key].push_back(r);
    }
    std::string data;
    for (const std::string& key : order) {
      data += "# " + key + "\n";
      const ReportRun* base = lines[key].front();
      for (const ReportRun* r : lines[key]) {
        const double eff = (r->m.tokens_per_s / r->ranks) / (base->m.tokens_per_s / base->ranks);
        data += std::to_string(r->ranks) + " " + fixed(r->m.tokens_per_s, 1) + " " + fixed(eff, 4) + "\n";
      }
      data += "\n\n";
    }
    write_text(dir / "scale.dat", data);
    for (const auto& [file, col, ylabel] : {std::tuple{"scale_tokens_per_s", 2, "tokens/s"},
                                            std::tuple{"scale_efficiency", 3, "parallel efficiency"}}) {
      std::string plot = "set xlabel 'ranks'\nset ylabel " + gq(ylabel) + "\nset grid\nset logscale x 2\n" +
                         (col == 3 ? "set yrange [0:1.1]\n" : "set yrange [0:*]\n") + "set key outside right\nplot ";
      for (size_t i = 0; i < order.size(); ++i) {
        plot += (i ? ", " : "") + std::string("'scale.dat' index ") + std::to_string(i) + " using 1:" +
                std::to_string(col) + " with linespoints title " + gq(order[i]);
      }
      script(file, plot + "\n");
    }
  }
  return scripts;
}

}  // namespace

std::string report_study(const std::string& out, std::string* plot_note) {
  std::vector<ReportRun> runs;
  if (!fs::is_directory(out)) throw InputError(out, "no such study directory");
  for (const auto& entry : fs::directory_iterator(out)) {
    const fs::path info = entry.path() / "run.json";
    if (!entry.is_directory() || !fs::exists(info)) continue;
    YAML::Node j = parse_json(read_file(info.string(), "run description"), info.string());
    ReportRun r;
    r.index = j["index"].as<int>();
    r.name = j["name"].as<std::string>();
    r.model = j["model"].as<std::string>();
    r.mode = j["mode"].as<std::string>("");
    r.label = j["label"].as<std::string>("");
    r.repeat = j["repeat"].as<int>(1);
    r.kind = j["kind"].as<std::string>();
    r.ranks = j["ranks"].as<int>();
    r.done = fs::exists(entry.path() / "done");
    const fs::path metrics = entry.path() / "metrics.jsonl", bench = entry.path() / "bench.csv";
    if (r.mode == "layer") {
      if (fs::exists(bench)) r.bench_csv = read_file(bench.string(), "benchmark output");
    } else if (fs::exists(metrics)) {
      r.m = summarize_metrics_file(metrics.string());
    }
    r.status = r.done ? "done" : (r.m.steps > 0 || !r.bench_csv.empty()) ? "incomplete" : "not run";
    runs.push_back(std::move(r));
  }
  if (runs.empty()) throw InputError(out, "holds no study runs (run.json files); run launch/moe study first");
  std::sort(runs.begin(), runs.end(), [](const ReportRun& a, const ReportRun& b) { return a.index < b.index; });
  const std::string kind = runs.front().mode == "layer" ? "layer" : runs.front().kind;

  Table t;
  std::string md = "# Study " + fs::path(out).filename().string() + " (" + kind + ")\n\n";
  if (kind == "layer") {
    // The benchmark's own CSV rows, the model's name in front.
    for (const ReportRun& r : runs) {
      std::istringstream lines(r.bench_csv);
      std::string line, header;
      std::getline(lines, header);
      if (t.columns.empty() && !header.empty()) {
        t.columns = {"model"};
        std::istringstream cells(header);
        std::string c;
        while (std::getline(cells, c, ',')) t.columns.push_back(c);
      }
      while (std::getline(lines, line)) {
        std::vector<std::string> row{r.model};
        std::istringstream cells(line);
        std::string c;
        while (std::getline(cells, c, ',')) row.push_back(c);
        t.rows.push_back(row);
      }
      if (r.bench_csv.empty()) t.rows.push_back({r.model + " (" + r.status + ")"});
    }
    md += "MoE layers at one shape, forward + backward (moe_bench layer); times in ms.\n\n" + t.markdown();
    write_text(fs::path(out) / "summary.md", md);
    write_text(fs::path(out) / "summary.csv", t.csv());
    if (plot_note) *plot_note = "no plots for a layer comparison";
    return md;
  }

  t.columns = {"run", "status", "ranks", "ep", "routing"};
  if (kind == "scale") t.columns.insert(t.columns.end(), {"mode", "sweep", "tokens/step", "efficiency"});
  t.columns.insert(t.columns.end(), {"params total", "params active", "tokens/s", "MFU", "step ms"});
  for (const Phase& p : kPhases) t.columns.push_back(std::string(p.name) + " ms");
  t.columns.insert(t.columns.end(), {"hidden ms", "max/mean load", "dropped %"});
  if (kind == "compare") t.columns.insert(t.columns.end(), {"val loss", "val bpb", "evals"});
  // efficiency: tokens/s per rank against the smallest rank count of the same model, mode and sweep point
  std::map<std::string, const ReportRun*> base;
  for (const ReportRun& r : runs) {
    const std::string key = r.model + "|" + r.mode + "|" + r.label + "|" + std::to_string(r.repeat);
    if (r.m.steps > 0 && (!base.count(key) || r.ranks < base[key]->ranks)) base[key] = &r;
  }
  for (const ReportRun& r : runs) {
    const RunSummary& m = r.m;
    std::vector<std::string> row{r.name, r.status + (r.status == "done" ? "" : " (step " + std::to_string(m.last_step) + ")"),
                                 std::to_string(r.ranks), m.ep ? std::to_string(m.ep) : "-",
                                 m.routing == "off" ? "learned" : "forced " + m.routing};
    const bool have = m.steps > 0;
    if (kind == "scale") {
      const std::string key = r.model + "|" + r.mode + "|" + r.label + "|" + std::to_string(r.repeat);
      const ReportRun* b = base.count(key) ? base[key] : nullptr;
      const double eff = have && b ? (m.tokens_per_s / r.ranks) / (b->m.tokens_per_s / b->ranks) : 0;
      row.insert(row.end(), {r.mode, r.label.empty() ? "-" : r.label,
                             m.tokens_per_step > 0 ? std::to_string(m.tokens_per_step) : "-",
                             have && b ? fixed(eff, 3) : "-"});
    }
    row.insert(row.end(), {millions(m.params_total), millions(m.params_active), have ? fixed(m.tokens_per_s, 0) : "-",
                           have ? fixed(100 * m.mfu, 2) + "%" : "-",
                           have ? fixed(1e3 * m.times.total(), 1) : "-"});
    for (const Phase& p : kPhases) row.push_back(have ? fixed(1e3 * (m.times.*p.field), 2) : "-");
    row.push_back(have ? fixed(1e3 * (m.times.hidden_shared + m.times.hidden_allreduce), 2) : "-");
    row.push_back(have && m.max_mean_load > 0 ? fixed(m.max_mean_load, 2) : "-");
    row.push_back(have ? fixed(100 * m.dropped_frac, 2) : "-");
    if (kind == "compare") {
      row.push_back(m.evals.empty() ? "-" : fixed(m.evals.back().loss, 4));
      row.push_back(m.evals.empty() ? "-" : fixed(m.evals.back().bpb, 4));
      row.push_back(std::to_string(m.evals.size()));
    }
    t.rows.push_back(row);
  }
  md += kind == "compare"
            ? "Dense, classic top-k MoE and shared-expert MoE on the same data, token budget and ranks. tokens/s "
              "and MFU: medians over the steps after the first tenth; phases: mean ms per step over the same "
              "steps (hidden: shared-expert and gradient-sum time that overlapped other work, outside the sum); "
              "val loss and bpb: the last evaluation.\n\n"
            : "Weak scaling keeps the tokens per rank, strong scaling the global batch. efficiency = (tokens/s "
              "per rank) / (tokens/s per rank at the smallest rank count of the same model, mode and sweep "
              "point). Phases: mean ms per step after the first tenth of the steps.\n\n";
  md += t.markdown();
  write_text(fs::path(out) / "summary.md", md);
  write_text(fs::path(out) / "summary.csv", t.csv());

  // Plots: gnuplot from the Debian package; a study is complete without them.
  const fs::path plots = fs::path(out) / "plots";
  std::vector<std::string> scripts = write_plots(plots, runs, kind);
  std::string note;
  if (scripts.empty()) {
    note = "no plots: no run has metrics yet";
  } else if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    note = "plots not drawn: gnuplot is not installed (the data and scripts are in " + plots.string() + ")";
  } else {
    int made = 0;
    std::string failed;
    for (const std::string& s : scripts) {
      const std::string cmd = "cd " + sh_quote(plots.string()) + " && gnuplot " + sh_quote(s) + " >" +
                              sh_quote(s + ".log") + " 2>&1";
      if (std::system(cmd.c_str()) == 0) ++made;
      else failed += (failed.empty() ? "" : ", ") + s;
    }
    note = std::to_string(made) + " plot(s) in " + plots.string() +
           (failed.empty() ? "" : "; gnuplot failed on " + failed + " (see the .log files)");
  }
  if (plot_note) *plot_note = note;
  return md;
}

}  // namespace moe
