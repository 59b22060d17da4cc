// Studies: the run grid of a study file (configs/studies/*.yaml), and the report that turns the runs'
// metrics into a Markdown table, a CSV file and gnuplot plots. launch/moe study runs the grid between
// the two (moe_study plan, then one mpirun per run, then moe_study report); see docs/STUDIES.md.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace moe {

// A table written as Markdown (aligned for reading in a terminal too) or as CSV (RFC 4180 quoting).
struct Table {
  std::vector<std::string> columns;
  std::vector<std::vector<std::string>> rows;
  std::string markdown() const;
  std::string csv() const;
};

// One run of a study.
struct StudyRun {
  int index = 0;
  std::string name;    // its directory under the study's output directory
  std::string model;   // the model's name in the study file
  std::string mode;    // scale: weak | strong; layer runs: layer; compare: ""
  std::string label;   // the swept keys of this run ("moe.top_k=2"), "" without a sweep
  std::string config;  // the model's YAML file (training runs)
  int ranks = 1;
  int repeat = 1;  // 1..repeats: the same run again (the name ends in -repN when the study repeats)
  std::vector<std::string> args;  // training: overrides key=value; layer runs: moe_bench layer options
};

struct StudyOptions {
  std::string kind;                    // compare | scale (what the command asked for)
  std::string out;                     // output directory
  std::vector<int> ranks;              // --ranks: replaces the study's rank counts when given
  bool layer = false;                  // compare --layer: the bare MoE layers, no training
  std::vector<std::string> overrides;  // --section.key=value[,value...] from the command line
  std::vector<std::string> bench_flags;  // --layer: moe_bench layer's own flags (--iters=N, --warmup=N)
  int repeats = 0;                     // --repeats: replaces the study's `repeats` (each run N times) when > 0
};

// Expands a study file into its runs: every model x sweep point (x mode x rank count for scale), each
// configuration parsed and validated for its rank count before anything runs. Throws ConfigError or
// InputError naming the study file, the run and the key.
std::vector<StudyRun> plan_study(const std::string& study_path, const StudyOptions& options);

// What one training run's metrics say (moe_train's JSON lines: the events file's start event, then the
// metrics file's line per step).
struct RunSummary {
  bool started = false;
  int64_t steps = 0;  // step lines read
  int64_t skipped = 0;  // of which the first `skipped` are warm-up, outside the medians and means
  int64_t last_step = 0;
  int ranks = 0, ep = 0;
  int64_t params_total = 0, params_active = 0, tokens_per_step = 0;
  double flops_per_token = 0;
  std::string routing = "off";
  // Medians / means over the measured steps (all but the warm-up).
  double tokens_per_s = 0, mfu = 0;
  std::map<std::string, double> phase_s;  // mean seconds per step of every time_s entry
  double max_mean_load = 0, dropped_frac = 0;
  struct Eval {
    int64_t step;
    double tokens, wall_s, loss, bpb;  // bpb: bits per byte for byte-level models, else bits per token
  };
  std::vector<Eval> evals;  // wall_s: the steps' wall time up to this step
  // Per MoE layer, per step (one row per step), the load of each expert over the mean load.
  std::vector<std::vector<std::vector<double>>> load;  // [layer][step][expert]
};
// `warmup` is the fraction of the steps left out of the medians and means (at least one step, never all).
// `jsonl`: event and step lines in any order (a metrics file of an earlier version holds both).
RunSummary summarize_metrics(const std::string& jsonl, const std::string& what, double warmup = 0.1);
// The same for the run whose train.metrics_path is `metrics_path`: its events file (when there is one)
// and its metrics file.
RunSummary summarize_metrics_file(const std::string& metrics_path, double warmup = 0.1);

// The phases of a step in the order the tables and plots show them.
const std::vector<std::string>& phase_names();

// Reads every run of the study in `out` (run.json and metrics.jsonl or bench.csv of each), writes
// summary.md, summary.csv and plots/ (data, gnuplot scripts, and PNGs when gnuplot runs), and returns
// the Markdown text. Runs that did not finish are listed as such. `plot_note` gets what happened to the
// plots (made, or why not).
std::string report_study(const std::string& out, std::string* plot_note);

}  // namespace moe
