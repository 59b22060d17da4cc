// The whole MoE layer (forward and backward) and a few training steps on the CUDA backend against the
// CPU backend, one process. F32 layer outputs and gradients within 1e-5 of the CPU's (relative to the
// largest entry); bf16 expert GEMMs within 3e-2 (see layer_bench.cc for the rounding argument); the
// training loss of every step within 1e-4 (F32, after a few optimizer updates the differences of the
// first step have been through AdamW's normalisation) and 3e-2 in bf16.
//
// Every test skips, printing why, when no CUDA device is usable.
#include <gtest/gtest.h>

#include "comm/mpi/mpi_communicator.h"
#include "comm/nccl/nccl_communicator.h"
#include "tests/test_util.h"
#include "train/trainer.h"

namespace moe {
namespace {

// A group of one for the CUDA backend. test::self_groups() is MPI over MPI_COMM_SELF, which moves host
// buffers only and is not ordered with the backend's stream: the dispatcher's all-to-all of device rows
// would hand device pointers to MPI. A GPU run gets NCCL (make_groups), so the tests use it too.
ProcessGroups device_self_groups(Backend& backend) {
  return make_process_groups(make_nccl_communicator(make_mpi_self(), backend.native_stream(), 120.0), 1);
}

struct LayerCase {
  const char* name;
  std::vector<std::string> overrides;  // of test::small_config(8, 2, 32)
};

const LayerCase kCases[] = {
    {"capacity_with_drops_padded", {"moe.capacity_factor=0.8", "moe.min_capacity=1"}},
    {"capacity_compact", {"moe.capacity_factor=1.0", "runtime.dispatch_layout=compact"}},
    {"dropless_shared_on_side_stream", {"moe.capacity_factor=0", "moe.num_shared_experts=2"}},
    {"sigmoid_random_routing_jitter_batch_priority",
     {"moe.score=sigmoid", "moe.random_routing=true", "moe.router_jitter=0.05", "moe.priority=batch"}},
    {"gumbel_top3_gelu_groups",
     {"moe.top_k=3", "moe.router_grad=gumbel", "moe.expert_type=gelu", "moe.group_size=16"}},
};

class CudaLayer : public ::testing::TestWithParam<LayerCase> {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason();
  }
};

void PrintTo(const LayerCase& c, std::ostream* os) { *os << c.name; }

void expect_layer_matches(const Config& base, Precision precision, double tol) {
  const int64_t tokens = 64;
  const Config cpu_config = base;
  const Config gpu_config = test::config(
      base, {"runtime.device=cuda", precision == Precision::kBf16 ? "runtime.precision=bf16" : "runtime.precision=fp32"});
  auto cpu = make_cpu_backend({});
  auto gpu = make_cuda_backend({});
  ProcessGroups g1 = test::self_groups(), g2 = device_self_groups(*gpu);
  test::LayerResult want = test::run_layer(cpu_config, *cpu, g1, tokens, 0, tokens, true, 2);
  test::LayerResult got = test::run_layer(gpu_config, *gpu, g2, tokens, 0, tokens, true, 2);
  EXPECT_LE(test::rel_diff(got.y, want.y), tol) << "y";
  EXPECT_LE(test::rel_diff(got.dx, want.dx), tol) << "dx";
  EXPECT_NEAR(got.aux, want.aux, tol * std::max(1e-3, want.aux));
  EXPECT_NEAR(got.z, want.z, tol * std::max(1e-3, want.z));
  if (precision == Precision::kFp32) {
    EXPECT_EQ(got.stats.load, want.stats.load);
    EXPECT_EQ(got.stats.tokens, want.stats.tokens);
    EXPECT_EQ(got.stats.dropped, want.stats.dropped);
  }
  for (const auto& [name, g] : want.grads) {
    ASSERT_TRUE(got.grads.count(name)) << name;
    EXPECT_LE(test::rel_diff(got.grads.at(name), g), tol) << "gradient of " << name;
  }
}

TEST_P(CudaLayer, Fp32ForwardBackwardMatchesCpu) {
  expect_layer_matches(test::config(test::small_config(8, 2, 32), GetParam().overrides), Precision::kFp32, 1e-5);
}

TEST_P(CudaLayer, Bf16ExpertGemmsWithinTheRoundingBound) {
  std::vector<std::string> overrides{"model.init_std=0.1"};
  overrides.insert(overrides.end(), GetParam().overrides.begin(), GetParam().overrides.end());
  const Config c = test::config(test::small_config(8, 2, 32), overrides);
  // bf16 may route a token differently only where two scores tie to within the router's fp32 rounding;
  // the router runs in fp32 on both sides, so routing is the same and only the expert math differs.
  expect_layer_matches(c, Precision::kBf16, 3e-2);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaLayer, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

std::vector<double> train_losses(const Config& config) {
  const bool cuda = config.runtime.device == Device::kCuda;
  auto backend = cuda ? make_cuda_backend({}) : make_cpu_backend({});
  ProcessGroups groups = cuda ? device_self_groups(*backend) : test::self_groups();
  Trainer trainer(config, *backend, groups);
  std::vector<double> out;
  for (const StepRecord& r : trainer.run()) out.push_back(r.stats.loss);
  return out;
}

TEST(CudaTraining, LossCurveMatchesCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason();
  const Config c = test::config({"model.hidden=32", "model.layers=2", "model.seq_len=32", "moe.num_experts=8",
                                  "moe.ffn_hidden=64", "moe.num_shared_experts=1", "moe.bias_update_rate=1e-3",
                                  "train.batch_size=8", "train.steps=5", "train.warmup_steps=2", "train.log_every=1000"});
  std::vector<double> want = train_losses(c);
  for (const std::string precision : {"fp32", "bf16"}) {
    std::vector<double> got = train_losses(test::config(c, {"runtime.device=cuda", "runtime.precision=" + precision}));
    ASSERT_EQ(got.size(), want.size());
    const double tol = precision == "fp32" ? 1e-4 : 3e-2;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], tol * want[i]) << "step " << i + 1 << " " << precision;
    }
  }
}

TEST(CudaTraining, TimelinePhasesAddUpAndReportHiddenSharedTime) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason();
  const Config c = test::config({"model.hidden=256", "model.layers=2", "model.seq_len=256", "moe.num_experts=8",
                                  "moe.num_shared_experts=2", "train.batch_size=8", "train.steps=3",
                                  "train.log_every=1000", "runtime.device=cuda"});
  auto backend = make_cuda_backend({});
  ProcessGroups groups = device_self_groups(*backend);
  Trainer trainer(c, *backend, groups);
  std::vector<StepRecord> records = trainer.run();
  const PhaseTimes& t = records.back().times;
  for (double v : {t.attention, t.router, t.dispatch, t.experts, t.combine, t.backward, t.optimizer}) EXPECT_GT(v, 0.0);
  // The phases are device time between events on the main stream: they cannot exceed the step's host time.
  EXPECT_LE(t.total(), records.back().wall_s);
  // On a GPU the shared experts run on the side stream beside the exchanges: some of their time is hidden.
  EXPECT_GT(t.hidden_shared, 0.0);
}

}  // namespace
}  // namespace moe
