// The configuration table, YAML/CLI parsing, validation and the generated reference.
#include "config/config.h"

#include "base/error.h"
#include "base/json.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <set>
#include <sstream>

namespace moe {
namespace {

// ---------------------------------------------------------------------------------------------------
// scalar parsing and printing

// A value quoted in an error line: at most 200 characters of it.
std::string quoted(const std::string& text) {
  constexpr size_t kMax = 200;
  if (text.size() <= kMax) return "'" + text + "'";
  return "'" + text.substr(0, kMax) + "...' (" + std::to_string(text.size()) + " characters)";
}

double parse_double(const std::string& key, const std::string& text) {
  std::string t = text;
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
  if (t == ".nan" || t == "nan") return std::numeric_limits<double>::quiet_NaN();
  if (t == ".inf" || t == "+.inf" || t == "inf") return std::numeric_limits<double>::infinity();
  if (t == "-.inf" || t == "-inf") return -std::numeric_limits<double>::infinity();
  const char* begin = text.c_str();
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(begin, &end);
  if (text.empty() || end != begin + text.size() || errno == ERANGE) {
    throw ConfigError(key, "expected a number, got " + quoted(text));
  }
  return v;
}

template <typename V>
V parse_integer(const std::string& key, const std::string& text) {
  const char* begin = text.c_str();
  char* end = nullptr;
  errno = 0;
  bool ok = !text.empty() && text.find_first_of(".eE") == std::string::npos;
  V v{};
  if constexpr (std::is_unsigned_v<V>) {
    ok = ok && text[0] != '-';
    unsigned long long u = std::strtoull(begin, &end, 10);
    ok = ok && end == begin + text.size() && errno != ERANGE && u <= std::numeric_limits<V>::max();
    v = static_cast<V>(u);
  } else {
    long long s = std::strtoll(begin, &end, 10);
    ok = ok && end == begin + text.size() && errno != ERANGE && s >= std::numeric_limits<V>::min() &&
         s <= std::numeric_limits<V>::max();
    v = static_cast<V>(s);
  }
  if (!ok) throw ConfigError(key, "expected an integer, got " + quoted(text));
  return v;
}

bool parse_bool(const std::string& key, const std::string& text) {
  std::string t = text;
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
  if (t == "true" || t == "yes" || t == "on" || t == "1") return true;
  if (t == "false" || t == "no" || t == "off" || t == "0") return false;
  throw ConfigError(key, "expected true or false, got " + quoted(text));
}

template <typename V>
const char* type_name() {
  if constexpr (std::is_same_v<V, bool>) return "bool";
  if constexpr (std::is_same_v<V, double>) return "float";
  if constexpr (std::is_same_v<V, std::string>) return "string";
  return "int";
}

// ---------------------------------------------------------------------------------------------------
// field builders

template <typename Sec, typename V>
ConfigField field(const char* key, Sec Config::*sec, V Sec::*mem, const char* doc) {
  ConfigField f;
  f.key = key;
  f.type = type_name<V>();
  f.doc = doc;
  f.sweep = !std::is_same_v<V, std::string>;  // a path or a prompt may hold commas
  std::string k = key;
  f.set = [k, sec, mem](Config& c, const std::string& text) {
    V& dst = c.*sec.*mem;
    if constexpr (std::is_same_v<V, bool>) {
      dst = parse_bool(k, text);
    } else if constexpr (std::is_same_v<V, double>) {
      dst = parse_double(k, text);
    } else if constexpr (std::is_same_v<V, std::string>) {
      dst = text;
    } else {
      dst = parse_integer<V>(k, text);
    }
  };
  f.get = [sec, mem](const Config& c) -> std::string {
    const V& v = c.*sec.*mem;
    if constexpr (std::is_same_v<V, bool>) {
      return v ? "true" : "false";
    } else if constexpr (std::is_same_v<V, double>) {
      return format_double(v);
    } else if constexpr (std::is_same_v<V, std::string>) {
      return v;
    } else {
      return std::to_string(v);
    }
  };
  return f;
}

template <typename Sec, typename E>
ConfigField choice(const char* key, Sec Config::*sec, E Sec::*mem, std::vector<std::pair<std::string, E>> names,
                   const char* doc) {
  ConfigField f;
  f.key = key;
  f.doc = doc;
  f.sweep = true;
  for (size_t i = 0; i < names.size(); ++i) f.type += (i ? " | " : "") + names[i].first;
  std::string k = key, type = f.type;
  f.set = [k, type, sec, mem, names](Config& c, const std::string& text) {
    for (const auto& [name, value] : names) {
      if (name == text) {
        c.*sec.*mem = value;
        return;
      }
    }
    throw ConfigError(k, "expected one of " + type + ", got " + quoted(text));
  };
  f.get = [sec, mem, names](const Config& c) -> std::string {
    for (const auto& [name, value] : names)
      if (value == c.*sec.*mem) return name;
    return "?";
  };
  return f;
}

// Marks a field structural (ConfigField::structural).
ConfigField structural(ConfigField f) {
  f.structural = true;
  return f;
}

std::vector<ConfigField> build_fields() {
  using C = Config;
  std::vector<ConfigField> f;
  // parallel
  f.push_back(field("parallel.ep", &C::parallel, &ParallelConfig::ep,
                    "Expert-parallel group size: routed experts are sharded over this many consecutive ranks; the "
                    "world is ep x dp with dp = ranks / ep."));
  // model
  f.push_back(structural(field("model.hidden", &C::model, &ModelConfig::hidden, "Hidden size H of every token.")));
  f.push_back(structural(field("model.layers", &C::model, &ModelConfig::layers,
                               "Transformer blocks, each attention then an FFN (MoE or dense, see moe.num_experts).")));
  f.push_back(structural(field("model.vocab_size", &C::model, &ModelConfig::vocab_size,
                    "Vocabulary size; 256 for byte tokens. Every token id in the data must be below it.")));
  f.push_back(field("model.seq_len", &C::model, &ModelConfig::seq_len, "Tokens per training sequence."));
  f.push_back(structural(field("model.heads", &C::model, &ModelConfig::heads,
                    "Attention query heads; model.hidden must be divisible by it (head size hidden / heads, even).")));
  f.push_back(structural(field("model.kv_heads", &C::model, &ModelConfig::kv_heads,
                    "Key/value heads; must divide model.heads (grouped-query attention: heads / kv_heads query "
                    "heads share one). 0: model.heads.")));
  f.push_back(structural(field("model.rope_base", &C::model, &ModelConfig::rope_base,
                    "Rotary position embedding base: dimension pair i of a head turns by position * base^(-2i / "
                    "head size).")));
  f.push_back(field("model.attn_dropout", &C::model, &ModelConfig::attn_dropout,
                    "Dropout probability on the attention probabilities during training. 0: off."));
  f.push_back(structural(field("model.ffn_hidden", &C::model, &ModelConfig::ffn_hidden,
                    "Mid size of the dense SwiGLU FFN layers. 0: round_up(8H/3, moe.multiple_of).")));
  f.push_back(structural(field("model.tie_embeddings", &C::model, &ModelConfig::tie_embeddings,
                    "Use the token embedding (V, H) as the LM head too (no separate head tensor).")));
  f.push_back(structural(field("model.norm_eps", &C::model, &ModelConfig::norm_eps, "RMSNorm epsilon.")));
  f.push_back(field("model.init_std", &C::model, &ModelConfig::init_std,
                    "Standard deviation of the normal initialisation of weight matrices (output projections are "
                    "scaled by 1/sqrt(2 * layers))."));
  // moe
  f.push_back(structural(field("moe.num_experts", &C::moe, &MoeConfig::num_experts,
                    "Routed experts E per MoE layer; must be divisible by parallel.ep. 0: every layer is a dense "
                    "SwiGLU FFN.")));
  f.push_back(structural(field("moe.first_dense_layers", &C::moe, &MoeConfig::first_dense_layers,
                    "The first this many layers have a dense FFN instead of MoE (DeepSeek).")));
  f.push_back(structural(field("moe.every", &C::moe, &MoeConfig::every,
                    "After the first dense layers, every this-many-th layer is MoE (layer l is MoE when "
                    "(l - first_dense_layers) % every == 0); the others are dense.")));
  f.push_back(field("moe.top_k", &C::moe, &MoeConfig::top_k, "Experts each token is routed to (1 <= top_k <= num_experts)."));
  f.push_back(field("moe.capacity_factor", &C::moe, &MoeConfig::capacity_factor,
                    "GShard capacity per expert and capacity group of G tokens: C = min(G, max(min_capacity, "
                    "ceil(top_k * G * capacity_factor / num_experts))), at least 1, the ceiling forgiving a "
                    "relative 1e-12 of rounding (docs/ARCHITECTURE.md, MoE FFN step 5). A value <= 0 means "
                    "dropless: every assignment is sent, with variable-size exchanges."));
  f.push_back(field("moe.min_capacity", &C::moe, &MoeConfig::min_capacity,
                    "Lower bound on the capacity C (capped at group_size, which no expert can exceed)."));
  f.push_back(field("moe.group_size", &C::moe, &MoeConfig::group_size,
                    "Tokens per capacity group G; must divide the tokens of a rank. 0: all tokens of a rank form "
                    "one group. Fixing it makes results independent of the number of ranks."));
  f.push_back(structural(field("moe.num_shared_experts", &C::moe, &MoeConfig::num_shared_experts,
                    "DeepSeekMoE shared experts: see every local token, are replicated on every rank, never cross "
                    "the network.")));
  f.push_back(structural(choice("moe.expert_type", &C::moe, &MoeConfig::expert_type,
                     {{"swiglu", ExpertType::kSwiGLU}, {"gelu", ExpertType::kGelu}, {"relu", ExpertType::kRelu}},
                     "Expert FFN: swiglu is W_down(silu(W_gate x) * W_up x); gelu and relu are the plain "
                     "two-layer FFN W_down(act(W_up x)). No biases.")));
  f.push_back(structural(field("moe.ffn_hidden", &C::moe, &MoeConfig::ffn_hidden,
                    "Mid size F of a routed expert. 0: round_up(8H/3, multiple_of) for swiglu, 4H otherwise.")));
  f.push_back(structural(field("moe.shared_ffn_hidden", &C::moe, &MoeConfig::shared_ffn_hidden,
                    "Mid size of each shared expert. 0: the same as the routed experts.")));
  f.push_back(structural(
      field("moe.multiple_of", &C::moe, &MoeConfig::multiple_of, "Rounding multiple of the default mid size.")));
  f.push_back(choice("moe.score", &C::moe, &MoeConfig::score,
                     {{"softmax", ScoreFn::kSoftmax}, {"sigmoid", ScoreFn::kSigmoid}},
                     "Router scores s from logits u = W_r x: softmax over experts, or per-expert sigmoid "
                     "(DeepSeek-V3)."));
  f.push_back(field("moe.normalize_topk", &C::moe, &MoeConfig::normalize_topk,
                    "Renormalise the selected scores of a token to sum to 1 to form its gate values."));
  f.push_back(field("moe.router_jitter", &C::moe, &MoeConfig::router_jitter,
                    "Switch-style jitter: during training the router input is multiplied by U(1 - eps, 1 + eps). "
                    "0: off."));
  f.push_back(choice("moe.priority", &C::moe, &MoeConfig::priority,
                     {{"token", Priority::kToken}, {"batch", Priority::kBatch}},
                     "Order in which a group's tokens claim expert slots within one choice rank: token order, or "
                     "batch-prioritised by top-1 score (V-MoE). Every 1st choice always comes before any 2nd."));
  f.push_back(field("moe.random_routing", &C::moe, &MoeConfig::random_routing,
                    "GShard random routing: the 2nd choice is kept only if 2 * g2 / (g1 + g2) > U(0, 1). Needs "
                    "top_k = 2."));
  f.push_back(choice("moe.router_grad", &C::moe, &MoeConfig::router_grad,
                     {{"exact", RouterGrad::kExact},
                      {"straight_through", RouterGrad::kStraightThrough},
                      {"gumbel", RouterGrad::kGumbel}},
                     "Router gradient: exact (through the selected gate values), straight_through (hard 1 or 1/k "
                     "gates forward, soft-gate gradient backward), gumbel (top-k over softmax((u + g) / tau), "
                     "softmax scores only)."));
  f.push_back(field("moe.gumbel_tau", &C::moe, &MoeConfig::gumbel_tau, "Gumbel-softmax temperature tau (> 0)."));
  f.push_back(field("moe.gumbel_hard", &C::moe, &MoeConfig::gumbel_hard,
                    "Gumbel-softmax with hard gates forward and soft gradients backward."));
  f.push_back(field("moe.aux_loss_coef", &C::moe, &MoeConfig::aux_loss_coef,
                    "alpha of the Switch load-balance loss alpha * E * sum_i f_i P_i, with f and P over the global "
                    "batch. 0: off."));
  f.push_back(field("moe.z_loss_coef", &C::moe, &MoeConfig::z_loss_coef,
                    "beta of the ST-MoE router z-loss beta * mean_t logsumexp(u_t)^2. 0: off."));
  f.push_back(field("moe.bias_update_rate", &C::moe, &MoeConfig::bias_update_rate,
                    "gamma of DeepSeek-V3 loss-free balancing: after each step b_i += gamma * sign(mean load - "
                    "load_i), loads counted globally; b only affects expert selection. 0: off."));
  {
    ConfigField r;
    r.key = "moe.force_routing";
    r.type = "off | uniform | zipf:S | hot:F";
    r.doc = "Benchmarks and studies: each token's experts are drawn from a seeded distribution instead of the "
            "router's top-k (uniform; zipf:S, expert i weighted (i+1)^-S; hot:F, expert 0 takes a fraction F of "
            "1st choices), k distinct experts per token; gates are still the router's scores at the drawn "
            "experts, so the router trains. Metrics record the routing. off: the router chooses.";
    r.sweep = true;
    r.set = [](Config& c, const std::string& text) { c.moe.force_routing = parse_forced_routing(text); };
    r.get = [](const Config& c) { return forced_routing_name(c.moe.force_routing); };
    f.push_back(r);
  }
  // train
  f.push_back(field("train.steps", &C::train, &TrainConfig::steps, "Optimizer steps to run (the final step number)."));
  f.push_back(structural(field("train.seed", &C::train, &TrainConfig::seed,
                    "Seed of every random stream: initialisation, synthetic data, jitter, gumbel noise, random "
                    "routing, attention dropout, the sample printed after training.")));
  f.push_back(field("train.batch_size", &C::train, &TrainConfig::batch_size,
                    "Global batch in sequences per step, split evenly over the ranks."));
  f.push_back(structural(choice("train.optimizer", &C::train, &TrainConfig::optimizer,
                     {{"adamw", OptimizerType::kAdamW}, {"sgd", OptimizerType::kSgd}},
                     "AdamW with decoupled weight decay, or plain SGD.")));
  f.push_back(field("train.lr", &C::train, &TrainConfig::lr, "Peak learning rate, reached after warm-up."));
  f.push_back(field("train.min_lr", &C::train, &TrainConfig::min_lr, "Learning rate at the end of the cosine decay."));
  f.push_back(field("train.warmup_steps", &C::train, &TrainConfig::warmup_steps, "Linear warm-up steps."));
  f.push_back(field("train.beta1", &C::train, &TrainConfig::beta1, "AdamW beta1."));
  f.push_back(field("train.beta2", &C::train, &TrainConfig::beta2, "AdamW beta2."));
  f.push_back(field("train.eps", &C::train, &TrainConfig::eps, "AdamW epsilon."));
  f.push_back(field("train.weight_decay", &C::train, &TrainConfig::weight_decay,
                    "Decoupled weight decay of weight matrices (not of norms or the loss-free bias)."));
  f.push_back(field("train.grad_clip", &C::train, &TrainConfig::grad_clip,
                    "Clip the global gradient norm (over all ranks' shards) to this value. 0: off."));
  f.push_back(field("train.log_every", &C::train, &TrainConfig::log_every, "Print a progress line every this many steps."));
  f.push_back(field("train.metrics_path", &C::train, &TrainConfig::metrics_path,
                    "One JSON line per step goes to this file, written by rank 0; the run's start and resume events go to "
                    "<stem>.events.jsonl beside it. A resume cuts both back to the resumed step. Empty: none."));
  f.push_back(field("train.checkpoint_dir", &C::train, &TrainConfig::checkpoint_dir,
                    "Directory for checkpoints (step_NNNNNNNN/ subdirectories). Empty: no checkpoints."));
  f.push_back(field("train.checkpoint_every", &C::train, &TrainConfig::checkpoint_every,
                    "Write a checkpoint every this many steps, and after the last step. 0: only after the last step."));
  f.push_back(field("train.resume", &C::train, &TrainConfig::resume,
                    "Resume from a checkpoint: 'auto' (the latest in checkpoint_dir, if any) or a step directory. "
                    "Empty: start fresh."));
  f.push_back(field("train.overwrite", &C::train, &TrainConfig::overwrite,
                    "Start fresh in a train.checkpoint_dir that already holds checkpoints, deleting them (without it "
                    "such a run refuses: resume with train.resume=auto instead)."));
  f.push_back(field("train.keep_checkpoints", &C::train, &TrainConfig::keep_checkpoints,
                    "Complete checkpoints kept in train.checkpoint_dir; older ones are removed after each save. 0: "
                    "keep all."));
  f.push_back(field("train.eval_every", &C::train, &TrainConfig::eval_every,
                    "Compute the validation loss every this many steps and after the last step (needs "
                    "data.val_path). 0: never."));
  f.push_back(field("train.eval_tokens", &C::train, &TrainConfig::eval_tokens,
                    "Validation tokens per evaluation: the first eval_tokens / model.seq_len sequences of the "
                    "validation file (at least one). 0: every sequence the file holds."));
  f.push_back(field("train.sample_tokens", &C::train, &TrainConfig::sample_tokens,
                    "After the last step, rank 0 reads the final checkpoint and prints this many sampled tokens "
                    "(byte-level models; none when train.checkpoint_dir is empty). 0: no sample."));
  f.push_back(field("train.sample_prompt", &C::train, &TrainConfig::sample_prompt,
                    "Prompt of the sample printed after training."));
  // data
  f.push_back(choice("data.source", &C::data, &DataConfig::source,
                     {{"synthetic", DataSource::kSynthetic}, {"file", DataSource::kFile}},
                     "synthetic: a deterministic Markov chain over the vocabulary, keyed by train.seed; file: "
                     "the token file data.path."));
  f.push_back(field("data.path", &C::data, &DataConfig::path,
                    "Training token file for data.source = file: ours (MOETOK01, written by moe_data) or an "
                    "llm.c shard (magic 20240520, uint16 tokens). Under a directory named brown it is prepared "
                    "from the Brown corpus on first use by launch/moe run."));
  f.push_back(field("data.val_path", &C::data, &DataConfig::val_path,
                    "Validation token file (same formats) for train.eval_every, launch/moe eval and the "
                    "baselines. Empty: no validation."));
  // runtime
  f.push_back(choice("runtime.device", &C::runtime, &RuntimeConfig::device,
                     {{"cpu", Device::kCpu}, {"cuda", Device::kCuda}},
                     "Where tensors live and ops run: the CPU backend (BLAS), or one CUDA GPU per rank (rank i "
                     "uses local device i mod the number of devices)."));
  f.push_back(structural(choice("runtime.dtype", &C::runtime, &RuntimeConfig::dtype,
                     {{"float32", DType::kF32}, {"float64", DType::kF64}},
                     "Type of parameters (master weights), optimizer state and activations. float64 is for the "
                     "CPU backend (gradient checks).")));
  f.push_back(choice("runtime.precision", &C::runtime, &RuntimeConfig::precision,
                     {{"fp32", Precision::kFp32}, {"bf16", Precision::kBf16}},
                     "Expert GEMMs (routed and shared): fp32, or bf16 weights and activations with fp32 "
                     "accumulation (fp32 master weights and optimizer state; the router stays fp32). bf16 needs "
                     "runtime.device = cuda."));
  f.push_back(choice("runtime.comm", &C::runtime, &RuntimeConfig::comm,
                     {{"auto", CommKind::kAuto}, {"nccl", CommKind::kNccl}, {"mpi", CommKind::kMpi}},
                     "Communicator for tensors: auto is nccl when runtime.device = cuda, else mpi (mpi moves host "
                     "memory only, nccl device memory only). Host values (counts, loss sums, strings) always go "
                     "over MPI."));
  f.push_back(field("runtime.comm_timeout_s", &C::runtime, &RuntimeConfig::comm_timeout_s,
                    "Seconds a rank waits for its peers in any collective (MPI or NCCL) before the job aborts "
                    "with one line naming the operation, the group and the step (a dead or stuck peer). 0: wait "
                    "forever."));
  f.push_back(choice("runtime.dispatch_layout", &C::runtime, &RuntimeConfig::dispatch_layout,
                     {{"auto", DispatchLayout::kAuto}, {"compact", DispatchLayout::kCompact},
                      {"padded", DispatchLayout::kPadded}},
                     "Expert input rows with a capacity: compact sends and computes only the real rows (fewer "
                     "bytes and FLOPs; the host reads the fill counts); padded sends every slot and keeps it "
                     "through the experts (no host synchronisation). auto: compact on the CPU, padded on GPUs. "
                     "Dropless routing is always compact."));
  f.push_back(choice("runtime.expert_gemm", &C::runtime, &RuntimeConfig::expert_gemm,
                     {{"grouped", GroupedGemmPath::kGrouped}, {"streams", GroupedGemmPath::kStreams}},
                     "How the CUDA backend runs the expert GEMMs (one GEMM per expert): grouped is one "
                     "cublasGemmGroupedBatchedEx call per weight; streams is one cublasGemmEx per expert, spread over "
                     "4 CUDA streams (bf16 weight gradients then go straight into the fp32 buffers; weight "
                     "gradients of equal groups, as in the padded layout, are one strided-batched GEMM either way). "
                     "The same numbers up to the summation order, to compare in one moe_bench layer run. CUDA only."));
  f.push_back(field("runtime.threads", &C::runtime, &RuntimeConfig::threads, "BLAS threads per rank."));
  return f;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

const ConfigField& config_field(const std::string& key) {
  for (const auto& f : config_fields())
    if (f.key == key) return f;
  std::string best;
  size_t best_d = 4;
  for (const auto& f : config_fields()) {
    size_t d = edit_distance(key, f.key);
    if (d < best_d) best_d = d, best = f.key;
  }
  throw ConfigError(key, "unknown key" + (best.empty() ? std::string() : " (did you mean " + best + "?)"));
}

namespace {

std::string node_kind(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Null: return "nothing";
    default: return "a scalar";
  }
}

void apply(Config& c, const std::string& key, const std::string& value, const std::string& source,
           ConfigSources* sources) {
  config_field(key).set(c, value);
  if (sources) (*sources)[key] = source;
}

}  // namespace

ForcedRouting parse_forced_routing(const std::string& text) {
  const char* key = "moe.force_routing";
  ForcedRouting f;
  if (text == "off") return f;
  if (text == "uniform") {
    f.kind = ForcedKind::kUniform;
    return f;
  }
  const size_t colon = text.find(':');
  const std::string kind = text.substr(0, colon);
  if (colon == std::string::npos || (kind != "zipf" && kind != "hot")) {
    throw ConfigError(key, "expected off | uniform | zipf:S | hot:F, got " + quoted(text));
  }
  f.kind = kind == "zipf" ? ForcedKind::kZipf : ForcedKind::kHot;
  f.param = parse_double(key, text.substr(colon + 1));
  if (f.kind == ForcedKind::kZipf && !(std::isfinite(f.param) && f.param >= 0)) {
    throw ConfigError(key, "the zipf exponent S must be a finite number >= 0, got " + quoted(text));
  }
  if (f.kind == ForcedKind::kHot && !(f.param > 0 && f.param < 1)) {
    throw ConfigError(key, "the hot fraction F must be in (0, 1), got " + quoted(text));
  }
  return f;
}

std::string forced_routing_name(const ForcedRouting& f) {
  switch (f.kind) {
    case ForcedKind::kUniform: return "uniform";
    case ForcedKind::kZipf: return "zipf:" + format_double(f.param);
    case ForcedKind::kHot: return "hot:" + format_double(f.param);
    default: return "off";
  }
}

const std::vector<ConfigField>& config_fields() {
  static const std::vector<ConfigField> fields = build_fields();
  return fields;
}

Config parse_config(const std::string& yaml_text, const std::string& yaml_name,
                    const std::vector<std::string>& overrides, ConfigSources* sources) {
  Config c;
  if (sources) {
    sources->clear();
    for (const auto& f : config_fields()) (*sources)[f.key] = "default";
  }
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    throw ConfigError("", detail::concat(yaml_name, ":", e.mark.line + 1, ":", e.mark.column + 1,
                                         ": not valid YAML: ", e.msg));
  }
  if (root && !root.IsNull()) {
    if (!root.IsMap()) throw ConfigError("", yaml_name + ": expected a mapping of sections at the top level");
    std::set<std::string> seen;  // yaml-cpp keeps both of two equal keys: a duplicate is an error here
    for (const auto& section : root) {
      if (!section.first.IsScalar()) throw ConfigError("", yaml_name + ": a section name must be a plain word");
      std::string name = section.first.as<std::string>();
      if (!section.second.IsMap()) {
        // A scalar at the top level is a key without its section, or an unknown section.
        throw ConfigError(name, "expected a section (a mapping of keys), got " + node_kind(section.second) +
                                    " in " + yaml_name);
      }
      for (const auto& item : section.second) {
        if (!item.first.IsScalar()) throw ConfigError(name, "a key must be a plain word in " + yaml_name);
        std::string key = name + "." + item.first.as<std::string>();
        config_field(key);  // unknown keys first, before any type complaint
        if (!seen.insert(key).second) throw ConfigError(key, "given twice in " + yaml_name);
        if (!item.second.IsScalar()) {
          throw ConfigError(key, "expected a single value, got " + node_kind(item.second) + " in " + yaml_name);
        }
        apply(c, key, item.second.Scalar(), yaml_name, sources);
      }
    }
  }
  for (const std::string& o : overrides) {
    size_t eq = o.find('=');
    if (eq == std::string::npos) throw ConfigError(o, "override needs the form --section.key=value");
    apply(c, o.substr(0, eq), o.substr(eq + 1), "command line", sources);
  }
  return c;
}

int expert_ffn_hidden(const Config& c) {
  if (c.moe.ffn_hidden > 0) return c.moe.ffn_hidden;
  if (c.moe.expert_type != ExpertType::kSwiGLU) return 4 * c.model.hidden;
  int m = std::max(1, c.moe.multiple_of);
  int f = (8 * c.model.hidden + 2) / 3;  // ceil(8H/3)
  return ((f + m - 1) / m) * m;
}

int dense_ffn_hidden(const Config& c) {
  if (c.model.ffn_hidden > 0) return c.model.ffn_hidden;
  int m = std::max(1, c.moe.multiple_of);
  int f = (8 * c.model.hidden + 2) / 3;  // ceil(8H/3)
  return ((f + m - 1) / m) * m;
}

int head_dim(const Config& c) { return c.model.heads > 0 ? c.model.hidden / c.model.heads : 0; }

int kv_heads(const Config& c) { return c.model.kv_heads > 0 ? c.model.kv_heads : c.model.heads; }

bool is_moe_layer(const Config& c, int layer) {
  const MoeConfig& m = c.moe;
  return m.num_experts > 0 && layer >= m.first_dense_layers && (layer - m.first_dense_layers) % std::max(1, m.every) == 0;
}

int num_moe_layers(const Config& c) {
  int n = 0;
  for (int l = 0; l < c.model.layers; ++l) n += is_moe_layer(c, l);
  return n;
}

int shared_ffn_hidden(const Config& c) {
  return c.moe.shared_ffn_hidden > 0 ? c.moe.shared_ffn_hidden : expert_ffn_hidden(c);
}

int64_t moe_capacity(const MoeConfig& moe, int64_t group_tokens) {
  if (moe.capacity_factor <= 0) return 0;  // dropless
  const double exact =
      static_cast<double>(moe.top_k) * static_cast<double>(group_tokens) * moe.capacity_factor / moe.num_experts;
  // ceil, forgiving the last-bit error of the product (k * S / E * cf = 1280.0000000000002 gives 1280)
  int64_t c = static_cast<int64_t>(std::ceil(exact * (1.0 - 1e-12)));
  c = std::max<int64_t>(c, moe.min_capacity);
  return std::max<int64_t>(1, std::min<int64_t>(c, group_tokens));  // an expert gets at most G per group
}

int64_t local_tokens(const Config& c, int world_size) {
  return int64_t{c.train.batch_size} / world_size * c.model.seq_len;
}

namespace {

void need(bool ok, const char* key, const std::string& msg) {
  if (!ok) throw ConfigError(key, msg);
}
void finite(double v, const char* key) { need(std::isfinite(v), key, "must be a finite number (got " + format_double(v) + ")"); }
template <typename V>
std::string str(V v) {
  return detail::concat(v);
}

void validate_model(const Config& c) {
  need(c.model.hidden >= 1, "model.hidden", "must be >= 1");
  need(c.model.layers >= 1, "model.layers", "must be >= 1");
  need(c.model.vocab_size >= 2 && c.model.vocab_size <= 65536, "model.vocab_size", "must be in [2, 65536]");
  need(c.model.seq_len >= 1, "model.seq_len", "must be >= 1");
  need(c.model.heads >= 1, "model.heads", "must be >= 1");
  need(c.model.hidden % c.model.heads == 0, "model.heads",
       "must divide model.hidden (" + str(c.model.hidden) + " is not divisible by " + str(c.model.heads) + ")");
  need(head_dim(c) % 2 == 0, "model.heads",
       "the head size model.hidden / model.heads must be even for rotary embeddings (got " + str(head_dim(c)) + ")");
  need(c.model.kv_heads >= 0, "model.kv_heads", "must be >= 0");
  need(c.model.heads % kv_heads(c) == 0, "model.kv_heads",
       "must divide model.heads (" + str(c.model.heads) + " heads, " + str(kv_heads(c)) + " kv heads)");
  finite(c.model.rope_base, "model.rope_base");
  need(c.model.rope_base > 1, "model.rope_base", "must be > 1");
  finite(c.model.attn_dropout, "model.attn_dropout");
  need(c.model.attn_dropout >= 0 && c.model.attn_dropout < 1, "model.attn_dropout", "must be in [0, 1)");
  need(c.model.ffn_hidden >= 0, "model.ffn_hidden", "must be >= 0");
  finite(c.model.norm_eps, "model.norm_eps");
  need(c.model.norm_eps > 0, "model.norm_eps", "must be > 0");
  finite(c.model.init_std, "model.init_std");
  need(c.model.init_std >= 0, "model.init_std", "must be >= 0");
}

void validate_moe(const Config& c) {
  const MoeConfig& m = c.moe;
  need(m.num_experts >= 0, "moe.num_experts", "must be >= 0 (got " + str(m.num_experts) + "; 0 means dense)");
  need(m.num_experts % c.parallel.ep == 0, "moe.num_experts",
       "must be divisible by parallel.ep (" + str(m.num_experts) + " experts, ep = " + str(c.parallel.ep) + ")");
  need(m.first_dense_layers >= 0, "moe.first_dense_layers", "must be >= 0");
  need(m.every >= 1, "moe.every", "must be >= 1");
  need(m.top_k >= 1, "moe.top_k", "must be >= 1 (got " + str(m.top_k) + ")");
  need(m.num_experts == 0 || m.top_k <= m.num_experts, "moe.top_k",
       "must be <= moe.num_experts (got " + str(m.top_k) + " > " + str(m.num_experts) + ")");
  finite(m.capacity_factor, "moe.capacity_factor");
  need(m.min_capacity >= 0, "moe.min_capacity", "must be >= 0");
  need(m.group_size >= 0, "moe.group_size", "must be >= 0");
  need(m.num_shared_experts >= 0, "moe.num_shared_experts", "must be >= 0");
  need(m.ffn_hidden >= 0, "moe.ffn_hidden", "must be >= 0");
  need(m.shared_ffn_hidden >= 0, "moe.shared_ffn_hidden", "must be >= 0");
  need(m.multiple_of >= 1, "moe.multiple_of", "must be >= 1");
  finite(m.router_jitter, "moe.router_jitter");
  need(m.router_jitter >= 0 && m.router_jitter < 1, "moe.router_jitter", "must be in [0, 1)");
  need(!m.random_routing || m.top_k == 2, "moe.random_routing",
       "needs moe.top_k = 2 (got top_k = " + str(m.top_k) + ")");
  finite(m.gumbel_tau, "moe.gumbel_tau");
  need(m.gumbel_tau > 0, "moe.gumbel_tau", "must be > 0");
  need(m.router_grad != RouterGrad::kGumbel || m.score == ScoreFn::kSoftmax, "moe.router_grad",
       "gumbel needs moe.score = softmax");
  need(!m.gumbel_hard || m.router_grad == RouterGrad::kGumbel, "moe.gumbel_hard", "needs moe.router_grad = gumbel");
  finite(m.aux_loss_coef, "moe.aux_loss_coef");
  need(m.aux_loss_coef >= 0, "moe.aux_loss_coef", "must be >= 0");
  finite(m.z_loss_coef, "moe.z_loss_coef");
  need(m.z_loss_coef >= 0, "moe.z_loss_coef", "must be >= 0");
  finite(m.bias_update_rate, "moe.bias_update_rate");
  need(m.bias_update_rate >= 0, "moe.bias_update_rate", "must be >= 0");
}

void validate_train(const Config& c, int world) {
  const TrainConfig& t = c.train;
  const MoeConfig& m = c.moe;
  need(t.steps >= 0, "train.steps", "must be >= 0");
  need(t.batch_size >= 1, "train.batch_size", "must be >= 1");
  need(t.batch_size % world == 0, "train.batch_size",
       "must be divisible by the number of ranks (" + str(t.batch_size) + " sequences, " + str(world) + " ranks)");
  int64_t tokens = local_tokens(c, world);
  need(m.group_size == 0 || tokens % m.group_size == 0, "moe.group_size",
       "must divide the tokens of a rank (" + str(tokens) + " = batch_size / ranks * seq_len, group_size = " +
           str(m.group_size) + ")");
  for (auto [v, key] : {std::pair{t.lr, "train.lr"}, {t.min_lr, "train.min_lr"}, {t.weight_decay, "train.weight_decay"},
                        {t.grad_clip, "train.grad_clip"}, {t.eps, "train.eps"}}) {
    finite(v, key);
    need(v >= 0, key, "must be >= 0");
  }
  for (auto [v, key] : {std::pair{t.beta1, "train.beta1"}, {t.beta2, "train.beta2"}}) {
    finite(v, key);
    need(v >= 0 && v < 1, key, "must be in [0, 1)");
  }
  need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0");
  need(t.log_every >= 1, "train.log_every", "must be >= 1");
  need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0");
  need(t.eval_every >= 0, "train.eval_every", "must be >= 0");
  need(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0");
  need(t.eps > 0, "train.eps", "must be > 0 (it keeps AdamW's division finite)");
  need(t.eval_tokens >= 0, "train.eval_tokens", "must be >= 0");
  need(t.eval_every == 0 || !c.data.val_path.empty(), "train.eval_every", "needs data.val_path (a validation split)");
  need(t.sample_tokens >= 0, "train.sample_tokens", "must be >= 0");
  need(t.sample_tokens == 0 || c.model.vocab_size <= 256, "train.sample_tokens",
       "text samples need a byte-level model (model.vocab_size <= 256)");
  need(t.sample_tokens == 0 || !t.sample_prompt.empty(), "train.sample_prompt", "must not be empty");
  for (unsigned char byte : t.sample_prompt) {
    need(t.sample_tokens == 0 || byte < c.model.vocab_size, "train.sample_prompt",
         "byte " + str(int{byte}) + " is outside model.vocab_size = " + str(c.model.vocab_size));
  }
  need(t.resume.empty() || !t.checkpoint_dir.empty() || t.resume != "auto", "train.resume",
       "'auto' needs train.checkpoint_dir");
  need(c.data.source != DataSource::kFile || !c.data.path.empty(), "data.path", "is required when data.source = file");
}

void validate_runtime(const Config& c) {
  const MoeConfig& m = c.moe;
  need(c.runtime.threads >= 1, "runtime.threads", "must be >= 1");
  const RuntimeConfig& r = c.runtime;
  bool cuda = r.device == Device::kCuda;
  need(!cuda || r.dtype == DType::kF32, "runtime.dtype", "must be float32 with runtime.device = cuda");
  need(cuda || r.precision == Precision::kFp32, "runtime.precision", "bf16 needs runtime.device = cuda");
  need(cuda || r.comm != CommKind::kNccl, "runtime.comm", "nccl needs runtime.device = cuda");
  need(cuda || r.expert_gemm == GroupedGemmPath::kGrouped, "runtime.expert_gemm", "streams needs runtime.device = cuda");
  need(!cuda || r.comm != CommKind::kMpi, "runtime.comm",
       "mpi moves host buffers only; runtime.device = cuda needs nccl (or auto)");
  need(!cuda || m.top_k <= 16, "moe.top_k", "must be <= 16 with runtime.device = cuda");
  if (r.precision == Precision::kBf16) {
    // cuBLAS needs bf16 GEMM operands 16-byte aligned: rows of a multiple of 8 elements
    need(c.model.hidden % 8 == 0, "model.hidden", "must be a multiple of 8 with runtime.precision = bf16");
    need(expert_ffn_hidden(c) % 8 == 0, "moe.ffn_hidden", "must be a multiple of 8 with runtime.precision = bf16");
    need(dense_ffn_hidden(c) % 8 == 0, "model.ffn_hidden", "must be a multiple of 8 with runtime.precision = bf16");
    need(shared_ffn_hidden(c) % 8 == 0, "moe.shared_ffn_hidden",
         "must be a multiple of 8 with runtime.precision = bf16");
  }
  finite(r.comm_timeout_s, "runtime.comm_timeout_s");
  need(r.comm_timeout_s >= 0, "runtime.comm_timeout_s", "must be >= 0");
}

}  // namespace

void validate_config(const Config& c, int world) {
  need(c.parallel.ep >= 1, "parallel.ep", "must be >= 1 (got " + str(c.parallel.ep) + ")");
  need(world % c.parallel.ep == 0, "parallel.ep",
       "must divide the number of ranks (" + str(world) + " ranks, ep = " + str(c.parallel.ep) + ")");
  validate_model(c);
  validate_moe(c);
  validate_train(c, world);
  validate_runtime(c);
}

int largest_ep(const Config& config, int ranks) {
  return config.moe.num_experts > 0 ? std::gcd(ranks, config.moe.num_experts) : 1;
}

Layout fit_layout(const Config& config, int available) {
  for (int ranks = std::max(1, available); ranks >= 1; --ranks) {
    Config c = config;
    c.parallel.ep = largest_ep(c, ranks);
    try {
      validate_config(c, ranks);
    } catch (const ConfigError&) {
      if (ranks == 1) throw;  // the configuration fits no layout at all: say why
      continue;
    }
    return Layout{ranks, c.parallel.ep};
  }
  return Layout{};
}

DispatchLayout dispatch_layout(const Config& c) {
  if (c.runtime.dispatch_layout != DispatchLayout::kAuto) return c.runtime.dispatch_layout;
  return c.runtime.device == Device::kCpu ? DispatchLayout::kCompact : DispatchLayout::kPadded;
}

bool use_nccl(const Config& c) {
  switch (c.runtime.comm) {
    case CommKind::kNccl: return true;
    case CommKind::kMpi: return false;
    case CommKind::kAuto: break;
  }
  return c.runtime.device == Device::kCuda;
}

std::vector<std::pair<std::string, std::string>> config_values(const Config& c) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& f : config_fields()) out.emplace_back(f.key, f.get(c));
  return out;
}

std::string config_table(const Config& c, const ConfigSources& sources) {
  size_t kw = 0, vw = 0;
  auto values = config_values(c);
  for (const auto& [k, v] : values) kw = std::max(kw, k.size()), vw = std::max(vw, v.empty() ? 2 : v.size());
  std::ostringstream out;
  for (const auto& [k, v] : values) {
    auto it = sources.find(k);
    std::string src = it == sources.end() ? "default" : it->second;
    std::string shown = v.empty() ? "''" : v;
    out << "  " << k << std::string(kw - k.size() + 2, ' ') << shown;
    if (src != "default") out << std::string(vw - shown.size() + 2, ' ') << "(" << src << ")";
    out << "\n";
  }
  return out.str();
}

std::string config_reference_markdown() {
  Config defaults;
  std::ostringstream out;
  out << "# Configuration reference\n\n"
      << "<!-- Generated by `build/moe_train --config-reference` from the field table in config/config.cc. "
         "Do not edit by hand: tests/unit/config_test.cc fails when this file and the table differ. -->\n\n"
      << "A run is configured by a YAML file of sections (`parallel`, `model`, `moe`, `train`, `data`, "
         "`runtime`), each a mapping of the keys below, and by command-line overrides "
         "`--section.key=value` (or `--section.key value`), applied after the file. An unknown key, a value of "
         "the wrong type, or a value out of range stops the run before any work with one line naming the key. "
         "The resolved configuration is printed once at start-up. Keys marked *sweep* may take a comma "
         "list (`--moe.top_k=1,2`) in `moe_bench layer` and in studies, or a YAML list in a study file: one "
         "run per combination (docs/STUDIES.md). Keys marked *structural* fix the shapes or meaning of the "
         "tensors a checkpoint stores: resuming with another value is an error naming the key.\n\n"
      << "```yaml\nmoe:\n  num_experts: 8\n  top_k: 2\ntrain:\n  steps: 300\n```\n";
  std::string section;
  for (const auto& f : config_fields()) {
    std::string s = f.key.substr(0, f.key.find('.'));
    if (s != section) {
      section = s;
      out << "\n## " << section
          << "\n\n| key | type | default | sweep | structural | meaning |\n|---|---|---|---|---|---|\n";
    }
    std::string def = f.get(defaults);
    std::string type = f.type;
    for (size_t pos = 0; (pos = type.find('|', pos)) != std::string::npos; pos += 2) type.replace(pos, 1, "\\|");
    out << "| `" << f.key << "` | " << type << " | " << (def.empty() ? "''" : "`" + def + "`") << " | "
        << (f.sweep ? "sweep" : "") << " | " << (f.structural ? "structural" : "") << " | " << f.doc << " |\n";
  }
  return out.str();
}

}  // namespace moe
