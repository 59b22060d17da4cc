// Distributed equivalence: the MoE layer on N ranks, for every (ep, dp) layout that fits, gives the same
// outputs, losses and gradients as one process fed the same global batch split into N capacity groups.
//
// Every rank also computes the single-process reference itself (over MPI_COMM_SELF), so each compares
// its own slice. Inputs and parameters are keyed by global indices, so both sides see the same numbers.
#include <gtest/gtest.h>

#include "comm/mpi/mpi_communicator.h"
#include "tests/test_util.h"

namespace moe {
namespace {

int world_size() { return mpi_world_size(); }
int world_rank() { return mpi_world_rank(); }

// Expert counts that every ep dividing the world can shard: 8 for 1, 2, 4, 8 ranks; 6 for 3.
int experts_for_world() { return world_size() % 3 == 0 ? 6 : 8; }

std::vector<int> layouts(int experts) {
  std::vector<int> eps;
  for (int ep = 1; ep <= world_size(); ++ep) {
    if (world_size() % ep == 0 && experts % ep == 0) eps.push_back(ep);
  }
  return eps;
}

struct Variant {
  const char* name;
  void (*apply)(Config&);
};

const Variant kVariants[] = {
    {"capacity_with_drops",
     [](Config& c) {
       c.moe.capacity_factor = 0.8;
       c.moe.min_capacity = 1;
     }},
    {"dropless", [](Config& c) { c.moe.capacity_factor = 0; }},
    {"sigmoid_bias_random_routing_jitter_batch_priority",
     [](Config& c) {
       c.moe.score = ScoreFn::kSigmoid;
       c.moe.random_routing = true;
       c.moe.router_jitter = 0.05;
       c.moe.priority = Priority::kBatch;
       c.moe.capacity_factor = 1.0;
     }},
    {"shared_experts_gumbel_top3_gelu",
     [](Config& c) {
       c.moe.top_k = 3;
       c.moe.num_shared_experts = 2;
       c.moe.router_grad = RouterGrad::kGumbel;
       c.moe.expert_type = ExpertType::kGelu;
       c.moe.capacity_factor = 1.25;
     }},
    {"straight_through_unnormalized_groups",
     [](Config& c) {
       c.moe.router_grad = RouterGrad::kStraightThrough;
       c.moe.normalize_topk = false;
       c.moe.group_size = 6;  // two capacity groups per rank
       c.moe.capacity_factor = 1.0;
     }},
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

class Equivalence : public ::testing::TestWithParam<Variant> {};

void expect_equivalent(const Config& base, int ep, DType dtype, double tol, double r_scale = 1.0) {
  const int64_t local = 12, global = local * world_size(), offset = local * world_rank();
  const int64_t h = base.model.hidden;
  Config dist = base;
  dist.runtime.dtype = dtype;
  dist.parallel.ep = ep;
  // The reference splits the global batch into the same capacity groups the ranks form.
  Config ref = dist;
  ref.parallel.ep = 1;
  ref.moe.group_size = base.moe.group_size > 0 ? base.moe.group_size : static_cast<int>(local);

  auto backend = make_cpu_backend({});
  ProcessGroups groups = test::world_groups(ep);
  test::LayerResult got = test::run_layer(dist, *backend, groups, local, offset, global, true, 3, r_scale);
  ProcessGroups self = test::self_groups();
  test::LayerResult want = test::run_layer(ref, *backend, self, global, 0, global, true, 3, r_scale);

  auto slice = [&](const std::vector<double>& v) {
    return std::vector<double>(v.begin() + offset * h, v.begin() + (offset + local) * h);
  };
  const std::string where = "ep=" + std::to_string(ep) + " dp=" + std::to_string(world_size() / ep);
  EXPECT_LT(test::rel_diff(got.y, slice(want.y)), tol) << where << ": y";
  EXPECT_LT(test::rel_diff(got.dx, slice(want.dx)), tol) << where << ": dx";
  EXPECT_NEAR(got.aux, want.aux, tol * std::max(1e-3, std::abs(want.aux))) << where;
  EXPECT_NEAR(got.z, want.z, tol * std::max(1e-3, std::abs(want.z))) << where;
  EXPECT_EQ(got.stats.load, want.stats.load) << where;
  EXPECT_EQ(got.stats.tokens, want.stats.tokens) << where;
  EXPECT_EQ(got.stats.dropped, want.stats.dropped) << where;
  int64_t local_experts = 0;
  for (const auto& [name, g] : got.grads) {
    ASSERT_TRUE(want.grads.count(name)) << where << ": " << name;
    EXPECT_LT(test::rel_diff(g, want.grads.at(name)), tol) << where << ": gradient of " << name;
    local_experts += name.find(".experts.") != std::string::npos;
  }
  const int w_per_expert = base.moe.expert_type == ExpertType::kSwiGLU ? 3 : 2;
  EXPECT_EQ(local_experts, int64_t{w_per_expert} * base.moe.num_experts / ep) << where;
}

TEST_P(Equivalence, EveryLayoutMatchesOneProcess) {
  Config c = test::small_config(experts_for_world(), 2, 8);
  GetParam().apply(c);
  for (int ep : layouts(c.moe.num_experts)) expect_equivalent(c, ep, DType::kF64, 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Variants, Equivalence, ::testing::ValuesIn(kVariants),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(EquivalenceF32, DefaultLayerWithinOneInTenToTheFive) {
  Config c = test::small_config(experts_for_world(), 2, 16);
  c.moe.capacity_factor = 1.25;
  c.moe.num_shared_experts = 1;
  for (int ep : layouts(c.moe.num_experts)) expect_equivalent(c, ep, DType::kF32, 1e-5);
}

TEST(AuxLossSync, LossAndGradientAreThoseOfTheGlobalBatch) {
  // dy = 0 and no z-loss: the only gradient is the aux loss's, which needs the global counts and
  // probability sums on every rank.
  Config c = test::small_config(experts_for_world(), 2, 8);
  c.moe.aux_loss_coef = 1.0;
  c.moe.z_loss_coef = 0.0;
  for (int ep : layouts(c.moe.num_experts)) expect_equivalent(c, ep, DType::kF64, 1e-10, 0.0);
}

}  // namespace
}  // namespace moe
