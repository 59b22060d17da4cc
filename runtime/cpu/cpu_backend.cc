// CPU op backend: the reference implementation of every op in runtime/backend.h.
//
// GEMMs go through CBLAS (OpenBLAS, `threads` threads per rank); everything else is plain loops over
// contiguous rows. Each op is a template over the float type (F32 for training, F64 for gradient
// checks), dispatched once on the dtype of its first tensor argument.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "runtime/backend.h"
#include "runtime/topk.h"

namespace moe {
namespace {

// ---------------------------------------------------------------------------------------------------
// helpers

template <typename F>
void dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32: f(float{}); return;
    case DType::kF64: f(double{}); return;
    default: MOE_CHECK(false, "float op called on ", dtype_name(dtype), " tensor");
  }
}

void same_dtype(const Tensor& a, const Tensor& b, const char* op) {
  MOE_CHECK(a.dtype() == b.dtype(), op, ": dtype mismatch ", a.str(), " vs ", b.str());
}

// Elements per row: the product of every dimension after the first (defined for zero rows too).
int64_t row_len(const Tensor& t) {
  int64_t n = 1;
  for (int i = 1; i < t.rank(); ++i) n *= t.dim(i);
  return n;
}

template <typename T>
void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, double beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves this to the implementation; make it exact: c = beta * c
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0 ? T(0) : static_cast<T>(beta * c[i * ldc + j]);
    return;
  }
  auto op_a = ta ? CblasTrans : CblasNoTrans;
  auto op_b = tb ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, op_a, op_b, (int)m, (int)n, (int)k, (float)alpha, a, (int)lda, b, (int)ldb,
                (float)beta, c, (int)ldc);
  } else {
    cblas_dgemm(CblasRowMajor, op_a, op_b, (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c,
                (int)ldc);
  }
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)

template <typename T>
void softmax_row(const T* in, T* out, int64_t n, T inv_tau = T(1)) {
  T mx = in[0] * inv_tau;
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, in[i] * inv_tau);
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (out[i] = std::exp(in[i] * inv_tau - mx));
  T inv = T(1) / sum;
  for (int64_t i = 0; i < n; ++i) out[i] *= inv;
}

// log-sum-exp of one row, stable
template <typename T>
T logsumexp_row(const T* in, int64_t n) {
  T mx = in[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, in[i]);
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(in[i] - mx);
  return mx + std::log(sum);
}

// ---------------------------------------------------------------------------------------------------

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuBackendOptions& options) {
    MOE_CHECK(options.threads >= 1, "threads must be >= 1");
    openblas_set_num_threads(options.threads);
  }

  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::kCpu; }

  Tensor empty(const Shape& shape, DType dtype) override { return host_tensor_uninitialized(shape, dtype); }

  void fill(Tensor& t, double value) override {
    if (t.dtype() == DType::kI32) {
      std::fill_n(t.data<int32_t>(), t.numel(), static_cast<int32_t>(value));
      return;
    }
    if (value == 0.0) {
      if (t.numel()) std::memset(t.raw(), 0, t.nbytes());
      return;
    }
    dispatch_float(t.dtype(), [&](auto tag) {
      using T = decltype(tag);
      std::fill_n(t.data<T>(), t.numel(), static_cast<T>(value));
    });
  }

  void copy(const Tensor& src, Tensor& dst) override {
    same_dtype(src, dst, "copy");
    MOE_CHECK(src.numel() == dst.numel(), "copy: ", src.str(), " to ", dst.str());
    if (src.numel()) std::memmove(dst.raw(), src.raw(), src.nbytes());
  }
  void copy_to_host(const Tensor& src, void* dst) override {
    if (src.numel()) std::memcpy(dst, src.raw(), src.nbytes());
  }
  void copy_from_host(const void* src, Tensor& dst) override {
    if (dst.numel()) std::memcpy(dst.raw(), src, dst.nbytes());
  }

  // ---- dense algebra

  void gemm(const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, double alpha, double beta) override {
    MOE_CHECK(a.rank() == 2 && b.rank() == 2 && c.rank() == 2, "gemm needs 2-D tensors: ", a.str(), b.str(), c.str());
    same_dtype(a, b, "gemm");
    same_dtype(a, c, "gemm");
    bool at = ta == Trans::kT, bt = tb == Trans::kT;
    int64_t m = at ? a.dim(1) : a.dim(0), k = at ? a.dim(0) : a.dim(1);
    int64_t kb = bt ? b.dim(1) : b.dim(0), n = bt ? b.dim(0) : b.dim(1);
    MOE_CHECK(k == kb && c.dim(0) == m && c.dim(1) == n, "gemm shapes: ", a.str(), at ? "^T" : "", " x ", b.str(),
              bt ? "^T" : "", " -> ", c.str());
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      blas_gemm<T>(at, bt, m, n, k, alpha, a.data<T>(), a.dim(1), b.data<T>(), b.dim(1), beta, c.data<T>(), n);
    });
  }

  void grouped_gemm(const Tensor& a, const Tensor& b, Trans tb, Tensor& c, const std::vector<int64_t>& group_rows,
                    double alpha, double beta) override {
    MOE_CHECK(a.rank() == 2 && b.rank() == 3 && c.rank() == 2, "grouped_gemm shapes: ", a.str(), b.str(), c.str());
    MOE_CHECK(static_cast<int64_t>(group_rows.size()) == b.dim(0), "grouped_gemm: ", group_rows.size(),
              " groups for weights ", b.str());
    same_dtype(a, b, "grouped_gemm");
    same_dtype(a, c, "grouped_gemm");
    bool bt = tb == Trans::kT;
    int64_t k = a.dim(1), n = bt ? b.dim(1) : b.dim(2);
    MOE_CHECK((bt ? b.dim(2) : b.dim(1)) == k && c.dim(1) == n && c.dim(0) == a.dim(0), "grouped_gemm shapes: ",
              a.str(), " x ", b.str(), bt ? "^T" : "", " -> ", c.str());
    int64_t total = std::accumulate(group_rows.begin(), group_rows.end(), int64_t{0});
    MOE_CHECK(total == a.dim(0), "grouped_gemm: group rows sum to ", total, ", a has ", a.dim(0));
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* pa = a.data<T>();
      const T* pb = b.data<T>();
      T* pc = c.data<T>();
      int64_t row = 0;
      for (size_t g = 0; g < group_rows.size(); ++g) {
        int64_t m = group_rows[g];
        blas_gemm<T>(false, bt, m, n, k, alpha, pa + row * k, k, pb + g * n * k, bt ? k : n, beta, pc + row * n, n);
        row += m;
      }
    });
  }

  void grouped_gemm_tn(const Tensor& a, const Tensor& b, Tensor& c, const std::vector<int64_t>& group_rows,
                       double alpha, double beta) override {
    MOE_CHECK(a.rank() == 2 && b.rank() == 2 && c.rank() == 3, "grouped_gemm_tn shapes: ", a.str(), b.str(), c.str());
    same_dtype(a, b, "grouped_gemm_tn");
    same_dtype(a, c, "grouped_gemm_tn");
    int64_t p = a.dim(1), q = b.dim(1);
    MOE_CHECK(a.dim(0) == b.dim(0) && c.dim(0) == static_cast<int64_t>(group_rows.size()) && c.dim(1) == p &&
                  c.dim(2) == q,
              "grouped_gemm_tn shapes: ", a.str(), "^T x ", b.str(), " -> ", c.str());
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      int64_t row = 0;
      for (size_t g = 0; g < group_rows.size(); ++g) {
        int64_t m = group_rows[g];
        blas_gemm<T>(true, false, p, q, m, alpha, a.data<T>() + row * p, p, b.data<T>() + row * q, q, beta,
                     c.data<T>() + g * p * q, q);
        row += m;
      }
      MOE_CHECK(row == a.dim(0), "grouped_gemm_tn: group rows sum to ", row, ", a has ", a.dim(0));
    });
  }

  void axpy(double alpha, const Tensor& x, Tensor& y) override {
    same_dtype(x, y, "axpy");
    MOE_CHECK(x.numel() == y.numel(), "axpy: ", x.str(), " vs ", y.str());
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* px = x.data<T>();
      T* py = y.data<T>();
      T a = static_cast<T>(alpha);
      for (int64_t i = 0, n = x.numel(); i < n; ++i) py[i] += a * px[i];
    });
  }

  void scale(Tensor& x, double alpha) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      T* p = x.data<T>();
      T a = static_cast<T>(alpha);
      for (int64_t i = 0, n = x.numel(); i < n; ++i) p[i] *= a;
    });
  }

  double sum_squares(const Tensor& x) override {
    double total = 0;
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* p = x.data<T>();
      for (int64_t i = 0, n = x.numel(); i < n; ++i) total += static_cast<double>(p[i]) * p[i];
    });
    return total;
  }

  // ---- activations

  void swiglu_forward(const Tensor& a, const Tensor& b, Tensor& h) override {
    MOE_CHECK(a.numel() == b.numel() && a.numel() == h.numel(), "swiglu: ", a.str(), b.str(), h.str());
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T *pa = a.data<T>(), *pb = b.data<T>();
      T* ph = h.data<T>();
      for (int64_t i = 0, n = a.numel(); i < n; ++i) ph[i] = pa[i] * sigmoid(pa[i]) * pb[i];
    });
  }

  void swiglu_backward(const Tensor& dh, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db) override {
    MOE_CHECK(dh.numel() == a.numel() && a.numel() == b.numel() && da.numel() == a.numel() && db.numel() == a.numel(),
              "swiglu_backward shapes");
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T *pdh = dh.data<T>(), *pa = a.data<T>(), *pb = b.data<T>();
      T *pda = da.data<T>(), *pdb = db.data<T>();
      for (int64_t i = 0, n = a.numel(); i < n; ++i) {
        T s = sigmoid(pa[i]);
        T silu = pa[i] * s;
        pdb[i] = pdh[i] * silu;
        pda[i] = pdh[i] * pb[i] * s * (T(1) + pa[i] * (T(1) - s));
      }
    });
  }

  void activation_forward(Activation act, const Tensor& a, Tensor& h) override {
    MOE_CHECK(a.numel() == h.numel(), "activation: ", a.str(), h.str());
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* pa = a.data<T>();
      T* ph = h.data<T>();
      for (int64_t i = 0, n = a.numel(); i < n; ++i) {
        T x = pa[i];
        if (act == Activation::kRelu) {
          ph[i] = x > T(0) ? x : T(0);
        } else {
          ph[i] = T(0.5) * x * (T(1) + std::tanh(T(kGeluC) * (x + T(0.044715) * x * x * x)));
        }
      }
    });
  }

  void activation_backward(Activation act, const Tensor& dh, const Tensor& a, Tensor& da) override {
    MOE_CHECK(a.numel() == dh.numel() && a.numel() == da.numel(), "activation_backward shapes");
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T *pdh = dh.data<T>(), *pa = a.data<T>();
      T* pda = da.data<T>();
      for (int64_t i = 0, n = a.numel(); i < n; ++i) {
        T x = pa[i];
        if (act == Activation::kRelu) {
          pda[i] = x > T(0) ? pdh[i] : T(0);
        } else {
          T u = T(kGeluC) * (x + T(0.044715) * x * x * x);
          T th = std::tanh(u);
          T du = T(kGeluC) * (T(1) + T(3 * 0.044715) * x * x);
          pda[i] = pdh[i] * (T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * du);
        }
      }
    });
  }

  // ---- embedding, norm, loss

  void embedding_forward(const Tensor& ids, const Tensor& table, Tensor& out) override {
    int64_t t_count = ids.numel(), h = table.dim(1), v = table.dim(0);
    check_shape(out, {t_count, h}, "embedding output");
    const int32_t* pid = ids.data<int32_t>();
    dispatch_float(table.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t t = 0; t < t_count; ++t) {
        MOE_CHECK(pid[t] >= 0 && pid[t] < v, "token id ", pid[t], " outside vocabulary of ", v);
        std::memcpy(out.data<T>() + t * h, table.data<T>() + int64_t{pid[t]} * h, sizeof(T) * h);
      }
    });
  }

  void embedding_backward(const Tensor& ids, const Tensor& dout, Tensor& dtable) override {
    int64_t t_count = ids.numel(), h = dtable.dim(1);
    check_shape(dout, {t_count, h}, "embedding gradient");
    const int32_t* pid = ids.data<int32_t>();
    dispatch_float(dtable.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t t = 0; t < t_count; ++t) {
        T* row = dtable.data<T>() + int64_t{pid[t]} * h;
        const T* g = dout.data<T>() + t * h;
        for (int64_t j = 0; j < h; ++j) row[j] += g[j];
      }
    });
  }

  void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) override {
    int64_t t_count = x.dim(0), h = x.dim(1);
    check_shape(y, x.shape(), "rmsnorm output");
    check_shape(rstd, {t_count}, "rmsnorm rstd");
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* pw = w.data<T>();
      for (int64_t t = 0; t < t_count; ++t) {
        const T* px = x.data<T>() + t * h;
        T* py = y.data<T>() + t * h;
        double ss = 0;
        for (int64_t j = 0; j < h; ++j) ss += static_cast<double>(px[j]) * px[j];
        T r = static_cast<T>(1.0 / std::sqrt(ss / h + eps));
        rstd.data<T>()[t] = r;
        for (int64_t j = 0; j < h; ++j) py[j] = px[j] * r * pw[j];
      }
    });
  }

  void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,
                        Tensor& dw) override {
    int64_t t_count = x.dim(0), h = x.dim(1);
    check_shape(dx, x.shape(), "rmsnorm dx");
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* pw = w.data<T>();
      T* pdw = dw.data<T>();
      for (int64_t t = 0; t < t_count; ++t) {
        const T* px = x.data<T>() + t * h;
        const T* pdy = dy.data<T>() + t * h;
        T* pdx = dx.data<T>() + t * h;
        T r = rstd.data<T>()[t];
        double dot = 0;  // mean over j of (dy * w) * n, n = x * r
        for (int64_t j = 0; j < h; ++j) dot += static_cast<double>(pdy[j]) * pw[j] * px[j] * r;
        T mean = static_cast<T>(dot / h);
        for (int64_t j = 0; j < h; ++j) {
          T n = px[j] * r;
          pdx[j] = r * (pdy[j] * pw[j] - n * mean);
          pdw[j] += pdy[j] * n;
        }
      }
    });
  }

  double cross_entropy(const Tensor& logits, const Tensor& targets, double grad_scale, Tensor& dlogits) override {
    int64_t t_count = logits.dim(0), v = logits.dim(1);
    check_shape(dlogits, logits.shape(), "cross_entropy dlogits");
    MOE_CHECK(targets.numel() == t_count, "cross_entropy: ", targets.numel(), " targets for ", t_count, " rows");
    double total = 0;
    const int32_t* pt = targets.data<int32_t>();
    dispatch_float(logits.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t t = 0; t < t_count; ++t) {
        const T* pl = logits.data<T>() + t * v;
        T* pd = dlogits.data<T>() + t * v;
        MOE_CHECK(pt[t] >= 0 && pt[t] < v, "target ", pt[t], " outside vocabulary of ", v);
        softmax_row(pl, pd, v);
        T lse = logsumexp_row(pl, v);
        total += static_cast<double>(lse - pl[pt[t]]);
        T s = static_cast<T>(grad_scale);
        for (int64_t j = 0; j < v; ++j) pd[j] *= s;
        pd[pt[t]] -= s;
      }
    });
    return total;
  }

  // ---- router

  void jitter(const Tensor& x, double eps, const RngStream& rng, int64_t token_offset, Tensor& out) override {
    check_shape(out, x.shape(), "jitter output");
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

  void router_probs(ScoreFn fn, const Tensor& logits, Tensor& probs) override {
    check_shape(probs, logits.shape(), "router probs");
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

  void gumbel_probs(const Tensor& logits, double tau, const RngStream& rng, int64_t token_offset,
                    Tensor& probs) override {
    check_shape(probs, logits.shape(), "gumbel probs");
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

  void router_probs_backward(ScoreFn fn, const Tensor& dprobs, const Tensor& probs, double scale,
                             Tensor& dlogits) override {
    check_shape(dprobs, probs.shape(), "router dprobs");
    check_shape(dlogits, probs.shape(), "router dlogits");
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

  void z_loss(const Tensor& logits, double coef, Tensor& dlogits, Tensor& sum) override {
    check_shape(dlogits, logits.shape(), "z-loss dlogits");
    MOE_CHECK(sum.numel() == 1 && sum.dtype() == DType::kF64, "z_loss: sum ", sum.str());
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

  void router_stats(const RouteState& state, const Tensor& probs, Tensor& stats) override {
    int64_t t_count = probs.dim(0), e = probs.dim(1);
    RouterStatsLayout layout{static_cast<int>(e)};
    MOE_CHECK(stats.numel() == layout.size() && stats.dtype() == DType::kF64, "router_stats: ", stats.str());
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

  void add_row_vector(Tensor& x, const Tensor& v, double scale) override {
    int64_t t_count = x.dim(0), e = x.dim(1);
    MOE_CHECK(v.numel() == e && v.dtype() == DType::kF64, "add_row_vector: ", v.str(), " for ", x.str());
    const double* pv = v.data<double>();
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t t = 0; t < t_count; ++t)
        for (int64_t j = 0; j < e; ++j) x.data<T>()[t * e + j] += static_cast<T>(scale * pv[j]);
    });
  }

  void route(const RouteArgs& args, const Tensor& sel_probs, const Tensor& bias, RouteState& out) override;
  void route_backward(const RouteArgs& args, const Tensor& sel_probs, const RouteState& state, const Tensor& dgate,
                      Tensor& dsel_probs) override;

  // ---- token permutation

  void permute(const Tensor& x, const Tensor& row_idx, Tensor& out) override {
    int64_t t_count = x.dim(0), h = x.dim(1), k = row_idx.dim(1);
    MOE_CHECK(row_idx.dim(0) == t_count && out.dim(1) == h, "permute shapes: ", x.str(), row_idx.str(), out.str());
    fill(out, 0.0);
    const int32_t* rows = row_idx.data<int32_t>();
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t t = 0; t < t_count; ++t)
        for (int64_t j = 0; j < k; ++j) {
          int32_t r = rows[t * k + j];
          if (r < 0) continue;
          MOE_CHECK(r < out.dim(0), "permute: row ", r, " outside ", out.str());
          std::memcpy(out.data<T>() + int64_t{r} * h, x.data<T>() + t * h, sizeof(T) * h);
        }
    });
  }

  void permute_backward(const Tensor& dout, const Tensor& row_idx, Tensor& dx) override {
    int64_t t_count = dx.dim(0), h = dx.dim(1), k = row_idx.dim(1);
    const int32_t* rows = row_idx.data<int32_t>();
    dispatch_float(dx.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t t = 0; t < t_count; ++t)
        for (int64_t j = 0; j < k; ++j) {
          int32_t r = rows[t * k + j];
          if (r < 0) continue;
          const T* src = dout.data<T>() + int64_t{r} * h;
          T* dst = dx.data<T>() + t * h;
          for (int64_t c = 0; c < h; ++c) dst[c] += src[c];
        }
    });
  }

  void unpermute(const Tensor& rows, const Tensor& row_idx, const Tensor& gate, Tensor& y) override {
    int64_t t_count = y.dim(0), h = y.dim(1), k = row_idx.dim(1);
    const int32_t* ri = row_idx.data<int32_t>();
    dispatch_float(y.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* pg = gate.data<T>();
      for (int64_t t = 0; t < t_count; ++t)
        for (int64_t j = 0; j < k; ++j) {
          int32_t r = ri[t * k + j];
          if (r < 0) continue;
          T g = pg[t * k + j];
          const T* src = rows.data<T>() + int64_t{r} * h;
          T* dst = y.data<T>() + t * h;
          for (int64_t c = 0; c < h; ++c) dst[c] += g * src[c];
        }
    });
  }

  void unpermute_backward(const Tensor& dy, const Tensor& rows, const Tensor& row_idx, const Tensor& gate,
                          Tensor& drows, Tensor& dgate) override {
    int64_t t_count = dy.dim(0), h = dy.dim(1), k = row_idx.dim(1);
    check_shape(drows, rows.shape(), "unpermute drows");
    check_shape(dgate, gate.shape(), "unpermute dgate");
    fill(drows, 0.0);
    const int32_t* ri = row_idx.data<int32_t>();
    dispatch_float(dy.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* pg = gate.data<T>();
      T* pdg = dgate.data<T>();
      for (int64_t t = 0; t < t_count; ++t)
        for (int64_t j = 0; j < k; ++j) {
          int32_t r = ri[t * k + j];
          if (r < 0) {
            pdg[t * k + j] = 0;
            continue;
          }
          const T* pdy = dy.data<T>() + t * h;
          const T* src = rows.data<T>() + int64_t{r} * h;
          T* dst = drows.data<T>() + int64_t{r} * h;
          T g = pg[t * k + j], dot = 0;
          for (int64_t c = 0; c < h; ++c) {
            dst[c] = g * pdy[c];
            dot += pdy[c] * src[c];
          }
          pdg[t * k + j] = dot;
        }
    });
  }

  void gather_rows(const Tensor& src, const Tensor& idx, Tensor& dst) override {
    int64_t n = idx.numel(), h = row_len(src);
    MOE_CHECK(dst.dim(0) == n && row_len(dst) == h, "gather_rows shapes: ", src.str(), idx.str(), dst.str());
    const int32_t* pi = idx.data<int32_t>();
    size_t bytes = static_cast<size_t>(h) * dtype_size(src.dtype());
    for (int64_t i = 0; i < n; ++i) {
      MOE_CHECK(pi[i] >= 0 && pi[i] < src.dim(0), "gather_rows: row ", pi[i], " outside ", src.str());
      std::memcpy(static_cast<char*>(dst.raw()) + i * bytes, static_cast<const char*>(src.raw()) + pi[i] * bytes, bytes);
    }
  }

  void scatter_rows(const Tensor& src, const Tensor& idx, Tensor& dst) override {
    int64_t n = idx.numel(), h = row_len(dst);
    MOE_CHECK(src.dim(0) == n && row_len(src) == h, "scatter_rows shapes: ", src.str(), idx.str(), dst.str());
    const int32_t* pi = idx.data<int32_t>();
    size_t bytes = static_cast<size_t>(h) * dtype_size(src.dtype());
    for (int64_t i = 0; i < n; ++i) {
      MOE_CHECK(pi[i] >= 0 && pi[i] < dst.dim(0), "scatter_rows: row ", pi[i], " outside ", dst.str());
      std::memcpy(static_cast<char*>(dst.raw()) + pi[i] * bytes, static_cast<const char*>(src.raw()) + i * bytes, bytes);
    }
  }

  // ---- optimizer

  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& a) override {
    MOE_CHECK(param.numel() == grad.numel() && m.numel() == param.numel() && v.numel() == param.numel(),
              "adamw shapes");
    double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
    double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
    dispatch_float(param.dtype(), [&](auto tag) {
      using T = decltype(tag);
      T *p = param.data<T>(), *pm = m.data<T>(), *pv = v.data<T>();
      const T* g = grad.data<T>();
      T b1 = T(a.beta1), b2 = T(a.beta2), lr = T(a.lr), wd = T(a.weight_decay), eps = T(a.eps);
      T ibc1 = T(1.0 / bc1), ibc2 = T(1.0 / bc2);
      for (int64_t i = 0, n = param.numel(); i < n; ++i) {
        pm[i] = b1 * pm[i] + (T(1) - b1) * g[i];
        pv[i] = b2 * pv[i] + (T(1) - b2) * g[i] * g[i];
        T update = (pm[i] * ibc1) / (std::sqrt(pv[i] * ibc2) + eps);
        p[i] -= lr * (update + wd * p[i]);
      }
    });
  }

  void sgd_step(Tensor& param, const Tensor& grad, double lr, double weight_decay) override {
    MOE_CHECK(param.numel() == grad.numel(), "sgd shapes");
    dispatch_float(param.dtype(), [&](auto tag) {
      using T = decltype(tag);
      T* p = param.data<T>();
      const T* g = grad.data<T>();
      T l = T(lr), wd = T(weight_decay);
      for (int64_t i = 0, n = param.numel(); i < n; ++i) p[i] -= l * (g[i] + wd * p[i]);
    });
  }
};

// ---------------------------------------------------------------------------------------------------
// routing: top-k, gates, random routing, capacity slots

void CpuBackend::route(const RouteArgs& args, const Tensor& sel_probs, const Tensor& bias, RouteState& out) {
  const int64_t t_count = sel_probs.dim(0);
  const int e_count = args.num_experts, k = args.top_k, g_count = args.num_groups;
  MOE_CHECK(sel_probs.dim(1) == e_count, "route: probs ", sel_probs.str(), " for ", e_count, " experts");
  MOE_CHECK(k >= 1 && k <= e_count, "route: top_k ", k, " of ", e_count, " experts");
  MOE_CHECK(g_count >= 1 && t_count % g_count == 0, "route: ", t_count, " tokens in ", g_count, " groups");
  MOE_CHECK(!args.random_routing || k == 2, "route: random routing needs top_k == 2");
  const int64_t group_tokens = t_count / g_count;

  DType ft = sel_probs.dtype();
  out.expert_idx = host_tensor({t_count, k}, DType::kI32);
  out.score = host_tensor({t_count, k}, ft);
  out.gate = host_tensor({t_count, k}, ft);
  out.row_idx = host_tensor({t_count, k}, DType::kI32);
  out.fill = host_tensor({e_count, g_count}, DType::kI32);
  out.choices = host_tensor({e_count}, DType::kI32);
  out.counts = host_tensor({2}, DType::kI32);
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
      for (int e = 0; e < e_count; ++e) topk_insert(key.data(), idx, n, k, T(p[e] + (b ? b[e] : T(0))), e);
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

void CpuBackend::route_backward(const RouteArgs& args, const Tensor& sel_probs, const RouteState& state,
                                const Tensor& dgate, Tensor& dsel_probs) {
  const int64_t t_count = sel_probs.dim(0);
  const int e_count = args.num_experts, k = args.top_k;
  check_shape(dgate, {t_count, k}, "route dgate");
  check_shape(dsel_probs, sel_probs.shape(), "route dprobs");
  fill(dsel_probs, 0.0);
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

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

}  // namespace moe
