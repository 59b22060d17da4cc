// Elementwise family table: the activations' backwards against central differences of their forwards
// (CPU, F64), and every elementwise op and the bf16 conversion on CUDA against the CPU.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/ops/op_test.h"

namespace moe {
namespace {

class ElementwiseOps : public CpuOps {};

TEST_P(ElementwiseOps, ActivationBackwardsAreTheDerivativesOfTheForwards) {
  if (dt() != DType::kF64) GTEST_SKIP() << "finite differences need F64";
  const Shape s{3, 7};
  Tensor a = rnd(s, 1, 2.0), g = rnd(s, 2), dh = rnd(s, 3), h = backend->empty(s, dt());
  Tensor da = backend->empty(s, dt()), dg = backend->empty(s, dt());
  swiglu_backward(*backend, dh, a, g, da, dg);
  auto swiglu = [&] {
    swiglu_forward(*backend, a, g, h);
    return test::dot(*backend, h, dh);
  };
  EXPECT_LT(rel_diff(to_doubles(*backend, da), test::numeric_gradient(*backend, a, swiglu)), 1e-8);
  EXPECT_LT(rel_diff(to_doubles(*backend, dg), test::numeric_gradient(*backend, g, swiglu)), 1e-8);
  for (Activation act : {Activation::kGelu, Activation::kRelu}) {
    activation_backward(*backend, act, dh, a, da);
    auto f = [&] {
      activation_forward(*backend, act, a, h);
      return test::dot(*backend, h, dh);
    };
    EXPECT_LT(rel_diff(to_doubles(*backend, da), test::numeric_gradient(*backend, a, f)), 1e-8);
  }
}

// The F32 activations (vectorised, with their own exp) against the F64 ones (std::exp, std::tanh) on the
// same inputs, over a range wide enough for the exp's clamps (|x| up to ~200), element by element.
TEST(ElementwiseF32, ActivationsMatchTheF64ReferenceToFloatRounding) {
  auto backend = make_cpu_backend({});
  const Shape s{37, 29};  // not a multiple of any vector width: the loops' tails run too
  auto pair = [&](uint64_t stream, double scale) {
    Tensor f64 = test::random_tensor(*backend, s, DType::kF64, stream, 0, scale);
    Tensor f32 = backend->empty(s, DType::kF32);
    std::vector<double> v = to_doubles(*backend, f64);
    std::vector<float> fv(v.begin(), v.end());
    backend->copy_from_host(fv.data(), f32);
    backend->copy_from_host(std::vector<double>(fv.begin(), fv.end()).data(), f64);  // the same values in both
    return std::pair<Tensor, Tensor>{f32, f64};
  };
  auto [a32, a64] = pair(1, 40.0);
  auto [g32, g64] = pair(2, 1.0);
  auto [d32, d64] = pair(3, 1.0);
  auto out = [&](DType dt) { return backend->empty(s, dt); };
  auto check = [&](const char* what, const Tensor& got, const Tensor& want) {  // element by element
    const std::vector<double> g = to_doubles(*backend, got), w = to_doubles(*backend, want);
    double worst = 0;
    for (size_t i = 0; i < g.size(); ++i) worst = std::max(worst, std::abs(g[i] - w[i]) / (std::abs(w[i]) + 1e-4));
    EXPECT_LT(worst, 1e-5) << what;  // float rounding of exp's argument, |u| eps, dominates
  };
  Tensor h32 = out(DType::kF32), h64 = out(DType::kF64), x32 = out(DType::kF32), x64 = out(DType::kF64);
  Tensor y32 = out(DType::kF32), y64 = out(DType::kF64);
  swiglu_forward(*backend, a32, g32, h32);
  swiglu_forward(*backend, a64, g64, h64);
  check("swiglu", h32, h64);
  swiglu_backward(*backend, d32, a32, g32, x32, y32);
  swiglu_backward(*backend, d64, a64, g64, x64, y64);
  check("swiglu da", x32, x64);
  check("swiglu db", y32, y64);
  for (Activation act : {Activation::kGelu, Activation::kRelu}) {
    activation_forward(*backend, act, a32, h32);
    activation_forward(*backend, act, a64, h64);
    check(act == Activation::kGelu ? "gelu" : "relu", h32, h64);
    activation_backward(*backend, act, d32, a32, x32);
    activation_backward(*backend, act, d64, a64, x64);
    check(act == Activation::kGelu ? "gelu backward" : "relu backward", x32, x64);
  }
}

TEST_P(ElementwiseOps, AxpyScaleAndSumSquares) {
  Tensor x = rnd({11}, 4), y = rnd({11}, 5);
  std::vector<double> xv = to_doubles(*backend, x), yv = to_doubles(*backend, y), want(11);
  double ss = 0;
  for (int i = 0; i < 11; ++i) {
    want[i] = 1.5 * (yv[i] - 0.75 * xv[i]);
    ss += want[i] * want[i];
  }
  axpy(*backend, -0.75, x, y);
  scale(*backend, y, 1.5);
  EXPECT_LT(rel_diff(to_doubles(*backend, y), want), tol());
  EXPECT_NEAR(sum_squares(*backend, y), ss, tol() * ss);
}

MOE_CPU_OPS_DTYPES(ElementwiseOps);

TEST_F(CudaOps, Bf16ConversionRoundsToNearestEven) {
  std::vector<float> values{1.0f, 1.00390625f, 1.01171875f, -3.14159265f, 1e-20f, 65504.0f, 0.0f};
  Tensor f = gpu->empty({static_cast<int64_t>(values.size())}, DType::kF32);
  gpu->copy_from_host(values.data(), f);
  Tensor h = gpu->empty(f.shape(), DType::kBF16);
  gpu->convert(f, h);
  std::vector<double> got = to_doubles(*gpu, h);
  for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(got[i], bf16_to_float(float_to_bf16(values[i]))) << values[i];
}

TEST_F(CudaOps, ElementwiseAndActivations) {
  compare("axpy/scale", [](Backend& b) {
    Tensor x = rnd(b, {1000, 3}, 12), y = rnd(b, {1000, 3}, 13);
    axpy(b, -0.75, x, y);
    scale(b, y, 1.5);
    return std::vector<Tensor>{y};
  });
  Tensor xc = rnd(*cpu, {4097}, 14), xg = rnd(*gpu, {4097}, 14);
  double want = sum_squares(*cpu, xc), got = sum_squares(*gpu, xg);
  EXPECT_LE(std::abs(got - want) / want, 1e-6);
  compare("swiglu", [](Backend& b) {
    Tensor a = rnd(b, {77, 33}, 15, 3.0), bb = rnd(b, {77, 33}, 16), h = b.empty({77, 33}, DType::kF32);
    Tensor dh = rnd(b, {77, 33}, 17), da = b.empty({77, 33}, DType::kF32), db = b.empty({77, 33}, DType::kF32);
    swiglu_forward(b, a, bb, h);
    swiglu_backward(b, dh, a, bb, da, db);
    return std::vector<Tensor>{h, da, db};
  });
  for (Activation act : {Activation::kGelu, Activation::kRelu}) {
    compare("activation", [act](Backend& b) {
      Tensor a = rnd(b, {50, 31}, 18, 3.0), h = b.empty({50, 31}, DType::kF32);
      Tensor dh = rnd(b, {50, 31}, 19), da = b.empty({50, 31}, DType::kF32);
      activation_forward(b, act, a, h);
      activation_backward(b, act, dh, a, da);
      return std::vector<Tensor>{h, da};
    });
  }
}

}  // namespace
}  // namespace moe
