// Optimizer family table: AdamW against its formula (CPU); AdamW and SGD on CUDA against the CPU.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/ops/op_test.h"

namespace moe {
namespace {

class OptimizerOps : public CpuOps {};

TEST_P(OptimizerOps, AdamWMatchesTheFormula) {
  Tensor p = rnd({5}, 11), g = rnd({5}, 12);
  Tensor m = backend->zeros({5}, dt()), v = backend->zeros({5}, dt());
  std::vector<double> p0 = to_doubles(*backend, p), gv = to_doubles(*backend, g);
  AdamArgs a;
  a.lr = 0.1;
  a.weight_decay = 0.2;
  a.step = 1;
  adamw_step(*backend, p, g, m, v, a, nullptr);
  std::vector<double> want(5);
  for (int i = 0; i < 5; ++i) {
    double mh = (1 - a.beta1) * gv[i] / (1 - a.beta1), vh = (1 - a.beta2) * gv[i] * gv[i] / (1 - a.beta2);
    want[i] = p0[i] * (1 - a.lr * a.weight_decay) - a.lr * mh / (std::sqrt(vh) + a.eps);
  }
  EXPECT_LT(rel_diff(to_doubles(*backend, p), want), tol());
}

MOE_CPU_OPS_DTYPES(OptimizerOps);

// The updated parameter rounded to BF16 in the same pass; the parameter itself as without a shadow.
// Runs on every backend present (`backends`: the CPU, and CUDA when there is a device).
void expect_shadows_hold_the_rounded_update(Backend& b) {
  SCOPED_TRACE(b.name());
  const int64_t n = 1000;
  for (bool adam : {true, false}) {
    Tensor p = rnd(b, {n}, 48), g = rnd(b, {n}, 49), m = b.zeros({n}, DType::kF32), v = b.zeros({n}, DType::kF32);
    Tensor q = rnd(b, {n}, 48), m2 = b.zeros({n}, DType::kF32), v2 = b.zeros({n}, DType::kF32);
    Tensor shadow = b.empty({n}, DType::kBF16), want = b.empty({n}, DType::kBF16);
    AdamArgs a;
    a.lr = 1e-2;
    a.weight_decay = 0.1;
    for (a.step = 1; a.step <= 2; ++a.step) {
      if (adam) {
        adamw_step(b, p, g, m, v, a, &shadow);
        adamw_step(b, q, g, m2, v2, a, nullptr);
      } else {
        sgd_step(b, p, g, 0.1, 0.01, &shadow);
        sgd_step(b, q, g, 0.1, 0.01, nullptr);
      }
    }
    b.convert(p, want);
    EXPECT_EQ(to_doubles(b, shadow), to_doubles(b, want)) << (adam ? "adamw" : "sgd");
    EXPECT_EQ(to_doubles(b, p), to_doubles(b, q)) << (adam ? "adamw" : "sgd");
    EXPECT_NE(to_doubles(b, shadow), to_doubles(b, p)) << "the shadow is rounded";
  }
  Tensor p = rnd(b, {n}, 48), g = rnd(b, {n}, 49), wrong = b.empty({n - 1}, DType::kBF16);
  EXPECT_THROW(sgd_step(b, p, g, 0.1, 0.0, &wrong), InternalError);
}

TEST(OptimizerShadow, HoldsTheRoundedUpdate) {
  expect_shadows_hold_the_rounded_update(*make_cpu_backend({}));
}

TEST_F(CudaOps, OptimizerShadowHoldsTheRoundedUpdate) { expect_shadows_hold_the_rounded_update(*gpu); }

TEST_F(CudaOps, OptimizerSteps) {
  compare("adamw", [](Backend& b) {
    Tensor p = rnd(b, {300}, 48), g = rnd(b, {300}, 49), m = rnd(b, {300}, 50, 0.1);
    Tensor v = b.zeros({300}, DType::kF32);
    AdamArgs a;
    a.lr = 1e-2;
    a.weight_decay = 0.1;
    for (a.step = 1; a.step <= 3; ++a.step) adamw_step(b, p, g, m, v, a, nullptr);
    return std::vector<Tensor>{p, m, v};
  });
  compare("sgd", [](Backend& b) {
    Tensor p = rnd(b, {300}, 52), g = rnd(b, {300}, 53);
    sgd_step(b, p, g, 0.1, 0.01, nullptr);
    return std::vector<Tensor>{p};
  });
}

}  // namespace
}  // namespace moe
