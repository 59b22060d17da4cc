// Contracts of the GEMM family (runtime/ops/gemm.h), run before either device's implementation.
#include "runtime/ops/gemm.h"

#include "runtime/ops/contract.h"

namespace moe {
namespace {

// Whether the result may be F32 when the operands are BF16: cublasGemmEx takes that pair,
// cublasGemmGroupedBatchedEx (the grouped path of the grouped GEMMs) does not.
enum class Widening : uint8_t { kBf16ToF32, kNone };

void check_gemm_dtypes(const Backend& b, const char* op, const Tensor& a, const char* a_what, const Tensor& w,
                       const char* w_what, const Tensor& c, Widening widening) {
  check_floats(b, op, {{a, a_what}, {w, w_what}, {c, "c"}});
  check_same_dtype(op, a, a_what, w, w_what);
  if (c.dtype() == a.dtype()) return;
  if (widening == Widening::kBf16ToF32 && a.dtype() == DType::kBF16 && c.dtype() == DType::kF32) return;
  throw InternalError(detail::concat(op, ": the ", device_name(b.device()), " backend takes c as ",
                                     dtype_name(a.dtype()), " for ", dtype_name(a.dtype()), " operands",
                                     widening == Widening::kNone ? " on this path" : "", ", got ", c.str()));
}

Widening grouped_widening(GroupedGemmPath path) {
  return path == GroupedGemmPath::kStreams ? Widening::kBf16ToF32 : Widening::kNone;
}

void check_group_rows(const char* op, const std::vector<int64_t>& group_rows, int64_t rows) {
  int64_t total = 0;
  for (int64_t m : group_rows) {
    MOE_CHECK(m >= 0, op, ": negative group size ", m);
    total += m;
  }
  MOE_CHECK(total == rows, op, ": group rows sum to ", total, ", a has ", rows);
}

}  // namespace

void check_gemm(Backend& b, const Tensor& a, Trans ta, const Tensor& w, Trans tw, Tensor& c, double alpha,
                double beta) {
  MOE_CHECK(a.rank() == 2, "gemm needs 2-D tensors: ", a.str(), w.str(), c.str());
  gemm_dims("gemm", a, ta, w, tw, c);
  check_gemm_dtypes(b, "gemm", a, "a", w, "w", c, Widening::kBf16ToF32);
}

void check_grouped_gemm(Backend& b, const Tensor& a, const Tensor& w, Trans tw, Tensor& c,
                        const std::vector<int64_t>& group_rows, double alpha, double beta, GroupedGemmPath path) {
  MOE_CHECK(a.rank() == 2 && w.rank() == 3 && c.rank() == 2, "grouped_gemm shapes: ", a.str(), w.str(), c.str());
  MOE_CHECK(static_cast<int64_t>(group_rows.size()) == w.dim(0), "grouped_gemm: ", group_rows.size(),
            " groups for weights ", w.str());
  const bool wt = tw == Trans::kT;
  const int64_t k = a.dim(1), n = wt ? w.dim(1) : w.dim(2);
  MOE_CHECK((wt ? w.dim(2) : w.dim(1)) == k && c.dim(1) == n && c.dim(0) == a.dim(0), "grouped_gemm shapes: ",
            a.str(), " x ", w.str(), wt ? "^T" : "", " -> ", c.str());
  check_group_rows("grouped_gemm", group_rows, a.dim(0));
  check_gemm_dtypes(b, "grouped_gemm", a, "a", w, "w", c, grouped_widening(path));
}

void check_grouped_gemm_tn(Backend& b, const Tensor& a, const Tensor& x, Tensor& c,
                           const std::vector<int64_t>& group_rows, double alpha, double beta, GroupedGemmPath path) {
  MOE_CHECK(a.rank() == 2 && x.rank() == 2 && c.rank() == 3, "grouped_gemm_tn shapes: ", a.str(), x.str(), c.str());
  MOE_CHECK(a.dim(0) == x.dim(0) && c.dim(0) == static_cast<int64_t>(group_rows.size()) && c.dim(1) == a.dim(1) &&
                c.dim(2) == x.dim(1),
            "grouped_gemm_tn shapes: ", a.str(), "^T x ", x.str(), " -> ", c.str());
  check_group_rows("grouped_gemm_tn", group_rows, a.dim(0));
  check_gemm_dtypes(b, "grouped_gemm_tn", a, "a", x, "x", c, grouped_widening(path));
}

void check_batched_gemm(Backend& b, const Tensor& a, Trans ta, const Tensor& w, Trans tw, Tensor& c, double alpha,
                        double beta) {
  MOE_CHECK(a.rank() == 3, "batched_gemm needs 3-D tensors: ", a.str(), w.str(), c.str());
  gemm_dims("batched_gemm", a, ta, w, tw, c);
  check_gemm_dtypes(b, "batched_gemm", a, "a", w, "w", c, Widening::kBf16ToF32);
}

}  // namespace moe
