// moe_eval: the validation loss of a checkpoint, next to the unigram and bigram baselines of the same
// tokens, on any number of ranks whatever layout the checkpoint was written with.
//
//   mpirun -np N moe_eval CHECKPOINT [--section.key=value ...]
//
// CHECKPOINT is a step directory, or a checkpoint directory (its `latest` is used). The configuration is
// the checkpoint's, then the overrides. parallel.ep defaults to the largest value that divides both the
// ranks and moe.num_experts.
#include <cmath>
#include <cstdio>
#include <numeric>

#include "comm/mpi/mpi_communicator.h"
#include "launch/main_common.h"
#include "base/log.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: mpirun -np N moe_eval CHECKPOINT [--section.key=value ...]\n\n"
    "Validation loss (nats/token, bits/byte for byte-level models) of a checkpoint on data.val_path, with the\n"
    "unigram and bigram baselines fitted on data.path. CHECKPOINT: a step directory, or a checkpoint\n"
    "directory (its latest step).\n";

int eval_main(const CommandLine& cl) {
  auto world = make_mpi_world();
  if (cl.config_path.empty() || !cl.positional.empty() || !cl.flags.empty()) {
    throw collective(ConfigError("", cl.config_path.empty() ? "give a checkpoint (see --help)"
                                             : "unexpected argument; usage: moe_eval CHECKPOINT [--section.key=value ...]"));
  }
  const std::string step_dir = resolve_step_dir(cl.config_path, *world);
  // The checkpoint's configuration for what evaluation uses; what only training needs is switched off.
  std::vector<std::string> overrides{"train.resume=", "train.checkpoint_dir=", "train.metrics_path=",
                                     "train.eval_every=0", "train.sample_tokens=0", "moe.group_size=0"};
  Config base = checkpoint_config(step_dir, {}, *world);
  const int ranks = world->size();
  overrides.push_back("parallel.ep=" + std::to_string(std::gcd(ranks, std::max(1, base.moe.num_experts))));
  overrides.push_back("train.batch_size=" + std::to_string(ranks * std::max(1, base.train.batch_size / ranks)));
  overrides.insert(overrides.end(), cl.overrides.begin(), cl.overrides.end());
  Config config = checkpoint_config(step_dir, overrides, *world);
  try {
    validate_config(config, ranks);
  } catch (Error& e) {
    e.mark_collective();
    throw;
  }
  auto backend = make_backend(config, *world);
  ProcessGroups groups = make_groups(config, *backend, std::move(world));
  Communicator& w = *groups.world;
  // Rank 0 opens the files first: a bad file is one message.
  std::unique_ptr<DataSet> val, train;
  const bool baselines = config.data.source == DataSource::kFile && !config.data.path.empty();
  if (w.rank() == 0) {
    val = make_val_data(config);
    if (baselines) train = make_train_data(config);
  }
  w.barrier();
  if (!val) val = make_val_data(config);
  Transformer model(config, *backend, groups);
  TrainingState state = load_checkpoint(step_dir, config, model, nullptr, groups);
  EvalResult r = evaluate(model, *val, config, state.step);
  Baselines base_loss;
  if (w.rank() == 0 && baselines) base_loss = ngram_baselines(*train, *val, config);
  const char* unit = r.byte_level ? "byte" : "token";
  char line[256];
  std::snprintf(line, sizeof(line), "eval %s (step %lld): %lld tokens of %s on %d rank(s), ep %d", step_dir.c_str(),
                static_cast<long long>(state.step), static_cast<long long>(r.tokens), config.data.val_path.c_str(),
                w.size(), groups.ep_size());
  log_info(line);
  std::snprintf(line, sizeof(line), "  %-8s %10s %12s", "", "nats/token", (std::string("bits/") + unit).c_str());
  log_info(line);
  auto row = [&](const char* name, double nats) {
    std::snprintf(line, sizeof(line), "  %-8s %10.4f %12.4f", name, nats, nats / std::log(2.0));
    log_info(line);
  };
  row("model", r.loss);
  if (baselines) {
    row("unigram", base_loss.unigram);
    row("bigram", base_loss.bigram);
    std::snprintf(line, sizeof(line), "  model - bigram: %+.4f bits/%s", (r.loss - base_loss.bigram) / std::log(2.0),
                  unit);
    log_info(line);
  } else {
    log_info("  (no baselines: data.path is not a token file)");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (print_usage_if_asked(argc, argv, kUsage)) return 0;
  return run_job(argc, argv, "moe_eval", [&] { return eval_main(parse_command_line(argc, argv, 1)); });
}
