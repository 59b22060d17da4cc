// Studies: the run grid of a study file (configs/studies/*.yaml), and the report that turns the runs'
// metrics into a Markdown table, a CSV file and gnuplot plots. launch/moe study runs the grid between
// the two (moe_study plan, then one mpirun per run, then moe_study report); see docs/STUDIES.md.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "train/metrics.h"

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

// Reads every run of the study in `out` (run.json and metrics.jsonl or bench.csv of each), writes
// summary.md, summary.csv and plots/ (data, gnuplot scripts, and PNGs when gnuplot runs), and returns
// the Markdown text. Runs that did not finish are listed as such. `plot_note` gets what happened to the
// plots (made, or why not).
std::string report_study(const std::string& out, std::string* plot_note);

}  // namespace moe
