// Finite-difference gradient checks of the MoE layer in double precision.
//
// The objective is L = <y, r> + aux + z for a fixed random r, so the layer's backward (given dy = r)
// must reproduce dL/dx and dL/dθ for every parameter. Central differences with eps = 1e-6 are exact to
// ~1e-9 in F64 away from the routing decision boundaries, which random inputs do not hit.
#include <gtest/gtest.h>

#include <functional>
#include <memory>

#include "model/attention.h"
#include "model/transformer.h"
#include "tests/test_util.h"

namespace moe {
namespace {

// Central differences (eps 1e-6) of f() with respect to every element of `value` against `analytic`: the
// worst difference relative to the largest analytic entry (at least 1e-3) must stay below 1e-6.
void expect_gradient(Backend& backend, const std::string& what, Tensor& value, const std::vector<double>& analytic,
                     const std::function<double()>& f) {
  const std::vector<double> numeric = test::numeric_gradient(backend, value, f);
  ASSERT_EQ(numeric.size(), analytic.size()) << what;
  double worst = 0, scale = 1e-3;
  for (size_t i = 0; i < numeric.size(); ++i) {
    worst = std::max(worst, std::abs(numeric[i] - analytic[i]));
    scale = std::max(scale, std::abs(analytic[i]));
  }
  EXPECT_LT(worst / scale, 1e-6) << what << ": max |numeric - analytic| = " << worst << ", scale " << scale;
}

class LayerGradCheck {
 public:
  LayerGradCheck(const Config& config, int64_t tokens, double r_scale = 1.0)
      : config_(test::config(config, {"runtime.dtype=float64"})), tokens_(tokens), groups_(test::self_groups()) {
    layer_ = std::make_unique<MoeLayer>(params_, "moe", config_, 0, 1, 0);
    params_.allocate(*backend_, DType::kF64, config_.train.seed);
    x_ = test::random_tensor(*backend_, {tokens, config_.model.hidden}, DType::kF64, 11);
    r_ = test::random_tensor(*backend_, {tokens, config_.model.hidden}, DType::kF64, 12, 0, r_scale);
  }

  double objective() {
    StepContext ctx;
    ctx.global_tokens = tokens_;
    Tensor y = layer_->forward(*backend_, groups_, x_, ctx);
    RouterStats stats = layer_->read_stats(*backend_);
    std::vector<double> yv = to_doubles(*backend_, y), rv = to_doubles(*backend_, r_);
    double dot = 0;
    for (size_t i = 0; i < yv.size(); ++i) dot += yv[i] * rv[i];
    return dot + stats.aux_loss + stats.z_loss;
  }

  // Compares the analytic gradient of every element of `value` with central differences.
  void check(const std::string& what, Tensor& value, const std::vector<double>& analytic) {
    expect_gradient(*backend_, what, value, analytic, [this] { return objective(); });
  }

  // Runs forward+backward once, then checks dx and the gradient of every parameter whose name contains
  // one of `filters` (all of them when empty). Returns how many tensors were checked.
  int run(const std::vector<std::string>& filters = {}) {
    params_.zero_grads(*backend_);
    objective();
    Tensor dx = layer_->backward(*backend_, groups_, r_);
    std::vector<double> dxv = to_doubles(*backend_, dx);
    int checked = 0;
    check("dx", x_, dxv);
    for (Param* p : params_.trainable()) {
      bool wanted = filters.empty();
      for (const std::string& f : filters) wanted |= p->name.find(f) != std::string::npos;
      if (!wanted) continue;
      check(p->name, p->value, to_doubles(*backend_, p->grad));
      ++checked;
    }
    return checked;
  }

  Config& config() { return config_; }

 private:
  Config config_;
  int64_t tokens_;
  ProcessGroups groups_;
  std::unique_ptr<Backend> backend_ = make_cpu_backend({});
  ParamSet params_;
  std::unique_ptr<MoeLayer> layer_;
  Tensor x_, r_;
};

// test::small_config of hidden size 6 with mid size 5, dropless and without router losses, then
// `overrides` (what a test turns on).
Config base(int experts, int k, const std::vector<std::string>& overrides = {}) {
  std::vector<std::string> all{"moe.ffn_hidden=5", "moe.capacity_factor=0", "moe.aux_loss_coef=0", "moe.z_loss_coef=0"};
  all.insert(all.end(), overrides.begin(), overrides.end());
  return test::config(test::small_config(experts, k, 6), all);
}

struct RouterCase {
  const char* name;
  std::vector<std::string> overrides;
};

void PrintTo(const RouterCase& c, std::ostream* os) { *os << c.name; }

class RouterGradCheck : public ::testing::TestWithParam<RouterCase> {};

TEST_P(RouterGradCheck, RouterWeightAndInput) {
  std::vector<std::string> overrides = GetParam().overrides;
  overrides.push_back("moe.gumbel_tau=0.7");
  LayerGradCheck g(base(4, 2, overrides), 10);
  EXPECT_EQ(g.run({"router"}), 1);
}

INSTANTIATE_TEST_SUITE_P(
    Modes, RouterGradCheck,
    ::testing::Values(
        RouterCase{"softmax_normalized", {"moe.score=softmax", "moe.normalize_topk=true", "moe.router_grad=exact"}},
        RouterCase{"softmax_raw", {"moe.score=softmax", "moe.normalize_topk=false", "moe.router_grad=exact"}},
        RouterCase{"sigmoid_normalized", {"moe.score=sigmoid", "moe.normalize_topk=true", "moe.router_grad=exact"}},
        RouterCase{"sigmoid_raw", {"moe.score=sigmoid", "moe.normalize_topk=false", "moe.router_grad=exact"}},
        RouterCase{"gumbel_soft", {"moe.score=softmax", "moe.normalize_topk=true", "moe.router_grad=gumbel"}}),
    [](const auto& info) { return std::string(info.param.name); });

class ExpertGradCheck : public ::testing::TestWithParam<std::string> {};

TEST_P(ExpertGradCheck, ExpertWeights) {
  LayerGradCheck g(base(4, 2, {"moe.expert_type=" + GetParam()}), 10);
  EXPECT_EQ(g.run({"experts"}), GetParam() == "swiglu" ? 3 : 2);
}

INSTANTIATE_TEST_SUITE_P(Types, ExpertGradCheck, ::testing::Values("swiglu", "gelu", "relu"),
                         [](const auto& info) { return info.param; });

TEST(SharedExpertGradCheck, SharedWeights) {
  LayerGradCheck g(base(4, 2, {"moe.num_shared_experts=2", "moe.shared_ffn_hidden=3"}), 10);
  EXPECT_EQ(g.run({"shared"}), 3);
}

TEST(LossGradCheck, AuxLossAlone) {
  LayerGradCheck g(base(4, 2, {"moe.aux_loss_coef=0.5"}), 12, /*r_scale=*/0.0);  // dy = 0: only the aux loss
  EXPECT_EQ(g.run({"router"}), 1);
}

TEST(LossGradCheck, SigmoidAuxLossAlone) {
  LayerGradCheck g(base(4, 2, {"moe.score=sigmoid", "moe.aux_loss_coef=0.5"}), 12, 0.0);
  EXPECT_EQ(g.run({"router"}), 1);
}

TEST(LossGradCheck, ZLossAlone) {
  LayerGradCheck g(base(4, 2, {"moe.z_loss_coef=0.3"}), 12, 0.0);
  EXPECT_EQ(g.run({"router"}), 1);
}

TEST(LayerGradCheckAll, EverythingOnWithCapacityDrops) {
  LayerGradCheck g(base(6, 2, {"moe.capacity_factor=0.75", "moe.min_capacity=1", "moe.num_shared_experts=1",
                               "moe.aux_loss_coef=0.1", "moe.z_loss_coef=0.05", "moe.router_jitter=0.1",
                               "moe.random_routing=true"}),
                   16);
  EXPECT_EQ(g.run(), 1 + 3 + 3);  // router, experts, shared
}

TEST(LayerGradCheckAll, BatchPriorityTop3Gelu) {
  LayerGradCheck g(base(5, 3, {"moe.capacity_factor=1.0", "moe.priority=batch", "moe.expert_type=gelu",
                               "moe.aux_loss_coef=0.1", "moe.z_loss_coef=0.05"}),
                   15);
  EXPECT_EQ(g.run(), 1 + 2);
}

struct AttentionCase {
  const char* name;
  std::vector<std::string> overrides;  // heads, kv_heads, attn_dropout
};

void PrintTo(const AttentionCase& c, std::ostream* os) { *os << c.name; }

class AttentionGradCheck : public ::testing::TestWithParam<AttentionCase> {};

// L = <y, r> for the attention sublayer alone: dx and every weight gradient against central differences.
TEST_P(AttentionGradCheck, InputAndWeights) {
  std::vector<std::string> overrides = GetParam().overrides;
  overrides.insert(overrides.end(), {"runtime.dtype=float64", "model.seq_len=5"});
  const Config c = test::config(test::small_config(4, 2, 8), overrides);
  auto backend = make_cpu_backend({});
  ParamSet params;
  Attention attn(params, "attn", c, 0);
  params.allocate(*backend, DType::kF64, 7);
  const int64_t t = 10, h = c.model.hidden;
  Tensor x = test::random_tensor(*backend, {t, h}, DType::kF64, 11);
  Tensor r = test::random_tensor(*backend, {t, h}, DType::kF64, 12);
  StepContext ctx;
  ctx.step = 3;
  ctx.seq_len = 5;
  ctx.token_offset = 15;  // the third and fourth sequences of a global batch: dropout draws there
  auto objective = [&] { return test::dot(*backend, attn.forward(*backend, x, ctx), r); };
  params.zero_grads(*backend);
  objective();
  Tensor dx = attn.backward(*backend, r);
  expect_gradient(*backend, "dx", x, to_doubles(*backend, dx), objective);
  for (Param* p : params.trainable()) expect_gradient(*backend, p->name, p->value, to_doubles(*backend, p->grad), objective);
}

INSTANTIATE_TEST_SUITE_P(Heads, AttentionGradCheck,
                         ::testing::Values(
                             AttentionCase{"multi_head", {"model.heads=2", "model.kv_heads=0", "model.attn_dropout=0"}},
                             AttentionCase{"grouped_query", {"model.heads=4", "model.kv_heads=2", "model.attn_dropout=0"}},
                             AttentionCase{"single_kv_head_dropout",
                                           {"model.heads=4", "model.kv_heads=1", "model.attn_dropout=0.3"}}),
                         [](const auto& info) { return std::string(info.param.name); });

// The whole model: embedding, blocks of attention + dense FFN and attention + MoE FFN (shared experts,
// capacity drops), final norm, head (tied or not), cross-entropy + aux + z. Every parameter's gradient
// against central differences of the loss.
class ModelGradCheck : public ::testing::TestWithParam<bool> {};

TEST_P(ModelGradCheck, EveryParameter) {
  const Config c = base(4, 2, {"runtime.dtype=float64", "model.vocab_size=11", "model.layers=2", "model.heads=2",
                               "model.seq_len=4", "model.ffn_hidden=6",
                               std::string("model.tie_embeddings=") + (GetParam() ? "true" : "false"),
                               "moe.first_dense_layers=1", "moe.capacity_factor=1.0", "moe.min_capacity=1",
                               "moe.num_shared_experts=1", "moe.aux_loss_coef=0.1", "moe.z_loss_coef=0.05",
                               "train.batch_size=3"});
  auto backend = make_cpu_backend({});
  ProcessGroups groups = test::self_groups();
  Transformer model(c, *backend, groups);
  const int64_t t = c.train.batch_size * c.model.seq_len;
  std::vector<int32_t> ids(static_cast<size_t>(t)), next(static_cast<size_t>(t));
  for (int64_t i = 0; i < t; ++i) ids[i] = static_cast<int32_t>((i * 7 + 3) % 11), next[i] = static_cast<int32_t>((i * 5 + 1) % 11);
  Tensor inputs = host_tensor({t}, DType::kI32), targets = host_tensor({t}, DType::kI32);
  std::copy(ids.begin(), ids.end(), inputs.data<int32_t>());
  std::copy(next.begin(), next.end(), targets.data<int32_t>());
  StepContext ctx;
  ctx.seq_len = c.model.seq_len;
  ctx.global_tokens = t;
  auto loss = [&] {
    double ce = model.forward(inputs, targets, ctx);
    StepStats s = model.read_stats();
    return ce + s.aux_loss + s.z_loss;
  };
  model.params().zero_grads(*backend);
  loss();
  int ready_calls = 0;
  model.backward([&](const Param*) { ++ready_calls; });
  EXPECT_EQ(ready_calls, c.model.layers + 2);  // head, each block, embedding
  EXPECT_EQ(model.moe_layers().size(), 1u);
  int checked = 0;
  for (Param* p : model.params().trainable()) {
    expect_gradient(*backend, p->name, p->value, to_doubles(*backend, p->grad), loss);
    ++checked;
  }
  EXPECT_EQ(model.params().find("head") == nullptr, GetParam());
  EXPECT_GT(checked, 15);
}

INSTANTIATE_TEST_SUITE_P(Head, ModelGradCheck, ::testing::Bool(),
                         [](const auto& info) { return std::string(info.param ? "tied" : "untied"); });

}  // namespace
}  // namespace moe
