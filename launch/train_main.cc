// moe_train: trains the MoE transformer described by a YAML config, one process per rank under mpirun.
//
//   mpirun -np 8 build/moe_train configs/quickstart.yaml [--section.key=value ...]
//   build/moe_train --help | --config-reference | --exit-codes | CONFIG --print-config | CONFIG --get=KEY[,KEY...]
//   build/moe_train CONFIG --fit-ranks=N
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "base/exit_codes.h"
#include "launch/main_common.h"
#include "base/json.h"
#include "base/log.h"
#include "runtime/signals.h"
#include "train/trainer.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: mpirun -np N moe_train [CONFIG.yaml] [--section.key=value ...]\n"
    "       moe_train --help | --config-reference | --exit-codes\n"
    "       moe_train [CONFIG.yaml] [overrides] --print-config\n"
    "       moe_train [CONFIG.yaml] [overrides] --get=KEY[,KEY...]\n"
    "       moe_train [CONFIG.yaml] [overrides] --fit-ranks=N\n\n"
    "Trains an expert-parallel MoE transformer. Options:\n"
    "  --print-config       print the resolved configuration and exit\n"
    "  --get=KEY[,KEY...]   print the resolved value of each key, one per line, and exit\n"
    "  --fit-ranks=N        print the layout the configuration takes on at most N ranks, \"RANKS EP\" (the most\n"
    "                       ranks it validates for, ep the largest divisor of the ranks and the experts), and exit\n"
    "  --config-reference   print docs/CONFIG.md (generated from the configuration table) and exit\n"
    "  --exit-codes         print the exit code table as shell assignments (EXIT_NAME=CODE) and exit\n\n"
    "Configuration keys (YAML section.key, or --section.key=value):\n";

// moe_train's own options (everything else is a configuration key).
struct TrainFlags {
  bool print_only = false;
  std::string get;    // --get=KEY[,KEY...]
  int fit_ranks = 0;  // --fit-ranks=N
};

TrainFlags parse_flags(const CommandLine& cl) {
  return on_every_rank([&] {
    TrainFlags t;
    for (const auto& f : cl.flags) {
      if (f == "print-config") {
        t.print_only = true;
      } else if (f.rfind("get=", 0) == 0) {
        t.get = f.substr(4);
      } else if (f.rfind("fit-ranks=", 0) == 0) {
        char* end = nullptr;
        const std::string v = f.substr(10);
        const long n = std::strtol(v.c_str(), &end, 10);
        if (v.empty() || *end != '\0' || n < 1) throw ConfigError("--fit-ranks", "expected a positive number, got '" + v + "'");
        t.fit_ranks = static_cast<int>(n);
      } else {
        throw Error(ErrorKind::kConfig, "unknown option --" + f + " (see --help)");
      }
    }
    if (!cl.positional.empty()) {
      throw Error(ErrorKind::kConfig, "unexpected argument '" + cl.positional[0] + "' (one config file at most)");
    }
    return t;
  });
}

// --get: one value per line, for scripts (launch/moe).
void print_values(const Config& config, const std::string& get) {
  auto values = config_values(config);
  std::stringstream keys(get);
  std::string key;
  while (std::getline(keys, key, ',')) {
    auto it = std::find_if(values.begin(), values.end(), [&](const auto& kv) { return kv.first == key; });
    if (it == values.end()) {
      throw collective(ConfigError(key, "unknown key"));
    }
    log_info(it->second);
  }
}

int train(const CommandLine& cl) {
  install_stop_handlers();  // a SIGTERM / SIGINT / SIGUSR1 stops at the next step, after a checkpoint
  auto world = make_mpi_world();
  const TrainFlags flags = parse_flags(cl);
  ConfigSources sources;
  // --get and --fit-ranks answer for the file as written, whatever the number of ranks they are asked from.
  const bool query = !flags.get.empty() || flags.fit_ranks > 0;
  Config config = load_config(cl, *world, &sources, /*validate=*/!query);
  if (!flags.get.empty()) {
    print_values(config, flags.get);
    return exit_code(ExitCode::kOk);
  }
  if (flags.fit_ranks > 0) {
    const Layout l = on_every_rank([&] { return fit_layout(config, flags.fit_ranks); });
    log_info(std::to_string(l.ranks) + " " + std::to_string(l.ep));
    return exit_code(ExitCode::kOk);
  }
  log_info("moe_train: " + std::to_string(world->size()) + " ranks, ep " + std::to_string(config.parallel.ep) +
           " x dp " + std::to_string(world->size() / config.parallel.ep) + ", " +
           std::to_string(local_tokens(config, world->size())) + " tokens per rank per step");
  log_info("resolved configuration" + (cl.config_path.empty() ? std::string() : " (" + cl.config_path + ")") + ":\n" +
           config_table(config, sources));
  if (flags.print_only) return exit_code(ExitCode::kOk);

  auto backend = make_backend(config, *world);
  log_info("backend: " + backend->name() + ", communicator: " + (use_nccl(config) ? "nccl" : "mpi"));
  ProcessGroups groups = make_groups(config, *backend, std::move(world));
  Trainer trainer(config, *backend, groups);
  auto records = trainer.run();
  if (!records.empty()) {
    const StepRecord& last = records.back();
    double seconds = 0;
    for (const auto& r : records) seconds += r.times.total();
    log_info("done: " + std::to_string(records.size()) + " steps in " + format_duration(seconds) + ", final loss " +
             format_double(last.stats.loss));
  }
  return trainer.stopped_by() ? exit_code_for_signal(trainer.stopped_by()) : exit_code(ExitCode::kOk);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("%s%s", kUsage, config_help().c_str());
      return 0;
    }
    if (a == "--config-reference") {
      std::printf("%s", config_reference_markdown().c_str());
      return 0;
    }
    if (a == "--exit-codes") {  // for launch/moe: EXIT_NAME=CODE, one per line
      for (const ExitCodeInfo& e : kExitCodes) std::printf("EXIT_%s=%d\n", e.name, exit_code(e.code));
      return 0;
    }
  }
  return run_job(argc, argv, "moe_train", [&] { return train(parse_command_line(argc, argv, 1)); });
}
