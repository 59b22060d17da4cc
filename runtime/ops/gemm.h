// GEMM family: dense and grouped matrix products (CPU: CBLAS; CUDA: cuBLAS, fp32 compute, no TF32).
//
// Row-major tensors. "op(a)" is a or a^T by the Trans argument. Dtypes: the two operands share one of the
// device's floats (runtime/ops/contract.h: CPU F32 or F64, CUDA F32 or BF16); the result has their dtype,
// except that on CUDA BF16 operands may give an F32 result (cublasGemmEx), but not on the grouped path of
// grouped_gemm(_tn) (cublasGemmGroupedBatchedEx). The contracts are in runtime/ops/gemm.cc.
#pragma once

#include <vector>

#include "runtime/ops/op.h"

namespace moe {

enum class Trans : uint8_t { kN, kT };

// Problem sizes of gemm (2-D operands, batch 1) or batched_gemm (3-D operands, batch = leading dimension):
// op(a) (m, k), op(w) (k, n), c (m, n). Throws InternalError naming `op` when the shapes do not fit.
struct GemmDims {
  int64_t batch = 1, m = 0, n = 0, k = 0;
};
inline GemmDims gemm_dims(const char* op, const Tensor& a, Trans ta, const Tensor& w, Trans tw, const Tensor& c) {
  const int r = a.rank();
  MOE_CHECK((r == 2 || r == 3) && w.rank() == r && c.rank() == r, op, " needs ", r == 3 ? "3" : "2",
            "-D tensors: ", a.str(), w.str(), c.str());
  const bool at = ta == Trans::kT, wt = tw == Trans::kT;
  GemmDims d;
  d.batch = r == 3 ? a.dim(0) : 1;
  d.m = at ? a.dim(-1) : a.dim(-2);
  d.k = at ? a.dim(-2) : a.dim(-1);
  d.n = wt ? w.dim(-2) : w.dim(-1);
  const int64_t kw = wt ? w.dim(-1) : w.dim(-2);
  MOE_CHECK(d.k == kw && c.dim(-2) == d.m && c.dim(-1) == d.n && (r == 2 || (w.dim(0) == d.batch && c.dim(0) == d.batch)),
            op, " shapes: ", a.str(), at ? "^T" : "", " x ", w.str(), wt ? "^T" : "", " -> ", c.str());
  return d;
}

// c (M, N) = alpha * op(a) op(b) + beta * c, with op(a) (M, K) and op(b) (K, N), 2-D. K = 0 gives
// c = beta * c exactly (0 when beta = 0).
MOE_OP(void, gemm,
       (Backend& b, const Tensor& a, Trans ta, const Tensor& w, Trans tw, Tensor& c, double alpha, double beta),
       (b, a, ta, w, tw, c, alpha, beta))

// One GEMM per group of consecutive rows: for g, c[rows_g] (m_g, N) = alpha * a[rows_g] (m_g, K) op(w[g])
// + beta * c[rows_g]. w is (G, N, K) with tw = kT, or (G, K, N) with tw = kN. group_rows lives on the
// host, one entry per weight, none negative, summing to a's rows; empty groups are allowed.
MOE_OP(void, grouped_gemm,
       (Backend& b, const Tensor& a, const Tensor& w, Trans tw, Tensor& c, const std::vector<int64_t>& group_rows,
        double alpha, double beta, GroupedGemmPath path),
       (b, a, w, tw, c, group_rows, alpha, beta, path))

// Weight gradients of grouped_gemm: c[g] (P, Q) = alpha * a[rows_g]^T (P, m_g) x[rows_g] (m_g, Q) + beta * c[g]
// (an empty group leaves beta * c[g]).
MOE_OP(void, grouped_gemm_tn,
       (Backend& b, const Tensor& a, const Tensor& x, Tensor& c, const std::vector<int64_t>& group_rows, double alpha,
        double beta, GroupedGemmPath path),
       (b, a, x, c, group_rows, alpha, beta, path))

// c[i] (M, N) = alpha * op(a[i]) op(w[i]) + beta * c[i] for every i < batch; a, w, c are 3-D (batch, rows,
// cols), each matrix contiguous and row-major.
MOE_OP(void, batched_gemm,
       (Backend& b, const Tensor& a, Trans ta, const Tensor& w, Trans tw, Tensor& c, double alpha, double beta),
       (b, a, ta, w, tw, c, alpha, beta))

}  // namespace moe
