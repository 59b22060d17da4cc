// The PyTorch baseline's rows, from tools/torch_moe_block.py run once per row.
#include "perf/torch_bench.h"

#include <yaml-cpp/yaml.h>

#include <cstdio>
#include <sstream>

#include "base/error.h"
#include "base/json.h"
#include "config/config.h"

#ifndef MOE_SOURCE_DIR
#define MOE_SOURCE_DIR "."
#endif

namespace moe {
namespace {

std::string sh_quote(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

class TorchBench : public Bench {
 public:
  TorchBench(std::vector<Config> configs, std::vector<std::string> dtypes, std::string model)
      : configs_(std::move(configs)), dtypes_(std::move(dtypes)), model_(std::move(model)) {}
  std::vector<std::string> title(BenchRun& run) override {
    return {"moe_bench torch: PyTorch eager " + model_ + " block of transformers (tools/torch_moe_block.py), " +
                std::to_string(run.options().iters) + " iters after " + std::to_string(run.options().warmup) +
                " warm-up (median, CUDA events)",
            "expert TFLOP/s: 3 (fwd+bwd) x 3 GEMMs x 2 x tokens x hidden x ffn x (top_k + shared) / time; compare "
            "with moe_bench layer's --capacity_factor=0 rows (these blocks are dropless)"};
  }
  std::vector<Column> columns() const override {
    return {{"device", "device", 6, 0},     {"dtype", "dtype", 5, 0},          {"tokens", "tokens", 7, 0},
            {"hidden", "hidden", 6, 0},     {"experts", "experts", 7, 0},      {"top_k", "top_k", 5, 0},
            {"shared", "shared", 6, 0},     {"ffn", "ffn", 5, 0},              {"time_ms", "time(ms)", 9, 3},
            {"tokens_per_s", "tokens/s", 10, 0}, {"expert_tflops", "expert TF/s", 11, 2},
            {"impl", "", 0, 0},             {"versions", "", 0, 0}};
  }
  size_t num_rows() const override { return configs_.size() * dtypes_.size(); }
  void setup(BenchRun& run, size_t i) override {}
  void run(BenchRun& run, size_t i) override {}
  // The script's own median for this row's shape.
  double seconds(BenchRun& run, size_t i) override {
    const Config& c = configs_[i / dtypes_.size()];
    const std::string cmd = "python3 " + sh_quote(std::string(MOE_SOURCE_DIR) + "/tools/torch_moe_block.py") +
                            " --format json --model " + sh_quote(model_) + " --dtype " + sh_quote(dtypes_[i % dtypes_.size()]) +
                            " --tokens " + std::to_string(c.model.seq_len) + " --hidden " + std::to_string(c.model.hidden) +
                            " --experts " + std::to_string(c.moe.num_experts) + " --top_k " + std::to_string(c.moe.top_k) +
                            " --ffn_hidden " + std::to_string(expert_ffn_hidden(c)) + " --shared " +
                            std::to_string(c.moe.num_shared_experts) + " --iters " + std::to_string(run.options().iters) +
                            " --warmup " + std::to_string(run.options().warmup) + " 2>&1";
    std::FILE* pipe = ::popen(cmd.c_str(), "r");
    if (!pipe) throw InputError("python3", "cannot start tools/torch_moe_block.py");
    std::string out;
    char buf[4096];
    while (std::fgets(buf, sizeof(buf), pipe)) out += buf;
    const int status = ::pclose(pipe);
    std::istringstream lines(out);
    std::string last;
    for (std::string line; std::getline(lines, line);)
      if (!line.empty()) last = line;
    if (status != 0 || last.empty() || last[0] != '{') {
      throw InputError("moe_bench torch", last.empty() ? "tools/torch_moe_block.py failed (is python3 installed?)" : last);
    }
    row_ = parse_json(last, "tools/torch_moe_block.py output");
    return row_["ms"].as<double>() * 1e-3;
  }
  int64_t check(BenchRun& run, size_t i) override { return -1; }
  std::vector<Cell> cells(BenchRun& run, size_t i, double seconds) override {
    const Config& c = configs_[i / dtypes_.size()];
    return {row_["device"].as<std::string>(), dtypes_[i % dtypes_.size()], int64_t{c.model.seq_len},
            int64_t{c.model.hidden}, int64_t{c.moe.num_experts}, int64_t{c.moe.top_k},
            int64_t{c.moe.num_shared_experts}, int64_t{expert_ffn_hidden(c)}, seconds * 1e3,
            row_["tokens_per_s"].as<double>(), row_["expert_tflops"].as<double>(), row_["impl"].as<std::string>(),
            "transformers " + row_["transformers_version"].as<std::string>() + ", torch " +
                row_["torch_version"].as<std::string>()};
  }

 private:
  std::vector<Config> configs_;
  std::vector<std::string> dtypes_;
  std::string model_;
  YAML::Node row_;  // the script's JSON row of the row being measured
};

}  // namespace

BenchFlags torch_bench_flags() {
  BenchFlags f;
  f.defaults = {"model.seq_len=16384", "model.hidden=2048", "moe.num_experts=64", "moe.top_k=6",
                "moe.ffn_hidden=1408", "moe.num_shared_experts=0,2"};
  f.iters = 20;
  f.warmup = 5;
  f.strings = {{"dtype", "bf16,fp32"}, {"model", "qwen2_moe"}};  // PyTorch's dtypes, not runtime.dtype
  return f;
}

int run_torch_bench(BenchRun& run) {
  const BenchOptions& o = run.options();
  std::vector<Config> configs;
  for (size_t point = 0; point < o.sweep.size(); ++point) {
    configs.push_back(on_every_rank([&] { return parse_config("", "", o.sweep.point(point)); }));
  }
  const std::vector<std::string> dtypes = split_commas(o.strings.at("dtype"));
  const std::string model = o.strings.at("model");
  on_every_rank([&] {
    for (const std::string& d : dtypes)
      if (d != "bf16" && d != "fp16" && d != "fp32") throw ConfigError("dtype", "expected bf16, fp16 or fp32, got '" + d + "'");
    if (dtypes.empty()) throw ConfigError("dtype", "needs at least one of bf16, fp16, fp32");
    if (model != "qwen2_moe" && model != "deepseek") throw ConfigError("model", "expected qwen2_moe or deepseek, got '" + model + "'");
  });
  TorchBench bench(configs, dtypes, model);
  return run.execute({&bench});
}

}  // namespace moe
