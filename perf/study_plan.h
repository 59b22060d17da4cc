// A study's plan: the runs of a study file (configs/studies/*.yaml; docs/STUDIES.md), each with its
// rank count and its arguments, described in <out>/<run>/run.json for the runner and the report.
#pragma once

#include <string>
#include <vector>

namespace moe {

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

// Writes <options.out>/<run>/run.json for every run (what the runner and the report read).
void write_plan(const std::string& study_path, const StudyOptions& options, const std::vector<StudyRun>& runs);

}  // namespace moe
