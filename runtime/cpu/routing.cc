// CPU routing family (runtime/ops/routing.h): router scores, top-k with gates, random routing and
// GShard capacity slots, the router statistics and gradients (the contracts in runtime/ops/routing.cc
// have checked the arguments).
#include <numeric>
#include <vector>

#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/routing.h"
#include "runtime/topk.h"

namespace moe::cpu {

void jitter(Backend&, const Tensor& x, double eps, const RngStream& rng, int64_t token_offset, Tensor& out) {
  int64_t t_count = x.dim(0), h = x.dim(1);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t)
      for (int64_t j = 0; j < h; ++j) {
        int64_t i = t * h + j;
        double m = 1.0 - eps + 2.0 * eps * rng.uniform(static_cast<uint64_t>((token_offset + t) * h + j));
        out.data<T>()[i] = static_cast<T>(x.data<T>()[i] * m);
      }
  });
}

void router_probs(Backend&, ScoreFn fn, const Tensor& logits, Tensor& probs) {
  int64_t t_count = logits.dim(0), e = logits.dim(1);
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t) {
      const T* pl = logits.data<T>() + t * e;
      T* pp = probs.data<T>() + t * e;
      if (fn == ScoreFn::kSoftmax) {
        softmax_row(pl, pp, e);
      } else {
        for (int64_t j = 0; j < e; ++j) pp[j] = sigmoid(pl[j]);
      }
    }
  });
}

void gumbel_probs(Backend&, const Tensor& logits, double tau, const RngStream& rng, int64_t token_offset,
                  Tensor& probs) {
  int64_t t_count = logits.dim(0), e = logits.dim(1);
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> noisy(static_cast<size_t>(e));
    for (int64_t t = 0; t < t_count; ++t) {
      const T* pl = logits.data<T>() + t * e;
      for (int64_t j = 0; j < e; ++j)
        noisy[j] = pl[j] + static_cast<T>(rng.gumbel(static_cast<uint64_t>((token_offset + t) * e + j)));
      softmax_row(noisy.data(), probs.data<T>() + t * e, e, static_cast<T>(1.0 / tau));
    }
  });
}

void router_probs_backward(Backend&, ScoreFn fn, const Tensor& dprobs, const Tensor& probs, double scale,
                           Tensor& dlogits) {
  int64_t t_count = probs.dim(0), e = probs.dim(1);
  dispatch_float(probs.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T s = static_cast<T>(scale);
    for (int64_t t = 0; t < t_count; ++t) {
      const T* pp = probs.data<T>() + t * e;
      const T* pd = dprobs.data<T>() + t * e;
      T* pl = dlogits.data<T>() + t * e;
      if (fn == ScoreFn::kSoftmax) {
        T dot = 0;
        for (int64_t j = 0; j < e; ++j) dot += pd[j] * pp[j];
        for (int64_t j = 0; j < e; ++j) pl[j] += s * pp[j] * (pd[j] - dot);
      } else {
        for (int64_t j = 0; j < e; ++j) pl[j] += s * pd[j] * pp[j] * (T(1) - pp[j]);
      }
    }
  });
}

void z_loss(Backend& backend, const Tensor& logits, double coef, Tensor& dlogits, Tensor& sum) {
  int64_t t_count = logits.dim(0), e = logits.dim(1);
  double total = 0;
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> p(static_cast<size_t>(e));
    for (int64_t t = 0; t < t_count; ++t) {
      const T* pl = logits.data<T>() + t * e;
      T lse = logsumexp_row(pl, e);
      total += static_cast<double>(lse) * lse;
      softmax_row(pl, p.data(), e);
      T c = static_cast<T>(2.0 * coef) * lse;
      T* pd = dlogits.data<T>() + t * e;
      for (int64_t j = 0; j < e; ++j) pd[j] += c * p[j];
    }
  });
  sum.data<double>()[0] = total;
}

void router_stats(Backend& backend, const RouteState& state, const Tensor& probs, Tensor& stats) {
  int64_t t_count = probs.dim(0), e = probs.dim(1);
  RouterStatsLayout layout{static_cast<int>(e)};
  double* out = stats.data<double>();
  const int32_t* choices = state.choices.data<int32_t>();
  const int32_t* fill = state.fill.data<int32_t>();
  const int64_t groups = state.fill.dim(1);
  for (int64_t j = 0; j < e; ++j) {
    out[layout.choices() + j] = choices[j];
    out[layout.score_sums() + j] = 0;
    out[layout.processed() + j] = 0;
    for (int64_t g = 0; g < groups; ++g) out[layout.processed() + j] += fill[j * groups + g];
  }
  dispatch_float(probs.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t)
      for (int64_t j = 0; j < e; ++j) out[layout.score_sums() + j] += probs.data<T>()[t * e + j];
  });
  out[layout.dropped()] = state.counts.data<int32_t>()[0];
}

void add_row_vector(Backend& backend, Tensor& x, const Tensor& v, double scale) {
  int64_t t_count = x.dim(0), e = x.dim(1);
  const double* pv = v.data<double>();
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t)
      for (int64_t j = 0; j < e; ++j) x.data<T>()[t * e + j] += static_cast<T>(scale * pv[j]);
  });
}

// ---------------------------------------------------------------------------------------------------
// routing: top-k, gates, random routing, capacity slots

void route(Backend& backend, const RouteArgs& args, const Tensor& sel_probs, const Tensor& bias, RouteState& out) {
  const int64_t t_count = sel_probs.dim(0);
  const int e_count = args.num_experts, k = args.top_k, g_count = args.num_groups;
  const int64_t group_tokens = t_count / g_count;
  out.args = args;

  DType ft = sel_probs.dtype();
  out.expert_idx = backend.zeros({t_count, k}, DType::kI32);
  out.score = backend.zeros({t_count, k}, ft);
  out.gate = backend.zeros({t_count, k}, ft);
  out.row_idx = backend.zeros({t_count, k}, DType::kI32);
  out.fill = backend.zeros({e_count, g_count}, DType::kI32);
  out.choices = backend.zeros({e_count}, DType::kI32);
  out.counts = backend.zeros({2}, DType::kI32);
  int32_t& num_dropped = out.counts.data<int32_t>()[0];
  int32_t& num_random_skipped = out.counts.data<int32_t>()[1];

  int32_t* eidx = out.expert_idx.data<int32_t>();
  int32_t* rows = out.row_idx.data<int32_t>();
  int32_t* fill = out.fill.data<int32_t>();
  int32_t* choices = out.choices.data<int32_t>();
  std::vector<int32_t> slot(static_cast<size_t>(t_count * k), -1);

  dispatch_float(ft, [&](auto tag) {
    using T = decltype(tag);
    const T* probs = sel_probs.data<T>();
    const T* b = bias.defined() ? bias.data<T>() : nullptr;
    T* score = out.score.data<T>();
    T* gate = out.gate.data<T>();

    // 1. top-k per token over probs + bias; ties go to the lower expert index.
    std::vector<T> key(static_cast<size_t>(k));
    for (int64_t t = 0; t < t_count; ++t) {
      const T* p = probs + t * e_count;
      int32_t* idx = eidx + t * k;
      int n = 0;
      if (args.forced.on()) {
        forced_choice(args.forced, e_count, k, args.forced_rng, static_cast<uint64_t>(args.token_offset + t), idx);
      } else {
        for (int e = 0; e < e_count; ++e) topk_insert(key.data(), idx, n, k, T(p[e] + (b ? b[e] : T(0))), e);
      }
      T sum = 0;
      for (int j = 0; j < k; ++j) {
        score[t * k + j] = p[idx[j]];
        sum += p[idx[j]];
        ++choices[idx[j]];
      }
      for (int j = 0; j < k; ++j) {
        if (args.gate_mode == GateMode::kHard) {
          gate[t * k + j] = args.normalize ? T(1) / T(k) : T(1);
        } else {
          gate[t * k + j] = args.normalize ? (sum > T(0) ? score[t * k + j] / sum : T(0)) : score[t * k + j];
        }
      }
    }

    // 2. GShard random routing: the 2nd choice survives only if 2 * g2 / (g1 + g2) > U(0, 1).
    std::vector<char> skipped(static_cast<size_t>(t_count * k), 0);
    if (args.random_routing) {
      for (int64_t t = 0; t < t_count; ++t) {
        T s1 = score[t * k], s2 = score[t * k + 1];
        double g2 = s1 + s2 > T(0) ? static_cast<double>(s2) / static_cast<double>(s1 + s2) : 0.0;
        double u = args.rng.uniform(static_cast<uint64_t>(args.token_offset + t));
        if (!(2.0 * g2 > u)) {
          skipped[t * k + 1] = 1;
          ++num_random_skipped;
        }
      }
    }

    // 3. capacity: per group, every token's j-th choice claims a slot before any token's (j+1)-th.
    std::vector<int64_t> order(static_cast<size_t>(group_tokens));
    for (int g = 0; g < g_count; ++g) {
      int64_t t0 = g * group_tokens;
      std::iota(order.begin(), order.end(), t0);
      if (args.priority == Priority::kBatch) {  // V-MoE: highest top-1 score first, ties by token order
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t x, int64_t y) { return score[x * k] > score[y * k]; });
      }
      for (int j = 0; j < k; ++j) {
        for (int64_t t : order) {
          int64_t a = t * k + j;
          if (skipped[a]) continue;
          int32_t& f = fill[eidx[a] * g_count + g];
          if (args.capacity == 0 || f < args.capacity) {
            slot[a] = f++;
          } else {
            ++num_dropped;
          }
        }
      }
    }
  });

  // 4. rows of the expert-major send buffer
  std::vector<int64_t> block_begin(static_cast<size_t>(e_count * g_count));
  int64_t next = 0;
  for (int64_t b = 0; b < e_count * g_count; ++b) {
    block_begin[b] = args.capacity ? b * args.capacity : next;
    next += fill[b];
  }
  out.num_rows = args.capacity ? int64_t{e_count} * g_count * args.capacity : next;
  MOE_CHECK(out.num_rows < (int64_t{1} << 31), "route: ", out.num_rows, " send rows overflow 32-bit indices");
  for (int64_t t = 0; t < t_count; ++t)
    for (int j = 0; j < k; ++j) {
      int64_t a = t * k + j;
      rows[a] = slot[a] < 0 ? -1 : static_cast<int32_t>(block_begin[eidx[a] * g_count + t / group_tokens] + slot[a]);
    }
}

void route_backward(Backend& backend, const Tensor& sel_probs, const RouteState& state,
                                const Tensor& dgate, Tensor& dsel_probs) {
  const RouteArgs& args = state.args;
  const int64_t t_count = sel_probs.dim(0);
  const int e_count = args.num_experts, k = args.top_k;
  backend.fill(dsel_probs, 0.0);
  const int32_t* eidx = state.expert_idx.data<int32_t>();
  dispatch_float(sel_probs.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* score = state.score.data<T>();
    const T* dg = dgate.data<T>();
    T* ds = dsel_probs.data<T>();
    for (int64_t t = 0; t < t_count; ++t) {
      const T* s = score + t * k;
      const T* d = dg + t * k;
      T* out = ds + t * e_count;
      if (!args.normalize) {
        for (int j = 0; j < k; ++j) out[eidx[t * k + j]] += d[j];
        continue;
      }
      // g_j = s_j / S  =>  dL/ds_i = (dg_i - sum_j dg_j g_j) / S
      T sum = 0;
      for (int j = 0; j < k; ++j) sum += s[j];
      if (!(sum > T(0))) continue;
      T dot = 0;
      for (int j = 0; j < k; ++j) dot += d[j] * s[j] / sum;
      for (int j = 0; j < k; ++j) out[eidx[t * k + j]] += (d[j] - dot) / sum;
    }
  });
}

}  // namespace moe::cpu
