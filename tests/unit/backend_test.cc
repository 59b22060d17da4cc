// CPU backend ops against naive loops: GEMMs (every transpose), grouped GEMMs (with empty groups),
// permute/unpermute and their backwards, optimizer steps.
#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace moe {
namespace {

using test::random_tensor;
using test::rel_diff;

class BackendTest : public ::testing::TestWithParam<DType> {
 protected:
  std::unique_ptr<Backend> backend = make_cpu_backend({});
  DType dt() const { return GetParam(); }
  double tol() const { return dt() == DType::kF64 ? 1e-13 : 1e-5; }
  Tensor rnd(const Shape& s, uint64_t stream) { return random_tensor(*backend, s, dt(), stream); }
};

TEST_P(BackendTest, GemmEveryTransposeMatchesLoops) {
  const int64_t m = 7, n = 5, k = 9;
  for (Trans ta : {Trans::kN, Trans::kT}) {
    for (Trans tb : {Trans::kN, Trans::kT}) {
      Tensor a = rnd(ta == Trans::kN ? Shape{m, k} : Shape{k, m}, 1);
      Tensor b = rnd(tb == Trans::kN ? Shape{k, n} : Shape{n, k}, 2);
      Tensor c = rnd({m, n}, 3);
      std::vector<double> av = to_doubles(*backend, a), bv = to_doubles(*backend, b), cv = to_doubles(*backend, c);
      std::vector<double> want(m * n);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double s = 0;
          for (int64_t p = 0; p < k; ++p) {
            double x = ta == Trans::kN ? av[i * k + p] : av[p * m + i];
            double y = tb == Trans::kN ? bv[p * n + j] : bv[j * k + p];
            s += x * y;
          }
          want[i * n + j] = 0.5 * s + 2.0 * cv[i * n + j];
        }
      }
      backend->gemm(a, ta, b, tb, c, 0.5, 2.0);
      EXPECT_LT(rel_diff(to_doubles(*backend, c), want), tol());
    }
  }
}

TEST_P(BackendTest, GroupedGemmsWithEmptyGroupsMatchLoops) {
  const std::vector<int64_t> rows{3, 0, 5, 1};
  const int64_t total = 9, k = 4, n = 6, g = 4;
  Tensor a = rnd({total, k}, 4);
  Tensor bt = rnd({g, n, k}, 5);  // tb = kT
  Tensor c = backend->zeros({total, n}, dt());
  backend->grouped_gemm(a, bt, Trans::kT, c, rows, 1.0, 0.0);
  std::vector<double> av = to_doubles(*backend, a), bv = to_doubles(*backend, bt), want(total * n);
  int64_t r0 = 0;
  for (int64_t e = 0; e < g; ++e) {
    for (int64_t r = r0; r < r0 + rows[e]; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t p = 0; p < k; ++p) s += av[r * k + p] * bv[(e * n + j) * k + p];
        want[r * n + j] = s;
      }
    }
    r0 += rows[e];
  }
  EXPECT_LT(rel_diff(to_doubles(*backend, c), want), tol());

  // Weight gradient: dW[g] (k, n) = a[rows_g]^T dy[rows_g]; an empty group gets beta * dW.
  Tensor dy = rnd({total, n}, 6);
  Tensor dw = rnd({g, k, n}, 7);
  std::vector<double> dyv = to_doubles(*backend, dy), dw0 = to_doubles(*backend, dw), want_dw(g * k * n);
  r0 = 0;
  for (int64_t e = 0; e < g; ++e) {
    for (int64_t p = 0; p < k; ++p) {
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t r = r0; r < r0 + rows[e]; ++r) s += av[r * k + p] * dyv[r * n + j];
        want_dw[(e * k + p) * n + j] = s + dw0[(e * k + p) * n + j];
      }
    }
    r0 += rows[e];
  }
  backend->grouped_gemm_tn(a, dy, dw, rows, 1.0, 1.0);
  EXPECT_LT(rel_diff(to_doubles(*backend, dw), want_dw), tol());
}

TEST_P(BackendTest, PermuteUnpermuteAndBackwards) {
  const int64_t t = 4, h = 3, rows = 6;
  Tensor x = rnd({t, h}, 8);
  Tensor idx = host_tensor({t, 2}, DType::kI32);
  std::vector<int32_t> iv{2, 0, -1, 5, 1, -1, 3, 4};  // -1: not sent
  std::copy(iv.begin(), iv.end(), idx.data<int32_t>());
  Tensor out = backend->empty({rows, h}, dt());
  backend->permute(x, idx, out);
  std::vector<double> xv = to_doubles(*backend, x), ov = to_doubles(*backend, out), want(rows * h, 0.0);
  for (int64_t i = 0; i < t * 2; ++i) {
    if (iv[i] >= 0) std::copy_n(xv.begin() + (i / 2) * h, h, want.begin() + iv[i] * h);
  }
  EXPECT_EQ(ov, want);

  Tensor gate = rnd({t, 2}, 9);
  std::vector<double> gv = to_doubles(*backend, gate);
  Tensor y = backend->zeros({t, h}, dt());
  backend->unpermute(out, idx, gate, y);
  std::vector<double> want_y(t * h, 0.0);
  for (int64_t i = 0; i < t * 2; ++i) {
    if (iv[i] < 0) continue;
    for (int64_t j = 0; j < h; ++j) want_y[(i / 2) * h + j] += gv[i] * ov[iv[i] * h + j];
  }
  EXPECT_LT(rel_diff(to_doubles(*backend, y), want_y), tol());

  Tensor dy = rnd({t, h}, 10);
  std::vector<double> dyv = to_doubles(*backend, dy);
  Tensor drows = backend->empty({rows, h}, dt()), dgate = backend->empty({t, 2}, dt());
  backend->unpermute_backward(dy, out, idx, gate, drows, dgate);
  std::vector<double> want_dr(rows * h, 0.0), want_dg(t * 2, 0.0);
  for (int64_t i = 0; i < t * 2; ++i) {
    if (iv[i] < 0) continue;
    for (int64_t j = 0; j < h; ++j) {
      want_dr[iv[i] * h + j] = gv[i] * dyv[(i / 2) * h + j];
      want_dg[i] += dyv[(i / 2) * h + j] * ov[iv[i] * h + j];
    }
  }
  EXPECT_LT(rel_diff(to_doubles(*backend, drows), want_dr), tol());
  EXPECT_LT(rel_diff(to_doubles(*backend, dgate), want_dg), tol());

  Tensor dx = backend->zeros({t, h}, dt());
  backend->permute_backward(drows, idx, dx);
  std::vector<double> want_dx(t * h, 0.0);
  for (int64_t i = 0; i < t * 2; ++i) {
    if (iv[i] < 0) continue;
    for (int64_t j = 0; j < h; ++j) want_dx[(i / 2) * h + j] += want_dr[iv[i] * h + j];
  }
  EXPECT_LT(rel_diff(to_doubles(*backend, dx), want_dx), tol());
}

TEST_P(BackendTest, AdamWMatchesTheFormula) {
  Tensor p = rnd({5}, 11), g = rnd({5}, 12);
  Tensor m = backend->zeros({5}, dt()), v = backend->zeros({5}, dt());
  std::vector<double> p0 = to_doubles(*backend, p), gv = to_doubles(*backend, g);
  AdamArgs a;
  a.lr = 0.1;
  a.weight_decay = 0.2;
  a.step = 1;
  backend->adamw_step(p, g, m, v, a);
  std::vector<double> want(5);
  for (int i = 0; i < 5; ++i) {
    double mh = (1 - a.beta1) * gv[i] / (1 - a.beta1), vh = (1 - a.beta2) * gv[i] * gv[i] / (1 - a.beta2);
    want[i] = p0[i] * (1 - a.lr * a.weight_decay) - a.lr * mh / (std::sqrt(vh) + a.eps);
  }
  EXPECT_LT(rel_diff(to_doubles(*backend, p), want), tol());
}

INSTANTIATE_TEST_SUITE_P(DTypes, BackendTest, ::testing::Values(DType::kF32, DType::kF64),
                         [](const auto& info) { return std::string(info.param == DType::kF32 ? "f32" : "f64"); });

}  // namespace
}  // namespace moe
