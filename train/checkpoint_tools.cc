// Offline checkpoint tools: reshard, export, import, upcycle.
#include "train/checkpoint_tools.h"

#include <sys/stat.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <map>

#include "comm/mpi/mpi_communicator.h"
#include "base/json.h"
#include "base/log.h"
#include "runtime/rng.h"
#include "train/checkpoint.h"
#include "train/safetensors.h"

namespace moe {
namespace {

constexpr const char* kExportFormat = "moe-export";
constexpr int kExportVersion = 1;

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

void make_output_dir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir)) {
    throw InputError(dir, "cannot create the output directory" + (ec ? ": " + ec.message() : std::string()), "--out");
  }
}

// out_dir must not hold a checkpoint yet: nothing is overwritten.
void require_fresh_checkpoint_dir(const std::string& out_dir) {
  if (out_dir.empty()) throw ConfigError("--out", "give an output directory");
  if (exists(out_dir + "/latest")) {
    throw InputError(out_dir, "already holds checkpoints; choose another --out (nothing is overwritten)");
  }
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(out_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step_", 0) != 0) continue;
    throw InputError(out_dir, "already holds " + name +
                                  (exists(e.path().string() + "/manifest.json")
                                       ? std::string()
                                       : " (incomplete, no manifest.json: an interrupted run left it; remove it)") +
                                  "; choose another --out (nothing is overwritten)");
  }
  make_output_dir(out_dir);
}

// The global expert index of a stored tensor ("[optim.m.]layers.3.moe.experts.5.w_up" -> 5), or -1.
int64_t expert_of(const std::string& name) {
  const std::string mark = ".moe.experts.";
  const size_t at = name.find(mark);
  if (at == std::string::npos) return -1;
  const size_t begin = at + mark.size(), end = name.find('.', begin);
  if (end == std::string::npos || end == begin) return -1;
  const std::string digits = name.substr(begin, end - begin);
  if (digits.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoll(digits);
}

// "layers.3.moe.experts.5.w_up" -> "layers.3.moe.experts.w_up" (the stacked name of docs/ARCHITECTURE.md).
std::string stacked_name(const std::string& name) {
  const std::string mark = ".moe.experts.";
  const size_t begin = name.find(mark) + mark.size();
  return name.substr(0, begin) + name.substr(name.find('.', begin) + 1);
}

std::vector<double> to_doubles(const Tensor& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  switch (t.dtype()) {
    case DType::kF32: std::copy(t.data<float>(), t.data<float>() + t.numel(), out.begin()); break;
    case DType::kF64: std::copy(t.data<double>(), t.data<double>() + t.numel(), out.begin()); break;
    case DType::kBF16:
      for (int64_t i = 0; i < t.numel(); ++i) out[i] = bf16_to_float(static_cast<const uint16_t*>(t.raw())[i]);
      break;
    default: throw InputError(dtype_name(t.dtype()), "a parameter tensor must be F32, F64 or BF16");
  }
  return out;
}

// values rounded to `dtype` (to BF16 through float, round to nearest even).
Tensor from_doubles(const std::vector<double>& values, const Shape& shape, DType dtype) {
  Tensor t = host_tensor_uninitialized(shape, dtype);
  for (size_t i = 0; i < values.size(); ++i) {
    switch (dtype) {
      case DType::kF32: t.data<float>()[i] = static_cast<float>(values[i]); break;
      case DType::kF64: t.data<double>()[i] = values[i]; break;
      case DType::kBF16: static_cast<uint16_t*>(t.raw())[i] = float_to_bf16(static_cast<float>(values[i])); break;
      default: throw InternalError("from_doubles: unsupported dtype");
    }
  }
  return t;
}

Config stored_config(const std::vector<std::pair<std::string, std::string>>& values, const std::string& where,
                     const std::vector<std::string>& overrides = {}) {
  std::vector<std::string> kv;
  for (const auto& [k, v] : values) kv.push_back(k + "=" + v);
  kv.insert(kv.end(), overrides.begin(), overrides.end());
  return parse_config("", where, kv);
}


// A one-process model of `config` (every expert local) with a fresh optimizer, for import and upcycle:
// `fill` sets its parameters, then it is saved as out_dir/step_N.
template <typename Fill>
std::string write_new_checkpoint(Config config, const TrainingState& state, const std::string& out_dir,
                                 Backend& backend, Fill fill) {
  config.parallel.ep = 1;
  config.train.checkpoint_dir = out_dir;
  ProcessGroups self = make_process_groups(make_mpi_self(), 1);
  Transformer model(config, backend, self);
  Optimizer optimizer(config.train, backend, model.params());
  fill(model);
  model.params().values_changed();
  return save_checkpoint(out_dir, state, config, model, optimizer, self);
}

}  // namespace

std::string reshard_checkpoint(const std::string& step_dir, int ep, int dp, const std::string& out_dir) {
  const StoredCheckpoint src = open_checkpoint(step_dir);
  const int experts = stored_config(src.config, step_dir + "/manifest.json").moe.num_experts;
  if (ep < 1) throw ConfigError("--ep", "must be at least 1, got " + std::to_string(ep));
  if (dp < 1) throw ConfigError("--dp", "must be at least 1, got " + std::to_string(dp));
  if (experts == 0 && ep != 1) {
    throw ConfigError("--ep", "a dense model (moe.num_experts 0) has no experts to spread: only ep 1");
  }
  if (experts > 0 && experts % ep != 0) {
    throw ConfigError("--ep", "ep " + std::to_string(ep) + " does not divide moe.num_experts " + std::to_string(experts));
  }
  require_fresh_checkpoint_dir(out_dir);
  const int64_t per_file = experts / ep;
  const std::string dir = out_dir + "/" + checkpoint_step_name(src.step);
  make_output_dir(dir);
  std::vector<CheckpointFile> files;
  for (int r = 0; r < ep; ++r) {  // one file at a time: memory holds one file's tensors
    CheckpointFile f{checkpoint_rank_file(r), {}, {}};
    std::vector<TensorRecord> records;
    for (const std::string& name : src.tensors) {
      const int64_t e = expert_of(name);
      if ((e < 0 ? 0 : e / per_file) != r) continue;
      records.push_back(TensorRecord{name, src.read(name)});
      f.tensors.push_back(name);
    }
    f.written = write_safetensors(dir + "/" + f.name, records,
                                  {{"format", "moe-checkpoint"}, {"step", std::to_string(src.step)}});
    files.push_back(std::move(f));
    log_info("reshard: wrote " + dir + "/" + files.back().name + " (" + std::to_string(records.size()) + " tensors)");
  }
  CheckpointInfo info;
  info.step = src.step;
  info.next_sequence = src.next_sequence;
  info.optimizer_steps = src.optimizer_steps;
  if (int64_t{ep} * dp > (int64_t{1} << 30)) throw ConfigError("--dp", "ep x dp is too large");
  info.world_size = ep * dp;
  info.ep = ep;
  info.experts_per_file = per_file;
  info.config = src.config;
  for (auto& [k, v] : info.config) {
    if (k == "parallel.ep") v = std::to_string(ep);
  }
  info.origin = "reshard of " + step_dir + " (ep " + std::to_string(src.ep) + " -> " + std::to_string(ep) + ")";
  return commit_checkpoint(out_dir, info, files);
}

void export_checkpoint(const std::string& step_dir, const std::string& out_dir, DType dtype) {
  if (dtype != DType::kF32 && dtype != DType::kBF16) throw ConfigError("--dtype", "export writes fp32 or bf16");
  const StoredCheckpoint src = open_checkpoint(step_dir);
  const Config config = stored_config(src.config, step_dir + "/manifest.json");
  if (out_dir.empty()) throw ConfigError("--out", "give an output directory");
  if (exists(out_dir + "/model.safetensors") || exists(out_dir + "/config.json")) {
    throw InputError(out_dir, std::string("already holds ") +
                                  (exists(out_dir + "/config.json") ? "an export" : "an incomplete export (no config.json: remove it)") +
                                  "; choose another --out (nothing is overwritten)");
  }
  make_output_dir(out_dir);

  // Parameters in stored order, each routed expert tensor gathered into its stacked tensor.
  std::vector<std::string> order;
  std::map<std::string, std::vector<std::string>> parts;  // stacked name -> per-expert names by index
  const int64_t experts = config.moe.num_experts;
  for (const std::string& name : src.tensors) {
    if (name.rfind("optim.", 0) == 0) continue;
    const int64_t e = expert_of(name);
    if (e >= experts) {
      throw InputError(step_dir, "tensor " + name + " names an expert beyond moe.num_experts = " + std::to_string(experts),
                       "train.resume");
    }
    const std::string out = e < 0 ? name : stacked_name(name);
    auto& p = parts[out];
    if (p.empty()) {
      order.push_back(out);
      p.resize(static_cast<size_t>(e < 0 ? 1 : experts));
    }
    p[static_cast<size_t>(e < 0 ? 0 : e)] = name;
  }
  std::vector<TensorRecord> records;
  for (const std::string& out : order) {
    std::vector<double> values;
    Shape shape;
    for (const std::string& name : parts[out]) {
      if (name.empty()) throw InputError(step_dir, "checkpoint lacks an expert of " + out, "train.resume");
      Tensor t = src.read(name);
      shape = t.shape();
      std::vector<double> v = to_doubles(t);
      values.insert(values.end(), v.begin(), v.end());
    }
    if (expert_of(parts[out][0]) >= 0) shape.insert(shape.begin(), experts);
    records.push_back(TensorRecord{out, from_doubles(values, shape, dtype)});
  }
  write_safetensors(out_dir + "/model.safetensors", records,
                    {{"format", "pt"}, {"source", kExportFormat}, {"step", std::to_string(src.step)},
                     {"software", software_version()}});

  // config.json: the architecture (sizes resolved), then every key as stored, for import.
  const auto& m = config.model;
  const auto& moe = config.moe;
  std::vector<int64_t> moe_layers;
  for (int l = 0; l < m.layers; ++l) {
    if (is_moe_layer(config, l)) moe_layers.push_back(l);
  }
  std::map<std::string, std::string> value;  // every key, defaults filled in for keys older checkpoints lack
  for (const auto& [k, v] : config_values(config)) value[k] = v;
  JsonWriter j;
  j.begin_object();
  j.field("format", kExportFormat).field("format_version", kExportVersion).field("software", software_version());
  j.field("dtype", dtype == DType::kBF16 ? "bfloat16" : "float32");
  j.field("step", src.step).field("next_sequence", src.next_sequence);
  j.key("model").begin_object();
  j.field("vocab_size", m.vocab_size).field("hidden", m.hidden).field("layers", m.layers);
  j.field("heads", m.heads).field("kv_heads", kv_heads(config)).field("head_dim", head_dim(config));
  j.field("seq_len", m.seq_len).field("ffn_hidden", dense_ffn_hidden(config));
  j.field("rope_base", m.rope_base).field("norm_eps", m.norm_eps).field("tie_embeddings", m.tie_embeddings);
  j.end_object();
  j.key("moe").begin_object();
  j.field("num_experts", moe.num_experts).field("top_k", moe.top_k);
  j.field("ffn_hidden", moe.num_experts > 0 ? expert_ffn_hidden(config) : 0);
  j.field("num_shared_experts", moe.num_shared_experts);
  j.field("shared_ffn_hidden", moe.num_shared_experts > 0 ? shared_ffn_hidden(config) : 0);
  j.field("expert_type", value["moe.expert_type"]).field("score", value["moe.score"]);
  j.field("normalize_topk", moe.normalize_topk).field("capacity_factor", moe.capacity_factor);
  j.field("min_capacity", moe.min_capacity).field("priority", value["moe.priority"]);
  j.field("force_routing", value["moe.force_routing"]);
  j.array("moe_layers", moe_layers);
  j.end_object();
  j.key("config").begin_object();
  for (const auto& [k, v] : config_values(config)) j.field(k, v);
  j.end_object();
  j.end_object();
  write_file_atomic(out_dir + "/config.json", j.str() + "\n");
  log_info("export: wrote " + out_dir + "/model.safetensors (" + std::to_string(records.size()) + " tensors, " +
           dtype_name(dtype) + ") and config.json from " + step_dir);
}

std::string import_checkpoint(const std::string& export_dir, const std::string& out_dir, Backend& backend) {
  const std::string config_path = export_dir + "/config.json";
  if (!exists(config_path)) throw InputError(export_dir, "not an export: no config.json", "IMPORT_DIR");
  YAML::Node j = parse_json(read_file(config_path, "export config"), config_path);
  std::vector<std::pair<std::string, std::string>> values;
  TrainingState state;
  try {
    if (j["format"].as<std::string>("") != kExportFormat) {
      throw InputError(config_path, "not a moe-export config.json (format '" + j["format"].as<std::string>("") + "')");
    }
    if (j["format_version"].as<int>(0) > kExportVersion) {
      throw InputError(config_path, "export format version " + j["format_version"].as<std::string>() +
                                        " is newer than this build (" + software_version() + ") reads (" +
                                        std::to_string(kExportVersion) + ")");
    }
    for (const auto& item : j["config"]) values.emplace_back(item.first.as<std::string>(), item.second.as<std::string>(""));
    state.step = j["step"].as<int64_t>(0);
    state.next_sequence = j["next_sequence"].as<int64_t>(0);
  } catch (const YAML::Exception& e) {
    throw InputError(config_path, "malformed export config: " + e.msg);
  }
  const Config config = stored_config(values, config_path);
  require_fresh_checkpoint_dir(out_dir);
  SafetensorsReader weights(export_dir + "/model.safetensors");
  std::vector<std::string> unused = weights.names();
  return write_new_checkpoint(config, state, out_dir, backend, [&](Transformer& model) {
    for (Param* p : model.params().all()) {
      if (!weights.has(p->name)) {
        throw InputError(export_dir + "/model.safetensors", "has no tensor " + p->name + ", which config.json's model needs");
      }
      Tensor t = weights.read(p->name);
      if (t.shape() != p->value.shape()) {
        throw InputError(export_dir + "/model.safetensors", "tensor " + p->name + " is " + t.str() +
                                                                ", config.json's model needs " + p->value.str());
      }
      Tensor host = from_doubles(to_doubles(t), p->value.shape(), p->value.dtype());
      backend.copy_from_host(host.raw(), p->value);
      unused.erase(std::find(unused.begin(), unused.end(), p->name));
    }
    if (!unused.empty()) {
      throw InputError(export_dir + "/model.safetensors", "holds " + unused.front() +
                                                              ", which config.json's model has no place for");
    }
  });
}

std::string upcycle_checkpoint(const std::string& dense_step_dir, const Config& config, const std::string& out_dir,
                               const UpcycleOptions& options, Backend& backend) {
  const StoredCheckpoint dense = open_checkpoint(dense_step_dir);
  const Config from = stored_config(dense.config, dense_step_dir + "/manifest.json");
  if (from.moe.num_experts != 0) {
    throw ConfigError("moe.num_experts", "upcycling starts from a dense checkpoint (moe.num_experts 0); " + dense_step_dir +
                                             " has " + std::to_string(from.moe.num_experts) + " experts");
  }
  if (config.moe.num_experts < 1) throw ConfigError("moe.num_experts", "the upcycled configuration needs routed experts");
  const auto now = config_values(config);
  for (const char* key : {"model.hidden", "model.layers", "model.vocab_size", "model.heads", "model.kv_heads",
                          "model.tie_embeddings", "model.rope_base", "model.norm_eps", "runtime.dtype"}) {
    const std::string was = dense.value(key);
    for (const auto& [k, v] : now) {
      if (k == key && v != was) {
        throw ConfigError(key, "the dense checkpoint has " + was + ", the MoE configuration " + v + ": they must match");
      }
    }
  }
  const int dense_mid = dense_ffn_hidden(from);
  bool keeps_dense_layers = false;
  for (int l = 0; l < config.model.layers; ++l) keeps_dense_layers |= !is_moe_layer(config, l);
  if (keeps_dense_layers && dense_ffn_hidden(config) != dense_mid) {
    throw ConfigError("model.ffn_hidden", "the dense checkpoint's FFNs have " + std::to_string(dense_mid) +
                                              " mid units, the MoE configuration's dense layers " +
                                              std::to_string(dense_ffn_hidden(config)));
  }
  if (config.moe.expert_type != ExpertType::kSwiGLU) {
    throw ConfigError("moe.expert_type", "the dense FFN is SwiGLU: upcycled experts must be swiglu");
  }
  const int mid = expert_ffn_hidden(config);
  int pieces = 1;  // G: experts cut from one dense FFN
  if (!options.granular && mid != dense_mid) {
    throw ConfigError("moe.ffn_hidden", "each expert is a copy of the dense FFN (" + std::to_string(dense_mid) +
                                            " mid units): set moe.ffn_hidden to " + std::to_string(dense_mid) +
                                            ", or cut it into smaller experts with --granular");
  }
  if (options.granular) {
    if (mid > dense_mid || dense_mid % mid != 0) {
      throw ConfigError("moe.ffn_hidden", "granular upcycling cuts the dense FFN's " + std::to_string(dense_mid) +
                                              " mid units into experts of moe.ffn_hidden = " + std::to_string(mid) +
                                              ", which must divide it");
    }
    pieces = dense_mid / mid;
    if (config.moe.num_experts % pieces != 0) {
      throw ConfigError("moe.num_experts", "granular upcycling makes " + std::to_string(pieces) +
                                               " experts per dense FFN: moe.num_experts must be a multiple of it");
    }
  }
  if (!(options.noise_std >= 0)) throw ConfigError("--noise", "must be >= 0");
  require_fresh_checkpoint_dir(out_dir);

  return write_new_checkpoint(config, TrainingState{}, out_dir, backend, [&](Transformer& model) {
    const int64_t h = config.model.hidden, f = mid;
    for (Param* p : model.params().all()) {
      if (p->scope != ParamScope::kExpert) {
        const bool moe_only = p->name.find(".moe.router.") != std::string::npos ||
                              p->name.find(".moe.shared.") != std::string::npos;
        if (moe_only) continue;  // router, shared experts: as initialised
        if (!dense.weight_map.count(p->name)) {
          throw InputError(dense_step_dir, "the dense checkpoint has no tensor " + p->name + ", which the MoE model copies");
        }
        Tensor t = dense.read(p->name);
        if (t.shape() != p->value.shape() || t.dtype() != p->value.dtype()) {
          throw InputError(dense_step_dir, "tensor " + p->name + " is " + t.str() + ", the MoE model's " + p->value.str());
        }
        backend.copy_from_host(t.raw(), p->value);
        continue;
      }
      // layers.l.moe.experts.<w> from layers.l.ffn.<w>
      const std::string w = p->name.substr(p->name.rfind('.') + 1);
      const std::string layer = p->name.substr(0, p->name.find(".moe."));
      const std::vector<double> src = to_doubles(dense.read(layer + ".ffn." + w));
      const RngStream noise{config.train.seed, rng_stream(RngPurpose::kUpcycleNoise, name_hash(p->name.c_str()))};
      const int64_t size = f * h;  // per expert
      std::vector<double> out(static_cast<size_t>(config.moe.num_experts * size));
      for (int64_t e = 0; e < config.moe.num_experts; ++e) {
        const int64_t j = e % pieces;
        for (int64_t a = 0; a < f; ++a) {
          for (int64_t b = 0; b < h; ++b) {
            // w_gate, w_up (F, H): rows j·F + a of the dense (F_d, H); w_down (H, F): columns j·F + a of (H, F_d)
            const bool down = w == "w_down";
            const int64_t i = down ? b * f + a : a * h + b;
            const double v = down ? src[b * dense_mid + j * f + a] * pieces : src[(j * f + a) * h + b];
            const int64_t index = e * size + i;
            out[index] = v + (options.noise_std > 0 ? options.noise_std * noise.normal(static_cast<uint64_t>(index)) : 0);
          }
        }
      }
      Tensor host = from_doubles(out, p->value.shape(), p->value.dtype());
      backend.copy_from_host(host.raw(), p->value);
    }
  });
}

}  // namespace moe
