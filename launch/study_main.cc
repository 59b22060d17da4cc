// moe_study: the two ends of a study (launch/moe study runs the jobs in between). One process, no MPI.
//
//   moe_study plan STUDY.yaml --kind=compare|scale --out=DIR [--ranks=1,2,4,8] [--repeats=N]
//                  [--layer [--iters=N --warmup=N]]
//                  [--section.key=v1,v2 ...]
//       writes DIR/<run>/run.json for every run and prints one line per run, fields separated by tabs:
//       name, ranks, mode, config file ("-" for an empty field), then the run's arguments (overrides
//       key=value, or moe_bench options)
//   moe_study report DIR
//       writes DIR/summary.md, DIR/summary.csv and DIR/plots/, and prints the Markdown table
//   moe_study predict CONFIG --constants=FILE [--ranks=8,64,1024] [--ranks-per-node=N] [--ep=N]
//                     [--batch-per-rank=N] [--bf16-everywhere] [--load-from=METRICS] [--format=markdown|csv]
//                     [--section.key=value ...]
//       the cost model's step time and split per rank count
//   moe_study validate DIR --constants=FILE [--format=markdown|csv]
//       the cost model against every finished training run of a study directory
//   moe_study median-constants OUT FILE...
//       the element-wise median of several calibrations (launch/moe calibrate --repeats N)
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>

#include "perf/predict.h"
#include "perf/study.h"
#include "base/error.h"
#include "base/json.h"
#include "config/sweep.h"
#include "train/safetensors.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: moe_study plan STUDY.yaml --kind=compare|scale --out=DIR [--ranks=N,...] [--repeats=N]\n"
    "                      [--layer [--iters=N] [--warmup=N]]\n"
    "                      [--section.key=v,...]\n"
    "       moe_study report DIR\n"
    "       moe_study predict CONFIG --constants=FILE [--ranks=8,64,1024] [--ranks-per-node=N] [--ep=N]\n"
    "                         [--batch-per-rank=N] [--bf16-everywhere] [--load-from=METRICS] [--format=markdown|csv]\n"
    "                         [--section.key=value ...]\n"
    "       moe_study validate DIR --constants=FILE [--format=markdown|csv]\n"
    "       moe_study median-constants OUT FILE...\n"
    "launch/moe study is the command to use; see docs/STUDIES.md.\n";

int positive(const std::string& flag, const std::string& text);

int plan(int argc, char** argv) {
  StudyOptions opt;
  std::string study;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--kind=", 0) == 0) opt.kind = a.substr(7);
    else if (a.rfind("--out=", 0) == 0) opt.out = a.substr(6);
    else if (a == "--layer") opt.layer = true;
    else if (a.rfind("--iters=", 0) == 0 || a.rfind("--warmup=", 0) == 0) opt.bench_flags.push_back(a);
    else if (a.rfind("--repeats=", 0) == 0) opt.repeats = positive("--repeats", a.substr(10));
    else if (a.rfind("--ranks=", 0) == 0) {
      for (const std::string& r : split_list("--ranks", a.substr(8))) {
        char* end = nullptr;
        const long n = std::strtol(r.c_str(), &end, 10);
        if (*end != '\0' || n < 1) throw InputError("--ranks", "expected positive numbers, got '" + a.substr(8) + "'");
        opt.ranks.push_back(static_cast<int>(n));
      }
    } else if (a.rfind("--", 0) == 0 && a.find('.') != std::string::npos && a.find('=') != std::string::npos) {
      opt.overrides.push_back(a.substr(2));
    } else if (a.rfind("--", 0) != 0 && study.empty()) {
      study = a;
    } else {
      throw InputError(a, "unexpected argument to moe_study plan");
    }
  }
  if (study.empty() || opt.kind.empty() || opt.out.empty()) throw InputError("moe_study plan", "needs STUDY.yaml, --kind and --out");
  const std::vector<StudyRun> runs = plan_study(study, opt);
  for (const StudyRun& r : runs) {
    const std::filesystem::path dir = std::filesystem::path(opt.out) / r.name;
    std::filesystem::create_directories(dir);
    JsonWriter j;
    j.begin_object().field("index", r.index).field("name", r.name).field("model", r.model).field("mode", r.mode);
    j.field("label", r.label).field("kind", opt.kind).field("study", study).field("config", r.config);
    j.field("ranks", r.ranks).field("repeat", r.repeat).array("args", r.args).end_object();
    write_file_atomic((dir / "run.json").string(), j.str() + "\n");
    // "-" for an empty field: bash's read collapses runs of tabs
    std::string line = r.name + "\t" + std::to_string(r.ranks) + "\t" + (r.mode.empty() ? "-" : r.mode) + "\t" +
                       (r.config.empty() ? "-" : r.config);
    for (const std::string& a : r.args) {
      if (a.find_first_of("\t\n") != std::string::npos) throw InputError(r.name, "an argument holds a tab or a newline: " + a);
      line += "\t" + a;
    }
    std::cout << line << "\n";
  }
  return 0;
}

std::vector<int> parse_ranks(const std::string& flag, const std::string& text) {
  std::vector<int> out;
  for (const std::string& r : split_list(flag, text)) {
    char* end = nullptr;
    const long n = std::strtol(r.c_str(), &end, 10);
    if (*end != '\0' || n < 1) throw InputError(flag, "expected positive numbers, got '" + text + "'");
    out.push_back(static_cast<int>(n));
  }
  return out;
}

int positive(const std::string& flag, const std::string& text) { return parse_ranks(flag, text).at(0); }

// predict and validate: the cost model's tables
int model(int argc, char** argv) {
  const std::string what = argv[1];
  PredictRequest req;
  std::string target, constants, format = "markdown";
  std::vector<std::string> overrides;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    std::string v;
    // --name=value: true with the value in v
    auto option = [&](const char* name) {
      const std::string prefix = std::string("--") + name + "=";
      if (a.rfind(prefix, 0) != 0) return false;
      v = a.substr(prefix.size());
      return true;
    };
    if (option("constants")) constants = v;
    else if (option("format")) format = v;
    else if (option("ranks")) req.ranks = parse_ranks("--ranks", v);
    else if (option("ranks-per-node")) req.ranks_per_node = positive("--ranks-per-node", v);
    else if (option("ep")) req.ep = positive("--ep", v);
    else if (option("batch-per-rank")) req.batch_per_rank = positive("--batch-per-rank", v);
    else if (option("load-from")) req.load_from = v;
    else if (a == "--bf16-everywhere") req.bf16_everywhere = true;
    else if (a.rfind("--", 0) == 0 && a.find('.') != std::string::npos && a.find('=') != std::string::npos)
      overrides.push_back(a.substr(2));
    else if (a.rfind("--", 0) != 0 && target.empty()) target = a;
    else throw InputError(a, "unexpected argument to moe_study " + what + " (see moe_study --help)");
  }
  if (target.empty()) throw InputError("moe_study " + what, what == "predict" ? "needs a configuration file" : "needs a study directory");
  if (constants.empty()) throw InputError("moe_study " + what, "needs --constants=FILE (launch/moe calibrate writes one)");
  if (format != "markdown" && format != "csv") throw InputError("--format", "expected markdown or csv, got '" + format + "'");
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
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  try {
    const std::string what = argv[1];
    if (what == "plan") return plan(argc, argv);
    if (what == "predict" || what == "validate") return model(argc, argv);
    if (what == "median-constants" && argc >= 4) {
      std::vector<CostConstants> runs;
      for (int i = 3; i < argc; ++i) runs.push_back(read_constants(argv[i]));
      write_file_atomic(argv[2], constants_to_json(median_constants(runs)));
      return 0;
    }
    if (what == "report" && argc == 3) {
      std::string note;
      std::cout << report_study(argv[2], &note);
      std::cerr << "moe_study: " << note << "\n";
      return 0;
    }
    std::fputs(kUsage, stderr);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_study: error: %s\n", e.what());
    return 2;
  }
}
