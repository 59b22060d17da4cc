// Checkpoint save/load.
#include "train/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

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

// The manifest's own consistency and every rank file it lists: the counters make sense, each ep rank
// 0 .. ep-1 has its file listed, and every listed file has its size and CRC-32 and parses. Throws
// InputError (key train.resume) naming what is wrong. Rank 0 only (it reads everything).
void verify_files(const std::string& step_dir, const YAML::Node& m) {
  const std::string path = step_dir + "/manifest.json";
  auto bad = [&](const std::string& what) { throw InputError(path, "damaged manifest: " + what, "train.resume"); };
  const int64_t step = m["step"].as<int64_t>(-1), next = m["next_sequence"].as<int64_t>(-1);
  const int64_t optimizer_steps = m["optimizer_steps"].as<int64_t>(-1), ep = m["ep"].as<int64_t>(0);
  if (step < 0) bad("step " + std::to_string(step));
  if (next < 0) bad("next_sequence " + std::to_string(next));
  if (optimizer_steps < 0 || optimizer_steps > step) {
    bad("optimizer_steps " + std::to_string(optimizer_steps) + " for step " + std::to_string(step));
  }
  if (ep < 1) bad("ep " + std::to_string(ep));
  // routed experts per rank file: > 0 for a model with MoE layers, 0 for a dense one
  const bool has_experts = m["config"]["moe.num_experts"].as<std::string>("0") != "0";
  const int64_t per_file = m["experts_per_file"].as<int64_t>(-1);
  if (per_file < (has_experts ? 1 : 0)) bad("experts_per_file " + std::to_string(per_file));
  std::set<std::string> listed;
  for (const auto& f : m["files"]) {
    const std::string name = f["name"].as<std::string>();
    listed.insert(name);
    const std::string file = step_dir + "/" + name;
    WrittenFile want{f["bytes"].as<uint64_t>(), static_cast<uint32_t>(f["crc32"].as<uint64_t>())};
    struct stat st {};
    if (::stat(file.c_str(), &st) != 0) throw InputError(file, "missing checkpoint file", "train.resume");
    WrittenFile got = checksum_file(file);
    if (got.bytes != want.bytes) {
      throw InputError(file, "corrupt checkpoint file: " + std::to_string(got.bytes) + " bytes, manifest says " +
                                 std::to_string(want.bytes), "train.resume");
    }
    if (got.crc32 != want.crc32) throw InputError(file, "corrupt checkpoint file: CRC-32 mismatch", "train.resume");
    SafetensorsReader check(file);  // header parses and every tensor fits the file
  }
  for (int64_t r = 0; r < ep; ++r) {
    if (!listed.count(rank_file(static_cast<int>(r)))) bad("no entry for " + rank_file(static_cast<int>(r)));
  }
}

// Whether step_dir holds a complete checkpoint of this format; `why` says what is wrong otherwise.
bool complete_checkpoint(const std::string& step_dir, std::string* why) {
  try {
    const std::string path = step_dir + "/manifest.json";
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw InputError(step_dir, "no manifest.json");
    YAML::Node m = parse_json(read_file(path, "checkpoint manifest"), path);
    if (m["format"].as<std::string>("") != kFormat || m["version"].as<int>(0) != kVersion) {
      throw InputError(path, "not a moe-checkpoint version " + std::to_string(kVersion) + " manifest");
    }
    verify_files(step_dir, m);
    return true;
  } catch (const Error& e) {
    if (why) *why = e.what();
  } catch (const YAML::Exception& e) {
    if (why) *why = step_dir + ": malformed manifest: " + e.msg;
  }
  return false;
}

// The step directories under dir, newest first: (step, path).
std::vector<std::pair<int64_t, std::string>> step_dirs(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() != 13 || n.rfind("step_", 0) != 0 || !e.is_directory(ec)) continue;
    if (n.find_first_not_of("0123456789", 5) != std::string::npos) continue;
    out.emplace_back(std::stoll(n.substr(5)), e.path().string());
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

// Removes every step directory older than the newest `keep` complete checkpoints (0: keep all); the
// newest (`latest`, just written) is never removed.
void prune_checkpoints(const std::string& dir, int64_t keep, int64_t newest) {
  if (keep <= 0) return;
  int64_t kept = 0;
  for (const auto& [step, path] : step_dirs(dir)) {
    if (step > newest) continue;  // a later run's leftovers are not ours to judge
    if (kept < keep && complete_checkpoint(path, nullptr)) {
      ++kept;
      continue;
    }
    if (kept < keep) continue;  // an incomplete one newer than the kept ones: a save in progress elsewhere
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) log_warn("could not remove old checkpoint " + path + ": " + ec.message());
  }
}

// Removes the temporary files a killed save leaves (`*.tmp.<pid>`) in dir and its step directories.
void remove_stale_temporaries(const std::string& dir) {
  std::error_code ec;
  std::vector<std::filesystem::path> stale;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec); !ec && it != std::filesystem::end(it);
       it.increment(ec)) {
    if (it.depth() > 1) {
      it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file(ec) && it->path().filename().string().find(".tmp.") != std::string::npos) {
      stale.push_back(it->path());
    }
  }
  for (const auto& p : stale) std::filesystem::remove(p, ec);
  if (!stale.empty()) log_info("removed " + std::to_string(stale.size()) + " temporary file(s) of an interrupted save");
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
    prune_checkpoints(checkpoint_dir, config.train.keep_checkpoints, state.step);
  }
  world.barrier();
  return dir;
}

std::string resolve_resume(const Config& config, Communicator& world) {
  std::string path;
  const std::string& resume = config.train.resume;
  if (world.rank() == 0 && resume == "auto") {
    // `latest` names the newest checkpoint; when it is missing, damaged or names an incomplete one, the
    // newest complete step directory is found by scanning.
    const std::string dir = config.train.checkpoint_dir;
    std::string named;
    struct stat st {};
    if (::stat((dir + "/latest").c_str(), &st) == 0) {
      named = read_file(dir + "/latest", "latest checkpoint pointer");
      while (!named.empty() && (named.back() == '\n' || named.back() == ' ')) named.pop_back();
    }
    std::string why;
    if (!named.empty() && named.find('/') == std::string::npos && complete_checkpoint(dir + "/" + named, &why)) {
      path = dir + "/" + named;
    } else {
      if (!named.empty()) log_warn("latest names " + named + ", which is not a complete checkpoint (" + why + ")");
      std::string newest_why;
      for (const auto& [step, candidate] : step_dirs(dir)) {
        if (complete_checkpoint(candidate, &why)) {
          path = candidate;
          break;
        }
        if (newest_why.empty()) newest_why = why;
        log_warn("skipping " + candidate + ": " + why);
      }
      if (!path.empty()) {
        log_info("resume: found " + path + " by scanning " + dir);
      } else if (!newest_why.empty()) {  // checkpoints, none usable: never start over silently
        throw InputError(newest_why, "no complete checkpoint to resume from in " + dir +
                                         " (start over with --train.resume= --train.overwrite=true)",
                         "train.resume");
      }
    }
  } else if (world.rank() == 0) {
    path = resume;
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
      verify_files(step_dir, m);
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

CheckpointDir::~CheckpointDir() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

std::unique_ptr<CheckpointDir> claim_checkpoint_dir(const Config& config, Communicator& world) {
  auto claim = std::make_unique<CheckpointDir>();
  const std::string& dir = config.train.checkpoint_dir;
  std::string failure, key = "train.checkpoint_dir";
  if (world.rank() == 0 && !dir.empty()) {
    try {
      make_dirs(dir);
      const std::string probe = dir + "/.write_probe.tmp." + std::to_string(::getpid());
      write_file_atomic(probe, "probe\n");
      ::unlink(probe.c_str());
      // The lock: held by this job until it ends (the kernel drops it when the process dies).
      const std::string lock = dir + "/.lock";
      claim->fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      if (claim->fd_ < 0) throw InputError(lock, std::string("cannot open the lock file: ") + std::strerror(errno));
      if (::flock(claim->fd_, LOCK_EX | LOCK_NB) != 0) {
        std::string owner = read_file(lock, "lock file");
        while (!owner.empty() && owner.back() == '\n') owner.pop_back();
        throw InputError(dir, "in use by another job (" + (owner.empty() ? std::string("unknown") : owner) +
                                  "): one checkpoint directory belongs to one job");
      }
      char host[256] = "?";
      ::gethostname(host, sizeof(host) - 1);
      const std::string owner = "pid " + std::to_string(::getpid()) + " on " + host + "\n";
      if (::ftruncate(claim->fd_, 0) != 0 || ::pwrite(claim->fd_, owner.data(), owner.size(), 0) < 0) {
        throw InputError(lock, std::string("cannot write the lock file: ") + std::strerror(errno));
      }
      remove_stale_temporaries(dir);
      auto existing = step_dirs(dir);
      struct stat st {};
      const bool has_latest = ::stat((dir + "/latest").c_str(), &st) == 0;
      if (config.train.resume.empty() && (!existing.empty() || has_latest)) {
        if (!config.train.overwrite) {
          key = "train.overwrite";
          throw InputError(dir, "already holds checkpoints (newest " +
                                    (existing.empty() ? std::string("unknown") : existing.front().second) +
                                    "); continue with --train.resume=auto, or start over with --train.overwrite=true "
                                    "(which deletes them)");
        }
        for (const auto& [step, path] : existing) std::filesystem::remove_all(path);
        ::unlink((dir + "/latest").c_str());
        log_info("train.overwrite: removed " + std::to_string(existing.size()) + " checkpoint(s) in " + dir);
      }
    } catch (const Error& e) {
      failure = e.what();
      if (!e.key().empty()) key = e.key();
    } catch (const std::exception& e) {
      failure = dir + ": " + e.what();
    }
  }
  broadcast_string(world, failure, 0);
  if (!failure.empty()) {
    broadcast_string(world, key, 0);
    Error e(ErrorKind::kInput, failure, key);
    e.mark_collective();
    throw e;
  }
  return claim;
}

}  // namespace moe
