// moe_sample: text from a checkpoint of a byte-level model, on one process (every expert local).
//
//   moe_sample CHECKPOINT [--prompt TEXT] [--tokens N] [--temperature T] [--top_k K] [--seed S]
//
// The same checkpoint, prompt, settings and seed give the same text.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "comm/mpi/mpi_communicator.h"
#include "launch/main_common.h"
#include "base/log.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: moe_sample CHECKPOINT [--prompt TEXT] [--tokens N] [--temperature T] [--top_k K] [--seed S]\n\n"
    "Samples text from a checkpoint of a byte-level model on one process. Defaults: --prompt 'The '\n"
    "--tokens 200 --temperature 0.8 --top_k 0 (all tokens) --seed 1234. Temperature 0 is greedy.\n"
    "CHECKPOINT: a step directory, or a checkpoint directory (its latest step).\n";

struct SampleOptions {
  std::string checkpoint, prompt = "The ";
  int64_t tokens = 200;
  double temperature = 0.8;
  int top_k = 0;
  uint64_t seed = 1234;
};

SampleOptions parse(int argc, char** argv) {
  SampleOptions o;
  auto number = [](const std::string& flag, const std::string& text, double lo) {
    char* end = nullptr;
    double v = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || !(v >= lo)) {
      throw collective(ConfigError(flag, "expected a number >= " + std::to_string(static_cast<int>(lo)) + ", got '" + text + "'"));
    }
    return v;
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], value;
    const size_t eq = a.find('=');
    std::string flag = a.substr(0, eq);
    if (flag.rfind("--", 0) == 0) {
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        throw collective(ConfigError(flag, "missing value"));
      }
      if (flag == "--prompt") {
        o.prompt = value;
      } else if (flag == "--tokens") {
        o.tokens = static_cast<int64_t>(number(flag, value, 1));
      } else if (flag == "--temperature") {
        o.temperature = number(flag, value, 0);
      } else if (flag == "--top_k") {
        o.top_k = static_cast<int>(number(flag, value, 0));
      } else if (flag == "--seed") {
        o.seed = static_cast<uint64_t>(number(flag, value, 0));
      } else {
        throw collective(ConfigError(flag, "unknown option (see --help)"));
      }
    } else if (o.checkpoint.empty()) {
      o.checkpoint = a;
    } else {
      throw collective(ConfigError("", "unexpected argument '" + a + "' (one checkpoint)"));
    }
  }
  if (o.checkpoint.empty()) {
    throw collective(ConfigError("", "give a checkpoint (see --help)"));
  }
  return o;
}

int sample_main(int argc, char** argv) {
  SampleOptions o = parse(argc, argv);
  auto world = make_mpi_world();
  if (world->size() != 1) {
    throw collective(ConfigError("", "moe_sample runs on one process (every expert local); run it without mpirun -np > 1"));
  }
  const std::string step_dir = resolve_step_dir(o.checkpoint, *world);
  Config config = checkpoint_config(step_dir, {"parallel.ep=1"}, *world);
  auto backend = make_backend(config, *world);
  std::string text = sample_from_checkpoint(*backend, step_dir, o.prompt, o.tokens, o.temperature, o.top_k, o.seed);
  std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (print_usage_if_asked(argc, argv, kUsage)) return 0;
  return run_job(argc, argv, "moe_sample", [&] { return sample_main(argc, argv); });
}
