// moe_ckpt: offline checkpoint tools on one process (train/checkpoint_tools.h).
//
//   moe_ckpt reshard CHECKPOINT --ep N [--dp M] --out DIR
//   moe_ckpt export  CHECKPOINT --out DIR [--dtype fp32|bf16]
//   moe_ckpt import  EXPORT_DIR --out DIR
//   moe_ckpt upcycle DENSE_CHECKPOINT --config MOE_CONFIG --out DIR [--noise STD] [--granular]
//                    [--section.key=value ...]
//
// CHECKPOINT is a step directory, or a checkpoint directory (its latest step). Output directories must
// not hold a checkpoint (or an export) yet.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>

#include "comm/mpi/mpi_communicator.h"
#include "launch/main_common.h"
#include "base/log.h"
#include "train/checkpoint.h"
#include "train/checkpoint_tools.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: moe_ckpt reshard CHECKPOINT --ep N [--dp M] --out DIR\n"
    "       moe_ckpt export  CHECKPOINT --out DIR [--dtype fp32|bf16]\n"
    "       moe_ckpt import  EXPORT_DIR --out DIR\n"
    "       moe_ckpt upcycle DENSE_CHECKPOINT --config MOE_CONFIG --out DIR [--noise STD] [--granular]\n"
    "                        [--section.key=value ...]\n\n"
    "Offline, on one process. reshard: the same tensors in the files of ep N (dp M: the world size the\n"
    "manifest records). export: model.safetensors (experts stacked per layer) + config.json. import: an\n"
    "export back into a checkpoint with a fresh optimizer. upcycle: an MoE checkpoint from a dense one\n"
    "(experts copied from the dense FFN, or cut out of it with --granular). CHECKPOINT: a step directory,\n"
    "or a checkpoint directory (its latest step). Nothing is overwritten.\n";

struct Args {
  std::string command, input, out, config, dtype = "fp32";
  int ep = 0, dp = 1;
  double noise = 0;
  bool granular = false;
  std::vector<std::string> overrides;  // "section.key=value" (upcycle)
  std::set<std::string> given;         // the options given, for refusing those of another command
};

[[noreturn]] void usage_error(const std::string& key, const std::string& message) {
  throw collective(ConfigError(key, message + " (see --help)"));
}

double number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(v)) usage_error(flag, "expected a number, got '" + text + "'");
  return v;
}

int count(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v < 1 || v > (1 << 24)) {
    usage_error(flag, "expected a whole number from 1 to 16777216, got '" + text + "'");
  }
  return static_cast<int>(v);
}

Args parse(int argc, char** argv) {
  Args a;
  if (argc < 2) usage_error("", "give a command: reshard, export, import or upcycle");
  a.command = argv[1];
  if (a.command != "reshard" && a.command != "export" && a.command != "import" && a.command != "upcycle") {
    usage_error("", "unknown command '" + a.command + "'");
  }
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      if (!a.input.empty()) usage_error("", "unexpected argument '" + arg + "'");
      a.input = arg;
      continue;
    }
    const size_t eq = arg.find('=');
    const std::string flag = arg.substr(0, eq);
    if (flag == "--granular") {
      a.granular = eq == std::string::npos || arg.substr(eq + 1) == "true";
      continue;
    }
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      usage_error(flag, "missing value");
    }
    a.given.insert(flag);
    if (flag.find('.') != std::string::npos) {
      a.overrides.push_back(flag.substr(2) + "=" + value);
    } else if (flag == "--out") {
      a.out = value;
    } else if (flag == "--config") {
      a.config = value;
    } else if (flag == "--dtype") {
      a.dtype = value;
    } else if (flag == "--ep") {
      a.ep = count(flag, value);
    } else if (flag == "--dp") {
      a.dp = count(flag, value);
    } else if (flag == "--noise") {
      a.noise = number(flag, value);
    } else {
      usage_error(flag, "unknown option");
    }
  }
  if (a.input.empty()) usage_error("", a.command + " needs a " + (a.command == "import" ? "directory" : "checkpoint"));
  if (a.out.empty()) usage_error("--out", "give an output directory");
  if (a.command == "reshard" && a.ep < 1) usage_error("--ep", "reshard needs --ep N (N >= 1)");
  if (a.command == "export" && a.dtype != "fp32" && a.dtype != "bf16") usage_error("--dtype", "fp32 or bf16, not " + a.dtype);
  if (a.command == "upcycle" && a.config.empty()) usage_error("--config", "upcycle needs the MoE configuration");
  if (a.command != "upcycle" && (!a.overrides.empty() || !a.config.empty() || a.granular || a.noise != 0)) {
    usage_error("", "--config, --noise, --granular and configuration keys belong to upcycle");
  }
  const std::set<std::string> own = a.command == "reshard" ? std::set<std::string>{"--ep", "--dp", "--out"}
                                    : a.command == "export" ? std::set<std::string>{"--dtype", "--out"}
                                    : a.command == "import" ? std::set<std::string>{"--out"}
                                                            : std::set<std::string>{"--config", "--out", "--noise"};
  for (const std::string& flag : a.given) {
    if (flag.find('.') == std::string::npos && !own.count(flag)) usage_error(flag, "not an option of " + a.command);
  }
  return a;
}

int ckpt_main(int argc, char** argv) {
  Args a = parse(argc, argv);
  auto world = make_mpi_world();
  if (world->size() != 1) usage_error("", "moe_ckpt runs on one process; run it without mpirun -np > 1");
  auto backend = make_cpu_backend({});
  if (a.command == "import") {
    log_info("import: wrote " + import_checkpoint(a.input, a.out, *backend));
    return 0;
  }
  const std::string step_dir = resolve_step_dir(a.input, *world);
  if (a.command == "reshard") {
    log_info("reshard: wrote " + reshard_checkpoint(step_dir, a.ep, a.dp, a.out));
  } else if (a.command == "export") {
    export_checkpoint(step_dir, a.out, a.dtype == "bf16" ? DType::kBF16 : DType::kF32);
  } else {
    CommandLine cl;
    cl.config_path = a.config;
    cl.overrides = a.overrides;
    cl.overrides.push_back("parallel.ep=1");  // one process holds every expert
    Config config = load_config(cl, *world, nullptr, /*validate=*/true);
    log_info("upcycle: wrote " + upcycle_checkpoint(step_dir, config, a.out, {a.noise, a.granular}, *backend));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (print_usage_if_asked(argc, argv, kUsage)) return 0;
  return run_job(argc, argv, "moe_ckpt", [&] { return ckpt_main(argc, argv); });
}
