// A study's report: every run's metrics (or benchmark rows) as a Markdown table, a CSV file and gnuplot
// plots (docs/STUDIES.md).
#include "perf/study_report.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>
#include <tuple>

#include "base/error.h"
#include "base/json.h"
#include "model/context.h"
#include "perf/table.h"
#include "train/metrics.h"
#include "train/safetensors.h"

namespace moe {
namespace fs = std::filesystem;
namespace {

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

// gnuplot text for a string: single-quoted, quotes doubled.
std::string gq(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("''") : std::string(1, ch);
  return out + "'";
}

const char* kTerminal = "set terminal pngcairo size 960,600 noenhanced font ',10'\n";

// The plots of a study: data files and gnuplot scripts written to dir, their script names collected.
class Plots {
 public:
  explicit Plots(fs::path dir) : dir_(std::move(dir)) { fs::create_directories(dir_); }
  void data(const std::string& file, const std::string& text) { write_text(dir_ / file, text); }
  void script(const std::string& name, const std::string& body) {
    write_text(dir_ / (name + ".gp"), kTerminal + std::string("set output ") + gq(name + ".png") + "\n" + body);
    scripts_.push_back(name + ".gp");
  }
  const std::vector<std::string>& scripts() const { return scripts_; }

 private:
  fs::path dir_;
  std::vector<std::string> scripts_;
};

// The step split: one row per run, ms per step of every phase (rowstacked bars, a colour per phase).
void split_plot(Plots& plots, const std::vector<const ReportRun*>& ok, const std::string& kind) {
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
  plots.data("split.dat", data);
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
  plots.script(kind == "scale" ? "scale_split" : "throughput_split", plot);
}

// Validation loss over tokens and over wall time, one line per run.
void validation_plots(Plots& plots, const std::vector<const ReportRun*>& ok) {
  std::string data;
  std::vector<std::string> names;
  for (const ReportRun* r : ok) {
    if (r->m.evals.empty()) continue;
    data += "# " + r->name + "\n";
    for (const auto& e : r->m.evals) {
      data += fixed(e.tokens, 0) + " " + fixed(e.wall_s, 3) + " " + format_double(e.loss) + " " + format_double(e.bpb) + "\n";
    }
    data += "\n\n";
    names.push_back(r->name);
  }
  if (names.empty()) return;
  plots.data("val.dat", data);
  for (const auto& [file, x, xlabel] : {std::tuple{"val_loss_tokens", 1, "training tokens"},
                                        std::tuple{"val_loss_time", 2, "training wall time (s, steps only)"}}) {
    std::string plot = "set xlabel " + gq(xlabel) + "\nset ylabel 'validation loss (nats/token)'\nset grid\n"
                       "set key top right\nplot ";
    for (size_t i = 0; i < names.size(); ++i) {
      plot += (i ? ", " : "") + std::string("'val.dat' index ") + std::to_string(i) + " using " + std::to_string(x) +
              ":3 with linespoints title " + gq(names[i]);
    }
    plots.script(file, plot + "\n");
  }
}

// Expert load heat maps: rows are (layer, expert), columns steps, colour the load over the mean.
void load_maps(Plots& plots, const std::vector<const ReportRun*>& ok) {
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
    plots.data(file + ".dat", data);
    std::string tics;
    for (size_t i = 0; i < ticks.size(); ++i) tics += (i ? ", " : "") + ticks[i];
    plots.script(file, "set title " + gq("Expert load / mean load, " + r->name + " (rows: MoE layer x expert)") +
                           "\nset xlabel 'step'\nset ylabel 'MoE layer, expert'\nset ytics (" + tics +
                           ")\nset xrange [0.5:" + std::to_string(steps) + ".5]\nset yrange [-0.5:" +
                           std::to_string(row) + "-0.5]\nset cbrange [0:*]\nset palette defined (0 'white', 1 '#4477aa', 2 '#ee6677')\n"
                           "plot " + gq(file + ".dat") + " using 1:2:3 with image notitle\n");
  }
}

// tokens/s and parallel efficiency against ranks, one line per (model, mode, sweep point).
void scale_plots(Plots& plots, const std::vector<const ReportRun*>& ok) {
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
  plots.data("scale.dat", data);
  for (const auto& [file, col, ylabel] : {std::tuple{"scale_tokens_per_s", 2, "tokens/s"},
                                          std::tuple{"scale_efficiency", 3, "parallel efficiency"}}) {
    std::string plot = "set xlabel 'ranks'\nset ylabel " + gq(ylabel) + "\nset grid\nset logscale x 2\n" +
                       (col == 3 ? "set yrange [0:1.1]\n" : "set yrange [0:*]\n") + "set key outside right\nplot ";
    for (size_t i = 0; i < order.size(); ++i) {
      plot += (i ? ", " : "") + std::string("'scale.dat' index ") + std::to_string(i) + " using 1:" + std::to_string(col) +
              " with linespoints title " + gq(order[i]);
    }
    plots.script(file, plot + "\n");
  }
}

// The plots' data and scripts, then gnuplot on each when it is installed; returns what happened.
std::string draw_plots(const fs::path& dir, const std::vector<ReportRun>& runs, const std::string& kind) {
  std::vector<const ReportRun*> ok;
  for (const ReportRun& r : runs)
    if (r.m.steps > 0) ok.push_back(&r);
  if (ok.empty()) return "no plots: no run has metrics yet";
  Plots plots(dir);
  split_plot(plots, ok, kind);
  if (kind == "compare") {
    validation_plots(plots, ok);
    load_maps(plots, ok);
  } else {
    scale_plots(plots, ok);
  }
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    return "plots not drawn: gnuplot is not installed (the data and scripts are in " + dir.string() + ")";
  }
  int made = 0;
  std::string failed;
  for (const std::string& s : plots.scripts()) {
    const std::string cmd =
        "cd " + sh_quote(dir.string()) + " && gnuplot " + sh_quote(s) + " >" + sh_quote(s + ".log") + " 2>&1";
    if (std::system(cmd.c_str()) == 0) ++made;
    else failed += (failed.empty() ? "" : ", ") + s;
  }
  return std::to_string(made) + " plot(s) in " + dir.string() +
         (failed.empty() ? "" : "; gnuplot failed on " + failed + " (see the .log files)");
}

// Every run of the study in `out` (its run.json, and its metrics or benchmark rows when there are any), in
// plan order.
std::vector<ReportRun> read_runs(const std::string& out) {
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
    r.done = fs::exists(entry.path() / kStudyDoneMark);
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
  return runs;
}

// A layer comparison: the benchmark's own CSV rows, the model's name in front.
Table layer_table(const std::vector<ReportRun>& runs) {
  Table t;
  for (const ReportRun& r : runs) {
    std::istringstream lines(r.bench_csv);
    std::string line, header;
    std::getline(lines, header);
    if (t.columns.empty() && !header.empty()) {
      t.columns = {"model"};
      std::istringstream cells(header);
      for (std::string c; std::getline(cells, c, ',');) t.columns.push_back(c);
    }
    while (std::getline(lines, line)) {
      std::vector<std::string> row{r.model};
      std::istringstream cells(line);
      for (std::string c; std::getline(cells, c, ',');) row.push_back(c);
      t.rows.push_back(row);
    }
    if (r.bench_csv.empty()) t.rows.push_back({r.model + " (" + r.status + ")"});
  }
  return t;
}

// A training study's table: a row per run, its throughput, its phases (kPhases) and its quality.
Table training_table(const std::vector<ReportRun>& runs, const std::string& kind) {
  Table t;
  t.columns = {"run", "status", "ranks", "ep", "routing"};
  if (kind == "scale") t.columns.insert(t.columns.end(), {"mode", "sweep", "tokens/step", "efficiency"});
  t.columns.insert(t.columns.end(), {"params total", "params active", "tokens/s", "MFU", "step ms"});
  for (const Phase& p : kPhases) t.columns.push_back(std::string(p.name) + " ms");
  t.columns.insert(t.columns.end(), {"hidden ms", "max/mean load", "dropped %"});
  if (kind == "compare") t.columns.insert(t.columns.end(), {"val loss", "val bpb", "evals"});
  // efficiency: tokens/s per rank against the smallest rank count of the same model, mode and sweep point
  std::map<std::string, const ReportRun*> base;
  auto key_of = [](const ReportRun& r) { return r.model + "|" + r.mode + "|" + r.label + "|" + std::to_string(r.repeat); };
  for (const ReportRun& r : runs) {
    if (r.m.steps > 0 && (!base.count(key_of(r)) || r.ranks < base[key_of(r)]->ranks)) base[key_of(r)] = &r;
  }
  for (const ReportRun& r : runs) {
    const RunSummary& m = r.m;
    std::vector<std::string> row{r.name, r.status + (r.status == "done" ? "" : " (step " + std::to_string(m.last_step) + ")"),
                                 std::to_string(r.ranks), m.ep ? std::to_string(m.ep) : "-",
                                 m.routing == "off" ? "learned" : "forced " + m.routing};
    const bool have = m.steps > 0;
    if (kind == "scale") {
      const ReportRun* b = base.count(key_of(r)) ? base[key_of(r)] : nullptr;
      const double eff = have && b ? (m.tokens_per_s / r.ranks) / (b->m.tokens_per_s / b->ranks) : 0;
      row.insert(row.end(), {r.mode, r.label.empty() ? "-" : r.label,
                             m.tokens_per_step > 0 ? std::to_string(m.tokens_per_step) : "-", have && b ? fixed(eff, 3) : "-"});
    }
    row.insert(row.end(), {millions(m.params_total), millions(m.params_active), have ? fixed(m.tokens_per_s, 0) : "-",
                           have ? fixed(100 * m.mfu, 2) + "%" : "-", have ? fixed(1e3 * m.times.total(), 1) : "-"});
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
  return t;
}

}  // namespace

std::string report_study(const std::string& out, std::string* plot_note) {
  const std::vector<ReportRun> runs = read_runs(out);
  const std::string kind = runs.front().mode == "layer" ? "layer" : runs.front().kind;
  std::string md = "# Study " + fs::path(out).filename().string() + " (" + kind + ")\n\n";
  const Table t = kind == "layer" ? layer_table(runs) : training_table(runs, kind);
  if (kind == "layer") {
    md += "MoE layers at one shape, forward + backward (moe_bench layer); times in ms.\n\n";
  } else if (kind == "compare") {
    md += "Dense, classic top-k MoE and shared-expert MoE on the same data, token budget and ranks. tokens/s "
          "and MFU: medians over the steps after the first tenth; phases: mean ms per step over the same "
          "steps (hidden: shared-expert and gradient-sum time that overlapped other work, outside the sum); "
          "val loss and bpb: the last evaluation.\n\n";
  } else {
    md += "Weak scaling keeps the tokens per rank, strong scaling the global batch. efficiency = (tokens/s "
          "per rank) / (tokens/s per rank at the smallest rank count of the same model, mode and sweep "
          "point). Phases: mean ms per step after the first tenth of the steps.\n\n";
  }
  md += t.markdown();
  write_text(fs::path(out) / "summary.md", md);
  write_text(fs::path(out) / "summary.csv", t.csv());
  // Plots: gnuplot from the Debian package; a study is complete without them.
  const std::string note = kind == "layer" ? "no plots for a layer comparison" : draw_plots(fs::path(out) / "plots", runs, kind);
  if (plot_note) *plot_note = note;
  return md;
}

}  // namespace moe
