// Checkpoint save/load.
#include "train/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include "base/json.h"
#include "base/log.h"
#include "train/safetensors.h"

namespace moe {
namespace {

constexpr const char* kFormat = "moe-checkpoint";
// Format versions: 2 the transformer with attention (tensor names and layouts of docs/ARCHITECTURE.md);
// 3 adds the index (model.safetensors.index.json) and the software version.
static_assert(kCheckpointFormatVersion == 3, "update the version notes");

std::string rank_file(int rank) { return checkpoint_rank_file(rank); }
std::string step_name(int64_t step) { return checkpoint_step_name(step); }

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

// Test hook (tests/fault/faults.sh kill_during_save): MOE_TEST_PAUSE_IN_SAVE=STEP:SECONDS makes the save
// of step STEP pause for SECONDS after every rank file is written and before the index and the manifest,
// announced by a marker line, so that a test can kill the job inside a save for certain instead of at
// random. Not a configuration key: nothing but that test sets it.
void test_pause_in_save(int64_t step) {
  const char* value = std::getenv("MOE_TEST_PAUSE_IN_SAVE");
  if (value == nullptr || *value == '\0') return;
  long long at = 0;
  double seconds = 0;
  char rest = 0;
  if (std::sscanf(value, "%lld:%lf%c", &at, &seconds, &rest) != 2 || !(seconds >= 0)) {
    throw ConfigError("", std::string("MOE_TEST_PAUSE_IN_SAVE=") + value + ": expected STEP:SECONDS");
  }
  if (at != step) return;
  std::printf("moe test hook: pid %d pauses %g s in the save of step %lld, after the rank files, before the "
              "manifest\n", static_cast<int>(::getpid()), seconds, at);
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));  // resumes after a signal handler
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
// optimizer moments under the same names (none without an optimizer). With all_experts, the names of
// every global expert instead of this rank's (tensors left empty): what the whole checkpoint holds.
std::vector<Slot> slots(Transformer& model, Optimizer* optimizer, bool all_experts = false) {
  std::vector<Slot> out;
  std::map<Param*, std::pair<Tensor*, Tensor*>> moments;
  if (optimizer) {
    for (auto& s : optimizer->state()) moments[s.param] = {s.m, s.v};
  }
  auto add = [&](const std::string& prefix, Param* p, const Tensor& t) {
    if (p->scope == ParamScope::kExpert && all_experts) {
      for (int64_t e = 0; e < model.config().moe.num_experts; ++e) {
        out.push_back(Slot{prefix + expert_tensor_name(p->name, e), Tensor(), true, e});
      }
    } else if (p->scope == ParamScope::kExpert) {
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

// A checkpoint written by a newer format than this build reads: never skipped, never removed.
class NewerFormatError : public InputError {
 public:
  using InputError::InputError;
};

// The manifest's format and version: this build reads versions kOldest.. kCheckpointFormatVersion.
// Returns the version.
int check_format(const std::string& path, const YAML::Node& m) {
  const std::string readable = std::to_string(kOldestCheckpointFormatVersion) + ".." +
                               std::to_string(kCheckpointFormatVersion);
  if (m["format"].as<std::string>("") != kFormat) {
    throw InputError(path, "not a moe-checkpoint manifest (format '" + m["format"].as<std::string>("") + "')",
                     "train.resume");
  }
  const int version = m["version"].as<int>(0);
  if (version > kCheckpointFormatVersion) {
    throw NewerFormatError(path, "checkpoint format version " + std::to_string(version) + ", written by " +
                               m["software"].as<std::string>("a newer build") + ", is newer than this build (" +
                               software_version() + ") reads (" + readable + "): read it with that software or a newer one",
                     "train.resume");
  }
  if (version < kOldestCheckpointFormatVersion) {
    throw InputError(path, "checkpoint format version " + std::to_string(version) + " is older than this build reads (" +
                               readable + ")", "train.resume");
  }
  return version;
}

std::map<std::string, std::string> parse_weight_map(const std::string& text, const std::string& what) {
  std::map<std::string, std::string> out;
  try {
    YAML::Node index = parse_json(text, what);
    if (!index["weight_map"].IsMap()) throw InputError(what, "checkpoint index without a weight_map", "train.resume");
    for (const auto& item : index["weight_map"]) out[item.first.as<std::string>()] = item.second.as<std::string>();
  } catch (const YAML::Exception& e) {
    throw InputError(what, "malformed checkpoint index: " + e.msg, "train.resume");
  }
  return out;
}

std::string index_json(int64_t step, uint64_t total_bytes, const std::map<std::string, std::string>& weight_map) {
  JsonWriter j;
  j.begin_object();
  j.key("metadata").begin_object();
  j.field("format", kFormat).field("format_version", kCheckpointFormatVersion).field("step", step);
  j.field("total_size", total_bytes);
  j.end_object();
  j.key("weight_map").begin_object();
  for (const auto& [name, file] : weight_map) j.field(name, file);
  j.end_object();
  j.end_object();
  return j.str() + "\n";
}

// The manifest's own consistency and every rank file it lists: the counters make sense, each ep rank
// 0 .. ep-1 has its file listed, every listed file has its size and CRC-32 and parses, and (version 3)
// the index has its size and CRC-32 and names exactly the tensors each file holds. Throws InputError
// (key train.resume) naming what is wrong. Returns the index's text (version 2: one made from the files'
// headers). Rank 0 only (it reads everything).
std::string verify_files(const std::string& step_dir, const YAML::Node& m) {
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
  std::map<std::string, std::string> in_files;  // tensor -> the file whose header holds it
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
    for (const std::string& t : check.names()) {
      if (!in_files.emplace(t, name).second) bad("tensor " + t + " is in both " + in_files[t] + " and " + name);
    }
  }
  for (int64_t r = 0; r < ep; ++r) {
    if (!listed.count(rank_file(static_cast<int>(r)))) bad("no entry for " + rank_file(static_cast<int>(r)));
  }
  if (m["version"].as<int>(0) < 3) return index_json(step, 0, in_files);  // before the index
  const std::string index_path = step_dir + "/" + kCheckpointIndexFile;
  struct stat st {};
  if (::stat(index_path.c_str(), &st) != 0) throw InputError(index_path, "missing checkpoint index", "train.resume");
  const std::string text = read_file(index_path, "checkpoint index");
  if (text.size() != m["index"]["bytes"].as<uint64_t>(0) ||
      crc32_update(0, text.data(), text.size()) != m["index"]["crc32"].as<uint64_t>(0)) {
    throw InputError(index_path, "corrupt checkpoint index: its size or CRC-32 is not the manifest's", "train.resume");
  }
  const std::map<std::string, std::string> index = parse_weight_map(text, index_path);
  for (const auto& [tensor, file] : index) {
    auto it = in_files.find(tensor);
    if (it == in_files.end() || it->second != file) {
      throw InputError(index_path, "index and files disagree: the index puts " + tensor + " in " + file + ", " +
                                       (it == in_files.end() ? std::string("no file holds it")
                                                             : "it is in " + it->second),
                       "train.resume");
    }
  }
  for (const auto& [tensor, file] : in_files) {
    if (!index.count(tensor)) {
      throw InputError(index_path, "index and files disagree: " + file + " holds " + tensor + ", which the index does not list",
                       "train.resume");
    }
  }
  return text;
}

// Whether step_dir holds a complete checkpoint of this format; `why` says what is wrong otherwise.
bool complete_checkpoint(const std::string& step_dir, std::string* why) {
  try {
    const std::string path = step_dir + "/manifest.json";
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw InputError(step_dir, "no manifest.json");
    YAML::Node m = parse_json(read_file(path, "checkpoint manifest"), path);
    check_format(path, m);
    verify_files(step_dir, m);
    return true;
  } catch (const NewerFormatError&) {
    throw;  // not incomplete: a newer build's, which must stop the job rather than be skipped or pruned
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
    bool complete = false;
    try {
      complete = complete_checkpoint(path, nullptr);
    } catch (const NewerFormatError&) {
      continue;  // a newer build's checkpoint is not ours to remove
    }
    if (kept < keep && complete) {
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

#ifndef MOE_VERSION
#define MOE_VERSION "unknown"
#endif
const char* const kCheckpointIndexFile = "model.safetensors.index.json";
const char* software_version() { return "moe " MOE_VERSION; }

std::string checkpoint_rank_file(int rank) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "rank_%05d.safetensors", rank);
  return buf;
}

std::string checkpoint_step_name(int64_t step) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::string commit_checkpoint(const std::string& checkpoint_dir, const CheckpointInfo& info,
                              const std::vector<CheckpointFile>& files) {
  const std::string dir = checkpoint_dir + "/" + step_name(info.step);
  make_dirs(dir);
  std::map<std::string, std::string> weight_map;
  uint64_t total = 0;
  for (const CheckpointFile& f : files) {
    total += f.written.bytes;
    for (const std::string& t : f.tensors) {
      if (!weight_map.emplace(t, f.name).second) throw InternalError("checkpoint: tensor " + t + " in two files");
    }
  }
  const std::string index = index_json(info.step, total, weight_map);
  write_file_atomic(dir + "/" + kCheckpointIndexFile, index);
  std::string seed;
  for (const auto& [k, v] : info.config) {
    if (k == "train.seed") seed = v;
  }
  JsonWriter j;
  j.begin_object();
  j.field("format", kFormat).field("version", kCheckpointFormatVersion).field("software", software_version());
  j.field("step", info.step).field("seed", static_cast<uint64_t>(std::stoull(seed.empty() ? "0" : seed)));
  j.field("next_sequence", info.next_sequence).field("optimizer_steps", info.optimizer_steps);
  j.field("world_size", info.world_size).field("ep", info.ep);
  if (!info.origin.empty()) j.field("origin", info.origin);
  j.key("config").begin_object();
  for (const auto& [k, v] : info.config) j.field(k, v);
  j.end_object();
  j.key("files").begin_array();
  for (const CheckpointFile& f : files) {
    j.begin_object().field("name", f.name).field("bytes", f.written.bytes);
    j.field("crc32", static_cast<uint64_t>(f.written.crc32)).end_object();
  }
  j.end_array();
  j.key("index").begin_object().field("name", kCheckpointIndexFile).field("bytes", static_cast<uint64_t>(index.size()));
  j.field("crc32", static_cast<uint64_t>(crc32_update(0, index.data(), index.size()))).end_object();
  j.field("experts_per_file", info.experts_per_file);
  j.end_object();
  write_file_atomic(dir + "/manifest.json", j.str() + "\n");
  write_file_atomic(checkpoint_dir + "/latest", step_name(info.step) + "\n");
  return dir;
}

StoredCheckpoint open_checkpoint(const std::string& step_dir) {
  const std::string path = step_dir + "/manifest.json";
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw InputError(step_dir, "not a checkpoint: no manifest.json (give a step directory)", "train.resume");
  }
  StoredCheckpoint c;
  c.dir = step_dir;
  YAML::Node m = parse_json(read_file(path, "checkpoint manifest"), path);
  try {
    check_format(path, m);
    c.weight_map = parse_weight_map(verify_files(step_dir, m), step_dir + "/" + kCheckpointIndexFile);
    c.step = m["step"].as<int64_t>();
    c.next_sequence = m["next_sequence"].as<int64_t>();
    c.optimizer_steps = m["optimizer_steps"].as<int64_t>();
    c.world_size = m["world_size"].as<int>(1);
    c.ep = m["ep"].as<int>();
    for (const auto& item : m["config"]) c.config.emplace_back(item.first.as<std::string>(), item.second.as<std::string>(""));
    for (const auto& f : m["files"]) {
      for (std::string& t : SafetensorsReader(step_dir + "/" + f["name"].as<std::string>()).names()) {
        c.tensors.push_back(std::move(t));
      }
    }
  } catch (const YAML::Exception& e) {
    throw InputError(path, "malformed manifest: " + e.msg, "train.resume");
  }
  return c;
}

std::string StoredCheckpoint::value(const std::string& key) const {
  for (const auto& [k, v] : config) {
    if (k == key) return v;
  }
  return "";
}

Tensor StoredCheckpoint::read(const std::string& tensor) const {
  auto it = weight_map.find(tensor);
  if (it == weight_map.end()) throw InputError(dir, "checkpoint has no tensor " + tensor, "train.resume");
  auto& reader = readers_[it->second];
  if (!reader) reader = std::make_shared<SafetensorsReader>(dir + "/" + it->second);
  return reader->read(tensor);
}

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
  // A rank that cannot write its file (a full disk fills for several ranks at once) does not stop the job on
  // its own: the ranks first agree, so that one line reports the failure and every rank that had it.
  std::vector<double> mine{0, 0, 0};
  std::string failure;
  if (!records.empty()) {
    try {
      WrittenFile f = write_safetensors(dir + "/" + rank_file(world.rank()), records,
                                        {{"format", kFormat}, {"step", std::to_string(state.step)}});
      mine = {1, static_cast<double>(f.bytes), static_cast<double>(f.crc32)};
    } catch (const Error& e) {
      mine = {-1, 0, 0};
      failure = e.what();
    }
  }
  std::vector<double> all(3 * static_cast<size_t>(world.size()));
  world.host().all_gather(mine.data(), all.data(), 3, DType::kF64);
  std::string failed_ranks;
  for (int r = 0; r < world.size(); ++r) {
    if (all[3 * r] >= 0) continue;
    if (failed_ranks.empty()) broadcast_string(world, failure, r);  // the lowest failing rank's reason
    failed_ranks += (failed_ranks.empty() ? "" : ", ") + std::to_string(r);
  }
  if (!failed_ranks.empty()) {
    throw collective(InputError("checkpoint of step " + std::to_string(state.step),
                                failure + " (rank(s) " + failed_ranks + " could not write their files; the latest " +
                                    "complete checkpoint, if any, stays the latest)",
                                "train.checkpoint_dir"));
  }

  if (world.rank() == 0) {
    test_pause_in_save(state.step);
    CheckpointInfo info;
    info.step = state.step;
    info.next_sequence = state.next_sequence;
    info.optimizer_steps = optimizer.steps_taken();
    info.world_size = world.size();
    info.ep = groups.ep_size();
    info.experts_per_file = config.moe.num_experts / info.ep;
    info.config = config_values(config);
    // Experts [r * local, (r + 1) * local) are in world rank r's file (ranks 0 .. ep-1 are ep group 0, dp rank 0).
    std::vector<CheckpointFile> files;
    for (int r = 0; r < world.size(); ++r) {
      if (all[3 * r] == 0) continue;
      files.push_back(CheckpointFile{rank_file(r), {static_cast<uint64_t>(all[3 * r + 1]), static_cast<uint32_t>(all[3 * r + 2])}, {}});
    }
    auto file_of = [&](const Slot& s) -> CheckpointFile& {
      const std::string name = rank_file(s.expert ? static_cast<int>(s.expert_idx / info.experts_per_file) : 0);
      for (CheckpointFile& f : files) {
        if (f.name == name) return f;
      }
      throw InternalError("checkpoint: no file was written for " + s.name + " (" + name + ")");
    };
    for (const Slot& s : slots(model, &optimizer, /*all_experts=*/true)) file_of(s).tensors.push_back(s.name);
    try {
      commit_checkpoint(checkpoint_dir, info, files);
      prune_checkpoints(checkpoint_dir, config.train.keep_checkpoints, state.step);
    } catch (const Error& e) {  // the index, the manifest or `latest` could not be written
      failure = e.what();
    }
  }
  broadcast_string(world, failure, 0);  // every rank waits for the commit, and learns how it went
  if (!failure.empty()) throw collective(InputError("checkpoint of step " + std::to_string(state.step), failure, "train.checkpoint_dir"));
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
  std::string manifest_text, index_text;
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
      check_format(path, m);
      YAML::Node stored = m["config"];
      auto values = config_values(config);
      std::map<std::string, std::string> now(values.begin(), values.end());
      for (const ConfigField& f : config_fields()) {
        if (!f.structural) continue;
        const std::string& key = f.key;
        std::string was = stored[key].as<std::string>("");
        if (was != now[key]) {
          const bool upcycle = key == "moe.num_experts" && was == "0";
          throw ConfigError(key, "checkpoint " + step_dir + " was written with " + key + " = " + was +
                                     ", this run has " + now[key] +
                                     (upcycle ? " (to turn a dense checkpoint into an MoE model: launch/moe upcycle)"
                                              : ""));
        }
      }
      index_text = verify_files(step_dir, m);
      const std::map<std::string, std::string> index = parse_weight_map(index_text, step_dir + "/" + kCheckpointIndexFile);
      for (const Slot& s : slots(model, optimizer, /*all_experts=*/true)) {
        if (!index.count(s.name)) {
          throw InputError(step_dir + "/" + kCheckpointIndexFile, "checkpoint has no tensor " + s.name +
                                                                      " (written by another model?)", "train.resume");
        }
      }
    } catch (const YAML::Exception& e) {
      throw InputError(path, "malformed manifest: " + e.msg, "train.resume");
    }
  }
  broadcast_string(world, manifest_text, 0);
  broadcast_string(world, index_text, 0);

  YAML::Node m = parse_json(manifest_text, step_dir + "/manifest.json");
  const std::map<std::string, std::string> weight_map = parse_weight_map(index_text, step_dir + "/" + kCheckpointIndexFile);
  std::map<std::string, std::unique_ptr<SafetensorsReader>> readers;
  auto reader = [&](const std::string& name) -> SafetensorsReader& {
    auto& r = readers[name];
    if (!r) r = std::make_unique<SafetensorsReader>(step_dir + "/" + name);
    return *r;
  };
  Backend& backend = *model.backend();
  for (Slot& s : slots(model, optimizer)) {
    auto file = weight_map.find(s.name);
    if (file == weight_map.end()) {
      throw InputError(step_dir + "/" + kCheckpointIndexFile, "checkpoint has no tensor " + s.name +
                                                                  " (written by another model?)", "train.resume");
    }
    Tensor host = host_tensor(s.tensor.shape(), s.tensor.dtype());
    reader(file->second).read(s.name, host);
    backend.copy_from_host(host.raw(), s.tensor);
  }
  model.params().values_changed();  // BF16 shadows convert again
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
      try {
        check_format(path, parse_json(text, path));  // a newer format says so before its keys are read
      } catch (const Error& e) {
        failure = e.what();
      }
    }
  }
  broadcast_string(comm, failure, 0);
  if (!failure.empty()) {
    throw collective(InputError(failure, "give a step directory (<checkpoint_dir>/step_NNNNNNNN) this build can read"));
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
    throw collective(InputError(failure, "give a step directory or a train.checkpoint_dir", "train.resume"));
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
    throw collective(Error(ErrorKind::kInput, failure, key));
  }
  return claim;
}

}  // namespace moe
