// Attention family table. CPU: rotary embeddings against their formula and their inverse, the head layout
// against index arithmetic, the causal softmax against its definition and its backward against central
// differences, dropout's mask (rate, scale, rank independence). CUDA: each op against the CPU.
#include <gtest/gtest.h>

#include <cmath>

#include "runtime/ops/attention.h"
#include "tests/ops/op_test.h"

namespace moe {
namespace {

// cos/sin tables (positions, d/2) of the rotary embedding with base 10000, as the model builds them.
std::pair<Tensor, Tensor> rope_tables(Backend& b, int64_t positions, int64_t d, DType dt) {
  Tensor c = host_tensor({positions, d / 2}, DType::kF64), s = host_tensor({positions, d / 2}, DType::kF64);
  for (int64_t p = 0; p < positions; ++p)
    for (int64_t i = 0; i < d / 2; ++i) {
      double angle = static_cast<double>(p) * std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(d));
      c.data<double>()[p * d / 2 + i] = std::cos(angle);
      s.data<double>()[p * d / 2 + i] = std::sin(angle);
    }
  auto to = [&](const Tensor& h) {
    std::vector<double> v(h.data<double>(), h.data<double>() + h.numel());
    Tensor out = b.empty(h.shape(), dt);
    if (dt == DType::kF64) {
      b.copy_from_host(v.data(), out);
    } else {
      std::vector<float> f(v.begin(), v.end());
      b.copy_from_host(f.data(), out);
    }
    return out;
  };
  return {to(c), to(s)};
}

class AttentionOps : public CpuOps {};

TEST_P(AttentionOps, RopeRotatesPairsByPositionAndInverts) {
  const int64_t seq = 5, batch = 2, heads = 3, d = 8, t = batch * seq;
  auto [c, s] = rope_tables(*backend, 16, d, dt());
  Tensor x = rnd({t, heads * d}, 1), y = backend->empty({t, heads * d}, dt());
  rope(*backend, x, c, s, seq, false, y);
  std::vector<double> xv = to_doubles(*backend, x), yv = to_doubles(*backend, y), want(xv.size());
  for (int64_t tok = 0; tok < t; ++tok)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < d / 2; ++i) {
        double angle = static_cast<double>(tok % seq) * std::pow(10000.0, -2.0 * i / d);
        int64_t a = tok * heads * d + h * d + i, b = a + d / 2;
        want[a] = xv[a] * std::cos(angle) - xv[b] * std::sin(angle);
        want[b] = xv[b] * std::cos(angle) + xv[a] * std::sin(angle);
      }
  EXPECT_LT(rel_diff(yv, want), tol());
  rope(*backend, y, c, s, seq, true, y);  // in place, the inverse
  EXPECT_LT(rel_diff(to_doubles(*backend, y), xv), tol());
}

TEST_P(AttentionOps, HeadLayoutMovesEveryElementToItsPlace) {
  const int64_t batch = 2, seq = 3, heads = 4, d = 2;
  Tensor x = rnd({batch * seq, heads * d}, 2), h = backend->empty({batch, heads, seq, d}, dt());
  split_heads(*backend, x, seq, heads, h);
  std::vector<double> xv = to_doubles(*backend, x), hv = to_doubles(*backend, h);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < heads; ++k)
      for (int64_t i = 0; i < seq; ++i)
        for (int64_t c = 0; c < d; ++c)
          EXPECT_EQ(hv[((b * heads + k) * seq + i) * d + c], xv[(b * seq + i) * heads * d + k * d + c]);
  Tensor back = backend->empty(x.shape(), dt());
  merge_heads(*backend, h, seq, heads, back);
  EXPECT_EQ(to_doubles(*backend, back), xv);
}

TEST_P(AttentionOps, CausalSoftmaxMasksTheFutureAndItsBackwardIsItsDerivative) {
  const int64_t seq = 6, rows = 3 * seq;  // three heads' worth of rows
  const double scale = 0.7;
  Tensor s = rnd({rows, seq}, 3, 2.0), p = backend->empty({rows, seq}, dt());
  causal_softmax_forward(*backend, s, scale, p);
  std::vector<double> sv = to_doubles(*backend, s), pv = to_doubles(*backend, p);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % seq;
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, scale * sv[r * seq + j]);
    for (int64_t j = 0; j <= i; ++j) sum += std::exp(scale * sv[r * seq + j] - mx);
    for (int64_t j = 0; j < seq; ++j) {
      double want = j <= i ? std::exp(scale * sv[r * seq + j] - mx) / sum : 0.0;
      EXPECT_NEAR(pv[r * seq + j], want, tol()) << r << "," << j;
    }
  }
  if (dt() != DType::kF64) return;
  Tensor dp = rnd({rows, seq}, 4), ds = backend->empty({rows, seq}, dt());
  causal_softmax_backward(*backend, dp, p, scale, ds);
  auto f = [&] {
    causal_softmax_forward(*backend, s, scale, p);
    return test::dot(*backend, p, dp);
  };
  EXPECT_LT(rel_diff(to_doubles(*backend, ds), test::numeric_gradient(*backend, s, f)), 1e-8);
}

TEST_P(AttentionOps, DropoutKeepsOneMinusPScaledAndIsTheSameOnEveryRank) {
  const int64_t n = 20000;
  const double p = 0.3;
  RngStream rng{7, rng_stream(RngPurpose::kAttnDropout, 3, 1)};
  Tensor x = backend->empty({n}, dt()), y = backend->empty({n}, dt());
  backend->fill(x, 2.0);
  dropout(*backend, x, p, rng, 1000, y);
  std::vector<double> yv = to_doubles(*backend, y);
  int64_t kept = 0;
  for (double v : yv) {
    kept += v != 0.0;
    EXPECT_TRUE(v == 0.0 || std::abs(v - 2.0 / (1 - p)) < 1e-6) << v;
  }
  EXPECT_NEAR(static_cast<double>(kept) / n, 1 - p, 0.02);
  // A slice starting at global element 1000 + 500 draws what the whole tensor drew there.
  Tensor part = x.rows(500, 600), out = backend->empty({100}, dt());
  dropout(*backend, part, p, rng, 1500, out);
  EXPECT_EQ(to_doubles(*backend, out), std::vector<double>(yv.begin() + 500, yv.begin() + 600));
}

MOE_CPU_OPS_DTYPES(AttentionOps);

TEST_F(CudaOps, AttentionOps) {
  const int64_t batch = 3, seq = 37, heads = 4, d = 16, t = batch * seq;
  compare("rope", [&](Backend& b) {
    auto [c, s] = rope_tables(b, 64, d, DType::kF32);
    Tensor x = rnd(b, {t, heads * d}, 60), y = b.empty({t, heads * d}, DType::kF32);
    rope(b, x, c, s, seq, false, y);
    Tensor z = b.empty({t, heads * d}, DType::kF32);
    rope(b, x, c, s, seq, true, z);
    return std::vector<Tensor>{y, z};
  });
  compare("heads", [&](Backend& b) {
    Tensor x = rnd(b, {t, heads * d}, 61), h = b.empty({batch, heads, seq, d}, DType::kF32);
    split_heads(b, x, seq, heads, h);
    Tensor back = b.empty({t, heads * d}, DType::kF32);
    merge_heads(b, h, seq, heads, back);
    return std::vector<Tensor>{h, back};
  });
  compare("causal softmax", [&](Backend& b) {
    Tensor s = rnd(b, {batch * heads, seq, seq}, 62, 3.0), p = b.empty(s.shape(), DType::kF32);
    causal_softmax_forward(b, s, 0.25, p);
    Tensor dp = rnd(b, s.shape(), 63), ds = b.empty(s.shape(), DType::kF32);
    causal_softmax_backward(b, dp, p, 0.25, ds);
    return std::vector<Tensor>{p, ds};
  });
  compare("dropout", [&](Backend& b) {
    Tensor x = rnd(b, {1000, 7}, 64), y = b.empty({1000, 7}, DType::kF32);
    dropout(b, x, 0.1, RngStream{5, rng_stream(RngPurpose::kAttnDropout, 1, 2)}, 12345, y);
    return std::vector<Tensor>{y};
  });
}

}  // namespace
}  // namespace moe
