// Short training runs under mpirun: the loss falls, reruns are bit-identical, resuming from a checkpoint
// matches the uninterrupted run bit for bit, the loss curve and the validation loss of the whole model
// (dense and MoE layers mixed) do not depend on the number of ranks or the ep x dp layout, and the
// metrics file holds one JSON line per step.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "comm/mpi/mpi_communicator.h"
#include <yaml-cpp/yaml.h>

#include "base/json.h"
#include "tests/test_util.h"
#include "train/trainer.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

Config tiny_model(int64_t steps) {
  const int world = mpi_world_size();
  const int experts = world % 3 == 0 ? 6 : 8;
  const int ep = experts % world == 0 ? world : (world % 2 == 0 ? 2 : 1);
  return test::config({"model.hidden=16", "model.layers=2", "model.seq_len=16", "model.init_std=0.05",
                       "moe.num_experts=" + std::to_string(experts), "parallel.ep=" + std::to_string(ep),
                       "moe.top_k=2", "moe.ffn_hidden=16", "moe.num_shared_experts=1", "moe.capacity_factor=1.25",
                       "moe.min_capacity=1", "train.batch_size=24", "train.steps=" + std::to_string(steps),
                       "train.lr=1e-2", "train.min_lr=1e-3", "train.warmup_steps=3", "train.log_every=1000"});
}

// The tokens of one rank of tiny_model on this world: capacity groups of this size are the same in every
// layout and in one process.
std::string rank_tokens() { return std::to_string(local_tokens(tiny_model(1), mpi_world_size())); }

std::vector<double> losses(const std::vector<StepRecord>& records) {
  std::vector<double> out;
  for (const StepRecord& r : records) out.push_back(r.stats.loss);
  return out;
}

std::vector<StepRecord> train(const Config& config, ProcessGroups& groups) {
  validate_config(config, groups.world->size());
  auto backend = make_cpu_backend({});
  Trainer trainer(config, *backend, groups);
  return trainer.run();
}

using test::SharedDir;

TEST(Training, LossFallsAndRerunsAreBitIdentical) {
  Config c = tiny_model(40);
  ProcessGroups groups = test::world_groups(c.parallel.ep);
  std::vector<double> a = losses(train(c, groups));
  std::vector<double> b = losses(train(c, groups));
  ASSERT_EQ(a.size(), 40u);
  EXPECT_EQ(a, b) << "two runs with the same seed differ";
  double last = 0;
  for (size_t i = a.size() - 5; i < a.size(); ++i) last += a[i] / 5;
  EXPECT_LT(last, a[0] - 0.5) << "loss did not fall: first " << a[0] << ", mean of last five " << last;
  c.train.seed += 1;
  EXPECT_NE(losses(train(c, groups)), a) << "the seed changes nothing";
}

TEST(Training, ResumeMatchesTheUninterruptedRunBitForBit) {
  ProcessGroups groups = test::world_groups(tiny_model(1).parallel.ep);
  SharedDir dir(*groups.world);
  // The balancing bias is state too, and so is every per-step random stream (jitter).
  const Config full = test::config(tiny_model(12), {"moe.bias_update_rate=1e-3", "moe.router_jitter=0.01"});
  std::vector<double> want = losses(train(full, groups));

  // The same run, saving at steps 5, 10 and 12.
  const Config first = test::config(full, {"train.checkpoint_dir=" + dir.path(), "train.checkpoint_every=5"});
  EXPECT_EQ(losses(train(first, groups)), want) << "saving checkpoints changed the run";
  const Config second =
      test::config(full, {"train.checkpoint_dir=" + dir.path(), "train.resume=" + dir.path() + "/step_00000005"});
  std::vector<double> got = losses(train(second, groups));
  ASSERT_EQ(got.size(), 7u);
  EXPECT_EQ(got, std::vector<double>(want.begin() + 5, want.end()));

  // resume: auto picks the latest checkpoint (step 12), so nothing is left to do.
  const Config again =
      test::config(full, {"train.checkpoint_dir=" + dir.path(), "train.resume=auto", "train.steps=12"});
  EXPECT_TRUE(train(again, groups).empty());
}

TEST(Training, ADenseModelResumesBitForBit) {  // no routed experts: the manifest lists 0 per file
  ProcessGroups groups = test::world_groups(1);
  SharedDir dir(*groups.world);
  const Config full = test::config(tiny_model(8), {"moe.num_experts=0", "parallel.ep=1"});
  std::vector<double> want = losses(train(full, groups));
  const Config first = test::config(full, {"train.checkpoint_dir=" + dir.path(), "train.checkpoint_every=4"});
  EXPECT_EQ(losses(train(first, groups)), want);
  const Config second =
      test::config(full, {"train.checkpoint_dir=" + dir.path(), "train.resume=" + dir.path() + "/step_00000004"});
  std::vector<double> got = losses(train(second, groups));
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got, std::vector<double>(want.begin() + 4, want.end()));
}

// A checkpoint fixes the keys the field table marks structural: resuming with another value of one is
// refused naming it (a dense checkpoint given experts points to upcycle), any other key may change.
TEST(Training, ResumeRefusesAnotherValueOfAStructuralKeyAndNamesIt) {
  ProcessGroups groups = test::self_groups();  // each rank on its own: only rank 0 of a job reads the manifest
  SharedDir dir(*groups.world, "moe_structural");
  const Config base =
      test::config(tiny_model(2), {"parallel.ep=1", "moe.num_experts=0", "train.checkpoint_dir=" + dir.path()});
  train(base, groups);
  auto resume_with = [&](const std::string& key, const std::string& value) {
    const Config c =
        test::config(base, {key + "=" + value, "train.steps=3", "train.resume=" + dir.path() + "/step_00000002"});
    try {
      train(c, groups);
    } catch (const ConfigError& e) {
      return e.key() + ": " + e.what();
    }
    return std::string("resumed");
  };
  for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"model.hidden", "24"}, {"train.seed", "7"}, {"moe.ffn_hidden", "32"}, {"runtime.dtype", "float64"}}) {
    ASSERT_TRUE(config_field(key).structural) << key;
    const std::string got = resume_with(key, value);
    EXPECT_EQ(got.rfind(key + ":", 0), 0u) << got;
    EXPECT_NE(got.find("was written with " + key), std::string::npos) << got;
  }
  EXPECT_NE(resume_with("moe.num_experts", "4").find("launch/moe upcycle"), std::string::npos);
  ASSERT_FALSE(config_field("train.lr").structural);
  EXPECT_EQ(resume_with("train.lr", "0.02"), "resumed");
}

TEST(Training, LossCurveDoesNotDependOnTheNumberOfRanks) {
  // The same capacity groups on every layout (a rank's tokens); global loads drive the bias, identical
  // on every rank and layout.
  const Config c = test::config(tiny_model(6), {"runtime.dtype=float64", "moe.group_size=" + rank_tokens(),
                                                "moe.bias_update_rate=1e-3", "moe.router_jitter=0.01",
                                                "moe.random_routing=true"});
  ProcessGroups groups = test::world_groups(c.parallel.ep);
  std::vector<double> dist = losses(train(c, groups));
  const Config one = test::config(c, {"parallel.ep=1"});
  ProcessGroups self = test::self_groups();
  std::vector<double> single = losses(train(one, self));
  EXPECT_LT(test::rel_diff(dist, single), 1e-10);
}

// The whole model, dense and MoE layers mixed: layer 0 dense, layer 1 MoE (shared expert, capacity drops),
// layer 2 dense; grouped-query attention with dropout; tied embeddings; every random stream on. Trained
// for a few steps in every ep x dp layout the world allows, and evaluated, against one process fed the
// same global batch split into the same capacity groups.
Config mixed_model(const std::string& dtype) {
  return test::config(tiny_model(4), {"runtime.dtype=" + dtype, "model.layers=3", "model.heads=4", "model.kv_heads=2",
                                      "model.attn_dropout=0.1", "model.tie_embeddings=true", "model.ffn_hidden=24",
                                      "moe.first_dense_layers=1", "moe.every=2", "moe.capacity_factor=1.0",
                                      "moe.group_size=" + rank_tokens(), "moe.bias_update_rate=1e-3",
                                      "moe.router_jitter=0.01", "moe.random_routing=true"});
}

std::vector<int> expert_layouts(const Config& c) {
  std::vector<int> eps;
  for (int ep = 1; ep <= mpi_world_size(); ++ep)
    if (mpi_world_size() % ep == 0 && c.moe.num_experts % ep == 0) eps.push_back(ep);
  return eps;
}

// Losses of every step and the final validation loss.
std::vector<double> train_and_evaluate(const Config& config, ProcessGroups& groups) {
  validate_config(config, groups.world->size());
  auto backend = make_cpu_backend({});
  Trainer trainer(config, *backend, groups);
  std::vector<double> out = losses(trainer.run());
  out.push_back(trainer.evaluate().loss);
  return out;
}

TEST(Training, MixedModelMatchesOneProcessInEveryLayout) {
  ProcessGroups world = test::world_groups(1);
  SharedDir dir(*world.world);
  const std::string val = dir.path() + "/val.bin";
  if (world.world->rank() == 0) {  // a validation file of 9 sequences (the last round of evaluation pads)
    std::vector<uint32_t> tokens;
    for (uint32_t i = 0; i < 9 * 16 + 1; ++i) tokens.push_back((i * 37 + i / 5) % 256);
    write_token_file(val, tokens, 256);
  }
  world.world->barrier();
  for (const std::string dtype : {"float64", "float32"}) {
    // Evaluation inside run() too, with synthetic training data (no baselines).
    const Config c =
        test::config(mixed_model(dtype), {"data.val_path=" + val, "train.eval_tokens=0", "train.eval_every=2"});
    const Config one = test::config(c, {"parallel.ep=1"});
    ProcessGroups self = test::self_groups();
    const std::vector<double> want = train_and_evaluate(one, self);
    ASSERT_EQ(want.size(), 5u);
    const double tol = dtype == "float64" ? 1e-10 : 1e-5;
    for (int ep : expert_layouts(c)) {
      const Config d = test::config(c, {"parallel.ep=" + std::to_string(ep)});
      ProcessGroups groups = test::world_groups(ep);
      EXPECT_LT(test::rel_diff(train_and_evaluate(d, groups), want), tol)
          << dtype << " ep " << ep << " x dp " << mpi_world_size() / ep;
    }
  }
}

TEST(Training, ACheckpointResumesUnderAnotherLayout) {
  // Saved with ep = E's layout, resumed with every rank holding every expert (ep = 1, dp = world):
  // experts are stored per global index, so the run continues (to rounding: F64, reductions reordered).
  ProcessGroups groups = test::world_groups(tiny_model(1).parallel.ep);
  SharedDir dir(*groups.world);
  const Config c = test::config(tiny_model(8), {"runtime.dtype=float64", "train.checkpoint_dir=" + dir.path(),
                                                "train.checkpoint_every=4"});
  std::vector<double> want = losses(train(c, groups));
  const Config other = test::config(
      c, {"parallel.ep=1", "train.resume=" + dir.path() + "/step_00000004", "train.checkpoint_dir="});
  ProcessGroups flat = test::world_groups(1);
  std::vector<double> got = losses(train(other, flat));
  EXPECT_LT(test::rel_diff(got, std::vector<double>(want.begin() + 4, want.end())), 1e-10);
}

// Resuming cuts the metrics file back to the resumed step and keeps it a line per step, also when it was
// written in the earlier format (events inline): those events move to the events file, a resume event
// past the resumed step is dropped, and the new resume event follows.
TEST(Training, ResumeKeepsTheMetricsFileALinePerStepAndMovesInlineEvents) {
  ProcessGroups groups = test::world_groups(tiny_model(1).parallel.ep);
  SharedDir dir(*groups.world);
  const Config c = test::config(tiny_model(6), {"train.checkpoint_dir=" + dir.path(), "train.checkpoint_every=3",
                                                "train.metrics_path=" + dir.path() + "/m.jsonl"});
  const std::string events = metrics_events_path(c.train.metrics_path);
  train(c, groups);
  if (groups.world->rank() == 0) {  // the earlier format: the start event first, a resume event inline
    std::string start, steps, line;
    std::ifstream e(events), m(c.train.metrics_path);
    std::getline(e, start);
    while (std::getline(m, line)) steps += line + "\n";
    std::ofstream(c.train.metrics_path) << start << "\n" << steps << "{\"event\":\"resume\",\"step\":5,\"lost_steps\":0}\n";
    fs::remove(events);
  }
  groups.world->barrier();
  const Config resumed = test::config(c, {"train.resume=" + dir.path() + "/step_00000003"});
  EXPECT_EQ(train(resumed, groups).size(), 3u);
  if (groups.world->rank() != 0) return;
  std::ifstream m(c.train.metrics_path);
  std::string line;
  int lines = 0;
  while (std::getline(m, line)) {
    YAML::Node j = parse_json(line, "metrics line");
    EXPECT_FALSE(j["event"]) << line;
    EXPECT_EQ(j["step"].as<int>(), ++lines);
  }
  EXPECT_EQ(lines, 6);
  std::ifstream e(events);
  ASSERT_TRUE(std::getline(e, line));
  EXPECT_EQ(parse_json(line, "event")["event"].as<std::string>(), "start") << "moved from the metrics file";
  ASSERT_TRUE(std::getline(e, line));
  YAML::Node resume = parse_json(line, "event");
  EXPECT_EQ(resume["event"].as<std::string>(), "resume");
  EXPECT_EQ(resume["step"].as<int>(), 3);
  EXPECT_EQ(resume["lost_steps"].as<int>(), 3);
  EXPECT_FALSE(std::getline(e, line)) << "the resume event past step 3 is dropped: " << line;
}

// The parameters a model of `c` allocates over this world, as the start event must count them: the
// replicated ones once, the routed experts summed over an ep group (each expert once).
std::pair<int64_t, int64_t> allocated_params(const Config& c, ProcessGroups& groups) {
  auto backend = make_cpu_backend({});
  Transformer model(c, *backend, groups);
  std::vector<double> replicated{0}, experts{0}, idle{0};
  for (Param* p : model.params().trainable()) {
    const double n = static_cast<double>(p->value.numel());
    if (p->scope == ParamScope::kExpert) {
      experts[0] += n;
      idle[0] += n * (c.moe.num_experts - c.moe.top_k) / c.moe.num_experts;  // a token uses k of E
    } else {
      replicated[0] += n;
    }
  }
  groups.ep->all_reduce_sum(experts);
  groups.ep->all_reduce_sum(idle);
  const double total = replicated[0] + experts[0];
  return {std::llround(total), std::llround(total - idle[0])};
}

TEST(Training, MetricsFileHasOneJsonLinePerStep) {
  ProcessGroups groups = test::world_groups(tiny_model(1).parallel.ep);
  SharedDir dir(*groups.world);
  const Config c = test::config(tiny_model(6), {"train.metrics_path=" + dir.path() + "/metrics.jsonl"});
  train(c, groups);
  const auto [total, active] = allocated_params(c, groups);
  if (groups.world->rank() != 0) return;
  std::string line;
  // The start event, in the events file beside: what the study reports need besides the steps.
  EXPECT_EQ(metrics_events_path(c.train.metrics_path), dir.path() + "/metrics.events.jsonl");
  std::ifstream events(metrics_events_path(c.train.metrics_path));
  ASSERT_TRUE(std::getline(events, line));
  YAML::Node start = parse_json(line, "metrics start line");
  EXPECT_FALSE(std::getline(events, line)) << "one event";
  EXPECT_EQ(start["event"].as<std::string>(), "start");
  EXPECT_EQ(start["ranks"].as<int>(), groups.world->size());
  EXPECT_EQ(start["params_total"].as<int64_t>(), total) << "the parameters the model allocates";
  EXPECT_EQ(start["params_active"].as<int64_t>(), active);
  EXPECT_EQ(start["tokens_per_step"].as<int64_t>(), int64_t{c.train.batch_size} * c.model.seq_len);
  EXPECT_EQ(start["routing"].as<std::string>(), "off");
  // The metrics file: a line per step with its loss and nothing else (what every reader of it, the GPU
  // check's loss-curve comparison among them, takes it to be).
  std::ifstream in(c.train.metrics_path);
  int lines = 0;
  double best_coverage = -1;  // the largest over the steps of (phases + 2e-4 s) / wall
  while (std::getline(in, line)) {
    ++lines;
    YAML::Node j = parse_json(line, "metrics line");
    EXPECT_EQ(j["step"].as<int>(), lines);
    for (const char* key : {"loss", "aux", "z", "dropped_frac", "tokens_per_s"}) EXPECT_TRUE(j[key]) << key;
    double sum = 0;
    for (const char* key : {"attention", "dense", "router", "dispatch", "exchange", "experts", "combine", "shared",
                            "backward", "optimizer", "allreduce", "other"}) {
      ASSERT_TRUE(j["time_s"][key]) << key;
      sum += j["time_s"][key].as<double>();
    }
    // Every phase that ran is on the clock (the tiny model has no dense layer; MPI sums block inside the
    // backward, so nothing waits after it) ...
    for (const char* key : {"attention", "router", "dispatch", "exchange", "experts", "combine", "shared", "backward",
                            "optimizer", "other"}) {
      EXPECT_GT(j["time_s"][key].as<double>(), 0.0) << key;
    }
    EXPECT_NEAR(sum, j["time_s"]["total"].as<double>(), 1e-12 * sum);
    // ... and the phases, laps of the CPU clock inside the step's wall time, never exceed it (however
    // loaded the machine) ...
    const double wall = j["time_s"]["wall"].as<double>();
    EXPECT_LE(sum, wall * (1 + 1e-9)) << "phases " << sum << " s, wall " << wall << " s";
    best_coverage = std::max(best_coverage, (sum + 2e-4) / wall);
    EXPECT_NEAR(j["tokens_per_s"].as<double>() * wall, c.train.batch_size * c.model.seq_len, 1e-6);
    // On the CPU the side stream runs inline and MPI sums block: nothing is hidden.
    EXPECT_EQ(j["time_s"]["hidden_shared"].as<double>(), 0.0);
    EXPECT_EQ(j["time_s"]["hidden_allreduce"].as<double>(), 0.0);
    ASSERT_EQ(j["layers"].size(), 2u);
    EXPECT_EQ(j["layers"][0]["tokens_per_expert"].size(), static_cast<size_t>(c.moe.num_experts));
  }
  EXPECT_EQ(lines, 6);
  // ... and cover it but for a little bookkeeping: the host statements before the first lap and after the
  // last, tens of microseconds. No timeout bounds that on a loaded machine (8 ranks on 2 cores beside
  // other jobs), where a rank can lose the core inside those statements for a scheduler slice or more in
  // any one step. A phase left off the clock is missing from every step, a preemption hits some, so the
  // 80% coverage (+ 0.2 ms) is asked of the best of the six steps, not of each.
  EXPECT_GE(best_coverage, 0.8) << "no step's phases cover 80% of its wall time";
}

}  // namespace
}  // namespace moe
