// Checkpoints: one safetensors file per writing rank plus a JSON manifest, written atomically.
//
//   <checkpoint_dir>/step_00000100/rank_00000.safetensors   replicated tensors + expert shard of ep rank 0
//   <checkpoint_dir>/step_00000100/rank_0000r.safetensors   expert shard of ep rank r (dp rank 0 writes)
//   <checkpoint_dir>/step_00000100/model.safetensors.index.json   where each tensor is: {"metadata":
//                                                           {...}, "weight_map": {tensor: file}}
//   <checkpoint_dir>/step_00000100/manifest.json            written last: format version, software version,
//                                                           config, step, seed, data position, optimizer
//                                                           steps, files and index with CRC-32
//   <checkpoint_dir>/latest                                 "step_00000100", updated after the manifest
//
// Every file goes to a temporary name and is renamed into place, so a crash leaves either the old
// checkpoint or a complete new one; a step directory without a manifest is not a checkpoint. After each
// save, checkpoints older than the newest train.keep_checkpoints complete ones are removed. Expert
// tensors are stored per global expert ("layers.0.moe.experts.5.w_gate") so a checkpoint can be read
// back under another (ep, dp) layout; loading looks every tensor up in the index, so a checkpoint may
// spread its tensors over files any way (launch/moe reshard writes other layouts offline). Optimizer
// moments are "optim.m.<tensor>" / "optim.v.<tensor>". The directory must be visible to every rank (a
// shared filesystem on a cluster). Format versions: 3 (the index; this build writes it), 2 (no index:
// read through the files' own headers); a newer one is refused.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/transformer.h"
#include "train/optimizer.h"
#include "train/safetensors.h"

namespace moe {

struct TrainingState {
  int64_t step = 0;           // steps completed
  int64_t next_sequence = 0;  // first global sequence of the next step
};

// Collective over the world. Returns the step directory.
std::string save_checkpoint(const std::string& checkpoint_dir, const TrainingState& state, const Config& config,
                            Transformer& model, Optimizer& optimizer, ProcessGroups& groups);

// train.resume resolved on rank 0 and broadcast: "" (start fresh) or a step directory. "auto" takes the
// checkpoint `latest` names when it is complete, else the newest complete step directory (scanning), else
// "". Collective.
std::string resolve_resume(const Config& config, Communicator& world);

// The claim of this job on train.checkpoint_dir (see claim_checkpoint_dir): the lock is held until it is
// destroyed.
class CheckpointDir {
 public:
  CheckpointDir() = default;
  ~CheckpointDir();
  CheckpointDir(const CheckpointDir&) = delete;
  CheckpointDir& operator=(const CheckpointDir&) = delete;

 private:
  friend std::unique_ptr<CheckpointDir> claim_checkpoint_dir(const Config& config, Communicator& world);
  int fd_ = -1;  // rank 0's open, flock-ed <dir>/.lock
};

// Takes train.checkpoint_dir for this job (nothing when it is empty), before step 1: rank 0 creates it,
// checks that it can write there, locks it against any other job (flock on <dir>/.lock, which also records
// the owner's pid and host), removes stale temporary files of a killed save, and refuses a fresh run
// (train.resume empty) into a directory that already holds checkpoints unless train.overwrite, which
// deletes them. A problem is one collective error (key train.checkpoint_dir or train.overwrite).
std::unique_ptr<CheckpointDir> claim_checkpoint_dir(const Config& config, Communicator& world);

// Rank 0 checks the manifest (format, config compatibility) and every file (size, CRC-32) before any
// rank reads; a problem throws InputError there while the others wait in a broadcast, so the job stops
// with one message. Loads the optimizer state too unless `optimizer` is null (evaluation, sampling).
// Collective over the model's world.
TrainingState load_checkpoint(const std::string& step_dir, const Config& config, Transformer& model,
                              Optimizer* optimizer, ProcessGroups& groups);

// A step directory from `path`: path itself when it holds a manifest, else the step its `latest` file
// names (a checkpoint directory). Rank 0 of comm looks; throws InputError (key train.resume) when
// neither. Collective over comm.
std::string resolve_step_dir(const std::string& path, Communicator& comm);

// The configuration a checkpoint was written with (its manifest), then `overrides` ("section.key=value")
// on top. Rank 0 of `comm` reads the manifest; throws InputError (key train.resume) when the directory
// is not a checkpoint. Collective over comm.
Config checkpoint_config(const std::string& step_dir, const std::vector<std::string>& overrides, Communicator& comm);

// ---- Offline access (one process, no collective): what launch/moe reshard, export, import and upcycle use.

constexpr int kCheckpointFormatVersion = 3;        // written by this build
constexpr int kOldestCheckpointFormatVersion = 2;  // the oldest it reads
extern const char* const kCheckpointIndexFile;     // "model.safetensors.index.json"
const char* software_version();                    // "moe <version>", recorded in every manifest

std::string checkpoint_step_name(int64_t step);  // "step_00000100"
std::string checkpoint_rank_file(int rank);      // "rank_00003.safetensors"

// A complete checkpoint, verified like a resume verifies it (manifest, sizes, CRC-32, index against
// the files); throws InputError (key train.resume) naming what is wrong.
struct StoredCheckpoint {
  std::string dir;
  int64_t step = 0, next_sequence = 0, optimizer_steps = 0;
  int world_size = 1, ep = 1;
  std::vector<std::pair<std::string, std::string>> config;  // every key as stored
  std::map<std::string, std::string> weight_map;             // tensor -> file
  std::vector<std::string> tensors;                          // every tensor, file by file in byte order
  std::string value(const std::string& key) const;           // a configuration value ("" when absent)
  Tensor read(const std::string& tensor) const;              // as stored (dtype and shape)

 private:
  mutable std::map<std::string, std::shared_ptr<SafetensorsReader>> readers_;  // by file, opened on first use
};
StoredCheckpoint open_checkpoint(const std::string& step_dir);

// Writing a checkpoint file by file: each file is written (write_safetensors) first, then
// commit_checkpoint writes the index, the manifest and `latest`.
struct CheckpointFile {
  std::string name;
  WrittenFile written;
  std::vector<std::string> tensors;
};
struct CheckpointInfo {
  int64_t step = 0, next_sequence = 0, optimizer_steps = 0;
  int world_size = 1, ep = 1;
  int64_t experts_per_file = 0;  // informational since version 3: the index says where each expert is
  std::vector<std::pair<std::string, std::string>> config;
  std::string origin;  // how it was made when not by training ("reshard of …"); "" for training
};
// Returns the step directory. Creates checkpoint_dir/step_N when needed (the files must already be there).
std::string commit_checkpoint(const std::string& checkpoint_dir, const CheckpointInfo& info,
                              const std::vector<CheckpointFile>& files);

}  // namespace moe
