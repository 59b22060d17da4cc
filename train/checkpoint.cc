// Checkpoint save/load.
#include "train/checkpoint.h"

#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>

#include "runtime/json.h"
#include "runtime/log.h"
#include "train/safetensors.h"

namespace moe {
namespace {

constexpr const char* kFormat = "moe-checkpoint";
constexpr int kVersion = 2;  // 2: the transformer with attention (tensor names and layouts of docs/ARCHITECTURE.md)

// Keys that fix the shapes and meaning of the stored tensors: they must match on resume.
const char* const kStructuralKeys[] = {"model.hidden",       "model.layers",        "model.vocab_size",
                                       "model.heads",        "model.kv_heads",      "model.ffn_hidden",
                                       "model.tie_embeddings", "moe.num_experts",   "moe.first_dense_layers",
                                       "moe.every",          "moe.num_shared_experts", "moe.expert_type",
                                       "moe.ffn_hidden",     "moe.shared_ffn_hidden", "moe.multiple_of",
                                       "model.rope_base",    "model.norm_eps",      "runtime.dtype",
                                       "train.optimizer",    "train.seed"};

std::string rank_file(int rank) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "rank_%05d.safetensors", rank);
  return buf;
}

std::string step_name(int64_t step) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

void make_dirs(const std::string& path) {
  std::string partial;
  for (size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || (path[i] == '/' && i > 0)) {
      partial = path.substr(0, i);
      if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
        throw InputError(partial, std::string("cannot create checkpoint directory: ") + std::strerror(errno),
                         "train.checkpoint_dir");
      }
    }
  }
}

// "layers.0.moe.experts.w_gate", expert 5 -> "layers.0.moe.experts.5.w_gate"
std::string expert_tensor_name(const std::string& param, int64_t expert) {
  size_t dot = param.rfind('.');
  return param.substr(0, dot) + "." + std::to_string(expert) + param.substr(dot);
}

// One stored tensor: its name and the (device) tensor it is read from or written to.
struct Slot {
  std::string name;
  Tensor tensor;
  bool expert = false;
  int64_t expert_idx = 0;
};

// Every tensor this rank holds, in a fixed order: parameters (per expert for expert shards), then
// optimizer moments under the same names (none without an optimizer).
std::vector<Slot> slots(Transformer& model, Optimizer* optimizer) {
  std::vector<Slot> out;
  std::map<Param*, std::pair<Tensor*, Tensor*>> moments;
  if (optimizer) {
    for (auto& s : optimizer->state()) moments[s.param] = {s.m, s.v};
  }
  auto add = [&](const std::string& prefix, Param* p, const Tensor& t) {
    if (p->scope == ParamScope::kExpert) {
      for (int64_t l = 0; l < p->shape[0]; ++l) {
        Shape one(p->shape.begin() + 1, p->shape.end());
        out.push_back(Slot{prefix + expert_tensor_name(p->name, p->expert_offset + l), t.rows(l, l + 1).reshape(one),
                           true, p->expert_offset + l});
      }
    } else {
      out.push_back(Slot{prefix + p->name, t, false, 0});
    }
  };
  for (Param* p : model.params().all()) add("", p, p->value);
  for (Param* p : model.params().all()) {
    auto it = moments.find(p);
    if (it == moments.end()) continue;
    add("optim.m.", p, *it->second.first);
    add("optim.v.", p, *it->second.second);
  }
  return out;
}

Tensor to_host(Backend& backend, const Tensor& t) {
  Tensor h = host_tensor(t.shape(), t.dtype());
  backend.copy_to_host(t, h.raw());
  return h;
}

}  // namespace

std::string save_checkpoint(const std::string& checkpoint_dir, const TrainingState& state, const Config& config,
                            Transformer& model, Optimizer& optimizer, ProcessGroups& groups) {
  Communicator& world = *groups.world;
  const std::string dir = checkpoint_dir + "/" + step_name(state.step);
  if (world.rank() == 0) {
    make_dirs(dir);
    // Saving over an older checkpoint of the same step: its manifest must not vouch for the new files
    // while they are being written.
    ::unlink((dir + "/manifest.json").c_str());
  }
  world.barrier();

  // Rank 0 writes the replicated tensors; the dp-rank-0 replica of each expert shard writes its experts.
  Backend& backend = *model.backend();
  const bool writes_experts = groups.dp->rank() == 0;
  std::vector<TensorRecord> records;
  for (const Slot& s : slots(model, &optimizer)) {
    if ((s.expert && writes_experts) || (!s.expert && world.rank() == 0)) {
      records.push_back(TensorRecord{s.name, to_host(backend, s.tensor)});
    }
  }
  std::vector<double> mine{0, 0, 0};
  if (!records.empty()) {
    WrittenFile f = write_safetensors(dir + "/" + rank_file(world.rank()), records,
                                      {{"format", kFormat}, {"step", std::to_string(state.step)}});
    mine = {1, static_cast<double>(f.bytes), static_cast<double>(f.crc32)};
  }
  std::vector<double> all(3 * static_cast<size_t>(world.size()));
  world.all_gather(mine.data(), all.data(), 3, DType::kF64);

  if (world.rank() == 0) {
    const int ep = groups.ep_size();
    const int local = config.moe.num_experts / ep;
    JsonWriter j;
    j.begin_object();
    j.field("format", kFormat).field("version", kVersion).field("step", state.step);
    j.field("seed", config.train.seed).field("next_sequence", state.next_sequence);
    j.field("optimizer_steps", optimizer.steps_taken());
    j.field("world_size", world.size()).field("ep", ep);
    j.key("config").begin_object();
    for (const auto& [k, v] : config_values(config)) j.field(k, v);
    j.end_object();
    j.key("files").begin_array();
    for (int r = 0; r < world.size(); ++r) {
      if (all[3 * r] == 0) continue;
      j.begin_object().field("name", rank_file(r));
      j.field("bytes", static_cast<uint64_t>(all[3 * r + 1])).field("crc32", static_cast<uint64_t>(all[3 * r + 2]));
      j.end_object();
    }
    j.end_array();
    // Where each expert lives: experts [r * local, (r + 1) * local) in rank r's file (dp rank 0 = ep rank r).
    j.field("experts_per_file", local);
    j.end_object();
    write_file_atomic(dir + "/manifest.json", j.str() + "\n");
    write_file_atomic(checkpoint_dir + "/latest", step_name(state.step) + "\n");
  }
  world.barrier();
  return dir;
}

std::string resolve_resume(const Config& config, Communicator& world) {
  std::string path;
  const std::string& resume = config.train.resume;
  if (world.rank() == 0 && !resume.empty()) {
    if (resume == "auto") {
      std::string latest = config.train.checkpoint_dir + "/latest";
      struct stat st {};
      if (::stat(latest.c_str(), &st) == 0) {
        std::string name = read_file(latest, "latest checkpoint pointer");
        while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
        path = config.train.checkpoint_dir + "/" + name;
      }
    } else {
      path = resume;
    }
  }
  broadcast_string(world, path, 0);
  return path;
}

TrainingState load_checkpoint(const std::string& step_dir, const Config& config, Transformer& model,
                              Optimizer* optimizer, ProcessGroups& groups) {
  Communicator& world = *groups.world;
  std::string manifest_text;
  if (world.rank() == 0) {
    std::string path = step_dir + "/manifest.json";
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      throw InputError(step_dir, "not a checkpoint: no manifest.json (an incomplete or wrong directory)",
                       "train.resume");
    }
    manifest_text = read_file(path, "checkpoint manifest");
    YAML::Node m = parse_json(manifest_text, path);
    try {
      if (m["format"].as<std::string>("") != kFormat || m["version"].as<int>(0) != kVersion) {
        throw InputError(path, "not a moe-checkpoint version " + std::to_string(kVersion) + " manifest (version " +
                                   m["version"].as<std::string>("?") + ")", "train.resume");
      }
      YAML::Node stored = m["config"];
      auto values = config_values(config);
      std::map<std::string, std::string> now(values.begin(), values.end());
      for (const char* key : kStructuralKeys) {
        std::string was = stored[key].as<std::string>("");
        if (was != now[key]) {
          throw ConfigError(key, "checkpoint " + step_dir + " was written with " + key + " = " + was +
                                     ", this run has " + now[key]);
        }
      }
      if (m["experts_per_file"].as<int64_t>() <= 0) throw InputError(path, "bad experts_per_file", "train.resume");
      for (const auto& f : m["files"]) {
        std::string file = step_dir + "/" + f["name"].as<std::string>();
        WrittenFile want{f["bytes"].as<uint64_t>(), static_cast<uint32_t>(f["crc32"].as<uint64_t>())};
        WrittenFile got = checksum_file(file);
        if (got.bytes != want.bytes) {
          throw InputError(file, "corrupt checkpoint file: " + std::to_string(got.bytes) + " bytes, manifest says " +
                                     std::to_string(want.bytes), "train.resume");
        }
        if (got.crc32 != want.crc32) {
          throw InputError(file, "corrupt checkpoint file: CRC-32 mismatch", "train.resume");
        }
        SafetensorsReader check(file);  // header parses and every tensor fits the file
      }
    } catch (const YAML::Exception& e) {
      throw InputError(path, "malformed manifest: " + e.msg, "train.resume");
    }
  }
  broadcast_string(world, manifest_text, 0);

  YAML::Node m = parse_json(manifest_text, step_dir + "/manifest.json");
  const int64_t per_file = m["experts_per_file"].as<int64_t>();
  std::map<std::string, std::unique_ptr<SafetensorsReader>> readers;
  auto reader = [&](const std::string& name) -> SafetensorsReader& {
    auto& r = readers[name];
    if (!r) r = std::make_unique<SafetensorsReader>(step_dir + "/" + name);
    return *r;
  };
  Backend& backend = *model.backend();
  for (Slot& s : slots(model, optimizer)) {
    int file_rank = s.expert ? static_cast<int>(s.expert_idx / per_file) : 0;
    Tensor host = host_tensor(s.tensor.shape(), s.tensor.dtype());
    reader(rank_file(file_rank)).read(s.name, host);
    backend.copy_from_host(host.raw(), s.tensor);
  }
  TrainingState state;
  state.step = m["step"].as<int64_t>();
  state.next_sequence = m["next_sequence"].as<int64_t>();
  if (optimizer) optimizer->set_steps_taken(m["optimizer_steps"].as<int64_t>());
  if (optimizer) log_info("resumed from " + step_dir + " (step " + std::to_string(state.step) + ")");
  return state;
}

Config checkpoint_config(const std::string& step_dir, const std::vector<std::string>& overrides, Communicator& comm) {
  std::string text, failure;
  if (comm.rank() == 0) {
    const std::string path = step_dir + "/manifest.json";
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      failure = step_dir + ": not a checkpoint: no manifest.json (an incomplete or wrong directory)";
    } else {
      text = read_file(path, "checkpoint manifest");
    }
  }
  broadcast_string(comm, failure, 0);
  if (!failure.empty()) {
    InputError e(failure, "give a step directory (<checkpoint_dir>/step_NNNNNNNN)");
    e.mark_collective();
    throw e;
  }
  broadcast_string(comm, text, 0);
  std::vector<std::string> values;
  try {
    YAML::Node m = parse_json(text, step_dir + "/manifest.json");
    for (const auto& item : m["config"]) {
      values.push_back(item.first.as<std::string>() + "=" + item.second.as<std::string>(""));
    }
  } catch (const YAML::Exception& e) {
    InputError err(step_dir + "/manifest.json", "malformed manifest: " + e.msg);
    err.mark_collective();
    throw err;
  }
  values.insert(values.end(), overrides.begin(), overrides.end());
  try {
    return parse_config("", step_dir + "/manifest.json", values);
  } catch (Error& e) {
    e.mark_collective();
    throw;
  }
}

std::string resolve_step_dir(const std::string& path, Communicator& comm) {
  std::string dir, failure;
  if (comm.rank() == 0) {
    struct stat st {};
    if (::stat((path + "/manifest.json").c_str(), &st) == 0) {
      dir = path;
    } else if (::stat((path + "/latest").c_str(), &st) == 0) {
      std::string name = read_file(path + "/latest", "latest checkpoint pointer");
      while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
      dir = path + "/" + name;
    } else {
      failure = path + ": not a checkpoint (no manifest.json) nor a checkpoint directory (no latest)";
    }
  }
  broadcast_string(comm, failure, 0);
  if (!failure.empty()) {
    InputError e(failure, "give a step directory or a train.checkpoint_dir", "train.resume");
    e.mark_collective();
    throw e;
  }
  broadcast_string(comm, dir, 0);
  return dir;
}

}  // namespace moe
