// model_size() (model/transformer.h), which the start event and the FLOP count report, against the
// parameters a built Transformer really allocates: every trainable tensor counted, each routed expert
// once, for dense and MoE models, shared experts, tied and untied heads, dense first layers, MoE every
// other layer, grouped-query attention and two-matrix experts.
#include <gtest/gtest.h>

#include <cmath>

#include "comm/mpi/mpi_communicator.h"
#include "model/transformer.h"
#include "tests/test_util.h"

namespace moe {
namespace {

struct Counted {
  int64_t total = 0, active = 0, embedding = 0;
};

// What the model holds, on one process (ep 1: every routed expert is local, once). Active: a token
// passes through top_k of each MoE layer's E experts, so (E - k)/E of every routed expert tensor is idle.
Counted count_allocated(const Config& c) {
  auto backend = make_cpu_backend({});
  ProcessGroups self = test::self_groups();
  Transformer model(c, *backend, self);
  Counted n;
  double idle = 0;
  for (Param* p : model.params().trainable()) {
    n.total += p->value.numel();
    if (p->name == "embedding" || p->name == "head") n.embedding += p->value.numel();
    if (p->scope == ParamScope::kExpert) {
      EXPECT_EQ(p->shape[0], c.moe.num_experts) << p->name << ": ep 1 holds every expert";
      idle += static_cast<double>(p->value.numel()) * (c.moe.num_experts - c.moe.top_k) / c.moe.num_experts;
    }
  }
  n.active = n.total - std::llround(idle);
  return n;
}

struct SizeCase {
  const char* name;
  std::vector<std::string> overrides;
};

void PrintTo(const SizeCase& c, std::ostream* os) { *os << c.name; }

class ModelSizeOf : public ::testing::TestWithParam<SizeCase> {};

TEST_P(ModelSizeOf, EqualsTheParametersTheModelAllocates) {
  std::vector<std::string> overrides{"model.vocab_size=64", "model.hidden=16", "model.layers=3", "model.heads=4",
                                     "model.seq_len=8", "moe.num_experts=4", "moe.top_k=2", "moe.ffn_hidden=12"};
  overrides.insert(overrides.end(), GetParam().overrides.begin(), GetParam().overrides.end());
  const Config c = test::config(overrides);
  const ModelSize size = model_size(c);
  const Counted want = count_allocated(c);
  EXPECT_EQ(size.total_params, want.total);
  EXPECT_EQ(size.active_params, want.active);
  EXPECT_EQ(size.embedding_params, want.embedding);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, ModelSizeOf,
    ::testing::Values(SizeCase{"dense", {"moe.num_experts=0", "model.ffn_hidden=20"}},
                      SizeCase{"dense_tied", {"moe.num_experts=0", "model.tie_embeddings=true"}},
                      SizeCase{"moe", {}},
                      SizeCase{"moe_tied_top1", {"model.tie_embeddings=true", "moe.top_k=1"}},
                      SizeCase{"shared_experts", {"moe.num_shared_experts=2", "moe.shared_ffn_hidden=6"}},
                      SizeCase{"first_dense_then_every_other",
                               {"moe.first_dense_layers=1", "moe.every=2", "model.ffn_hidden=24",
                                "moe.num_shared_experts=1"}},
                      SizeCase{"grouped_query_gelu_experts",
                               {"model.kv_heads=2", "moe.expert_type=gelu", "moe.first_dense_layers=2"}},
                      SizeCase{"default_mid_sizes", {"model.ffn_hidden=0", "moe.ffn_hidden=0",
                                                     "moe.first_dense_layers=1", "moe.num_shared_experts=1"}}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace moe
