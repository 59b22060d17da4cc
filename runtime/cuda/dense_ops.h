// The dense ops of the CUDA backend: fill/convert, GEMMs (cuBLAS), elementwise activations, embedding,
// RMSNorm, cross-entropy, row gather/scatter and the optimizer steps.
//
// Each function has the contract of the Backend method of the same name (runtime/backend.h) and the
// semantics of the CPU reference (runtime/cpu/cpu_backend.cc), with a Context first. Tensors live in
// device memory; everything is issued on ctx.stream and nothing waits on the host except the two ops
// that return a host value (sum_squares, cross_entropy), which wait through wait_stream().
//
// Float tensors may be F32 or BF16 (computed in float) unless a function says otherwise; index tensors
// are I32. A shape or dtype that does not fit throws InternalError.
//
// Indices are validated on the host by the CPU backend; here they cannot be without a host wait, so
// an out-of-range index reads as a zero row (embedding_forward, gather_rows) or is skipped
// (embedding_backward, scatter_rows). cross_entropy waits anyway and throws for a bad target.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/backend.h"
#include "runtime/cuda/cuda_common.h"

namespace moe::cuda {

// ---- memory
void fill(Context& ctx, Tensor& t, double value);  // F32, BF16, F64, I32
// dst = src elementwise, F32 <-> BF16 (round to nearest even); any dtype when both are the same.
void convert(Context& ctx, const Tensor& src, Tensor& dst);

// ---- dense algebra
// cuBLAS, CUBLAS_COMPUTE_32F (F32 operands are computed in full FP32, never TF32).
// gemm: a, b F32 -> c F32; a, b BF16 -> c BF16 or F32.
void gemm(Context& ctx, const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, double alpha,
          double beta);
// One cublasGemmGroupedBatchedEx for all non-empty groups: F32 -> F32 or BF16 -> BF16 (the pairs cuBLAS
// documents for it). BF16 operand addresses must meet cuBLAS's alignment rule (checked).
void grouped_gemm(Context& ctx, const Tensor& a, const Tensor& b, Trans tb, Tensor& c,
                  const std::vector<int64_t>& group_rows, double alpha, double beta);
void grouped_gemm_tn(Context& ctx, const Tensor& a, const Tensor& b, Tensor& c,
                     const std::vector<int64_t>& group_rows, double alpha, double beta);
void axpy(Context& ctx, double alpha, const Tensor& x, Tensor& y);  // y += alpha * x
void scale(Context& ctx, Tensor& x, double alpha);                  // x *= alpha
double sum_squares(Context& ctx, const Tensor& x);                  // waits for the stream

// ---- activations (each tensor F32 or BF16 independently)
void swiglu_forward(Context& ctx, const Tensor& a, const Tensor& b, Tensor& h);
void swiglu_backward(Context& ctx, const Tensor& dh, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db);
void activation_forward(Context& ctx, Activation act, const Tensor& a, Tensor& h);
void activation_backward(Context& ctx, Activation act, const Tensor& dh, const Tensor& a, Tensor& da);

// ---- embedding, norm, loss
void embedding_forward(Context& ctx, const Tensor& ids, const Tensor& table, Tensor& out);  // out dtype = table's
// dtable F32 (accumulated with float atomics: the summation order of repeated ids is not fixed).
void embedding_backward(Context& ctx, const Tensor& ids, const Tensor& dout, Tensor& dtable);
// w, rstd, dw F32; x, y, dy, dx F32 or BF16.
void rmsnorm_forward(Context& ctx, const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Tensor& dx, Tensor& dw);
// Waits for the stream; throws InternalError when a target lies outside the vocabulary.
double cross_entropy(Context& ctx, const Tensor& logits, const Tensor& targets, double grad_scale,
                     Tensor& dlogits);

// ---- rows (any dtype, src and dst the same)
void gather_rows(Context& ctx, const Tensor& src, const Tensor& idx, Tensor& dst);   // dst[i] = src[idx[i]]
void scatter_rows(Context& ctx, const Tensor& src, const Tensor& idx, Tensor& dst);  // dst[idx[i]] = src[i]

// ---- optimizer (every tensor F32: master weights and state)
void adamw_step(Context& ctx, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& args);
void sgd_step(Context& ctx, Tensor& param, const Tensor& grad, double lr, double weight_decay);

}  // namespace moe::cuda
