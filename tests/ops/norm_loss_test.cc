// Norm and loss family table: RMSNorm's backward against central differences and cross-entropy against
// its formula (CPU); RMSNorm and cross-entropy on CUDA against the CPU.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/ops/op_test.h"

namespace moe {
namespace {

class NormLossOps : public CpuOps {};

TEST_P(NormLossOps, RmsNormBackwardIsTheDerivativeOfTheForward) {
  if (dt() != DType::kF64) GTEST_SKIP() << "finite differences need F64";
  const int64_t t = 4, h = 6;
  Tensor x = rnd({t, h}, 1, 2.0), w = rnd({h}, 2), dy = rnd({t, h}, 3);
  Tensor y = backend->empty({t, h}, dt()), rstd = backend->empty({t}, dt());
  Tensor dx = backend->empty({t, h}, dt()), dw = backend->zeros({h}, dt());
  rmsnorm_forward(*backend, x, w, 1e-5, y, rstd);
  rmsnorm_backward(*backend, dy, x, w, rstd, dx, dw);
  auto f = [&] {
    rmsnorm_forward(*backend, x, w, 1e-5, y, rstd);
    return test::dot(*backend, y, dy);
  };
  EXPECT_LT(rel_diff(to_doubles(*backend, dx), test::numeric_gradient(*backend, x, f)), 1e-8);
  EXPECT_LT(rel_diff(to_doubles(*backend, dw), test::numeric_gradient(*backend, w, f)), 1e-8);
}

TEST_P(NormLossOps, CrossEntropyIsTheMeanNegativeLogLikelihood) {
  const int64_t t = 5, v = 7;
  Tensor logits = rnd({t, v}, 4, 3.0), dl = backend->empty({t, v}, dt());
  Tensor targets = host_tensor({t}, DType::kI32);
  for (int64_t i = 0; i < t; ++i) targets.data<int32_t>()[i] = static_cast<int32_t>((3 * i + 1) % v);
  std::vector<double> lv = to_doubles(*backend, logits), want_dl(t * v);
  double want = 0;
  for (int64_t i = 0; i < t; ++i) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, lv[i * v + j]);
    for (int64_t j = 0; j < v; ++j) sum += std::exp(lv[i * v + j] - mx);
    int target = targets.data<int32_t>()[i];
    want += mx + std::log(sum) - lv[i * v + target];
    for (int64_t j = 0; j < v; ++j) want_dl[i * v + j] = 0.5 * (std::exp(lv[i * v + j] - mx) / sum - (j == target));
  }
  EXPECT_NEAR(cross_entropy(*backend, logits, targets, 0.5, dl), want, tol() * want);
  EXPECT_LT(rel_diff(to_doubles(*backend, dl), want_dl), tol());
}

MOE_CPU_OPS_DTYPES(NormLossOps);

TEST_F(CudaOps, RmsNormAndCrossEntropy) {
  const int64_t t = 67, h = 48, v = 300;
  compare("rmsnorm", [&](Backend& b) {
    Tensor x = rnd(b, {t, h}, 23, 2.0), w = rnd(b, {h}, 24), y = b.empty({t, h}, DType::kF32);
    Tensor rstd = b.empty({t}, DType::kF32), dy = rnd(b, {t, h}, 25), dx = b.empty({t, h}, DType::kF32);
    Tensor dw = rnd(b, {h}, 26);
    rmsnorm_forward(b, x, w, 1e-5, y, rstd);
    rmsnorm_backward(b, dy, x, w, rstd, dx, dw);
    return std::vector<Tensor>{y, rstd, dx, dw};
  });
  std::vector<double> loss(2);
  compare("cross_entropy", [&](Backend& b) {
    Tensor logits = rnd(b, {t, v}, 27, 3.0), dl = b.empty({t, v}, DType::kF32);
    Tensor target = ints(b, {t}, ids(t, static_cast<int32_t>(v), 11));
    loss[&b == cpu.get() ? 0 : 1] = cross_entropy(b, logits, target, 1.0 / t, dl);
    return std::vector<Tensor>{dl};
  });
  EXPECT_LE(std::abs(loss[1] - loss[0]) / loss[0], 1e-5);
}

}  // namespace
}  // namespace moe
