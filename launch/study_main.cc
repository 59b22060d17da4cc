// moe_study: studies, calibration passes and the cost model's tables. One process, no MPI: the jobs it
// runs go through launch/moe (given as --launcher), which runs each under mpirun.
//
//   moe_study run compare|scale [STUDY.yaml] --launcher=PATH [--out=DIR] [--fresh] [--ranks=1,2,4,8]
//                 [--repeats=N] [--layer [--iters=N --warmup=N]] [--section.key=v1,v2 ...]
//       plans the study (DIR/<run>/run.json), runs every run not finished before, writes the report
//   moe_study plan compare|scale [STUDY.yaml] [same options, no --launcher]
//       writes the plan and prints its runs, running nothing
//   moe_study report DIR
//       writes DIR/summary.md, DIR/summary.csv and DIR/plots/, and prints the Markdown table
//   moe_study calibrate --launcher=PATH [--ranks=1,2,4,8] [--repeats=N] [--out=FILE] [moe_bench calibrate options]
//       the cost model's constants of this machine: moe_bench calibrate per rank count and pass, the median
//   moe_study predict CONFIG [--constants=FILE] [--ranks=8,64,1024] [--ranks-per-node=N] [--ep=N]
//                     [--batch-per-rank=N] [--bf16-everywhere] [--load-from=METRICS] [--format=markdown|csv]
//                     [--section.key=value ...]
//   moe_study predict --validate=DIR [--constants=FILE] [--format=markdown|csv]    (or: moe_study validate DIR)
//       the cost model's step time and split per rank count, or against every finished run of a study
//   moe_study median-constants OUT FILE...
//
// Every "--name=value" may also be given as "--name value", and -n N as --ranks=N.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>

#include "base/error.h"
#include "base/exit_codes.h"
#include "config/config.h"
#include "config/sweep.h"
#include "perf/cost_constants.h"
#include "perf/predict.h"
#include "perf/runner.h"
#include "perf/study_plan.h"
#include "perf/study_report.h"
#include "perf/table.h"
#include "train/safetensors.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: moe_study run compare|scale [STUDY.yaml] --launcher=PATH [--out=DIR] [--fresh] [--ranks=N,...]\n"
    "                     [--repeats=N] [--layer [--iters=N] [--warmup=N]] [--section.key=v,...]\n"
    "       moe_study plan compare|scale [STUDY.yaml] [--out=DIR] [the same options]\n"
    "       moe_study report DIR\n"
    "       moe_study calibrate --launcher=PATH [--ranks=1,2,4,8] [--repeats=N] [--out=FILE] [--iters=N ...]\n"
    "       moe_study predict CONFIG [--constants=FILE] [--ranks=8,64,1024] [--ranks-per-node=N] [--ep=N]\n"
    "                         [--batch-per-rank=N] [--bf16-everywhere] [--load-from=METRICS] [--format=markdown|csv]\n"
    "                         [--section.key=value ...]\n"
    "       moe_study predict --validate=DIR [--constants=FILE] [--format=markdown|csv]\n"
    "       moe_study median-constants OUT FILE...\n"
    "launch/moe study, calibrate and predict are the commands to use; see docs/STUDIES.md.\n";

constexpr const char* kDefaultConstants = "runs/calibration/constants.json";

// The arguments after the subcommand as "--name=value", "--flag" and positional words: "--name value"
// joined (for the names that take a value, and section.key overrides), "-n N" as "--ranks=N".
struct Args {
  std::vector<std::string> options;     // "name=value" or "name", without the dashes
  std::vector<std::string> positional;
};

Args parse_args(int argc, char** argv, const std::vector<std::string>& valued) {
  Args a;
  for (int i = 2; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "-n") s = "--ranks";
    if (s.rfind("--", 0) != 0) {
      a.positional.push_back(s);
      continue;
    }
    s = s.substr(2);
    const bool takes_value = s.find('.') != std::string::npos ||
                             std::find(valued.begin(), valued.end(), s) != valued.end();
    if (s.find('=') == std::string::npos && takes_value) {
      if (i + 1 >= argc) throw InputError("--" + s, "needs a value");
      s += "=" + std::string(argv[++i]);
    }
    a.options.push_back(s);
  }
  return a;
}

std::vector<int> positive_list(const std::string& flag, const std::string& text) {
  std::vector<int> out;
  for (const std::string& r : split_list(flag, text)) {
    char* end = nullptr;
    const long n = std::strtol(r.c_str(), &end, 10);
    if (*end != '\0' || n < 1) throw InputError(flag, "expected positive numbers, got '" + text + "'");
    out.push_back(static_cast<int>(n));
  }
  return out;
}

int positive(const std::string& flag, const std::string& text) { return positive_list(flag, text).at(0); }

// "name=value" -> value in *v when the name matches.
bool option(const std::string& a, const char* name, std::string* v) {
  const std::string prefix = std::string(name) + "=";
  if (a.rfind(prefix, 0) != 0) return false;
  *v = a.substr(prefix.size());
  return true;
}

// plan and run: the study's options. The study file and the output directory default to
// <root>/configs/studies/<kind>.yaml and runs/study-<name>[-layer], root being the checkout launch/moe is in.
StudyRunnerOptions study_options(int argc, char** argv) {
  const Args args = parse_args(argc, argv, {"out", "ranks", "repeats", "iters", "warmup", "launcher"});
  StudyRunnerOptions o;
  std::string v;
  for (const std::string& a : args.options) {
    if (option(a, "out", &v)) o.plan.out = v;
    else if (option(a, "launcher", &v)) o.launcher = v;
    else if (a == "fresh") o.fresh = true;
    else if (a == "layer") o.plan.layer = true;
    else if (option(a, "iters", &v) || option(a, "warmup", &v)) o.plan.bench_flags.push_back("--" + a);
    else if (option(a, "repeats", &v)) o.plan.repeats = positive("--repeats", v);
    else if (option(a, "ranks", &v)) o.plan.ranks = positive_list("--ranks", v);
    else if (a.find('.') != std::string::npos && a.find('=') != std::string::npos) o.plan.overrides.push_back(a);
    else throw InputError("--" + a, "unknown option of moe_study " + std::string(argv[1]) + " (see --help)");
  }
  if (args.positional.empty() || (args.positional[0] != "compare" && args.positional[0] != "scale")) {
    throw InputError("study", "expected compare or scale (usage: launch/moe study compare|scale [STUDY.yaml] [options])");
  }
  if (args.positional.size() > 2) throw InputError(args.positional[2], "more than one study file");
  o.plan.kind = args.positional[0];
  const std::string root = o.launcher.empty() ? "." : std::filesystem::path(o.launcher).parent_path().parent_path().string();
  o.study = args.positional.size() > 1 ? args.positional[1] : root + "/configs/studies/" + o.plan.kind + ".yaml";
  if (o.plan.out.empty()) {
    o.plan.out = "runs/study-" + std::filesystem::path(o.study).stem().string() + (o.plan.layer ? "-layer" : "");
  }
  return o;
}

int plan(int argc, char** argv) {
  const StudyRunnerOptions o = study_options(argc, argv);
  const std::vector<StudyRun> runs = plan_study(o.study, o.plan);
  write_plan(o.study, o.plan, runs);
  Table t;
  t.columns = {"run", "ranks", "mode", "config"};
  for (const StudyRun& r : runs) t.rows.push_back({r.name, std::to_string(r.ranks), r.mode, r.config});
  std::cout << t.markdown();
  return exit_code(ExitCode::kOk);
}

int run(int argc, char** argv) {
  const StudyRunnerOptions o = study_options(argc, argv);
  if (o.launcher.empty()) throw InputError("moe_study run", "needs --launcher=PATH (launch/moe study is the command)");
  return run_study(o);
}

int calibrate(int argc, char** argv) {
  const Args args = parse_args(argc, argv, {"out", "ranks", "repeats", "launcher", "iters", "warmup", "device", "quick"});
  CalibrationOptions o;
  o.out = kDefaultConstants;
  std::string v;
  for (const std::string& a : args.options) {
    if (option(a, "out", &v)) o.out = v;
    else if (option(a, "launcher", &v)) o.launcher = v;
    else if (option(a, "repeats", &v)) o.repeats = positive("--repeats", v);
    else if (option(a, "ranks", &v)) o.ranks = positive_list("--ranks", v);
    else o.bench_args.push_back("--" + a);  // moe_bench calibrate checks its own options
  }
  if (!args.positional.empty()) throw InputError(args.positional[0], "unexpected argument to moe_study calibrate");
  if (o.launcher.empty()) throw InputError("moe_study calibrate", "needs --launcher=PATH (launch/moe calibrate)");
  return run_calibration(o);
}

// predict and validate: the cost model's tables
int model(int argc, char** argv) {
  std::string what = argv[1];
  const Args args = parse_args(argc, argv, {"constants", "format", "ranks", "ranks-per-node", "ep", "batch-per-rank",
                                            "load-from", "validate"});
  PredictRequest req;
  std::string target, constants = kDefaultConstants, format = "markdown", v;
  std::vector<std::string> overrides;
  for (const std::string& a : args.options) {
    if (option(a, "constants", &v)) constants = v;
    else if (option(a, "format", &v)) format = v;
    else if (option(a, "ranks", &v)) req.ranks = positive_list("--ranks", v);
    else if (option(a, "ranks-per-node", &v)) req.ranks_per_node = positive("--ranks-per-node", v);
    else if (option(a, "ep", &v)) req.ep = positive("--ep", v);
    else if (option(a, "batch-per-rank", &v)) req.batch_per_rank = positive("--batch-per-rank", v);
    else if (option(a, "load-from", &v)) req.load_from = v;
    else if (option(a, "validate", &v)) what = "validate", target = v;
    else if (a == "bf16-everywhere") req.bf16_everywhere = true;
    else if (a.find('.') != std::string::npos && a.find('=') != std::string::npos) overrides.push_back(a);
    else throw InputError("--" + a, "unexpected argument to moe_study " + what + " (see moe_study --help)");
  }
  for (const std::string& p : args.positional) {
    if (!target.empty()) throw InputError(p, "more than one " + std::string(what == "predict" ? "configuration" : "study directory"));
    target = p;
  }
  if (target.empty()) throw InputError("moe_study " + what, what == "predict" ? "needs a configuration file" : "needs a study directory");
  if (format != "markdown" && format != "csv") throw InputError("--format", "expected markdown or csv, got '" + format + "'");
  if (!std::filesystem::exists(constants)) {
    throw InputError(constants, "no cost constants: run launch/moe calibrate (or give --constants, e.g. "
                                "configs/hardware/h100-sxm.json)");
  }
  const CostConstants k = read_constants(constants);
  Table t;
  std::string summary;
  if (what == "predict") {
    const Config c = parse_config(read_file(target, "configuration"), target, overrides);
    t = predict_table(c, k, req);
    summary = "cost model: " + k.description;
  } else {
    t = validate_study(target, k, &summary);
  }
  std::cout << (format == "csv" ? t.csv() : t.markdown());
  std::cerr << "moe_study: " << summary << "\n";
  return exit_code(ExitCode::kOk);
}

int dispatch(int argc, char** argv) {
  const std::string what = argv[1];
  if (what == "run") return run(argc, argv);
  if (what == "plan") return plan(argc, argv);
  if (what == "calibrate") return calibrate(argc, argv);
  if (what == "predict" || what == "validate") return model(argc, argv);
  if (what == "median-constants" && argc >= 4) {
    std::vector<CostConstants> runs;
    for (int i = 3; i < argc; ++i) runs.push_back(read_constants(argv[i]));
    write_file_atomic(argv[2], constants_to_json(median_constants(runs)));
    return exit_code(ExitCode::kOk);
  }
  if (what == "report" && argc == 3) {
    std::string note;
    std::cout << report_study(argv[2], &note);
    std::cerr << "moe_study: " << note << "\n";
    return exit_code(ExitCode::kOk);
  }
  std::fputs(kUsage, stderr);
  return exit_code(ExitCode::kInvalid);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? exit_code(ExitCode::kInvalid) : exit_code(ExitCode::kOk);
  }
  try {
    return dispatch(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_study: error: %s\n", e.what());
    return exit_code(ExitCode::kInvalid);
  }
}
