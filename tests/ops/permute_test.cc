// Permutation family table: permute/unpermute and their backwards against loops (CPU); every
// permutation, row and embedding op on CUDA against the CPU.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/ops/op_test.h"

namespace moe {
namespace {

class PermuteOps : public CpuOps {};

TEST_P(PermuteOps, PermuteUnpermuteAndBackwards) {
  const int64_t t = 4, h = 3, rows = 8;  // rows 6 and 7 are named by no token: they must come out zero
  Tensor x = rnd({t, h}, 8);
  Tensor idx = host_tensor({t, 2}, DType::kI32);
  std::vector<int32_t> iv{2, 0, -1, 5, 1, -1, 3, 4};  // -1: not sent
  std::copy(iv.begin(), iv.end(), idx.data<int32_t>());
  Tensor out = backend->empty({rows, h}, dt());
  backend->fill(out, std::nan(""));  // whatever was there before must not show
  permute(*backend, x, idx, out);
  std::vector<double> xv = to_doubles(*backend, x), ov = to_doubles(*backend, out), want(rows * h, 0.0);
  for (int64_t i = 0; i < t * 2; ++i) {
    if (iv[i] >= 0) std::copy_n(xv.begin() + (i / 2) * h, h, want.begin() + iv[i] * h);
  }
  EXPECT_EQ(ov, want);

  Tensor gate = rnd({t, 2}, 9);
  std::vector<double> gv = to_doubles(*backend, gate);
  Tensor y = backend->empty({t, h}, dt());
  backend->fill(y, std::nan(""));  // written, not accumulated
  unpermute(*backend, out, idx, gate, y);
  std::vector<double> want_y(t * h, 0.0);
  for (int64_t i = 0; i < t * 2; ++i) {
    if (iv[i] < 0) continue;
    for (int64_t j = 0; j < h; ++j) want_y[(i / 2) * h + j] += gv[i] * ov[iv[i] * h + j];
  }
  EXPECT_LT(rel_diff(to_doubles(*backend, y), want_y), tol());

  Tensor dy = rnd({t, h}, 10);
  std::vector<double> dyv = to_doubles(*backend, dy);
  Tensor drows = backend->empty({rows, h}, dt()), dgate = backend->empty({t, 2}, dt());
  backend->fill(drows, std::nan(""));
  unpermute_backward(*backend, dy, out, idx, gate, drows, dgate);
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
  permute_backward(*backend, drows, idx, dx);
  std::vector<double> want_dx(t * h, 0.0);
  for (int64_t i = 0; i < t * 2; ++i) {
    if (iv[i] < 0) continue;
    for (int64_t j = 0; j < h; ++j) want_dx[(i / 2) * h + j] += want_dr[iv[i] * h + j];
  }
  EXPECT_LT(rel_diff(to_doubles(*backend, dx), want_dx), tol());
}

MOE_CPU_OPS_DTYPES(PermuteOps);

// The dispatcher's bf16 rows on the CPU: convert rounds to nearest even (ties to even, NaN kept) and
// widens exactly, and permute moves BF16 rows like any other.
TEST(PermuteBf16, ConvertRoundsToNearestEvenAndPermuteMovesBf16Rows) {
  auto backend = make_cpu_backend({});
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7 (to even: 1); 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
  std::vector<float> v{1.0f, 1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -2.5f, 1e-30f, 3.0e38f, std::nanf("")};
  const int64_t n = static_cast<int64_t>(v.size());
  Tensor f = backend->empty({n}, DType::kF32), b = backend->empty({n}, DType::kBF16), back = backend->empty({n}, DType::kF32);
  backend->copy_from_host(v.data(), f);
  backend->convert(f, b);
  backend->convert(b, back);
  std::vector<double> got = to_doubles(*backend, back);
  for (int64_t i = 0; i < n; ++i) {
    const float want = bf16_to_float(float_to_bf16(v[i]));
    if (std::isnan(v[i])) EXPECT_TRUE(std::isnan(got[i]));
    else EXPECT_EQ(got[i], want) << v[i];
  }
  EXPECT_EQ(got[1], 1.0);
  EXPECT_EQ(got[2], 1.0 + 1.0 / 64);

  const int64_t t = 3, h = 4, rows = 5;
  Tensor x = backend->empty({t, h}, DType::kBF16), x32 = test::random_tensor(*backend, {t, h}, DType::kF32, 5);
  backend->convert(x32, x);
  Tensor idx = host_tensor({t, 1}, DType::kI32);
  std::vector<int32_t> iv{4, -1, 0};
  std::copy(iv.begin(), iv.end(), idx.data<int32_t>());
  Tensor out = backend->empty({rows, h}, DType::kBF16);
  permute(*backend, x, idx, out);
  std::vector<double> xv = to_doubles(*backend, x), ov = to_doubles(*backend, out), want(rows * h, 0.0);
  for (int64_t i = 0; i < t; ++i) {
    if (iv[i] >= 0) std::copy_n(xv.begin() + i * h, h, want.begin() + iv[i] * h);
  }
  EXPECT_EQ(ov, want);
}

TEST_F(CudaOps, PermutationAndRows) {
  const int64_t t = 50, h = 36, k = 2, rows = 70;
  // Every row named at most once; about a quarter of the assignments unsent.
  std::vector<int32_t> row_idx(static_cast<size_t>(t * k), -1);
  for (int64_t a = 0, r = 0; a < t * k && r < rows; ++a)
    if (a % 4 != 3) row_idx[static_cast<size_t>(a)] = static_cast<int32_t>((r++ * 17) % rows);
  compare("permute family", [&](Backend& b) {
    Tensor x = rnd(b, {t, h}, 40), ri = ints(b, {t, k}, row_idx), out = b.empty({rows, h}, DType::kF32);
    permute(b, x, ri, out);
    Tensor dout = rnd(b, {rows, h}, 41), dx = rnd(b, {t, h}, 42);
    permute_backward(b, dout, ri, dx);
    Tensor gate = rnd(b, {t, k}, 43), y = rnd(b, {t, h}, 44);
    unpermute(b, dout, ri, gate, y);
    Tensor dy = rnd(b, {t, h}, 45), drows = b.empty({rows, h}, DType::kF32), dgate = b.empty({t, k}, DType::kF32);
    unpermute_backward(b, dy, dout, ri, gate, drows, dgate);
    return std::vector<Tensor>{out, dx, y, drows, dgate};
  });
  compare("gather/scatter", [&](Backend& b) {
    std::vector<int32_t> perm(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) perm[i] = static_cast<int32_t>((i * 17) % rows);
    Tensor src = rnd(b, {rows, h}, 46), idx = ints(b, {rows}, perm), dst = b.empty({rows, h}, DType::kF32);
    gather_rows(b, src, idx, dst);
    Tensor back = rnd(b, {rows, h}, 47);
    scatter_rows(b, dst, idx, back);
    return std::vector<Tensor>{dst, back};
  });
}

TEST_F(CudaOps, Embedding) {
  const int64_t t = 67, h = 48, v = 300;
  compare("embedding", [&](Backend& b) {
    Tensor id = ints(b, {t}, ids(t, static_cast<int32_t>(v), 3));
    Tensor table = rnd(b, {v, h}, 20), out = b.empty({t, h}, DType::kF32);
    embedding_forward(b, id, table, out);
    Tensor dout = rnd(b, {t, h}, 21), dtable = rnd(b, {v, h}, 22);
    embedding_backward(b, id, dout, dtable);
    return std::vector<Tensor>{out, dtable};
  });
}

}  // namespace
}  // namespace moe
