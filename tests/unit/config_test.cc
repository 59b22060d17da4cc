// Configuration parsing and validation: every bad value names its key; docs/CONFIG.md is the table.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "model/params.h"
#include "runtime/backend.h"
#include "config/config.h"
#include "runtime/cpu/blas.h"
#include "base/error.h"
#include "train/optimizer.h"

namespace moe {
namespace {

// The key named by the ConfigError that `fn` throws ("" when it throws nothing); *message gets its text
// ("" when nothing throws).
template <typename F>
std::string error_key(F fn, std::string* message = nullptr) {
  if (message) message->clear();
  try {
    fn();
  } catch (const ConfigError& e) {
    if (message) *message = e.what();
    return e.key();
  }
  return "";
}

TEST(Config, YamlThenOverridesWithSources) {
  ConfigSources sources;
  Config c = parse_config("moe:\n  num_experts: 16\n  top_k: 1\ntrain:\n  lr: 0.5\n", "run.yaml",
                          {"moe.top_k=3", "parallel.ep=4", "train.optimizer=sgd"}, &sources);
  EXPECT_EQ(c.moe.num_experts, 16);
  EXPECT_EQ(c.moe.top_k, 3);
  EXPECT_EQ(c.parallel.ep, 4);
  EXPECT_DOUBLE_EQ(c.train.lr, 0.5);
  EXPECT_EQ(c.train.optimizer, OptimizerType::kSgd);
  EXPECT_EQ(sources["moe.num_experts"], "run.yaml");
  EXPECT_EQ(sources["moe.top_k"], "command line");
  EXPECT_EQ(sources["model.hidden"], "default");
}

TEST(Config, EveryValueRoundTripsThroughItsText) {
  Config c = parse_config("", "", {"moe.capacity_factor=0.3", "moe.score=sigmoid", "train.seed=77"});
  std::vector<std::string> overrides;
  for (const auto& [key, value] : config_values(c)) overrides.push_back(key + "=" + value);
  Config back = parse_config("", "", overrides);
  EXPECT_EQ(config_values(back), config_values(c));
}

TEST(Config, UnknownKeySuggestsTheNearestOne) {
  std::string msg;
  EXPECT_EQ(error_key([] { parse_config("moe:\n  top_kk: 2\n", "x.yaml", {}); }, &msg), "moe.top_kk");
  EXPECT_NE(msg.find("moe.top_k"), std::string::npos) << msg;
  EXPECT_EQ(error_key([] { parse_config("", "", {"train.stepz=3"}); }), "train.stepz");
  EXPECT_EQ(error_key([] { parse_config("nosection:\n  a: 1\n", "x.yaml", {}); }), "nosection.a");
}

TEST(Config, WrongTypesNameTheKey) {
  EXPECT_EQ(error_key([] { parse_config("moe:\n  top_k: two\n", "x.yaml", {}); }), "moe.top_k");
  EXPECT_EQ(error_key([] { parse_config("moe:\n  top_k: 2.5\n", "x.yaml", {}); }), "moe.top_k");
  EXPECT_EQ(error_key([] { parse_config("", "", {"train.lr=fast"}); }), "train.lr");
  EXPECT_EQ(error_key([] { parse_config("", "", {"moe.normalize_topk=maybe"}); }), "moe.normalize_topk");
  EXPECT_EQ(error_key([] { parse_config("", "", {"moe.score=relu"}); }), "moe.score");
  EXPECT_EQ(error_key([] { parse_config("moe:\n  top_k: [1, 2]\n", "x.yaml", {}); }), "moe.top_k");
  EXPECT_EQ(error_key([] { parse_config("moe: 3\n", "x.yaml", {}); }), "moe");
  // Keys that are not plain words are still configuration errors, not YAML exceptions.
  std::string msg;
  EXPECT_EQ(error_key([] { parse_config("moe: {[a]: 1}\n", "x.yaml", {}); }, &msg), "moe");
  EXPECT_NE(msg.find("plain word"), std::string::npos) << msg;
  EXPECT_EQ(error_key([] { parse_config("{[a]: 1}\n", "x.yaml", {}); }, &msg), "");  // no key to name
  EXPECT_NE(msg.find("plain word"), std::string::npos) << msg;
}

TEST(Config, MalformedYamlIsAConfigErrorWithThePosition) {
  std::string msg;
  error_key([] { parse_config("moe:\n  top_k: [1\n", "bad.yaml", {}); }, &msg);
  EXPECT_NE(msg.find("bad.yaml:"), std::string::npos) << msg;
}

TEST(Config, CrossFieldRulesNameTheKey) {
  auto invalid = [](const std::vector<std::string>& overrides, int world) {
    return error_key([&] { validate_config(parse_config("", "", overrides), world); });
  };
  EXPECT_EQ(invalid({}, 1), "");
  EXPECT_EQ(invalid({"moe.top_k=9", "moe.num_experts=8"}, 1), "moe.top_k");
  EXPECT_EQ(invalid({"moe.top_k=0"}, 1), "moe.top_k");
  EXPECT_EQ(invalid({"moe.num_experts=6", "parallel.ep=4"}, 4), "moe.num_experts");
  EXPECT_EQ(invalid({"parallel.ep=4"}, 6), "parallel.ep");
  EXPECT_EQ(invalid({"parallel.ep=0"}, 1), "parallel.ep");
  EXPECT_EQ(invalid({"moe.capacity_factor=nan"}, 1), "moe.capacity_factor");
  EXPECT_EQ(invalid({"moe.capacity_factor=inf"}, 1), "moe.capacity_factor");
  EXPECT_EQ(invalid({"train.lr=-1"}, 1), "train.lr");
  EXPECT_EQ(invalid({"moe.random_routing=true", "moe.top_k=3"}, 1), "moe.random_routing");
  EXPECT_EQ(invalid({"train.batch_size=6"}, 4), "train.batch_size");
  EXPECT_EQ(invalid({"moe.group_size=7"}, 1), "moe.group_size");
  EXPECT_EQ(invalid({"data.source=file"}, 1), "data.path");
  EXPECT_EQ(invalid({"runtime.expert_gemm=streams"}, 1), "runtime.expert_gemm");  // CUDA only
  // the transformer, evaluation and sampling
  EXPECT_EQ(invalid({"model.heads=3"}, 1), "model.heads");                        // 64 / 3
  EXPECT_EQ(invalid({"model.heads=64"}, 1), "model.heads");                       // odd head size 1
  EXPECT_EQ(invalid({"model.kv_heads=3"}, 1), "model.kv_heads");                  // does not divide 4
  EXPECT_EQ(invalid({"model.attn_dropout=1"}, 1), "model.attn_dropout");
  EXPECT_EQ(invalid({"moe.every=0"}, 1), "moe.every");
  EXPECT_EQ(invalid({"moe.num_experts=0", "moe.top_k=3"}, 1), "");                // dense: top_k unused
  EXPECT_EQ(invalid({"train.eval_every=10"}, 1), "train.eval_every");             // no validation file
  EXPECT_EQ(invalid({"train.sample_tokens=10", "train.sample_prompt="}, 1), "train.sample_prompt");
  EXPECT_EQ(invalid({"train.sample_tokens=10", "model.vocab_size=50257"}, 1), "train.sample_tokens");
  EXPECT_EQ(invalid({"train.sample_tokens=10", "model.vocab_size=100", "train.sample_prompt=zebra"}, 1),
            "train.sample_prompt");                                               // 'z' = 122 >= 100
}

// The one copy of the layout rules a restart on fewer ranks (launch/moe --elastic) asks for.
TEST(Config, FitLayoutTakesTheMostRanksTheConfigurationValidatesFor) {
  auto fit = [](const std::vector<std::string>& keys, int available) {
    const Layout l = fit_layout(parse_config("", "", keys), available);
    return std::to_string(l.ranks) + " " + std::to_string(l.ep);
  };
  EXPECT_EQ(fit({"train.batch_size=32", "moe.num_experts=8"}, 8), "8 8");
  EXPECT_EQ(fit({"train.batch_size=32", "moe.num_experts=8"}, 7), "4 4");   // 7, 6, 5 do not divide the batch
  EXPECT_EQ(fit({"train.batch_size=24", "moe.num_experts=8"}, 7), "6 2");   // ep: the largest divisor of both
  EXPECT_EQ(fit({"train.batch_size=30", "moe.num_experts=0"}, 7), "6 1");   // dense: ep 1
  EXPECT_EQ(fit({"train.batch_size=3", "moe.num_experts=9"}, 100), "3 3");  // no more ranks than sequences
  // beyond the batch: capacity groups must divide each rank's tokens (8 sequences of 16 tokens)
  EXPECT_EQ(fit({"train.batch_size=8", "model.seq_len=16", "moe.group_size=64", "moe.num_experts=4"}, 8), "2 2");
  EXPECT_THROW(fit({"moe.top_k=9", "moe.num_experts=8"}, 4), ConfigError);  // fits no layout at all
}

TEST(Config, ReferenceDocumentIsGeneratedFromTheTable) {
  std::string md = config_reference_markdown();
  for (const ConfigField& f : config_fields()) {
    EXPECT_NE(md.find("`" + f.key + "`"), std::string::npos) << f.key << " missing from the reference";
  }
  std::ifstream in(std::string(MOE_SOURCE_DIR) + "/docs/CONFIG.md");
  ASSERT_TRUE(in) << "docs/CONFIG.md missing";
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), md) << "docs/CONFIG.md is stale: regenerate it with `build/moe_train --config-reference "
                               "> docs/CONFIG.md`";
}

// The OpenBLAS kernel choice (runtime/cpu/blas.h): a kernel narrower than the CPU's FMA width is
// replaced by the one that uses it; one that already does is kept.
TEST(Blas, AKernelNarrowerThanTheCpuIsReplacedByOneThatUsesItsVectors) {
  EXPECT_EQ(wider_openblas_kernel("Haswell", 16), "SKYLAKEX");
  EXPECT_EQ(wider_openblas_kernel("Zen", 16), "SKYLAKEX");
  EXPECT_EQ(wider_openblas_kernel("Prescott", 16), "SKYLAKEX");  // the generic fallback on unknown Xeons
  EXPECT_EQ(wider_openblas_kernel("Prescott", 8), "HASWELL");
  EXPECT_EQ(wider_openblas_kernel("Sandybridge", 8), "HASWELL");
  EXPECT_EQ(wider_openblas_kernel("Cooperlake", 16), "");
  EXPECT_EQ(wider_openblas_kernel("SkylakeX", 16), "");
  EXPECT_EQ(wider_openblas_kernel("SapphireRapids", 16), "");
  EXPECT_EQ(wider_openblas_kernel("Haswell", 8), "");
  EXPECT_EQ(wider_openblas_kernel("Zen", 8), "");
  EXPECT_EQ(wider_openblas_kernel("Prescott", 4), "");  // nothing wider to use
  BlasInfo info;
  info.fma_lanes = 16, info.mhz = 2000;
  EXPECT_DOUBLE_EQ(blas_rate_floor(info, false), 32e9);  // half of 16 lanes x 2 FLOPs per cycle at 2 GHz
  EXPECT_DOUBLE_EQ(blas_rate_floor(info, true), 16e9);
}

// Random tensors large enough to be drawn by several threads (runtime/parallel.h) hold exactly the
// draws of their indices: the chunk boundaries change nothing.
TEST(Init, DrawsSplitOverThreadsEqualTheSerialOnes) {
  auto backend = make_cpu_backend({});
  const RngStream rng{77, rng_stream(RngPurpose::kTest, 5)};
  const int64_t n = (int64_t{1} << 20) + 3;
  const std::vector<double> got = to_doubles(*backend, normal_tensor(*backend, {n}, DType::kF64, rng, 11, 0.5));
  const int64_t half = (n + 1) / 2;  // a chunk boundary with two threads
  for (int64_t i : {int64_t{0}, half - 1, half, half + 1, n / 4, n - 1}) {
    EXPECT_EQ(got[static_cast<size_t>(i)], 0.5 * rng.normal(static_cast<uint64_t>(11 + i))) << i;
  }
  double sum = 0;
  for (int64_t i = 0; i < n; i += 997) sum += std::abs(got[static_cast<size_t>(i)] - 0.5 * rng.normal(11 + i));
  EXPECT_EQ(sum, 0.0);
}

// A set allocated beside an earlier one copies the parameters that would draw the same values and draws
// the others: every value equals a fresh draw.
TEST(Init, ParametersOfTheSameShapeAreCopiedFromAnEarlierSetAndEqualAFreshDraw) {
  auto backend = make_cpu_backend({});
  auto declare = [](ParamSet& set, int64_t rows_b) {
    Param a;
    a.name = "a", a.shape = {3, 4}, a.init_std = 0.5;
    set.add(a);
    Param b;
    b.name = "b", b.shape = {rows_b, 2}, b.init_std = 0.25;
    set.add(b);
  };
  ParamSet first, fresh, reused, wrong_seed;
  declare(first, 5);
  declare(fresh, 6);
  declare(reused, 6);
  declare(wrong_seed, 6);
  first.allocate(*backend, DType::kF64, 7);
  fresh.allocate(*backend, DType::kF64, 7);
  // first's "a" becomes a NaN sentinel: a copied parameter shows it, a drawn one does not
  first.find("a")->value.data<double>()[0] = std::nan("");
  reused.allocate(*backend, DType::kF64, 7, &first);
  wrong_seed.allocate(*backend, DType::kF64, 8, &first);
  EXPECT_TRUE(std::isnan(to_doubles(*backend, reused.find("a")->value)[0])) << "same name and shape: copied";
  std::vector<double> ra = to_doubles(*backend, reused.find("a")->value), fa = to_doubles(*backend, fresh.find("a")->value);
  EXPECT_EQ(std::vector<double>(ra.begin() + 1, ra.end()), std::vector<double>(fa.begin() + 1, fa.end()));
  EXPECT_EQ(to_doubles(*backend, reused.find("b")->value), to_doubles(*backend, fresh.find("b")->value))
      << "another shape: drawn";
  EXPECT_FALSE(std::isnan(to_doubles(*backend, wrong_seed.find("a")->value)[0])) << "another seed: drawn";
}

// BF16 shadows: converted on first use, written by the optimizer's update (no conversion after it), and
// converted again after any other write of the values that says so (values_changed: allocate, loads).
TEST(Bf16Shadows, FollowTheOptimizerAndConvertAgainAfterOtherWrites) {
  auto backend = make_cpu_backend({});
  ParamSet set;
  Param spec;
  spec.name = "w", spec.shape = {4, 8}, spec.init_std = 0.5, spec.bf16_shadow = true;
  Param* w = set.add(spec);
  spec.name = "plain", spec.bf16_shadow = false;
  Param* plain = set.add(spec);
  set.allocate(*backend, DType::kF32, 3);
  EXPECT_FALSE(plain->shadow.defined());
  EXPECT_THROW(set.bf16_value(*backend, plain), InternalError);
  auto rounded = [&](const Tensor& v) {
    Tensor r = backend->empty(v.shape(), DType::kBF16);
    backend->convert(v, r);
    return to_doubles(*backend, r);
  };
  EXPECT_EQ(to_doubles(*backend, set.bf16_value(*backend, w)), rounded(w->value)) << "converted on first use";

  TrainConfig tc;
  tc.optimizer = OptimizerType::kAdamW;
  Optimizer optimizer(tc, *backend, set);
  backend->fill(w->grad, 0.25);
  backend->fill(plain->grad, 0.25);
  const std::vector<double> before = to_doubles(*backend, w->value);
  optimizer.step(0.1);
  EXPECT_NE(to_doubles(*backend, w->value), before);
  EXPECT_EQ(w->shadow_version, set.version()) << "the update wrote the shadow";
  EXPECT_EQ(to_doubles(*backend, w->shadow), rounded(w->value));

  // Another write: the shadow is used as it is until values_changed() says so.
  const std::vector<double> updated = rounded(w->value);
  backend->fill(w->value, 2.0);
  EXPECT_EQ(to_doubles(*backend, set.bf16_value(*backend, w)), updated) << "no conversion without values_changed";
  set.values_changed();
  EXPECT_EQ(to_doubles(*backend, set.bf16_value(*backend, w)), std::vector<double>(32, 2.0));
}

}  // namespace
}  // namespace moe
