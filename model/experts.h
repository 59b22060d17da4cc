// Expert FFNs computed as grouped GEMMs: the routed experts of this rank, the shared experts, and the
// dense FFN of a dense layer.
//
//   swiglu:    y = W_down( silu(W_gate x) * (W_up x) )
//   gelu/relu: y = W_down( act(W_up x) )
// Weights are stored (out, in), no biases: W_gate, W_up (F, H) and W_down (H, F), applied as x W^T.
// Routed experts stack theirs: (E_local, F, H) and (E_local, H, F), expert e of the rank being global
// expert expert_offset + e. A fused set of n FFNs of mid size F (the shared experts) is one FFN of mid
// size n*F: W_gate, W_up (n*F, H), W_down (H, n*F), FFN j owning mid rows / columns [jF, (j+1)F); its
// output is the sum of theirs, computed as a single GEMM group.
//
// Precision bf16 (runtime.precision): the GEMMs take a bf16 copy of the input and the BF16 shadows of
// the fp32 master weights (model/params.h: written by the optimizer's update, converted again only after
// another write of the values) and accumulate in fp32; the activations between the GEMMs are stored in
// bf16; the output and the input gradient go back to the activation dtype. Weight gradients: when every
// group has the same number of rows (the padded layout; a fused set is one group) one strided-batched
// GEMM accumulates them straight into the fp32 gradient buffers (bf16 in, fp32 out), as does the streams
// path (runtime.expert_gemm, one cublasGemmEx per group); otherwise they come out of the grouped GEMM in
// bf16 (cuBLAS's grouped GEMM has no bf16-in, fp32-out form) and are added to the fp32 buffers, as
// mixed-precision training does with bf16 weight gradients.
#pragma once

#include <string>
#include <vector>

#include "model/params.h"
#include "config/config.h"

namespace moe {

class FfnExperts {
 public:
  // num_experts weight sets of mid size ffn_hidden. `fused`: every token goes through all of them, run as
  // one FFN of mid size num_experts * ffn_hidden (shared experts; a dense FFN is one fused expert).
  // expert_offset: global index of expert 0 (routed only).
  FfnExperts(ParamSet& params, const std::string& prefix, const Config& config, ExpertType type, int num_experts,
             int ffn_hidden, ParamScope scope, bool fused, int64_t expert_offset);

  // x (N, H), rows of group g = group_rows[g] consecutive rows -> y (N, H). Saves activations when `save`.
  Tensor forward(Backend& backend, const Tensor& x, const std::vector<int64_t>& group_rows, bool save = true);
  // dy (N, H) -> dx (N, H); accumulates weight gradients. Releases the saved activations.
  Tensor backward(Backend& backend, const Tensor& dy);

  int num_experts() const { return num_experts_; }
  // Parameters of one expert (all of them for a fused set): 3 H F for swiglu, 2 H F otherwise.
  int64_t params_per_expert() const;
  // Forward FLOPs per token row through one expert (the fused set: through all of them).
  double forward_flops_per_row() const;
  Param* first_param() { return w_gate_ ? w_gate_ : w_up_; }

 private:
  // (groups, out, in) view of the weights in the compute dtype (the BF16 shadow in bf16)
  Tensor weight(Backend& backend, Param* p) const;
  Tensor grad(Param* p) const;    // the same view of the gradient
  // t in the compute dtype: t itself, or a converted copy.
  Tensor compute_copy(Backend& backend, const Tensor& t) const;
  // grad(p) += a_g^T b_g per group: one batched GEMM when the groups have one size, else grouped,
  // through a compute-dtype temporary when the dtypes differ on the grouped path.
  void accumulate_weight_grad(Backend& backend, const Tensor& a, const Tensor& b, Param* p);

  ExpertType type_;
  int num_experts_;
  int ffn_hidden_;
  int hidden_;
  bool fused_;
  bool bf16_;  // runtime.precision = bf16
  GroupedGemmPath path_;  // runtime.expert_gemm
  ParamSet& params_;
  Param* w_gate_ = nullptr;  // swiglu only
  Param* w_up_;
  Param* w_down_;

  // What the backward needs, in the compute dtype (F32, F64, or BF16).
  struct Saved {
    Tensor x;                  // (N, H) input
    Tensor a, g, h;            // (N, mid) W_gate x (or W_up x), W_up x (swiglu), activation output
    Tensor w_gate, w_up, w_down;  // the weights as used (bf16 copies in bf16)
    std::vector<int64_t> group_rows;
  } saved_;
};

}  // namespace moe
