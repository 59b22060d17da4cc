// Every CUDA op against the CPU backend, in the style of ggml's test-backend-ops: each case builds its
// inputs on a backend from the same random streams, runs one op, and returns its outputs; the harness
// runs it on both backends and compares every output with a per-op bound.
//
// Bounds. F32: 1e-5 relative (max |gpu - cpu| / max |cpu|), the goal of the issue, for every op; index
// outputs must match exactly. BF16 GEMMs against the F32 CPU product: operands rounded to 8 mantissa
// bits carry a relative error of 2^-9 each, the product of two 2^-8, and a K-term fp32 sum of such
// products with random signs keeps it near 2^-8 of the row norm: the bound is 1e-2 of the largest output.
//
// Every test skips, printing why, when no CUDA device is usable.
#include <gtest/gtest.h>

#include <functional>

#include "tests/test_util.h"

namespace moe {
namespace {

using test::random_tensor;
using test::rel_diff;

// One op case: builds inputs on `b`, runs the op, returns the outputs to compare.
using OpCase = std::function<std::vector<Tensor>(Backend& b)>;

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason();
    gpu = make_cuda_backend({});
  }

  // Runs `op` on both backends; every output must agree to `tol` (0 for I32: exactly).
  void compare(const char* what, const OpCase& op, double tol = 1e-5) {
    std::vector<Tensor> want = op(*cpu), got = op(*gpu);
    ASSERT_EQ(want.size(), got.size()) << what;
    for (size_t i = 0; i < want.size(); ++i) {
      SCOPED_TRACE(std::string(what) + ", output " + std::to_string(i));
      ASSERT_EQ(want[i].shape(), got[i].shape());
      std::vector<double> w = to_doubles(*cpu, want[i]), g = to_doubles(*gpu, got[i]);
      if (want[i].dtype() == DType::kI32) {
        EXPECT_EQ(w, g);
      } else {
        EXPECT_LE(rel_diff(g, w), tol);
      }
    }
  }

  std::unique_ptr<Backend> cpu = make_cpu_backend({});
  std::unique_ptr<Backend> gpu;
};

Tensor rnd(Backend& b, const Shape& s, uint64_t stream, double scale = 1.0) {
  return random_tensor(b, s, DType::kF32, stream, 0, scale);
}

Tensor ints(Backend& b, const Shape& s, const std::vector<int32_t>& v) {
  Tensor t = b.empty(s, DType::kI32);
  b.copy_from_host(v.data(), t);
  return t;
}

// Deterministic pseudo-random ids in [0, n).
std::vector<int32_t> ids(int64_t count, int32_t n, uint32_t salt) {
  std::vector<int32_t> v(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) v[i] = static_cast<int32_t>((i * 2654435761u + salt) % n);
  return v;
}

TEST_F(CudaOps, GemmEveryTranspose) {
  for (Trans ta : {Trans::kN, Trans::kT})
    for (Trans tb : {Trans::kN, Trans::kT})
      for (double beta : {0.0, 1.5}) {
        compare("gemm", [&](Backend& b) {
          const int64_t m = 37, n = 29, k = 45;
          Tensor a = rnd(b, ta == Trans::kN ? Shape{m, k} : Shape{k, m}, 1);
          Tensor bb = rnd(b, tb == Trans::kN ? Shape{k, n} : Shape{n, k}, 2);
          Tensor c = rnd(b, {m, n}, 3);
          b.gemm(a, ta, bb, tb, c, 0.5, beta);
          return std::vector<Tensor>{c};
        });
      }
}

TEST_F(CudaOps, GroupedGemmsWithEmptyGroups) {
  const std::vector<int64_t> rows{13, 0, 21, 1, 0, 9};
  const int64_t total = 44, k = 24, n = 40, g = 6;
  for (Trans tb : {Trans::kN, Trans::kT}) {
    compare("grouped_gemm", [&](Backend& b) {
      Tensor a = rnd(b, {total, k}, 4);
      Tensor w = rnd(b, tb == Trans::kT ? Shape{g, n, k} : Shape{g, k, n}, 5);
      Tensor c = rnd(b, {total, n}, 6);
      b.grouped_gemm(a, w, tb, c, rows, 1.0, 0.5);
      return std::vector<Tensor>{c};
    });
  }
  compare("grouped_gemm_tn", [&](Backend& b) {
    Tensor a = rnd(b, {total, k}, 7), x = rnd(b, {total, n}, 8);
    Tensor c = rnd(b, {g, k, n}, 9);
    b.grouped_gemm_tn(a, x, c, rows, 1.0, 1.0);
    return std::vector<Tensor>{c};
  });
}

TEST_F(CudaOps, Bf16GemmsWithinTheRoundingBound) {
  // bf16 operands, bf16 output, fp32 accumulation, against the fp32 CPU product of the same values
  const int64_t m = 64, n = 48, k = 256;
  std::vector<double> want, got;
  {
    Tensor a = rnd(*cpu, {m, k}, 10), w = rnd(*cpu, {n, k}, 11), c = cpu->empty({m, n}, DType::kF32);
    cpu->gemm(a, Trans::kN, w, Trans::kT, c, 1.0, 0.0);
    want = to_doubles(*cpu, c);
  }
  Tensor a = rnd(*gpu, {m, k}, 10), w = rnd(*gpu, {n, k}, 11);
  Tensor a16 = gpu->empty({m, k}, DType::kBF16), w16 = gpu->empty({n, k}, DType::kBF16);
  gpu->convert(a, a16);
  gpu->convert(w, w16);
  Tensor c16 = gpu->empty({m, n}, DType::kBF16);
  gpu->gemm(a16, Trans::kN, w16, Trans::kT, c16, 1.0, 0.0);
  got = to_doubles(*gpu, c16);
  EXPECT_LE(rel_diff(got, want), 1e-2);
  EXPECT_GT(rel_diff(got, want), 0.0);  // it really ran in bf16

  Tensor g16 = gpu->empty({1, n, k}, DType::kBF16), y16 = gpu->empty({m, n}, DType::kBF16);
  gpu->convert(w, g16);
  gpu->grouped_gemm(a16, g16, Trans::kT, y16, {m}, 1.0, 0.0);
  EXPECT_LE(rel_diff(to_doubles(*gpu, y16), want), 1e-2);
}

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
    b.axpy(-0.75, x, y);
    b.scale(y, 1.5);
    return std::vector<Tensor>{y};
  });
  Tensor xc = rnd(*cpu, {4097}, 14), xg = rnd(*gpu, {4097}, 14);
  double want = cpu->sum_squares(xc), got = gpu->sum_squares(xg);
  EXPECT_LE(std::abs(got - want) / want, 1e-6);
  compare("swiglu", [](Backend& b) {
    Tensor a = rnd(b, {77, 33}, 15, 3.0), bb = rnd(b, {77, 33}, 16), h = b.empty({77, 33}, DType::kF32);
    Tensor dh = rnd(b, {77, 33}, 17), da = b.empty({77, 33}, DType::kF32), db = b.empty({77, 33}, DType::kF32);
    b.swiglu_forward(a, bb, h);
    b.swiglu_backward(dh, a, bb, da, db);
    return std::vector<Tensor>{h, da, db};
  });
  for (Activation act : {Activation::kGelu, Activation::kRelu}) {
    compare("activation", [act](Backend& b) {
      Tensor a = rnd(b, {50, 31}, 18, 3.0), h = b.empty({50, 31}, DType::kF32);
      Tensor dh = rnd(b, {50, 31}, 19), da = b.empty({50, 31}, DType::kF32);
      b.activation_forward(act, a, h);
      b.activation_backward(act, dh, a, da);
      return std::vector<Tensor>{h, da};
    });
  }
}

TEST_F(CudaOps, EmbeddingNormAndCrossEntropy) {
  const int64_t t = 67, h = 48, v = 300;
  compare("embedding", [&](Backend& b) {
    Tensor id = ints(b, {t}, ids(t, static_cast<int32_t>(v), 3));
    Tensor table = rnd(b, {v, h}, 20), out = b.empty({t, h}, DType::kF32);
    b.embedding_forward(id, table, out);
    Tensor dout = rnd(b, {t, h}, 21), dtable = rnd(b, {v, h}, 22);
    b.embedding_backward(id, dout, dtable);
    return std::vector<Tensor>{out, dtable};
  });
  compare("rmsnorm", [&](Backend& b) {
    Tensor x = rnd(b, {t, h}, 23, 2.0), w = rnd(b, {h}, 24), y = b.empty({t, h}, DType::kF32);
    Tensor rstd = b.empty({t}, DType::kF32), dy = rnd(b, {t, h}, 25), dx = b.empty({t, h}, DType::kF32);
    Tensor dw = rnd(b, {h}, 26);
    b.rmsnorm_forward(x, w, 1e-5, y, rstd);
    b.rmsnorm_backward(dy, x, w, rstd, dx, dw);
    return std::vector<Tensor>{y, rstd, dx, dw};
  });
  std::vector<double> loss(2);
  compare("cross_entropy", [&](Backend& b) {
    Tensor logits = rnd(b, {t, v}, 27, 3.0), dl = b.empty({t, v}, DType::kF32);
    Tensor target = ints(b, {t}, ids(t, static_cast<int32_t>(v), 11));
    loss[&b == cpu.get() ? 0 : 1] = b.cross_entropy(logits, target, 1.0 / t, dl);
    return std::vector<Tensor>{dl};
  });
  EXPECT_LE(std::abs(loss[1] - loss[0]) / loss[0], 1e-5);
}

TEST_F(CudaOps, RouterScoresAndLosses) {
  const int64_t t = 129;
  const int e = 24;
  RngStream rng{3, rng_stream(RngPurpose::kJitter, 4, 1)};
  compare("jitter", [&](Backend& b) {
    Tensor x = rnd(b, {t, 40}, 28), out = b.empty({t, 40}, DType::kF32);
    b.jitter(x, 0.1, rng, 1000, out);
    return std::vector<Tensor>{out};
  });
  for (ScoreFn fn : {ScoreFn::kSoftmax, ScoreFn::kSigmoid}) {
    compare("router_probs", [&](Backend& b) {
      Tensor logits = rnd(b, {t, e}, 29, 2.0), probs = b.empty({t, e}, DType::kF32);
      b.router_probs(fn, logits, probs);
      Tensor dprobs = rnd(b, {t, e}, 30), dlogits = rnd(b, {t, e}, 31);
      b.router_probs_backward(fn, dprobs, probs, 0.7, dlogits);
      return std::vector<Tensor>{probs, dlogits};
    });
  }
  compare("gumbel_probs", [&](Backend& b) {
    Tensor logits = rnd(b, {t, e}, 32), probs = b.empty({t, e}, DType::kF32);
    b.gumbel_probs(logits, 0.5, rng, 77, probs);
    return std::vector<Tensor>{probs};
  });
  compare("z_loss", [&](Backend& b) {
    Tensor logits = rnd(b, {t, e}, 33, 2.0), dl = rnd(b, {t, e}, 34), sum = b.empty({1}, DType::kF64);
    b.z_loss(logits, 0.01, dl, sum);
    return std::vector<Tensor>{dl, sum};
  });
  compare("add_row_vector", [&](Backend& b) {
    Tensor x = rnd(b, {t, e}, 35), v = random_tensor(b, {e}, DType::kF64, 36);
    b.add_row_vector(x, v, 0.25);
    return std::vector<Tensor>{x};
  });
}

struct RouteCase {
  const char* name;
  int64_t capacity;
  int groups, top_k;
  Priority priority;
  bool random_routing, normalize, hard, bias;
};

TEST_F(CudaOps, RouteEveryGateOption) {
  const RouteCase cases[] = {
      {"capacity", 9, 1, 2, Priority::kToken, false, true, false, false},
      {"dropless", 0, 1, 2, Priority::kToken, false, true, false, false},
      {"groups+batch priority", 5, 3, 2, Priority::kBatch, false, true, false, true},
      {"random routing", 12, 1, 2, Priority::kToken, true, true, false, false},
      {"top-3 hard unnormalised", 7, 2, 3, Priority::kToken, false, false, true, false},
      {"dropless top-6 groups", 0, 4, 6, Priority::kBatch, false, true, false, true},
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
      Tensor probs = rnd(b, {t, e}, 37), bias = c.bias ? rnd(b, {e}, 38, 0.1) : Tensor();
      RouteState s;
      b.route(args, probs, bias, s);
      Tensor stats = b.empty({RouterStatsLayout{e}.size()}, DType::kF64);
      b.router_stats(s, probs, stats);
      Tensor z_sum = stats.rows(RouterStatsLayout{e}.z_sum(), RouterStatsLayout{e}.z_sum() + 1);
      b.fill(z_sum, 0.0);  // router_stats leaves it to z_loss
      Tensor dgate = rnd(b, {t, c.top_k}, 39), dsel = b.empty({t, e}, DType::kF32);
      b.route_backward(args, probs, s, dgate, dsel);
      Tensor num_rows = b.empty({1}, DType::kI32);
      int32_t nr = static_cast<int32_t>(s.num_rows);
      b.copy_from_host(&nr, num_rows);
      return std::vector<Tensor>{s.expert_idx, s.score, s.gate, s.row_idx, s.fill, s.choices, s.counts, num_rows,
                                 stats, dsel};
    });
  }
}

TEST_F(CudaOps, PermutationAndRows) {
  const int64_t t = 50, h = 36, k = 2, rows = 70;
  // Every row named at most once; about a quarter of the assignments unsent.
  std::vector<int32_t> row_idx(static_cast<size_t>(t * k), -1);
  for (int64_t a = 0, r = 0; a < t * k && r < rows; ++a)
    if (a % 4 != 3) row_idx[static_cast<size_t>(a)] = static_cast<int32_t>((r++ * 17) % rows);
  compare("permute family", [&](Backend& b) {
    Tensor x = rnd(b, {t, h}, 40), ri = ints(b, {t, k}, row_idx), out = b.empty({rows, h}, DType::kF32);
    b.permute(x, ri, out);
    Tensor dout = rnd(b, {rows, h}, 41), dx = rnd(b, {t, h}, 42);
    b.permute_backward(dout, ri, dx);
    Tensor gate = rnd(b, {t, k}, 43), y = rnd(b, {t, h}, 44);
    b.unpermute(dout, ri, gate, y);
    Tensor dy = rnd(b, {t, h}, 45), drows = b.empty({rows, h}, DType::kF32), dgate = b.empty({t, k}, DType::kF32);
    b.unpermute_backward(dy, dout, ri, gate, drows, dgate);
    return std::vector<Tensor>{out, dx, y, drows, dgate};
  });
  compare("gather/scatter", [&](Backend& b) {
    std::vector<int32_t> perm(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) perm[i] = static_cast<int32_t>((i * 17) % rows);
    Tensor src = rnd(b, {rows, h}, 46), idx = ints(b, {rows}, perm), dst = b.empty({rows, h}, DType::kF32);
    b.gather_rows(src, idx, dst);
    Tensor back = rnd(b, {rows, h}, 47);
    b.scatter_rows(dst, idx, back);
    return std::vector<Tensor>{dst, back};
  });
}

TEST_F(CudaOps, OptimizerSteps) {
  compare("adamw", [](Backend& b) {
    Tensor p = rnd(b, {300}, 48), g = rnd(b, {300}, 49), m = rnd(b, {300}, 50, 0.1);
    Tensor v = b.zeros({300}, DType::kF32);
    AdamArgs a;
    a.lr = 1e-2;
    a.weight_decay = 0.1;
    for (a.step = 1; a.step <= 3; ++a.step) b.adamw_step(p, g, m, v, a);
    return std::vector<Tensor>{p, m, v};
  });
  compare("sgd", [](Backend& b) {
    Tensor p = rnd(b, {300}, 52), g = rnd(b, {300}, 53);
    b.sgd_step(p, g, 0.1, 0.01);
    return std::vector<Tensor>{p};
  });
}

}  // namespace
}  // namespace moe
