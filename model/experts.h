// Expert FFNs computed as grouped GEMMs: the routed experts of this rank, and the shared experts.
//
//   swiglu:    y = W_down( silu(W_gate x) * (W_up x) )
//   gelu/relu: y = W_down( act(W_up x) )
// Weights, per expert (no biases): w_gate, w_up (F, H) used as x W^T; w_down (F, H) used as h W.
// Storing all three as (F, H) rows means n experts stacked, (n, F, H), are also one expert of mid size
// n * F: that is how the shared experts run, as a single GEMM group whose output is the sum of theirs.
//
// Precision bf16 (runtime.precision): the GEMMs take bf16 copies of the input and of the fp32 master
// weights (made each forward) and accumulate in fp32; the activations between the GEMMs are stored in
// bf16; the output and the input gradient go back to the activation dtype. Weight gradients come out of
// the grouped GEMM in bf16 (cuBLAS's grouped GEMM has no bf16-in, fp32-out form) and are added to the
// fp32 gradient buffers, as mixed-precision training does with bf16 weight gradients.
#pragma once

#include <string>
#include <vector>

#include "model/params.h"
#include "runtime/config.h"

namespace moe {

class FfnExperts {
 public:
  // num_experts expert weight sets of mid size ffn_hidden; `fused` runs them as one group (shared
  // experts, every token through all of them). expert_offset: global index of expert 0 (routed only).
  FfnExperts(ParamSet& params, const std::string& prefix, const Config& config, int num_experts, int ffn_hidden,
             ParamScope scope, bool fused, int64_t expert_offset);

  // x (N, H), rows of group g = group_rows[g] consecutive rows -> y (N, H). Saves activations.
  Tensor forward(Backend& backend, const Tensor& x, const std::vector<int64_t>& group_rows);
  // dy (N, H) -> dx (N, H); accumulates weight gradients.
  Tensor backward(Backend& backend, const Tensor& dy);

  int num_experts() const { return num_experts_; }
  // FLOPs of forward + backward for `rows` token rows (GEMMs only).
  double flops(int64_t rows) const;

 private:
  Tensor weight(Param* p) const;  // (groups, F', H) view
  Tensor grad(Param* p) const;    // the same view of the gradient
  // t in the compute dtype: t itself, or a converted copy.
  Tensor compute_copy(Backend& backend, const Tensor& t) const;
  // grad(p) += a_g^T b_g per group, through a compute-dtype temporary when the dtypes differ.
  void accumulate_weight_grad(Backend& backend, const Tensor& a, const Tensor& b, Param* p);

  ExpertType type_;
  int num_experts_;
  int ffn_hidden_;
  int hidden_;
  bool fused_;
  bool bf16_;  // runtime.precision = bf16
  Param* w_gate_ = nullptr;  // swiglu only
  Param* w_up_;
  Param* w_down_;
  // saved by forward (x_ and the weights in the compute dtype)
  Tensor x_, a_, b_, h_;
  Tensor wg_, wu_, wd_;
  std::vector<int64_t> group_rows_;
};

}  // namespace moe
