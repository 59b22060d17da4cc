// Routing family table. CPU: the gate checked by hand (top-k, gates, capacity slots, 1st-before-2nd
// priority, batch priority, drops, random routing, the dropless row layout, the capacity formula).
// CUDA: every router op and every gate option against the CPU.
#include <gtest/gtest.h>

#include <climits>
#include <cmath>
#include <random>

#include "model/router.h"
#include "runtime/topk.h"
#include "tests/ops/op_test.h"

namespace moe {
namespace {

class GateTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> backend = make_cpu_backend({});

  Tensor probs(int64_t tokens, int experts, const std::vector<double>& v) {
    Tensor t = host_tensor({tokens, experts}, DType::kF64);
    std::copy(v.begin(), v.end(), t.data<double>());
    return t;
  }
  std::vector<int> ints(const Tensor& t) {
    std::vector<int> out(t.data<int32_t>(), t.data<int32_t>() + t.numel());
    return out;
  }
  std::vector<double> reals(const Tensor& t) {
    return std::vector<double>(t.data<double>(), t.data<double>() + t.numel());
  }
  RouteArgs args(int experts, int k, int64_t capacity, int groups = 1) {
    RouteArgs a;
    a.num_experts = experts;
    a.top_k = k;
    a.capacity = capacity;
    a.num_groups = groups;
    return a;
  }
};

TEST_F(GateTest, TopKOrdersByScoreAndBreaksTiesTowardsLowerIndex) {
  Tensor p = probs(2, 4, {0.1, 0.4, 0.2, 0.3,  /**/ 0.25, 0.25, 0.25, 0.25});
  RouteState s;
  RouteArgs a = args(4, 3, 0);
  a.normalize = false;
  route(*backend, a, p, Tensor(), s);
  EXPECT_EQ(ints(s.expert_idx), (std::vector<int>{1, 3, 2, /**/ 0, 1, 2}));
  EXPECT_EQ(reals(s.gate), (std::vector<double>{0.4, 0.3, 0.2, 0.25, 0.25, 0.25}));
  EXPECT_EQ(ints(s.choices), (std::vector<int>{1, 2, 2, 1}));
}

// The CUDA router's warp rounds (topk_lane_offer on 32 lanes, then the kernel's butterfly reduction)
// give the insertion top-k's list on rows with ties, signed zeros, -inf and more experts than lanes.
TEST(WarpTopK, LaneRoundsGiveTheInsertionTopK) {
  constexpr int kLanes = 32;
  const float kInf = INFINITY;
  const float p_levels[] = {-0.0f, 0.0f, 0.125f, 0.25f, 0.5f, 1.0f};
  const float bias_levels[] = {-kInf, -0.25f, -0.0f, 0.0f, 0.25f};
  std::mt19937 gen(7);
  int rows = 0;
  for (int e_count : {1, 5, 31, 32, 33, 64, 80, 160, 257}) {
    for (int k : {1, 2, 3, 8, 16}) {
      if (k > e_count) continue;
      for (int row = 0; row < 12; ++row, ++rows) {
        std::vector<float> p(e_count), bias(e_count);
        for (float& v : p) v = p_levels[gen() % 6];
        for (float& v : bias) v = bias_levels[gen() % 5];
        const float* b = row % 2 ? bias.data() : nullptr;
        std::vector<float> key(k);
        std::vector<int> want(k);
        int n = 0;
        for (int e = 0; e < e_count; ++e) topk_insert(key.data(), want.data(), n, k, p[e] + (b ? b[e] : 0.0f), e);

        std::vector<int> got(k);
        float last_v = 0.0f;
        int last_e = -1;
        for (int j = 0; j < k; ++j) {
          float v[kLanes];
          int ex[kLanes];
          for (int lane = 0; lane < kLanes; ++lane)
            topk_lane_offer(p.data(), b, e_count, lane, kLanes, last_v, last_e, &v[lane], &ex[lane]);
          for (int o = kLanes / 2; o > 0; o /= 2) {  // __shfl_xor_sync: every lane sees lane ^ o's pair
            float nv[kLanes];
            int ne[kLanes];
            for (int lane = 0; lane < kLanes; ++lane) {
              const int other = lane ^ o;
              const bool take = ranks_before(v[other], ex[other], v[lane], ex[lane]);
              nv[lane] = take ? v[other] : v[lane];
              ne[lane] = take ? ex[other] : ex[lane];
            }
            std::copy(nv, nv + kLanes, v);
            std::copy(ne, ne + kLanes, ex);
          }
          for (int lane = 1; lane < kLanes; ++lane) ASSERT_EQ(ex[lane], ex[0]) << "lanes disagree";
          got[j] = ex[0];
          last_v = v[0];
          last_e = ex[0];
        }
        EXPECT_EQ(got, want) << e_count << " experts, top-" << k << ", row " << row << (b ? " with bias" : "");
      }
    }
  }
  EXPECT_GT(rows, 300);
}

TEST_F(GateTest, NormalizedGatesSumToOneAndBiasOnlyChangesSelection) {
  Tensor p = probs(1, 4, {0.1, 0.5, 0.3, 0.1});
  Tensor bias = host_tensor({4}, DType::kF64);
  bias.data<double>()[3] = 1.0;  // pulls expert 3 into the top-2 without changing its gate value
  RouteState s;
  route(*backend, args(4, 2, 0), p, bias, s);
  EXPECT_EQ(ints(s.expert_idx), (std::vector<int>{3, 1}));
  std::vector<double> g = reals(s.gate);
  EXPECT_NEAR(g[0], 0.1 / 0.6, 1e-15);
  EXPECT_NEAR(g[1], 0.5 / 0.6, 1e-15);
  EXPECT_EQ(reals(s.score), (std::vector<double>{0.1, 0.5}));
}

TEST_F(GateTest, HardGatesAreOneOrOneOverK) {
  Tensor p = probs(1, 4, {0.1, 0.5, 0.3, 0.1});
  RouteState s;
  RouteArgs a = args(4, 2, 0);
  a.gate_mode = GateMode::kHard;
  route(*backend, a, p, Tensor(), s);
  EXPECT_EQ(reals(s.gate), (std::vector<double>{0.5, 0.5}));
  a.normalize = false;
  route(*backend, a, p, Tensor(), s);
  EXPECT_EQ(reals(s.gate), (std::vector<double>{1.0, 1.0}));
}

TEST_F(GateTest, CapacityFillsInTokenOrderAndDropsTheRest) {
  // 4 tokens, all prefer expert 0; capacity 2: tokens 0 and 1 get slots 0 and 1, tokens 2 and 3 drop.
  Tensor p = probs(4, 2, {0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4});
  RouteState s;
  route(*backend, args(2, 1, 2), p, Tensor(), s);
  EXPECT_EQ(ints(s.row_idx), (std::vector<int>{0, 1, -1, -1}));
  EXPECT_EQ(ints(s.fill), (std::vector<int>{2, 0}));
  EXPECT_EQ(ints(s.counts)[0], 2);
  EXPECT_EQ(s.num_rows, 4);  // 2 experts x 1 group x capacity 2
}

TEST_F(GateTest, EveryFirstChoiceComesBeforeAnySecondChoice) {
  // Token 0 picks (0, 1); tokens 1 and 2 pick (1, 0). Capacity 2. Token order alone would give token 0's
  // second choice (expert 1) a slot before token 2's first choice; GShard priority must not.
  Tensor p = probs(3, 2, {0.6, 0.4, /**/ 0.3, 0.7, /**/ 0.2, 0.8});
  RouteState s;
  route(*backend, args(2, 2, 2), p, Tensor(), s);
  // rows: expert e slot j -> e * 2 + j
  std::vector<int> rows = ints(s.row_idx);
  EXPECT_EQ(rows[0], 0);        // token 0, 1st choice: expert 0 slot 0
  EXPECT_EQ(rows[2], 2);        // token 1, 1st choice: expert 1 slot 0
  EXPECT_EQ(rows[4], 3);        // token 2, 1st choice: expert 1 slot 1
  EXPECT_EQ(rows[1], -1);       // token 0, 2nd choice: expert 1 is full
  EXPECT_EQ(rows[3], 1);        // token 1, 2nd choice: expert 0 slot 1
  EXPECT_EQ(rows[5], -1);       // token 2, 2nd choice: expert 0 is full
  EXPECT_EQ(ints(s.counts)[0], 2);
}

TEST_F(GateTest, BatchPriorityServesHighestTopScoreFirst) {
  // All pick expert 0 first; capacity 1. Token order would serve token 0; batch priority serves token 2
  // (top-1 score 0.9).
  Tensor p = probs(3, 2, {0.6, 0.4, /**/ 0.7, 0.3, /**/ 0.9, 0.1});
  RouteState s;
  RouteArgs a = args(2, 1, 1);
  route(*backend, a, p, Tensor(), s);
  EXPECT_EQ(ints(s.row_idx), (std::vector<int>{0, -1, -1}));
  a.priority = Priority::kBatch;
  route(*backend, a, p, Tensor(), s);
  EXPECT_EQ(ints(s.row_idx), (std::vector<int>{-1, -1, 0}));
}

TEST_F(GateTest, CapacityIsPerGroup) {
  // Two groups of two tokens; every token picks expert 1; capacity 1 per group: one token of each group.
  Tensor p = probs(4, 2, {0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6});
  RouteState s;
  route(*backend, args(2, 1, 1, 2), p, Tensor(), s);
  // layout (expert, group, slot): expert 1 group 0 -> row 2, group 1 -> row 3
  EXPECT_EQ(ints(s.row_idx), (std::vector<int>{2, -1, 3, -1}));
  EXPECT_EQ(ints(s.fill), (std::vector<int>{0, 0, 1, 1}));
}

TEST_F(GateTest, DroplessRowsAreExpertMajorAndContiguous) {
  Tensor p = probs(4, 3, {0.1, 0.2, 0.7, /**/ 0.8, 0.1, 0.1, /**/ 0.1, 0.1, 0.8, /**/ 0.2, 0.7, 0.1});
  RouteState s;
  route(*backend, args(3, 1, 0), p, Tensor(), s);
  // expert 0: token 1; expert 1: token 3; expert 2: tokens 0, 2
  EXPECT_EQ(ints(s.row_idx), (std::vector<int>{2, 0, 3, 1}));
  EXPECT_EQ(s.num_rows, 4);
  EXPECT_EQ(ints(s.counts)[0], 0);
}

TEST_F(GateTest, EmptyExpertsAndSkewedRouting) {
  // Everything to expert 2 of 4: the others stay empty, dropless sends every token there.
  std::vector<double> v;
  for (int t = 0; t < 5; ++t) v.insert(v.end(), {0.1, 0.1, 0.7, 0.1});
  RouteState s;
  route(*backend, args(4, 1, 0), probs(5, 4, v), Tensor(), s);
  EXPECT_EQ(ints(s.fill), (std::vector<int>{0, 0, 5, 0}));
  EXPECT_EQ(ints(s.row_idx), (std::vector<int>{0, 1, 2, 3, 4}));
}

TEST_F(GateTest, RandomRoutingKeepsSecondChoiceWithProbabilityTwiceItsShare) {
  // 2000 tokens with scores (0.6, 0.3, 0.1): g2 = 0.3 / 0.9 = 1/3, kept when 2/3 > U. Check each coin
  // against the documented stream, and that the kept fraction is close to 2/3.
  const int n = 2000;
  std::vector<double> v;
  for (int t = 0; t < n; ++t) v.insert(v.end(), {0.6, 0.3, 0.1});
  RouteArgs a = args(3, 2, 0);
  a.random_routing = true;
  a.rng = RngStream{5, rng_stream(RngPurpose::kRandomRouting, 3, 1)};
  a.token_offset = 100;
  RouteState s;
  route(*backend, a, probs(n, 3, v), Tensor(), s);
  std::vector<int> rows = ints(s.row_idx);
  int kept = 0;
  for (int t = 0; t < n; ++t) {
    bool expect_keep = 2.0 / 3.0 > a.rng.uniform(static_cast<uint64_t>(100 + t));
    EXPECT_EQ(rows[2 * t + 1] >= 0, expect_keep) << "token " << t;
    EXPECT_GE(rows[2 * t], 0);  // the 1st choice is never touched
    kept += rows[2 * t + 1] >= 0;
  }
  EXPECT_EQ(ints(s.counts)[1], n - kept);
  EXPECT_EQ(ints(s.counts)[0], 0);  // skipped is not dropped
  EXPECT_NEAR(kept / double(n), 2.0 / 3.0, 0.04);
  EXPECT_EQ(ints(s.choices)[1], n);  // the load-balance counts see every choice
}

// Forced routing: every token gets k distinct experts drawn from the configured weights, whatever the
// scores; the scores and gates are the router's values at the drawn experts.
TEST_F(GateTest, ForcedRoutingFollowsItsDistribution) {
  const int n = 20000, e = 8, k = 2;
  std::vector<double> v;
  for (int t = 0; t < n; ++t)
    for (int x = 0; x < e; ++x) v.push_back(x == 7 ? 0.9 : 0.1 / 7);  // the router wants expert 7
  const ForcedRouting kinds[] = {{ForcedKind::kUniform, 0}, {ForcedKind::kZipf, 1.2}, {ForcedKind::kHot, 0.6}};
  for (const ForcedRouting& f : kinds) {
    SCOPED_TRACE(forced_routing_name(f));
    RouteArgs a = args(e, k, 0);
    a.forced = f;
    a.forced_rng = RngStream{9, rng_stream(RngPurpose::kForcedRouting, 2, 0)};
    a.token_offset = 1000;
    RouteState s;
    route(*backend, a, probs(n, e, v), Tensor(), s);
    std::vector<int> idx = ints(s.expert_idx);
    std::vector<double> score = reals(s.score), gate = reals(s.gate);
    double weight_sum = 0;
    for (int x = 0; x < e; ++x) weight_sum += forced_weight(f, x, e);
    std::vector<int> first(e, 0);
    for (int t = 0; t < n; ++t) {
      ASSERT_NE(idx[t * k], idx[t * k + 1]) << "token " << t << " got one expert twice";
      ++first[idx[t * k]];
      for (int j = 0; j < k; ++j) EXPECT_EQ(score[t * k + j], v[t * e + idx[t * k + j]]);
      EXPECT_NEAR(gate[t * k] + gate[t * k + 1], 1.0, 1e-12);
    }
    // 1st choices follow the weights: each count within 5 standard deviations of n p.
    for (int x = 0; x < e; ++x) {
      const double p = forced_weight(f, x, e) / weight_sum;
      EXPECT_NEAR(first[x], n * p, 5 * std::sqrt(n * p * (1 - p)) + 1) << "expert " << x;
    }
    // Every choice counts for the load-balance statistics, and the draws are the documented ones.
    std::vector<int> choices = ints(s.choices), all(e, 0);
    for (int a2 : idx) ++all[a2];
    EXPECT_EQ(choices, all);
    int want[k];
    forced_choice(f, e, k, a.forced_rng, 1000 + 123, want);
    EXPECT_EQ(idx[123 * k], want[0]);
    EXPECT_EQ(idx[123 * k + 1], want[1]);
  }
  // hot:F gives expert 0 a fraction F of the 1st choices; zipf:0 is uniform.
  EXPECT_NEAR(forced_weight({ForcedKind::kHot, 0.6}, 0, 8) / (forced_weight({ForcedKind::kHot, 0.6}, 0, 8) + 7), 0.6,
              1e-12);
  EXPECT_EQ(forced_weight({ForcedKind::kZipf, 0.0}, 5, 8), 1.0);
}

TEST_F(GateTest, RouteBackwardDifferentiatesNormalizedGates) {
  Tensor p = probs(1, 3, {0.5, 0.3, 0.2});
  RouteArgs a = args(3, 2, 0);
  RouteState s;
  route(*backend, a, p, Tensor(), s);
  Tensor dg = host_tensor({1, 2}, DType::kF64);
  dg.data<double>()[0] = 1.0;  // d/ds of g_0 = s0 / (s0 + s1)
  Tensor ds = host_tensor({1, 3}, DType::kF64);
  route_backward(*backend, p, s, dg, ds);
  EXPECT_NEAR(ds.data<double>()[0], 0.3 / (0.8 * 0.8), 1e-15);
  EXPECT_NEAR(ds.data<double>()[1], -0.5 / (0.8 * 0.8), 1e-15);
  EXPECT_EQ(ds.data<double>()[2], 0.0);  // not selected: no gradient
  // Hard gates (straight-through) differentiate the same soft gates.
  a.gate_mode = GateMode::kHard;
  route(*backend, a, p, Tensor(), s);
  Tensor ds_hard = host_tensor({1, 3}, DType::kF64);
  route_backward(*backend, p, s, dg, ds_hard);
  for (int e = 0; e < 3; ++e) EXPECT_EQ(ds_hard.data<double>()[e], ds.data<double>()[e]);
}

TEST(Capacity, FormulaMinimumAndCap) {
  MoeConfig m;
  m.num_experts = 8;
  m.top_k = 2;
  m.capacity_factor = 1.25;
  m.min_capacity = 4;
  EXPECT_EQ(moe_capacity(m, 4096), 1280);  // ceil(2 * 4096 / 8 * 1.25)
  EXPECT_EQ(moe_capacity(m, 100), 32);     // ceil(31.25)
  EXPECT_EQ(moe_capacity(m, 8), 4);        // min_capacity
  EXPECT_EQ(moe_capacity(m, 3), 3);        // never more than the group
  m.capacity_factor = 0.0;
  EXPECT_EQ(moe_capacity(m, 4096), 0);     // dropless
}


TEST_F(CudaOps, RouterScoresAndLosses) {
  const int64_t t = 129;
  const int e = 24;
  RngStream rng{3, rng_stream(RngPurpose::kJitter, 4, 1)};
  compare("jitter", [&](Backend& b) {
    Tensor x = rnd(b, {t, 40}, 28), out = b.empty({t, 40}, DType::kF32);
    jitter(b, x, 0.1, rng, 1000, out);
    return std::vector<Tensor>{out};
  });
  for (ScoreFn fn : {ScoreFn::kSoftmax, ScoreFn::kSigmoid}) {
    compare("router_probs", [&](Backend& b) {
      Tensor logits = rnd(b, {t, e}, 29, 2.0), probs = b.empty({t, e}, DType::kF32);
      router_probs(b, fn, logits, probs);
      Tensor dprobs = rnd(b, {t, e}, 30), dlogits = rnd(b, {t, e}, 31);
      router_probs_backward(b, fn, dprobs, probs, 0.7, dlogits);
      return std::vector<Tensor>{probs, dlogits};
    });
  }
  compare("gumbel_probs", [&](Backend& b) {
    Tensor logits = rnd(b, {t, e}, 32), probs = b.empty({t, e}, DType::kF32);
    gumbel_probs(b, logits, 0.5, rng, 77, probs);
    return std::vector<Tensor>{probs};
  });
  compare("z_loss", [&](Backend& b) {
    Tensor logits = rnd(b, {t, e}, 33, 2.0), dl = rnd(b, {t, e}, 34), sum = b.empty({1}, DType::kF64);
    z_loss(b, logits, 0.01, dl, sum);
    return std::vector<Tensor>{dl, sum};
  });
  compare("add_row_vector", [&](Backend& b) {
    Tensor x = rnd(b, {t, e}, 35), v = random_tensor(b, {e}, DType::kF64, 36);
    add_row_vector(b, x, v, 0.25);
    return std::vector<Tensor>{x};
  });
}

TEST_F(CudaOps, RouteTopKOnWideRowsWithTiesAndNan) {
  // More experts than a warp has lanes, probabilities on a coarse grid (many ties, signed zeros), and two
  // rows with a NaN (which lane 0 walks alone), with and without a bias: the CPU's lists and counts, exactly.
  const int64_t t = 70;
  for (int e : {33, 80, 160}) {
    std::vector<float> host(static_cast<size_t>(t * e));
    for (size_t i = 0; i < host.size(); ++i)
      host[i] = i % 11 == 0 ? -0.0f : static_cast<float>(i * 2654435761u % 7) * 0.125f;
    host[5 * e + 3] = NAN;
    host[17 * e + e - 1] = NAN;
    for (int k : {1, 4, 16}) {
      const std::string name = std::to_string(e) + " experts, top-" + std::to_string(k);
      compare(name.c_str(), [&](Backend& b) {
        Tensor probs = b.empty({t, e}, DType::kF32);
        b.copy_from_host(host.data(), probs);
        RouteArgs args;
        args.num_experts = e;
        args.top_k = k;
        args.capacity = t * k;  // no drops
        args.normalize = false;
        RouteState s;
        route(b, args, probs, k == 4 ? rnd(b, {e}, 40, 0.01) : Tensor(), s);  // ties stay without bias
        return std::vector<Tensor>{s.expert_idx, s.choices};
      });
    }
  }
}

struct RouteCase {
  const char* name;
  int64_t capacity;
  int groups, top_k;
  Priority priority;
  bool random_routing, normalize, hard, bias;
  ForcedRouting forced;
};

TEST_F(CudaOps, RouteEveryGateOption) {
  const RouteCase cases[] = {
      {"capacity", 9, 1, 2, Priority::kToken, false, true, false, false, {}},
      {"dropless", 0, 1, 2, Priority::kToken, false, true, false, false, {}},
      {"groups+batch priority", 5, 3, 2, Priority::kBatch, false, true, false, true, {}},
      {"random routing", 12, 1, 2, Priority::kToken, true, true, false, false, {}},
      {"top-3 hard unnormalised", 7, 2, 3, Priority::kToken, false, false, true, false, {}},
      {"dropless top-6 groups", 0, 4, 6, Priority::kBatch, false, true, false, true, {}},
      {"forced zipf:1.2", 6, 2, 2, Priority::kToken, false, true, false, true, {ForcedKind::kZipf, 1.2}},
      {"forced hot:0.5 top-3", 0, 1, 3, Priority::kBatch, false, true, false, false, {ForcedKind::kHot, 0.5}},
      {"forced uniform", 4, 1, 1, Priority::kToken, false, false, false, false, {ForcedKind::kUniform, 0}},
  };
  const int64_t t = 120;
  const int e = 16;
  for (const RouteCase& c : cases) {
    compare(c.name, [&](Backend& b) {
      RouteArgs args;
      args.num_experts = e;
      args.top_k = c.top_k;
      args.num_groups = c.groups;
      args.capacity = c.capacity;
      args.normalize = c.normalize;
      args.gate_mode = c.hard ? GateMode::kHard : GateMode::kSoft;
      args.priority = c.priority;
      args.random_routing = c.random_routing;
      args.rng = RngStream{5, rng_stream(RngPurpose::kRandomRouting, 1, 0)};
      args.token_offset = 300;
      args.forced = c.forced;
      args.forced_rng = RngStream{5, rng_stream(RngPurpose::kForcedRouting, 1, 0)};
      Tensor probs = rnd(b, {t, e}, 37), bias = c.bias ? rnd(b, {e}, 38, 0.1) : Tensor();
      RouteState s;
      route(b, args, probs, bias, s);
      Tensor stats = b.empty({RouterStatsLayout{e}.size()}, DType::kF64);
      router_stats(b, s, probs, stats);
      Tensor z_sum = stats.rows(RouterStatsLayout{e}.z_sum(), RouterStatsLayout{e}.z_sum() + 1);
      b.fill(z_sum, 0.0);  // router_stats leaves it to z_loss
      Tensor dgate = rnd(b, {t, c.top_k}, 39), dsel = b.empty({t, e}, DType::kF32);
      route_backward(b, probs, s, dgate, dsel);
      Tensor num_rows = b.empty({1}, DType::kI32);
      int32_t nr = static_cast<int32_t>(s.num_rows);
      b.copy_from_host(&nr, num_rows);
      return std::vector<Tensor>{s.expert_idx, s.score, s.gate, s.row_idx, s.fill, s.choices, s.counts, num_rows,
                                 stats, dsel};
    });
  }
}


}  // namespace
}  // namespace moe
