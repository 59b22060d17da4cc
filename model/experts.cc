// Grouped expert FFN forward and backward.
#include "model/experts.h"

#include <cmath>

namespace moe {

FfnExperts::FfnExperts(ParamSet& params, const std::string& prefix, const Config& config, int num_experts,
                       int ffn_hidden, ParamScope scope, bool fused, int64_t expert_offset)
    : type_(config.moe.expert_type),
      num_experts_(num_experts),
      ffn_hidden_(ffn_hidden),
      hidden_(config.model.hidden),
      fused_(fused) {
  auto add = [&](const char* name, double std) {
    Param p;
    p.name = prefix + "." + name;
    p.shape = {num_experts, ffn_hidden, config.model.hidden};
    p.scope = scope;
    p.init_std = std;
    p.expert_offset = expert_offset;
    return params.add(p);
  };
  double std = config.model.init_std;
  if (type_ == ExpertType::kSwiGLU) w_gate_ = add("w_gate", std);
  w_up_ = add("w_up", std);
  w_down_ = add("w_down", std / std::sqrt(2.0 * config.model.layers));
}

Tensor FfnExperts::weight(Param* p) const {
  return fused_ ? p->value.reshape({1, int64_t{num_experts_} * ffn_hidden_, hidden_}) : p->value;
}

double FfnExperts::flops(int64_t rows) const {
  // forward: (2 or 3) GEMMs of 2 * rows * H * F; backward: twice that
  int gemms = type_ == ExpertType::kSwiGLU ? 3 : 2;
  double mid = fused_ ? double(num_experts_) * ffn_hidden_ : double(ffn_hidden_);
  return 3.0 * gemms * 2.0 * double(rows) * hidden_ * mid;
}

Tensor FfnExperts::forward(Backend& backend, const Tensor& x, const std::vector<int64_t>& group_rows) {
  const int64_t n = x.dim(0);
  const int64_t mid = fused_ ? int64_t{num_experts_} * ffn_hidden_ : ffn_hidden_;
  const DType ft = x.dtype();
  x_ = x;
  group_rows_ = group_rows;
  a_ = backend.empty({n, mid}, ft);
  h_ = backend.empty({n, mid}, ft);
  if (type_ == ExpertType::kSwiGLU) {
    b_ = backend.empty({n, mid}, ft);
    backend.grouped_gemm(x, weight(w_gate_), Trans::kT, a_, group_rows, 1.0, 0.0);
    backend.grouped_gemm(x, weight(w_up_), Trans::kT, b_, group_rows, 1.0, 0.0);
    backend.swiglu_forward(a_, b_, h_);
  } else {
    backend.grouped_gemm(x, weight(w_up_), Trans::kT, a_, group_rows, 1.0, 0.0);
    backend.activation_forward(type_ == ExpertType::kGelu ? Activation::kGelu : Activation::kRelu, a_, h_);
  }
  Tensor y = backend.empty({n, hidden_}, ft);
  backend.grouped_gemm(h_, weight(w_down_), Trans::kN, y, group_rows, 1.0, 0.0);
  return y;
}

Tensor FfnExperts::backward(Backend& backend, const Tensor& dy) {
  const int64_t n = dy.dim(0);
  const int64_t mid = a_.dim(1);
  const DType ft = dy.dtype();
  auto grad = [&](Param* p) {
    return fused_ ? p->grad.reshape({1, int64_t{num_experts_} * ffn_hidden_, hidden_}) : p->grad;
  };
  Tensor dh = backend.empty({n, mid}, ft);
  backend.grouped_gemm(dy, weight(w_down_), Trans::kT, dh, group_rows_, 1.0, 0.0);  // dh = dy W_down^T
  Tensor g_down = grad(w_down_);
  backend.grouped_gemm_tn(h_, dy, g_down, group_rows_, 1.0, 1.0);                    // dW_down += h^T dy
  Tensor dx = backend.empty({n, hidden_}, ft);
  Tensor da = backend.empty({n, mid}, ft);
  if (type_ == ExpertType::kSwiGLU) {
    Tensor db = backend.empty({n, mid}, ft);
    backend.swiglu_backward(dh, a_, b_, da, db);
    Tensor g_gate = grad(w_gate_), g_up = grad(w_up_);
    backend.grouped_gemm_tn(da, x_, g_gate, group_rows_, 1.0, 1.0);  // dW_gate += da^T x
    backend.grouped_gemm_tn(db, x_, g_up, group_rows_, 1.0, 1.0);    // dW_up += db^T x
    backend.grouped_gemm(da, weight(w_gate_), Trans::kN, dx, group_rows_, 1.0, 0.0);
    backend.grouped_gemm(db, weight(w_up_), Trans::kN, dx, group_rows_, 1.0, 1.0);
  } else {
    backend.activation_backward(type_ == ExpertType::kGelu ? Activation::kGelu : Activation::kRelu, dh, a_, da);
    Tensor g_up = grad(w_up_);
    backend.grouped_gemm_tn(da, x_, g_up, group_rows_, 1.0, 1.0);
    backend.grouped_gemm(da, weight(w_up_), Trans::kN, dx, group_rows_, 1.0, 0.0);
  }
  return dx;
}

}  // namespace moe
