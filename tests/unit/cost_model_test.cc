// The cost model: its pieces against hand-computed values (kept rows under a capacity, the GEMM grid's
// interpolation, the alpha-beta fit, forced routing's choice probabilities) and whole-step predictions
// whose phases can be worked out by hand when every rate but one is infinite.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "perf/calibrate.h"
#include "perf/cost_model.h"
#include "model/router.h"
#include "model/transformer.h"
#include "tests/test_util.h"
#include "base/error.h"

namespace moe {
namespace {

constexpr double kInf = 1e300;

// Constants where only GEMMs (alpha 0, `rate` FLOP/s) and the named collectives cost anything.
CostConstants gemm_only(double rate, int ranks = 8) {
  NodeConstants n;
  n.ranks = ranks;
  n.gemm.flops_per_s = rate;
  n.stream_bytes_per_s = n.softmax_elems_per_s = n.swiglu_elems_per_s = n.adamw_params_per_s = kInf;
  n.all_to_all.bytes_per_s = n.all_reduce.bytes_per_s = kInf;
  CostConstants k;
  k.device = "cpu";
  k.nodes = {n};
  return k;
}

Config small(int experts) {
  Config c;
  c.model.hidden = 64;
  c.model.layers = 1;
  c.model.heads = 4;
  c.model.seq_len = 32;
  c.model.ffn_hidden = 128;
  c.moe.num_experts = experts;
  c.moe.top_k = 2;
  c.moe.ffn_hidden = 96;
  c.moe.capacity_factor = 0;  // dropless
  c.train.batch_size = 8;
  return c;
}

// The router and the cost model take their capacity from one formula (moe_capacity): the padded
// exchange buffer the cost model prices is the send buffer the router lays out, slot for slot.
TEST(CostModel, ThePaddedExchangeBufferIsTheRoutersSendBuffer) {
  ProcessGroups groups = test::self_groups();
  auto backend = make_cpu_backend({});
  struct Case {
    const char* experts;
    const char* top_k;
    const char* factor;
    const char* group;
    const char* min_capacity;
  };
  for (const Case& k : {Case{"8", "2", "1.25", "0", "4"}, Case{"6", "3", "1.0", "32", "1"},
                        Case{"4", "1", "0.3", "16", "4"}, Case{"16", "4", "2.0", "64", "0"}}) {
    SCOPED_TRACE(std::string("experts ") + k.experts + ", top_k " + k.top_k + ", factor " + k.factor + ", group " + k.group);
    const Config c = parse_config("", "", {"model.hidden=8", std::string("moe.num_experts=") + k.experts,
                                           std::string("moe.top_k=") + k.top_k, std::string("moe.capacity_factor=") + k.factor,
                                           std::string("moe.group_size=") + k.group,
                                           std::string("moe.min_capacity=") + k.min_capacity,
                                           "runtime.dispatch_layout=padded"});
    const int64_t tokens = 64;
    ParamSet params;
    Router router(params, "r", c, 0);
    params.allocate(*backend, DType::kF64, 1);
    Tensor x = test::random_tensor(*backend, {tokens, 8}, DType::kF64, 1);
    StepContext ctx;
    ctx.seq_len = tokens;
    ctx.global_tokens = tokens;
    const RouteState& route = router.forward(*backend, *groups.world, x, ctx);
    const int64_t group = c.moe.group_size > 0 ? c.moe.group_size : tokens;
    EXPECT_EQ(route.capacity(), moe_capacity(c.moe, group));
    EXPECT_EQ(static_cast<double>(route.num_rows), expert_buffer_rows(c, tokens, 0, 0));
  }
}

TEST(CostModel, KeptRowsUnderACapacity) {
  // X ~ Bin(2, 1/2): 0, 1, 2 with 1/4, 1/2, 1/4; min(X, 1) has mean 3/4 and variance 3/4 - 9/16
  KeptRows r = kept_rows(2, 0.5, 1);
  EXPECT_NEAR(r.mean, 0.75, 1e-12);
  EXPECT_NEAR(r.variance, 0.1875, 1e-12);
  r = kept_rows(1000, 0.1, 0);  // no capacity: the binomial's own moments
  EXPECT_NEAR(r.mean, 100, 1e-9);
  EXPECT_NEAR(r.variance, 90, 1e-9);
  r = kept_rows(512, 0.25, 160);  // a capacity 3 sd above the mean keeps nearly everything
  EXPECT_GT(r.mean, 127.9);
  EXPECT_LT(r.mean, 128.0);
  r = kept_rows(512, 0.5, 160);  // far below the mean: the capacity itself
  EXPECT_NEAR(r.mean, 160, 1e-6);
  EXPECT_NEAR(r.variance, 0, 1e-6);
}

TEST(CostModel, GemmGridInterpolatesAndScalesBeyondIt) {
  // t = 2mnk / R is linear in log m, log n, log k: the log-space interpolation is exact inside the grid
  GemmModel g;
  g.dims = {16, 64, 256};
  const double rate = 5e9;
  for (double m : g.dims)
    for (double n : g.dims)
      for (double k : g.dims) g.seconds.push_back(2 * m * n * k / rate);
  EXPECT_NEAR(g.time(16, 64, 256), 2.0 * 16 * 64 * 256 / rate, 1e-15);
  EXPECT_NEAR(g.time(100, 30, 200) / (2.0 * 100 * 30 * 200 / rate), 1.0, 1e-12);
  EXPECT_NEAR(g.time(1024, 64, 64) / (2.0 * 1024 * 64 * 64 / rate), 1.0, 1e-12) << "above the grid: by FLOPs";
  EXPECT_NEAR(g.time(4, 16, 16), g.time(16, 16, 16), 1e-18) << "below the grid: the smallest GEMM's time";
  EXPECT_EQ(g.time(0, 64, 64), 0.0);
  GemmModel a;
  a.alpha_s = 1e-6;
  a.flops_per_s = 1e9;
  EXPECT_NEAR(a.time(10, 10, 10), 1e-6 + 2e3 / 1e9, 1e-18);
}

TEST(CostModel, AlphaBetaFitRecoversItsLine) {
  std::vector<double> x{1e3, 1e4, 1e5, 1e6}, t;
  for (double b : x) t.push_back(20e-6 + b / 2e9);
  AlphaBeta ab = fit_alpha_beta(x, t);
  EXPECT_NEAR(ab.alpha_s, 20e-6, 1e-12);
  EXPECT_NEAR(ab.bytes_per_s / 2e9, 1.0, 1e-9);
  for (double& v : t) v -= 20e-6 - 1e-9;  // no latency at all: alpha >= 0 is kept
  ab = fit_alpha_beta(x, t);
  EXPECT_GE(ab.alpha_s, 0.0);
  EXPECT_THROW(fit_alpha_beta({1}, {1}), InternalError);
}

TEST(CostModel, ChoiceProbabilitiesFollowTheRouting) {
  Config c = small(8);
  for (double p : expert_choice_probability(c)) EXPECT_DOUBLE_EQ(p, 2.0 / 8);
  c.moe.top_k = 1;
  c.moe.force_routing = parse_forced_routing("hot:0.5");
  std::vector<double> p = expert_choice_probability(c);
  EXPECT_NEAR(p[0], 0.5, 0.02);
  EXPECT_NEAR(p[7], 0.5 / 7, 0.01);
  c.moe.force_routing = parse_forced_routing("zipf:1");
  p = expert_choice_probability(c);
  double h = 0;
  for (int i = 1; i <= 8; ++i) h += 1.0 / i;
  EXPECT_NEAR(p[0], 1 / h, 0.015);
  EXPECT_NEAR(p[3], 0.25 / h, 0.01);
  p = expert_choice_probability(c, {3, 1, 1, 1, 1, 1, 1, 1});  // observed load wins
  EXPECT_NEAR(p[0], 0.3, 1e-12);
  EXPECT_THROW(expert_choice_probability(c, {1, 1}), InputError);
}

TEST(CostModel, PhasesByHandWithOnlyGemmsCosting) {
  const double rate = 1e9;
  const CostConstants k = gemm_only(rate);
  Config c = small(0);  // dense: FFN = three GEMMs of 2 T H F FLOPs forward, twice that backward
  PredictOptions o;
  o.ranks = 1;
  StepPrediction s = predict_step(c, k, o);
  const double T = 8 * 32, H = 64, F = 128;
  EXPECT_NEAR(s.phases.dense, 6 * T * H * F / rate, 1e-12);
  EXPECT_EQ(s.phases.experts, 0.0);
  // MoE on one rank without capacity: every one of the T k choices is an expert row
  c = small(8);
  s = predict_step(c, k, o);
  EXPECT_NEAR(s.phases.experts, 6 * T * 2 * H * 96 / rate, 1e-12);
  EXPECT_NEAR(s.phases.router, 2 * T * H * 8 / rate, 1e-12);
  EXPECT_NEAR(s.phases.dispatch, 0.0, 1e-12);
  EXPECT_NEAR(s.phases.exchange, 0.0, 1e-12);
  EXPECT_NEAR(s.imbalance, 1.0, 1e-12);
  // twice the GEMM rate halves a step made only of GEMMs
  EXPECT_NEAR(predict_step(c, gemm_only(2 * rate), o).step_s, s.step_s / 2, 1e-12);
}

TEST(CostModel, GradientSumAndExchangeByHand) {
  CostConstants k = gemm_only(kInf, 4);
  k.nodes[0].all_reduce.bytes_per_s = 1e9;
  k.nodes[0].all_to_all.bytes_per_s = 2e9;
  Config c = small(0);
  PredictOptions o;
  o.ranks = 4;
  StepPrediction s = predict_step(c, k, o);
  const double params = static_cast<double>(model_size(c).total_params);
  EXPECT_NEAR(s.phases.allreduce, 2.0 * 3 / 4 * 4 * params / 1e9, 1e-12);  // ring: 2 (n-1)/n
  // MoE over ep 4, dropless, uniform: each rank sends its T k rows, receives about as many; the
  // buffer's (n-1)/n crosses at 2 GB/s, once in dispatch and once in combine
  c = small(8);
  o.ep = 4;
  s = predict_step(c, k, o);
  const double T = 8 * 32 / 4.0;
  EXPECT_GT(s.phases.exchange, 2 * T * 2 * 64 * 4 * 0.75 / 2e9);
  EXPECT_EQ(s.phases.dispatch, s.phases.combine);
  // across nodes the slower inter-node rate sets the time
  k.inter_all_to_all.bytes_per_s = 2e8;
  k.inter_all_reduce.bytes_per_s = 1e8;
  o.ranks_per_node = 2;
  const StepPrediction two_nodes = predict_step(c, k, o);
  EXPECT_EQ(two_nodes.nodes, 2);
  EXPECT_GT(two_nodes.phases.exchange, 4 * s.phases.exchange);
  o.ranks_per_node = 0;
  k.inter_all_to_all.bytes_per_s = 0;
  o.ranks_per_node = 2;
  EXPECT_THROW(predict_step(c, k, o), InputError) << "no inter-node constants";
}

TEST(CostModel, AHotExpertSlowsTheRankThatHoldsIt) {
  const CostConstants k = gemm_only(1e9);
  Config c = small(8);
  c.moe.capacity_factor = 2;
  PredictOptions o;
  o.ranks = 8;
  o.ep = 8;
  const StepPrediction uniform = predict_step(c, k, o);
  c.moe.force_routing = parse_forced_routing("hot:0.5");
  const StepPrediction hot = predict_step(c, k, o);
  EXPECT_GT(hot.imbalance, uniform.imbalance + 0.3);
  EXPECT_GT(hot.phases.experts, 1.3 * uniform.phases.experts);
  EXPECT_GT(hot.dropped_frac, uniform.dropped_frac) << "the hot expert overflows its capacity";
  o.ep = 3;
  EXPECT_THROW(predict_step(c, k, o), ConfigError);
}

TEST(CostModel, EfficiencyScalesComputeAndSyncCountsWaits) {
  CostConstants k = gemm_only(1e9, 4);
  k.nodes[0].all_reduce.bytes_per_s = 1e9;
  Config c = small(8);
  PredictOptions o;
  o.ranks = 4;
  o.ep = 4;
  const StepPrediction base = predict_step(c, k, o);
  k.nodes[0].step_efficiency = 2;
  const StepPrediction slow = predict_step(c, k, o);
  EXPECT_NEAR(slow.comm_s, base.comm_s, 1e-15) << "collectives are not scaled";
  EXPECT_NEAR(slow.step_s - slow.comm_s, 2 * (base.step_s - base.comm_s), 1e-12);
  // one MoE layer: the router's statistics, dispatch and combine forward and backward; per step the
  // loss, the last gradient bucket and the clipping norm: 8 waits
  k.nodes[0].step_efficiency = 1;
  k.nodes[0].sync_s = 1e-3;
  EXPECT_NEAR(predict_step(c, k, o).step_s - base.step_s, 8e-3, 1e-12);
}

TEST(CostModel, RanksSharingCoresSoftenTheImbalance) {
  CostConstants k = gemm_only(1e9, 8);
  Config c = small(8);
  c.moe.force_routing = parse_forced_routing("hot:0.5");
  PredictOptions o;
  o.ranks = 8;
  o.ep = 8;
  const StepPrediction own_cores = predict_step(c, k, o);
  // one rank alone computes 4 times faster than each of 8 busy ones (4 ranks per core): the hot rank
  // takes the core time of those waiting beside it
  CostConstants one = gemm_only(4e9, 1);
  k.nodes.insert(k.nodes.begin(), one.nodes[0]);
  const StepPrediction shared = predict_step(c, k, o);
  EXPECT_LT(shared.phases.experts, 0.6 * own_cores.phases.experts);
  EXPECT_EQ(shared.imbalance, own_cores.imbalance) << "the load itself does not change";
}

TEST(CostModel, MedianOfCalibrationsIsTakenConstantByConstant) {
  std::vector<CostConstants> runs;
  for (double x : {1.0, 5.0, 3.0}) {
    CostConstants k = gemm_only(1e9 * x, 2);
    k.nodes[0].gemm.dims = {16, 64};
    k.nodes[0].gemm.seconds.assign(8, x);
    k.nodes[0].gemm.seconds[7] = 10 - x;  // another order at this grid point
    k.nodes[0].stream_bytes_per_s = x;
    k.nodes[0].sync_s = x * 1e-3;
    runs.push_back(k);
  }
  const CostConstants m = median_constants(runs);
  ASSERT_EQ(m.nodes.size(), 1u);
  EXPECT_EQ(m.nodes[0].stream_bytes_per_s, 3.0);
  EXPECT_EQ(m.nodes[0].sync_s, 3e-3);
  EXPECT_EQ(m.nodes[0].gemm.seconds[0], 3.0);
  EXPECT_EQ(m.nodes[0].gemm.seconds[7], 7.0);
  EXPECT_EQ(m.nodes[0].gemm.flops_per_s, 3e9);
  runs[1].device = "cuda";
  EXPECT_THROW(median_constants(runs), InputError);
}

TEST(CostModel, ConstantsRoundTripThroughTheirFile) {
  CostConstants k = gemm_only(3e9, 2);
  k.nodes[0].gemm.dims = {16, 64};
  k.nodes[0].gemm.seconds = {1, 2, 3, 4, 5, 6, 7, 8};
  k.nodes[0].stream_bytes_per_s = k.nodes[0].softmax_elems_per_s = k.nodes[0].swiglu_elems_per_s = 1e9;
  k.nodes[0].adamw_params_per_s = 1e8;
  k.nodes[0].all_to_all = {5e-6, 1e9};
  k.nodes[0].all_reduce = {7e-6, 2e9};
  const std::string path = std::filesystem::temp_directory_path() / ("moe_constants_" + std::to_string(::getpid()) + ".json");
  merge_constants_file(path, k);
  CostConstants one = k;
  one.nodes[0].ranks = 1;
  merge_constants_file(path, one);  // adds the 1-rank entry, keeps the 2-rank one
  const CostConstants back = read_constants(path);
  ASSERT_EQ(back.nodes.size(), 2u);
  EXPECT_EQ(back.nodes[0].ranks, 1);
  EXPECT_EQ(back.nodes[1].gemm.seconds, k.nodes[0].gemm.seconds);
  EXPECT_EQ(back.nodes[1].all_reduce.alpha_s, 7e-6);
  EXPECT_EQ(&back.node(2), &back.nodes[1]);
  EXPECT_EQ(&back.node(64), &back.nodes[1]) << "more ranks than calibrated: the largest entry";
  std::FILE* f = std::fopen(path.c_str(), "w");
  std::fputs("{\"nodes\": [{\"ranks\": 1}]}", f);
  std::fclose(f);
  EXPECT_THROW(read_constants(path), InputError);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moe
