// Offline checkpoint tools: what launch/moe reshard, export, import and upcycle run, on one process.
//
//   reshard   a checkpoint's tensors spread over the files of another expert-parallel size, bytes unchanged
//   export    the parameters as one model.safetensors (experts stacked per layer) + config.json
//   import    such an export back into a checkpoint (fresh optimizer) that trains on any layout
//   upcycle   an MoE checkpoint made from a dense one: routed experts copied from (or cut out of) the
//             dense FFN, everything else copied or initialised as the MoE configuration says
//
// Each writes into a directory that holds no checkpoint (or export) yet and refuses otherwise: nothing is
// ever overwritten. Input problems throw InputError / ConfigError naming the file or the key.
#pragma once

#include <string>

#include "runtime/backend.h"
#include "config/config.h"

namespace moe {

// Writes the checkpoint at step_dir as out_dir/step_N for `ep` expert-parallel ranks (files rank_00000 ..
// rank_{ep-1}: rank r holds experts [r·E/ep, (r+1)·E/ep), rank 0 also every other tensor), world size
// ep·dp in the manifest, parallel.ep = ep in its configuration. Every tensor (parameters and optimizer
// moments) keeps its bytes. Returns the new step directory.
std::string reshard_checkpoint(const std::string& step_dir, int ep, int dp, const std::string& out_dir);

// Writes out_dir/model.safetensors (every parameter in `dtype`, F32 or BF16; the routed experts of MoE
// layer l stacked as layers.l.moe.experts.<w> (E, …)) and out_dir/config.json (the architecture under
// the configuration's key names, sizes resolved, and every configuration key as stored). Optimizer
// state is not exported.
void export_checkpoint(const std::string& step_dir, const std::string& out_dir, DType dtype);

// Reads an export (out of export_checkpoint) into out_dir/step_N: the parameters converted to
// runtime.dtype, a fresh optimizer (moments 0, no updates yet), the step and data position the export
// recorded. Returns the step directory.
std::string import_checkpoint(const std::string& export_dir, const std::string& out_dir, Backend& backend);

struct UpcycleOptions {
  double noise_std = 0;   // each routed expert's weights + noise_std · normal (seeded by train.seed)
  bool granular = false;  // experts cut out of the dense FFN's mid units instead of copies of all of it
};
// Builds `config`'s MoE model from the dense checkpoint at dense_step_dir (moe.num_experts 0) and
// writes it as out_dir/step_00000000 with a fresh optimizer. Copied: embedding, head, norms, attention,
// the dense FFNs of layers that stay dense. MoE layer l's routed experts come from the dense layer l's
// FFN: copies (moe.ffn_hidden = the dense mid size F_d), or with granular, expert e takes the mid units
// [j·F, (j+1)·F) of it, j = e mod (F_d / F), its w_down multiplied by F_d / F. The router and the shared
// experts are initialised as configured. Returns the step directory.
std::string upcycle_checkpoint(const std::string& dense_step_dir, const Config& config, const std::string& out_dir,
                               const UpcycleOptions& options, Backend& backend);

}  // namespace moe
