// Checkpoints that travel, under mpirun: the index agrees with the files (and a disagreement is refused),
// format versions, offline resharding (round trips bit for bit; a resharded checkpoint resumes exactly
// like the original), export/import (every parameter back bit for bit; the import trains on any layout)
// and upcycling (identical experts with normalised gates start at the dense model's loss). The offline
// tools run on rank 0 while the others wait, as launch/moe runs them on one process.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "tests/test_util.h"
#include "train/checkpoint.h"
#include "train/checkpoint_tools.h"
#include "train/evaluate.h"
#include "train/trainer.h"

namespace moe {
namespace {

using test::SharedDir;

Config tiny(int experts, int64_t steps) {
  return test::config({"model.hidden=16", "model.layers=2", "model.seq_len=16", "model.init_std=0.05",
                       "model.ffn_hidden=32", "moe.num_experts=" + std::to_string(experts), "moe.top_k=2",
                       "moe.ffn_hidden=16", "moe.num_shared_experts=1", "moe.min_capacity=1", "train.batch_size=24",
                       "train.steps=" + std::to_string(steps), "train.lr=1e-2", "train.warmup_steps=2",
                       "train.log_every=1000"});
}

// tiny() laid out over this world: ep the largest divisor of both the world and the experts, capacity
// groups of one rank's tokens (so every layout routes alike).
Config tiny_on_world(int experts, int64_t steps) {
  const Config c = tiny(experts, steps);
  return test::config(c, {"parallel.ep=" + std::to_string(std::gcd(mpi_world_size(), experts)),
                          "moe.group_size=" + std::to_string(local_tokens(c, mpi_world_size()))});
}

std::vector<double> train(const Config& config, ProcessGroups& groups) {
  validate_config(config, groups.world->size());
  auto backend = make_cpu_backend({});
  Trainer trainer(config, *backend, groups);
  std::vector<double> out;
  for (const StepRecord& r : trainer.run()) out.push_back(r.stats.loss);
  return out;
}

// Trains c (its train.steps) with one checkpoint at the end into <dir>/<name>; returns the step directory.
std::string train_to_checkpoint(Config& c, ProcessGroups& groups, const std::string& dir, const std::string& name) {
  c = test::config(c, {"train.checkpoint_dir=" + dir + "/" + name,
                       "train.checkpoint_every=" + std::to_string(c.train.steps)});
  train(c, groups);
  return c.train.checkpoint_dir + "/" + checkpoint_step_name(c.train.steps);
}

// The losses of resuming `from` under `ep` until step `steps` (writing no checkpoint).
std::vector<double> resumed_losses(const Config& config, const std::string& from, int ep, int64_t steps) {
  const Config c = test::config(config, {"parallel.ep=" + std::to_string(ep), "train.steps=" + std::to_string(steps),
                                         "train.checkpoint_dir=", "train.resume=" + from});
  ProcessGroups layout = test::world_groups(ep);
  return train(c, layout);
}

// Every tensor of a has the same name, dtype, shape and bytes in b, and b has no other.
void expect_same_tensors(const StoredCheckpoint& a, const StoredCheckpoint& b, const std::string& what) {
  EXPECT_EQ(a.tensors.size(), b.tensors.size()) << what;
  EXPECT_EQ(a.step, b.step) << what;
  EXPECT_EQ(a.next_sequence, b.next_sequence) << what;
  EXPECT_EQ(a.optimizer_steps, b.optimizer_steps) << what;
  for (const std::string& name : a.tensors) {
    ASSERT_TRUE(b.weight_map.count(name)) << what << ": " << name;
    Tensor x = a.read(name), y = b.read(name);
    ASSERT_EQ(x.dtype(), y.dtype()) << name;
    ASSERT_EQ(x.shape(), y.shape()) << name;
    EXPECT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0) << what << ": " << name << " differs";
  }
}

std::string text_of(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Runs f on rank 0 alone; a failure there (an exception too) fails the test on rank 0, and the others
// wait at the barrier either way.
template <typename F>
void on_rank0(Communicator& world, F f) {
  if (world.rank() == 0) {
    try {
      f();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank 0: " << e.what();
    }
  }
  world.barrier();
}

TEST(CheckpointTools, ReshardRoundTripsBitForBitAndResumesLikeTheOriginal) {
  const int world = mpi_world_size();
  Config c = tiny_on_world(8, 4);  // 8 ranks: the ep-8 layout of the issue
  ProcessGroups groups = test::world_groups(c.parallel.ep);
  SharedDir dir(*groups.world, "moe_ckpt_test");
  const std::string step = train_to_checkpoint(c, groups, dir.path(), "run");
  const int ep_new = c.parallel.ep > 1 ? c.parallel.ep / 2 : 1;
  on_rank0(*groups.world, [&] {
    const StoredCheckpoint src = open_checkpoint(step);
    EXPECT_EQ(src.ep, c.parallel.ep);
    // ep -> 2 -> 8 and ep -> 1 -> 4: every tensor, optimizer moments included, bit for bit
    const std::string two = reshard_checkpoint(step, 2, 1, dir.path() + "/r2");
    const StoredCheckpoint at2 = open_checkpoint(two);
    EXPECT_EQ(at2.ep, 2);
    EXPECT_EQ(at2.weight_map.at("layers.1.moe.experts.3.w_up"), "rank_00000.safetensors");
    EXPECT_EQ(at2.weight_map.at("optim.v.layers.1.moe.experts.4.w_up"), "rank_00001.safetensors");
    EXPECT_EQ(at2.value("parallel.ep"), "2");
    expect_same_tensors(src, at2, "ep " + std::to_string(src.ep) + " -> 2");
    expect_same_tensors(src, open_checkpoint(reshard_checkpoint(two, 8, 1, dir.path() + "/r8")), "-> 2 -> 8");
    const std::string one = reshard_checkpoint(step, 1, 1, dir.path() + "/r1");
    expect_same_tensors(src, open_checkpoint(reshard_checkpoint(one, 4, 2, dir.path() + "/r4")), "-> 1 -> 4");
    reshard_checkpoint(step, ep_new, world / ep_new, dir.path() + "/rn");
    // bad layouts and an occupied output directory are refused, naming the option
    try {
      reshard_checkpoint(step, 3, 1, dir.path() + "/r3");
      ADD_FAILURE() << "ep 3 of 8 experts accepted";
    } catch (const ConfigError& e) {
      EXPECT_EQ(e.key(), "--ep");
    }
    EXPECT_THROW(reshard_checkpoint(step, 2, 1, dir.path() + "/r2"), InputError);
  });
  // Resumed under the new layout: the resharded checkpoint continues exactly like the original.
  const std::vector<double> want = resumed_losses(c, step, ep_new, 6);
  EXPECT_EQ(resumed_losses(c, dir.path() + "/rn/step_00000004", ep_new, 6), want);
  ASSERT_EQ(want.size(), 2u);
}

TEST(CheckpointTools, LoadingFindsEveryTensorThroughTheIndexWhereverItIs) {
  // A checkpoint laid out as no training run writes it (experts alternating between two files, the
  // rest in a third) resumes on every layout exactly like the original.
  Config c = tiny_on_world(4, 2);
  ProcessGroups groups = test::world_groups(c.parallel.ep);
  SharedDir dir(*groups.world, "moe_ckpt_test");
  const std::string step = train_to_checkpoint(c, groups, dir.path(), "run");
  const std::string odd = dir.path() + "/odd";
  on_rank0(*groups.world, [&] {
    const StoredCheckpoint src = open_checkpoint(step);
    std::filesystem::create_directories(odd + "/step_00000002");
    std::vector<CheckpointFile> files{{"odd.safetensors", {}, {}}, {"even.safetensors", {}, {}}, {"rest.safetensors", {}, {}}};
    std::vector<std::vector<TensorRecord>> records(3);
    for (const std::string& name : src.tensors) {
      const size_t at = name.find(".experts.");
      const int f = at == std::string::npos ? 2 : (name[at + 9] - '0') % 2 == 1 ? 0 : 1;
      records[f].push_back(TensorRecord{name, src.read(name)});
      files[f].tensors.push_back(name);
    }
    for (int f = 0; f < 3; ++f) files[f].written = write_safetensors(odd + "/step_00000002/" + files[f].name, records[f], {});
    CheckpointInfo info;
    info.step = src.step;
    info.next_sequence = src.next_sequence;
    info.optimizer_steps = src.optimizer_steps;
    info.ep = 1;
    info.experts_per_file = 4;
    info.config = src.config;
    commit_checkpoint(odd, info, files);
    // the manifest must list rank_00000 for ep 1: the files it lists are what it vouches for
    EXPECT_THROW(open_checkpoint(odd + "/step_00000002"), InputError);
    files[2].name = checkpoint_rank_file(0);
    std::filesystem::rename(odd + "/step_00000002/rest.safetensors", odd + "/step_00000002/" + files[2].name);
    commit_checkpoint(odd, info, files);
    expect_same_tensors(src, open_checkpoint(odd + "/step_00000002"), "odd layout");
  });
  const std::vector<double> want = resumed_losses(c, step, c.parallel.ep, 4);
  for (int ep : {1, c.parallel.ep}) {
    const std::vector<double> got = resumed_losses(c, odd + "/step_00000002", ep, 4);
    EXPECT_LE(test::rel_diff(got, want), ep == c.parallel.ep ? 0.0 : 1e-5) << "ep " << ep;
  }
}

TEST(CheckpointTools, TheIndexMustAgreeWithTheFilesAndNewerFormatsAreRefused) {
  Config c = test::config(tiny(4, 2), {mpi_world_size() % 2 == 0 ? "parallel.ep=2" : "parallel.ep=1"});
  ProcessGroups groups = test::world_groups(c.parallel.ep);
  SharedDir dir(*groups.world, "moe_ckpt_test");
  const std::string step = train_to_checkpoint(c, groups, dir.path(), "run");
  on_rank0(*groups.world, [&] {
    const StoredCheckpoint good = open_checkpoint(step);
    EXPECT_TRUE(good.weight_map.count("optim.m.embedding"));
    // A file holding {embedding} under an index that says {head}: refused, naming both.
    const std::string bad = dir.path() + "/bad";
    std::filesystem::create_directories(bad + "/step_00000002");
    CheckpointInfo info;
    info.step = 2;
    info.config = good.config;
    info.experts_per_file = 4;
    CheckpointFile f{checkpoint_rank_file(0), {}, {"head"}};
    f.written = write_safetensors(bad + "/step_00000002/" + f.name, {TensorRecord{"embedding", good.read("embedding")}}, {});
    commit_checkpoint(bad, info, {f});
    try {
      open_checkpoint(bad + "/step_00000002");
      ADD_FAILURE() << "an index that disagrees with the files was accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("index and files disagree"), std::string::npos) << e.what();
    }
    // The manifest records the software; a newer format version is refused with a clear line.
    const std::string manifest = text_of(step + "/manifest.json");
    EXPECT_NE(manifest.find(std::string("\"software\":\"") + software_version() + "\""), std::string::npos);
    std::string newer = manifest;
    newer.replace(newer.find("\"version\":3"), 11, "\"version\":4");
    const std::string copy = dir.path() + "/newer/step_00000002";
    std::filesystem::create_directories(copy);
    for (const auto& e : std::filesystem::directory_iterator(step)) std::filesystem::copy(e.path(), copy + "/" + e.path().filename().string());
    write_file_atomic(copy + "/manifest.json", newer);
    try {
      open_checkpoint(copy);
      ADD_FAILURE() << "format version 4 accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("is newer than this build"), std::string::npos) << e.what();
    }
    // Version 2 had no index: read through the files' headers.
    std::string older = manifest;
    older.replace(older.find("\"version\":3"), 11, "\"version\":2");
    write_file_atomic(copy + "/manifest.json", older);
    std::filesystem::remove(copy + "/" + kCheckpointIndexFile);
    expect_same_tensors(good, open_checkpoint(copy), "version 2");
  });
}

TEST(CheckpointTools, ExportAndImportGiveBackEveryParameterAndTheImportTrainsOnAnyLayout) {
  Config c = tiny_on_world(4, 3);
  ProcessGroups groups = test::world_groups(c.parallel.ep);
  SharedDir dir(*groups.world, "moe_ckpt_test");
  const std::string step = train_to_checkpoint(c, groups, dir.path(), "run");
  on_rank0(*groups.world, [&] {
    export_checkpoint(step, dir.path() + "/export", DType::kF32);
    export_checkpoint(step, dir.path() + "/export16", DType::kBF16);
    auto backend = make_cpu_backend({});
    const StoredCheckpoint src = open_checkpoint(step);
    const StoredCheckpoint back = open_checkpoint(import_checkpoint(dir.path() + "/export", dir.path() + "/imported", *backend));
    EXPECT_EQ(back.step, 3);
    EXPECT_EQ(back.next_sequence, src.next_sequence);
    EXPECT_EQ(back.optimizer_steps, 0);  // a fresh optimizer
    for (const std::string& name : src.tensors) {
      Tensor got = back.read(name);
      if (name.rfind("optim.", 0) == 0) {
        std::vector<float> zero(static_cast<size_t>(got.numel()), 0.0f);
        EXPECT_EQ(std::memcmp(got.raw(), zero.data(), got.nbytes()), 0) << name << " is not a fresh moment";
      } else {
        Tensor want = src.read(name);
        EXPECT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0) << name << " changed on the way";
      }
    }
    // experts are stacked (E, F, H) and bf16 rounds to nearest even
    SafetensorsReader fp32(dir.path() + "/export/model.safetensors"), bf16(dir.path() + "/export16/model.safetensors");
    Tensor stacked = fp32.read("layers.0.moe.experts.w_up"), half = bf16.read("layers.0.moe.experts.w_up");
    ASSERT_EQ(stacked.shape(), (Shape{4, 16, 16}));
    Tensor expert2 = src.read("layers.0.moe.experts.2.w_up");
    EXPECT_EQ(std::memcmp(stacked.data<float>() + 2 * 256, expert2.raw(), expert2.nbytes()), 0);
    ASSERT_EQ(half.dtype(), DType::kBF16);
    EXPECT_EQ(static_cast<const uint16_t*>(half.raw())[2 * 256 + 5], float_to_bf16(expert2.data<float>()[5]));
    EXPECT_FALSE(fp32.has("optim.m.embedding"));
  });
  // The import resumes on every layout: its first step's loss (before any update) is the original's.
  const std::vector<double> want = resumed_losses(c, step, c.parallel.ep, 4);
  for (int ep : {1, c.parallel.ep}) {
    const std::vector<double> got = resumed_losses(c, dir.path() + "/imported/step_00000003", ep, 4);
    ASSERT_EQ(got.size(), 1u);
    EXPECT_LT(test::rel_diff({got[0]}, {want[0]}), 1e-6) << "ep " << ep;
  }
}

// The validation loss of a checkpoint on this world (ep 1: every layout gives the same, see evaluate.h).
double validation_loss(const std::string& step_dir, const std::string& val, ProcessGroups& groups) {
  Config config = checkpoint_config(step_dir, {"parallel.ep=1", "data.val_path=" + val, "train.eval_tokens=0",
                                               "train.batch_size=" + std::to_string(mpi_world_size())},
                                    *groups.world);
  auto backend = make_cpu_backend({});
  Transformer model(config, *backend, groups);
  const uint64_t version = model.params().version();
  load_checkpoint(step_dir, config, model, nullptr, groups);
  EXPECT_GT(model.params().version(), version) << "a load tells the BF16 shadows";
  auto data = make_val_data(config);
  return evaluate(model, *data, config).loss;
}

TEST(CheckpointTools, AnUpcycledModelStartsAtTheDenseModelsLoss) {
  ProcessGroups groups = test::world_groups(1);
  SharedDir dir(*groups.world, "moe_ckpt_test");
  Config dense = test::config(tiny(0, 3), {"runtime.dtype=float64", "model.layers=3"});
  const std::string from = train_to_checkpoint(dense, groups, dir.path(), "dense");
  const std::string val = dir.path() + "/val.bin";
  // Layers 1 and 2 MoE; dropless; identical experts (mid size 32, the dense FFN's) with normalised gates.
  const Config moe = test::config(dense, {"moe.num_experts=4", "moe.first_dense_layers=1", "moe.num_shared_experts=0",
                                          "moe.ffn_hidden=32", "moe.capacity_factor=0", "moe.normalize_topk=true"});
  on_rank0(*groups.world, [&] {
    std::vector<uint32_t> tokens;
    for (uint32_t i = 0; i < 6 * 16 + 1; ++i) tokens.push_back((i * 37 + i / 5) % 256);
    write_token_file(val, tokens, 256);
    auto backend = make_cpu_backend({});
    upcycle_checkpoint(from, moe, dir.path() + "/copies", {}, *backend);
    upcycle_checkpoint(from, moe, dir.path() + "/noisy", {0.01, false}, *backend);
    // 4 experts cut from each dense FFN, twice over.
    const Config fine = test::config(moe, {"moe.num_experts=8", "moe.ffn_hidden=8"});
    upcycle_checkpoint(from, fine, dir.path() + "/granular", {0, true}, *backend);
    const StoredCheckpoint d = open_checkpoint(from), g = open_checkpoint(dir.path() + "/granular/step_00000000");
    const std::vector<double> up = [&] {
      Tensor t = d.read("layers.2.ffn.w_up");
      return std::vector<double>(t.data<double>(), t.data<double>() + t.numel());
    }();
    for (int e : {1, 5}) {  // expert e holds mid rows (e mod 4)·8 .. +8 of w_up, w_down's columns times 4
      Tensor w = g.read("layers.2.moe.experts." + std::to_string(e) + ".w_up");
      Tensor wd = g.read("layers.2.moe.experts." + std::to_string(e) + ".w_down");
      Tensor dd = d.read("layers.2.ffn.w_down");
      EXPECT_EQ(w.data<double>()[3 * 16 + 7], up[static_cast<size_t>(((e % 4) * 8 + 3) * 16 + 7)]);
      EXPECT_EQ(wd.data<double>()[5 * 8 + 2], 4 * dd.data<double>()[5 * 32 + (e % 4) * 8 + 2]);
    }
    // what cannot be upcycled says which key
    const Config gelu = test::config(moe, {"moe.expert_type=gelu", "moe.ffn_hidden=32"});
    const Config wide = test::config(moe, {"model.hidden=32"});
    const Config small = test::config(moe, {"moe.ffn_hidden=16"});
    for (auto [config, key] : {std::pair<Config, std::string>{gelu, "moe.expert_type"}, {wide, "model.hidden"},
                               {small, "moe.ffn_hidden"}}) {
      try {
        upcycle_checkpoint(from, config, dir.path() + "/refused", {}, *backend);
        ADD_FAILURE() << key << " accepted";
      } catch (const ConfigError& e) {
        EXPECT_EQ(e.key(), key) << e.what();
      }
    }
  });
  const double want = validation_loss(from, val, groups);
  EXPECT_LT(test::rel_diff({validation_loss(dir.path() + "/copies/step_00000000", val, groups)}, {want}), 1e-12);
  const double noisy = validation_loss(dir.path() + "/noisy/step_00000000", val, groups);
  EXPECT_GT(std::abs(noisy - want), 1e-9);  // the noise is there
  EXPECT_LT(std::abs(noisy - want), 0.05 * want);
  // Changing num_experts by resuming is refused, naming the key and the way that works (rank 0 finds
  // it: on one process here, as a job would stop on it).
  on_rank0(*groups.world, [&] {
    ProcessGroups self = test::self_groups();
    auto backend = make_cpu_backend({});
    Transformer model(moe, *backend, self);
    try {
      load_checkpoint(from, moe, model, nullptr, self);
      ADD_FAILURE() << "resumed a dense checkpoint with 4 experts";
    } catch (const ConfigError& e) {
      EXPECT_EQ(e.key(), "moe.num_experts");
      EXPECT_NE(std::string(e.what()).find("upcycle"), std::string::npos) << e.what();
    }
  });
}

}  // namespace
}  // namespace moe
