// moe_train: trains the MoE transformer described by a YAML config, one process per rank under mpirun.
//
//   mpirun -np 8 build/moe_train configs/quickstart.yaml [--section.key=value ...]
//   build/moe_train --help | --config-reference | CONFIG --print-config | CONFIG --get=KEY[,KEY...]
#include <algorithm>
#include <cstdio>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "launch/main_common.h"
#include "base/json.h"
#include "base/log.h"
#include "runtime/signals.h"
#include "train/trainer.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: mpirun -np N moe_train [CONFIG.yaml] [--section.key=value ...]\n"
    "       moe_train --help | --config-reference\n"
    "       moe_train [CONFIG.yaml] [overrides] --print-config\n"
    "       moe_train [CONFIG.yaml] [overrides] --get=KEY[,KEY...]\n\n"
    "Trains an expert-parallel MoE transformer. Options:\n"
    "  --print-config       print the resolved configuration and exit\n"
    "  --get=KEY[,KEY...]   print the resolved value of each key, one per line, and exit\n"
    "  --config-reference   print docs/CONFIG.md (generated from the configuration table) and exit\n\n"
    "Configuration keys (YAML section.key, or --section.key=value):\n";

int train(const CommandLine& cl) {
  install_stop_handlers();  // a SIGTERM / SIGINT / SIGUSR1 stops at the next step, after a checkpoint
  auto world = make_mpi_world();
  bool print_only = false;
  std::string get;
  for (const auto& f : cl.flags) {
    if (f == "print-config") {
      print_only = true;
    } else if (f.rfind("get=", 0) == 0) {
      get = f.substr(4);
    } else {
      Error e(ErrorKind::kConfig, "unknown option --" + f + " (see --help)");
      e.mark_collective();
      throw e;
    }
  }
  if (!cl.positional.empty()) {
    Error e(ErrorKind::kConfig, "unexpected argument '" + cl.positional[0] + "' (one config file at most)");
    e.mark_collective();
    throw e;
  }
  ConfigSources sources;
  // --get answers for the file as written, whatever the number of ranks it is asked from.
  Config config = load_config(cl, *world, &sources, /*validate=*/get.empty());
  if (!get.empty()) {  // one value per line, for scripts (launch/moe)
    auto values = config_values(config);
    std::stringstream keys(get);
    std::string key;
    while (std::getline(keys, key, ',')) {
      auto it = std::find_if(values.begin(), values.end(), [&](const auto& kv) { return kv.first == key; });
      if (it == values.end()) {
        ConfigError e(key, "unknown key");
        e.mark_collective();
        throw e;
      }
      log_info(it->second);
    }
    return 0;
  }
  log_info("moe_train: " + std::to_string(world->size()) + " ranks, ep " + std::to_string(config.parallel.ep) +
           " x dp " + std::to_string(world->size() / config.parallel.ep) + ", " +
           std::to_string(local_tokens(config, world->size())) + " tokens per rank per step");
  log_info("resolved configuration" + (cl.config_path.empty() ? std::string() : " (" + cl.config_path + ")") + ":\n" +
           config_table(config, sources));
  if (print_only) return 0;

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
  return trainer.stopped_by() ? 128 + trainer.stopped_by() : 0;  // "stopped by a signal", like a shell
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
  }
  return run_job(argc, argv, "moe_train", [&] { return train(parse_command_line(argc, argv, 1)); });
}
