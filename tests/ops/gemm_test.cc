// GEMM family table: dense GEMMs (every transpose) and grouped GEMMs (with empty groups) against loops
// on the CPU; the same against the CPU on CUDA, and bf16 GEMMs within the rounding bound.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/ops/op_test.h"

namespace moe {
namespace {

class GemmOps : public CpuOps {};

TEST_P(GemmOps, GemmEveryTransposeMatchesLoops) {
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
      gemm(*backend, a, ta, b, tb, c, 0.5, 2.0);
      EXPECT_LT(rel_diff(to_doubles(*backend, c), want), tol());
    }
  }
}

TEST_P(GemmOps, GroupedGemmsWithEmptyGroupsMatchLoops) {
  const std::vector<int64_t> rows{3, 0, 5, 1};
  const int64_t total = 9, k = 4, n = 6, g = 4;
  Tensor a = rnd({total, k}, 4);
  Tensor bt = rnd({g, n, k}, 5);  // tb = kT
  Tensor c = backend->zeros({total, n}, dt());
  grouped_gemm(*backend, a, bt, Trans::kT, c, rows, 1.0, 0.0, GroupedGemmPath::kGrouped);
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
  grouped_gemm_tn(*backend, a, dy, dw, rows, 1.0, 1.0, GroupedGemmPath::kGrouped);
  EXPECT_LT(rel_diff(to_doubles(*backend, dw), want_dw), tol());
}

TEST_P(GemmOps, BatchedGemmsMatchLoops) {
  const int64_t batch = 3, m = 4, n = 5, k = 6;
  for (Trans ta : {Trans::kN, Trans::kT})
    for (Trans tw : {Trans::kN, Trans::kT}) {
      Tensor a = rnd(ta == Trans::kN ? Shape{batch, m, k} : Shape{batch, k, m}, 20);
      Tensor w = rnd(tw == Trans::kN ? Shape{batch, k, n} : Shape{batch, n, k}, 21);
      Tensor c = rnd({batch, m, n}, 22);
      std::vector<double> av = to_doubles(*backend, a), wv = to_doubles(*backend, w), cv = to_doubles(*backend, c);
      std::vector<double> want(cv.size());
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double s = 0;
            for (int64_t p = 0; p < k; ++p) {
              double x = ta == Trans::kN ? av[(b * m + i) * k + p] : av[(b * k + p) * m + i];
              double y = tw == Trans::kN ? wv[(b * k + p) * n + j] : wv[(b * n + j) * k + p];
              s += x * y;
            }
            want[(b * m + i) * n + j] = 2.0 * s - 0.5 * cv[(b * m + i) * n + j];
          }
      batched_gemm(*backend, a, ta, w, tw, c, 2.0, -0.5);
      EXPECT_LT(rel_diff(to_doubles(*backend, c), want), tol());
    }
}

MOE_CPU_OPS_DTYPES(GemmOps);

TEST_F(CudaOps, GemmEveryTranspose) {
  for (Trans ta : {Trans::kN, Trans::kT})
    for (Trans tb : {Trans::kN, Trans::kT})
      for (double beta : {0.0, 1.5}) {
        compare("gemm", [&](Backend& b) {
          const int64_t m = 37, n = 29, k = 45;
          Tensor a = rnd(b, ta == Trans::kN ? Shape{m, k} : Shape{k, m}, 1);
          Tensor bb = rnd(b, tb == Trans::kN ? Shape{k, n} : Shape{n, k}, 2);
          Tensor c = rnd(b, {m, n}, 3);
          gemm(b, a, ta, bb, tb, c, 0.5, beta);
          return std::vector<Tensor>{c};
        });
      }
}

TEST_F(CudaOps, BatchedGemmEveryTranspose) {
  for (Trans ta : {Trans::kN, Trans::kT})
    for (Trans tw : {Trans::kN, Trans::kT}) {
      compare("batched_gemm", [&](Backend& b) {
        const int64_t batch = 5, m = 33, n = 17, k = 24;
        Tensor a = rnd(b, ta == Trans::kN ? Shape{batch, m, k} : Shape{batch, k, m}, 23);
        Tensor w = rnd(b, tw == Trans::kN ? Shape{batch, k, n} : Shape{batch, n, k}, 24);
        Tensor c = rnd(b, {batch, m, n}, 25);
        batched_gemm(b, a, ta, w, tw, c, 1.0, 0.5);
        return std::vector<Tensor>{c};
      });
    }
}

TEST_F(CudaOps, GroupedGemmsWithEmptyGroups) {
  // Both CUDA paths (the streams path with more groups than streams) against the CPU.
  const std::vector<int64_t> rows{13, 0, 21, 1, 0, 9, 4, 2};
  const int64_t total = 50, k = 24, n = 40, g = 8;
  for (GroupedGemmPath path : {GroupedGemmPath::kGrouped, GroupedGemmPath::kStreams}) {
    const char* name = path == GroupedGemmPath::kGrouped ? "grouped" : "streams";
    for (Trans tb : {Trans::kN, Trans::kT}) {
      compare(name, [&](Backend& b) {
        Tensor a = rnd(b, {total, k}, 4);
        Tensor w = rnd(b, tb == Trans::kT ? Shape{g, n, k} : Shape{g, k, n}, 5);
        Tensor c = rnd(b, {total, n}, 6);
        grouped_gemm(b, a, w, tb, c, rows, 1.0, 0.5, path);
        return std::vector<Tensor>{c};
      });
    }
    compare(name, [&](Backend& b) {
      Tensor a = rnd(b, {total, k}, 7), x = rnd(b, {total, n}, 8);
      Tensor c = rnd(b, {g, k, n}, 9);
      grouped_gemm_tn(b, a, x, c, rows, 1.0, 1.0, path);
      return std::vector<Tensor>{c};
    });
  }
}

TEST_F(CudaOps, StreamsPathTakesBf16OperandsIntoF32) {
  // The streams path's weight gradients of unequal groups: bf16 operands accumulated into fp32, against
  // the CPU on the same rounded values; the grouped path refuses the pair (cuBLAS has no such form).
  const std::vector<int64_t> rows{8, 0, 16, 24, 8};
  const int64_t total = 56, p = 16, q = 32, g = 5;
  auto rounded = [&](Backend& b, const Shape& shape, uint64_t stream, DType dtype) {
    Tensor x = rnd(b, shape, stream), x16 = b.empty(shape, DType::kBF16), out = b.empty(shape, dtype);
    b.convert(x, x16);
    if (dtype == DType::kBF16) return x16;
    b.convert(x16, out);
    return out;
  };
  Tensor want = rnd(*cpu, {g, p, q}, 17);
  grouped_gemm_tn(*cpu, rounded(*cpu, {total, p}, 15, DType::kF32), rounded(*cpu, {total, q}, 16, DType::kF32), want,
                  rows, 1.0, 1.0, GroupedGemmPath::kGrouped);
  Tensor a16 = rounded(*gpu, {total, p}, 15, DType::kBF16), x16 = rounded(*gpu, {total, q}, 16, DType::kBF16);
  Tensor got = rnd(*gpu, {g, p, q}, 17);
  grouped_gemm_tn(*gpu, a16, x16, got, rows, 1.0, 1.0, GroupedGemmPath::kStreams);
  EXPECT_LE(rel_diff(to_doubles(*gpu, got), to_doubles(*cpu, want)), 1e-5);
  EXPECT_THROW(grouped_gemm_tn(*gpu, a16, x16, got, rows, 1.0, 1.0, GroupedGemmPath::kGrouped), InternalError);
}

TEST_F(CudaOps, Bf16GemmsWithinTheRoundingBound) {
  // bf16 operands, bf16 output, fp32 accumulation, against the fp32 CPU product of the same values
  const int64_t m = 64, n = 48, k = 256;
  std::vector<double> want, got;
  {
    Tensor a = rnd(*cpu, {m, k}, 10), w = rnd(*cpu, {n, k}, 11), c = cpu->empty({m, n}, DType::kF32);
    gemm(*cpu, a, Trans::kN, w, Trans::kT, c, 1.0, 0.0);
    want = to_doubles(*cpu, c);
  }
  Tensor a = rnd(*gpu, {m, k}, 10), w = rnd(*gpu, {n, k}, 11);
  Tensor a16 = gpu->empty({m, k}, DType::kBF16), w16 = gpu->empty({n, k}, DType::kBF16);
  gpu->convert(a, a16);
  gpu->convert(w, w16);
  Tensor c16 = gpu->empty({m, n}, DType::kBF16);
  gemm(*gpu, a16, Trans::kN, w16, Trans::kT, c16, 1.0, 0.0);
  got = to_doubles(*gpu, c16);
  EXPECT_LE(rel_diff(got, want), 1e-2);
  EXPECT_GT(rel_diff(got, want), 0.0);  // it really ran in bf16

  Tensor g16 = gpu->empty({1, n, k}, DType::kBF16), y16 = gpu->empty({m, n}, DType::kBF16);
  gpu->convert(w, g16);
  grouped_gemm(*gpu, a16, g16, Trans::kT, y16, {m}, 1.0, 0.0, GroupedGemmPath::kGrouped);
  EXPECT_LE(rel_diff(to_doubles(*gpu, y16), want), 1e-2);
}

TEST_F(CudaOps, Bf16OperandsIntoF32WithBatchedGemm) {
  // The experts' weight gradients of equal groups: c[g] += a[g]^T b[g] with bf16 operands accumulated
  // into an fp32 result. The CPU gets the same bf16-rounded operands in fp32, so only the summation
  // order differs.
  const int64_t groups = 3, m = 40, p = 24, q = 56;
  auto operands = [&](Backend& b) {
    std::vector<Tensor> out;
    for (auto [shape, stream] : {std::pair<Shape, uint64_t>{{groups, m, p}, 12}, {{groups, m, q}, 13}}) {
      Tensor x = rnd(b, shape, stream), x16 = b.empty(shape, DType::kBF16);
      b.convert(x, x16);
      out.push_back(x16);
    }
    return out;
  };
  std::vector<Tensor> host16 = operands(*cpu);
  Tensor a = cpu->empty(host16[0].shape(), DType::kF32), x = cpu->empty(host16[1].shape(), DType::kF32);
  cpu->convert(host16[0], a);
  cpu->convert(host16[1], x);
  Tensor want = rnd(*cpu, {groups, p, q}, 14);
  batched_gemm(*cpu, a, Trans::kT, x, Trans::kN, want, 1.0, 1.0);

  std::vector<Tensor> dev16 = operands(*gpu);
  Tensor got = rnd(*gpu, {groups, p, q}, 14);
  batched_gemm(*gpu, dev16[0], Trans::kT, dev16[1], Trans::kN, got, 1.0, 1.0);
  EXPECT_EQ(got.dtype(), DType::kF32);
  EXPECT_LE(rel_diff(to_doubles(*gpu, got), to_doubles(*cpu, want)), 1e-5);
}

}  // namespace
}  // namespace moe
