// CUDA GEMM family (runtime/ops/gemm.h): cuBLAS, row-major by the transpose trick: C (M, N) row-major
// is C^T (N, M) column-major, so we ask cuBLAS for C^T = op(B)^T op(A)^T with the operands swapped.
// CUBLAS_COMPUTE_32F always (F32 operands stay FP32, no TF32). k = 0 is done by us (c = beta * c,
// exactly 0 when beta = 0, as the CPU). grouped_gemm / grouped_gemm_tn issue, on the grouped path, one
// cublasGemmGroupedBatchedEx per 2730 non-empty groups (each its own cuBLAS group of batch 1; the three
// device pointer arrays go up in one ctx.stage() slot, the other per-group arrays are host arrays); on
// the streams path one cublasGemmEx per non-empty group, round-robin over the context's GEMM streams.
// Empty groups of grouped_gemm_tn get c[g] *= beta.
#include <algorithm>
#include <vector>

#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"

namespace moe::cuda {
namespace {

// c = beta * c, exactly zero when beta == 0 (what a GEMM with k = 0 leaves, as in the CPU backend).
void scale_by_beta(Backend& backend, Context& ctx, Tensor& c, double beta) {
  if (c.numel() == 0 || beta == 1.0) return;
  if (beta == 0.0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(c.raw(), 0, c.nbytes(), ctx.stream));
    return;
  }
  cuda::scale(backend, c, beta);
}

// ---------------------------------------------------------------------------------------------------
// cuBLAS

cudaDataType_t blas_type(DType dtype) { return dtype == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }
cublasOperation_t blas_op(Trans t) { return t == Trans::kT ? CUBLAS_OP_T : CUBLAS_OP_N; }

struct GemmTypes {
  cudaDataType_t ab, c;
};

// The cuBLAS types of the operands and the result. The pairs used with CUBLAS_COMPUTE_32F (F32/F32,
// BF16/BF16, and BF16/F32 outside cublasGemmGroupedBatchedEx) are the contract's (runtime/ops/gemm.cc).
GemmTypes gemm_types(const Tensor& a, const Tensor& c) { return {blas_type(a.dtype()), blas_type(c.dtype())}; }

// One GEMM of a grouped call, in cuBLAS's column-major terms: C (m, n) = op(A) (m, k) op(B) (k, n).
struct GroupProblem {
  const void* a;
  const void* b;
  void* c;
  int m, n, k, lda, ldb, ldc;
};

// cuBLAS asks the matrices of a 16-bit grouped GEMM to be 16-byte aligned when k % 8 == 0 and 4-byte
// aligned when k % 2 == 0; a misaligned one faults on the device (and kills the context), so refuse it.
void check_half_alignment(const GroupProblem& p, const char* op) {
  const uintptr_t need = p.k % 8 == 0 ? 16 : p.k % 2 == 0 ? 4 : 2;
  for (const void* ptr : {p.a, p.b, static_cast<const void*>(p.c)}) {
    MOE_CHECK(reinterpret_cast<uintptr_t>(ptr) % need == 0, op, ": BF16 matrix at ", ptr, " is not ", need,
              "-byte aligned, as cuBLAS needs for k = ", p.k);
  }
}

// Runs the problems (all with the same transposes and scalars) as cuBLAS groups of batch size 1, as many
// per call as one staging slot holds pointer triples for.
void run_grouped(Context& ctx, cublasOperation_t ta, cublasOperation_t tb, const std::vector<GroupProblem>& problems,
                 GemmTypes types, double alpha, double beta) {
  constexpr size_t kMaxPerCall = Context::kSlotBytes / (3 * sizeof(void*));
  for (size_t first = 0; first < problems.size(); first += kMaxPerCall) {
    const size_t count = std::min(kMaxPerCall, problems.size() - first);
    // Device pointer arrays, one slot: [A pointers | B pointers | C pointers].
    std::vector<void*> ptrs(3 * count);
    std::vector<int> m(count), n(count), k(count), lda(count), ldb(count), ldc(count);
    for (size_t i = 0; i < count; ++i) {
      const GroupProblem& p = problems[first + i];
      ptrs[i] = const_cast<void*>(p.a);
      ptrs[count + i] = const_cast<void*>(p.b);
      ptrs[2 * count + i] = p.c;
      m[i] = p.m;
      n[i] = p.n;
      k[i] = p.k;
      lda[i] = p.lda;
      ldb[i] = p.ldb;
      ldc[i] = p.ldc;
    }
    std::vector<cublasOperation_t> trans_a(count, ta), trans_b(count, tb);
    std::vector<float> alphas(count, static_cast<float>(alpha)), betas(count, static_cast<float>(beta));
    std::vector<int> group_size(count, 1);
    void** staged = static_cast<void**>(ctx.stage(ptrs.data(), ptrs.size() * sizeof(void*)));
    MOE_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        ctx.cublas, trans_a.data(), trans_b.data(), m.data(), n.data(), k.data(), alphas.data(), staged, types.ab,
        lda.data(), staged + count, types.ab, ldb.data(), betas.data(), staged + 2 * count, types.c, ldc.data(),
        static_cast<int>(count), group_size.data(), CUBLAS_COMPUTE_32F));
  }
}

// The streams path: one cublasGemmEx per problem, round-robin over the context's GEMM streams, forked
// from ctx.stream and joined back (a single problem runs on ctx.stream itself).
void run_streams(Context& ctx, cublasOperation_t ta, cublasOperation_t tb, const std::vector<GroupProblem>& problems,
                 GemmTypes types, double alpha, double beta) {
  if (problems.empty()) return;
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  const int used = static_cast<int>(std::min<size_t>(Context::kGemmStreams, problems.size()));
  // Joined on every exit: if a call throws, the operands' frees (stream-ordered on ctx.stream) must
  // still come after the GEMMs already issued on the other streams.
  struct Fork {
    Context& ctx;
    int n;
    Fork(Context& c, int used) : ctx(c), n(used) {
      if (n > 1) ctx.fork_gemm_streams(n);
    }
    ~Fork() {
      try {
        if (n > 1) ctx.join_gemm_streams(n);
      } catch (...) {
      }
    }
  } fork(ctx, used);
  for (size_t i = 0; i < problems.size(); ++i) {
    const GroupProblem& p = problems[i];
    cublasHandle_t handle = used > 1 ? ctx.gemm_cublas[i % used] : ctx.cublas;
    MOE_CUBLAS_CHECK(cublasGemmEx(handle, ta, tb, p.m, p.n, p.k, &alpha_f, p.a, types.ab, p.lda, p.b, types.ab, p.ldb,
                                  &beta_f, p.c, types.c, p.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

void run_problems(Context& ctx, GroupedGemmPath path, cublasOperation_t ta, cublasOperation_t tb,
                  const std::vector<GroupProblem>& problems, GemmTypes types, double alpha, double beta) {
  if (path == GroupedGemmPath::kStreams) return run_streams(ctx, ta, tb, problems, types, alpha, beta);
  run_grouped(ctx, ta, tb, problems, types, alpha, beta);
}

char* element_ptr(const Tensor& t, int64_t offset) {
  return static_cast<char*>(const_cast<void*>(t.raw())) + offset * static_cast<int64_t>(dtype_size(t.dtype()));
}

}  // namespace

void gemm(Backend& backend, const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, double alpha,
          double beta) {
  Context& ctx = context(backend);
  const GemmDims d = gemm_dims("gemm", a, ta, b, tb, c);
  const GemmTypes types = gemm_types(a, c);
  const int64_t m = d.m, n = d.n, k = d.k;
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_by_beta(backend, ctx, c, beta);
  // Column-major C^T (n, m) = op(b)^T (n, k) op(a)^T (k, m); a row-major matrix is its own transpose
  // column-major, with its row length as leading dimension.
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  MOE_CUBLAS_CHECK(cublasGemmEx(ctx.cublas, blas_op(tb), blas_op(ta), to_int(n, "gemm n"), to_int(m, "gemm m"),
                                to_int(k, "gemm k"), &alpha_f, b.raw(), types.ab, to_int(b.dim(1), "gemm ldb"),
                                a.raw(), types.ab, to_int(a.dim(1), "gemm lda"), &beta_f, c.raw(), types.c,
                                to_int(n, "gemm ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void grouped_gemm(Backend& backend, const Tensor& a, const Tensor& b, Trans tb, Tensor& c,
                  const std::vector<int64_t>& group_rows, double alpha, double beta, GroupedGemmPath path) {
  Context& ctx = context(backend);
  const GemmTypes types = gemm_types(a, c);
  const bool bt = tb == Trans::kT;
  const int64_t k = a.dim(1), n = bt ? b.dim(1) : b.dim(2);
  if (a.dim(0) == 0 || n == 0) return;
  if (k == 0) return scale_by_beta(backend, ctx, c, beta);  // every row of c belongs to a non-empty group

  // Group g, column-major: c_g^T (n, m_g) = op(b_g)^T (n, k) a_g^T (k, m_g).
  std::vector<GroupProblem> problems;
  int64_t row = 0;
  for (size_t g = 0; g < group_rows.size(); ++g) {
    const int64_t m = group_rows[g];
    if (m > 0) {
      GroupProblem p{element_ptr(b, static_cast<int64_t>(g) * n * k), element_ptr(a, row * k), element_ptr(c, row * n),
                     to_int(n, "grouped_gemm n"), to_int(m, "grouped_gemm group rows"), to_int(k, "grouped_gemm k"),
                     to_int(bt ? k : n, "grouped_gemm weight row length"), to_int(k, "grouped_gemm k"),
                     to_int(n, "grouped_gemm n")};
      if (types.ab == CUDA_R_16BF) check_half_alignment(p, "grouped_gemm");
      problems.push_back(p);
    }
    row += m;
  }
  run_problems(ctx, path, blas_op(tb), CUBLAS_OP_N, problems, types, alpha, beta);
}

void grouped_gemm_tn(Backend& backend, const Tensor& a, const Tensor& b, Tensor& c,
                     const std::vector<int64_t>& group_rows, double alpha, double beta, GroupedGemmPath path) {
  Context& ctx = context(backend);
  const GemmTypes types = gemm_types(a, c);
  const int64_t p = a.dim(1), q = b.dim(1);
  if (p == 0 || q == 0) return;

  // Group g, column-major: c[g]^T (q, p) = b_g^T (q, m_g) a_g (m_g, p). A group without rows is a
  // GEMM with k = 0: c[g] = beta * c[g], done here for each run of consecutive empty groups.
  std::vector<GroupProblem> problems;
  std::vector<std::pair<int64_t, int64_t>> empty_runs;  // [first, last) groups
  int64_t row = 0;
  for (size_t g = 0; g < group_rows.size(); ++g) {
    const int64_t m = group_rows[g], gi = static_cast<int64_t>(g);
    if (m == 0) {
      if (!empty_runs.empty() && empty_runs.back().second == gi) {
        ++empty_runs.back().second;
      } else {
        empty_runs.push_back({gi, gi + 1});
      }
      continue;
    }
    GroupProblem pr{element_ptr(b, row * q), element_ptr(a, row * p), element_ptr(c, gi * p * q),
                    to_int(q, "grouped_gemm_tn q"), to_int(p, "grouped_gemm_tn p"),
                    to_int(m, "grouped_gemm_tn group rows"), to_int(q, "grouped_gemm_tn q"),
                    to_int(p, "grouped_gemm_tn p"), to_int(q, "grouped_gemm_tn q")};
    if (types.ab == CUDA_R_16BF) check_half_alignment(pr, "grouped_gemm_tn");
    problems.push_back(pr);
    row += m;
  }
  for (const auto& [first, last] : empty_runs) {
    Tensor part = c.rows(first, last);
    scale_by_beta(backend, ctx, part, beta);
  }
  run_problems(ctx, path, CUBLAS_OP_N, CUBLAS_OP_T, problems, types, alpha, beta);
}

void batched_gemm(Backend& backend, const Tensor& a, Trans ta, const Tensor& w, Trans tw, Tensor& c, double alpha,
                  double beta) {
  Context& ctx = context(backend);
  const GemmDims d = gemm_dims("batched_gemm", a, ta, w, tw, c);
  const GemmTypes types = gemm_types(a, c);
  const int64_t batch = d.batch, m = d.m, n = d.n, k = d.k;
  if (batch == 0 || m == 0 || n == 0) return;
  if (k == 0) return scale_by_beta(backend, ctx, c, beta);
  // Per batch entry, column-major C^T (n, m) = op(w)^T (n, k) op(a)^T (k, m), as in gemm().
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  MOE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      ctx.cublas, blas_op(tw), blas_op(ta), to_int(n, "batched_gemm n"), to_int(m, "batched_gemm m"),
      to_int(k, "batched_gemm k"), &alpha_f, w.raw(), types.ab, to_int(w.dim(2), "batched_gemm ldw"),
      w.dim(1) * w.dim(2), a.raw(), types.ab, to_int(a.dim(2), "batched_gemm lda"), a.dim(1) * a.dim(2), &beta_f,
      c.raw(), types.c, to_int(n, "batched_gemm ldc"), m * n, to_int(batch, "batched_gemm batch"),
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace moe::cuda
