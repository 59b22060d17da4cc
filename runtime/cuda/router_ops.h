// CUDA kernels of the router and of token permutation: the ops of backend.h between the router GEMM
// and the expert GEMMs. F32 only (the router always runs in fp32; dispatch moves activations in the
// activation dtype). Semantics are those of the CPU backend, op for op; see runtime/backend.h.
#pragma once

#include "runtime/backend.h"
#include "runtime/cuda/cuda_common.h"

namespace moe {
namespace cuda {

void jitter(Context& ctx, const Tensor& x, double eps, const RngStream& rng, int64_t token_offset, Tensor& out);
void router_probs(Context& ctx, ScoreFn fn, const Tensor& logits, Tensor& probs);
void gumbel_probs(Context& ctx, const Tensor& logits, double tau, const RngStream& rng, int64_t token_offset,
                  Tensor& probs);
void router_probs_backward(Context& ctx, ScoreFn fn, const Tensor& dprobs, const Tensor& probs, double scale,
                           Tensor& dlogits);
void z_loss(Context& ctx, const Tensor& logits, double coef, Tensor& dlogits, Tensor& sum);
void router_stats(Context& ctx, const RouteState& state, const Tensor& probs, Tensor& stats);
void add_row_vector(Context& ctx, Tensor& x, const Tensor& v, double scale);

// Allocates the RouteState tensors with `alloc` (device memory) and fills them. Waits for the device only
// when dropless (the host needs the row count).
void route(Context& ctx, const RouteArgs& args, const Tensor& sel_probs, const Tensor& bias, RouteState& out,
           const std::function<Tensor(const Shape&, DType)>& alloc);
void route_backward(Context& ctx, const RouteArgs& args, const RouteState& state, const Tensor& dgate,
                    Tensor& dsel_probs);

void permute(Context& ctx, const Tensor& x, const Tensor& row_idx, Tensor& out);
void permute_backward(Context& ctx, const Tensor& dout, const Tensor& row_idx, Tensor& dx);
void unpermute(Context& ctx, const Tensor& rows, const Tensor& row_idx, const Tensor& gate, Tensor& y);
void unpermute_backward(Context& ctx, const Tensor& dy, const Tensor& rows, const Tensor& row_idx,
                        const Tensor& gate, Tensor& drows, Tensor& dgate);

}  // namespace cuda
}  // namespace moe
