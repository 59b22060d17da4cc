// Run configuration: plain structs, filled from YAML and `--section.key=value` overrides.
//
// One table of fields (config_fields()) drives everything about the configuration: YAML parsing,
// command-line overrides, type errors, unknown-key errors, the resolved-configuration printout, the
// manifest stored in checkpoints, and docs/CONFIG.md. Cross-field rules live in validate_config().
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "config/enums.h"

namespace moe {

struct ParallelConfig {
  int ep = 1;
};

struct ModelConfig {
  int hidden = 64;
  int layers = 2;
  int vocab_size = 256;
  int seq_len = 64;
  int heads = 4;
  int kv_heads = 0;             // 0: heads (multi-head); fewer: grouped-query attention
  double rope_base = 10000.0;
  double attn_dropout = 0.0;
  int ffn_hidden = 0;           // dense FFN layers; 0: round_up(8H/3, moe.multiple_of)
  bool tie_embeddings = false;
  double norm_eps = 1e-5;
  double init_std = 0.02;
};

struct MoeConfig {
  int num_experts = 8;
  int first_dense_layers = 0;
  int every = 1;
  int top_k = 2;
  double capacity_factor = 1.25;
  int min_capacity = 4;
  int group_size = 0;
  int num_shared_experts = 0;
  ExpertType expert_type = ExpertType::kSwiGLU;
  int ffn_hidden = 0;
  int shared_ffn_hidden = 0;
  int multiple_of = 64;
  ScoreFn score = ScoreFn::kSoftmax;
  bool normalize_topk = true;
  double router_jitter = 0.0;
  Priority priority = Priority::kToken;
  bool random_routing = false;
  RouterGrad router_grad = RouterGrad::kExact;
  double gumbel_tau = 1.0;
  bool gumbel_hard = false;
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.001;
  double bias_update_rate = 0.0;
  ForcedRouting force_routing;  // benchmarks and studies: experts drawn from a seeded distribution
};

struct TrainConfig {
  int64_t steps = 300;
  uint64_t seed = 1234;
  int batch_size = 32;
  OptimizerType optimizer = OptimizerType::kAdamW;
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup_steps = 20;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;
  int64_t log_every = 10;
  std::string metrics_path;
  std::string checkpoint_dir;
  int64_t checkpoint_every = 0;
  std::string resume;
  bool overwrite = false;
  int64_t keep_checkpoints = 3;
  int64_t eval_every = 0;
  int64_t eval_tokens = 65536;
  int64_t sample_tokens = 0;
  std::string sample_prompt = "The ";
};

struct DataConfig {
  DataSource source = DataSource::kSynthetic;
  std::string path;
  std::string val_path;
};

struct RuntimeConfig {
  Device device = Device::kCpu;
  DType dtype = DType::kF32;
  Precision precision = Precision::kFp32;
  CommKind comm = CommKind::kAuto;
  double comm_timeout_s = 300;
  DispatchLayout dispatch_layout = DispatchLayout::kAuto;
  GroupedGemmPath expert_gemm = GroupedGemmPath::kGrouped;
  int threads = 1;
};

struct Config {
  ParallelConfig parallel;
  ModelConfig model;
  MoeConfig moe;
  TrainConfig train;
  DataConfig data;
  RuntimeConfig runtime;
};

// One configuration key.
struct ConfigField {
  std::string key;                   // "moe.top_k"
  std::string type;                  // "int", "float", "bool", "string", or "a | b | c" for choices
  std::string doc;                   // one sentence for --help and docs/CONFIG.md
  std::function<void(Config&, const std::string&)> set;  // parses text; throws ConfigError naming the key
  std::function<std::string(const Config&)> get;         // the value as text that set() parses back
  bool sweep = false;  // may take a list of values in a study (one run per value)
  // Fixes the shapes or meaning of the tensors a checkpoint stores: resuming with another value is an
  // error naming the key (model and MoE shapes, dtype, optimizer, seed).
  bool structural = false;
};

const std::vector<ConfigField>& config_fields();
// The field of `key`; an unknown key throws ConfigError naming it and the nearest known key.
const ConfigField& config_field(const std::string& key);

// Where each key's value came from: "default", the YAML file name, or "command line".
using ConfigSources = std::map<std::string, std::string>;

// Parses YAML text (may be empty) and then `key=value` overrides (without the leading "--").
// Unknown keys and malformed values throw ConfigError naming the key. Does not validate.
Config parse_config(const std::string& yaml_text, const std::string& yaml_name,
                    const std::vector<std::string>& overrides, ConfigSources* sources = nullptr);

// Cross-field and range checks for a run on `world_size` ranks; throws ConfigError naming the key.
void validate_config(const Config& config, int world_size);

// The layout a configuration takes on at most `available` ranks (a restart after ranks were lost, or a
// study's rank count): the most ranks that the whole configuration validates for, each with ep = the
// largest divisor of both the ranks and moe.num_experts (1 for a dense model; the checkpoint's experts
// are placed by whoever holds them). Throws ConfigError when not even one rank fits.
struct Layout {
  int ranks = 1;
  int ep = 1;
};
Layout fit_layout(const Config& config, int available);
// The ep a configuration takes on `ranks` ranks when its own does not apply: the largest divisor of both
// the ranks and moe.num_experts (1 for a dense model). fit_layout, the scale studies and predict use it.
int largest_ep(const Config& config, int ranks);

// Derived sizes.
int expert_ffn_hidden(const Config& config);  // moe.ffn_hidden, or its default for the expert type
int dense_ffn_hidden(const Config& config);   // model.ffn_hidden, or round_up(8H/3, moe.multiple_of)
int head_dim(const Config& config);           // model.hidden / model.heads
int kv_heads(const Config& config);           // model.kv_heads, or model.heads
// Whether layer l's FFN is an MoE layer: moe.num_experts > 0, l >= moe.first_dense_layers and
// (l - moe.first_dense_layers) % moe.every == 0. Otherwise it is a dense SwiGLU FFN.
bool is_moe_layer(const Config& config, int layer);
int num_moe_layers(const Config& config);
int shared_ffn_hidden(const Config& config);  // moe.shared_ffn_hidden, or expert_ffn_hidden
// GShard capacity of one expert in a capacity group of `group_tokens` tokens: C = ceil(k * G * cf / E),
// at least moe.min_capacity, at most G (no expert can take more), at least 1; 0 when dropless
// (moe.capacity_factor <= 0). The one formula: the router and the cost model both call it.
int64_t moe_capacity(const MoeConfig& moe, int64_t group_tokens);
int64_t local_tokens(const Config& config, int world_size);  // tokens per rank per step
DispatchLayout dispatch_layout(const Config& config);  // runtime.dispatch_layout resolved for runtime.device
bool use_nccl(const Config& config);          // runtime.comm resolved for runtime.device

// moe.force_routing text ("off", "uniform", "zipf:1.2", "hot:0.5") and back; throws ConfigError.
ForcedRouting parse_forced_routing(const std::string& text);
std::string forced_routing_name(const ForcedRouting& f);

// Every key with its value, in table order.
std::vector<std::pair<std::string, std::string>> config_values(const Config& config);
// The resolved configuration as an aligned table, one key per line, with its source.
std::string config_table(const Config& config, const ConfigSources& sources);
// docs/CONFIG.md, generated from the table.
std::string config_reference_markdown();

}  // namespace moe
