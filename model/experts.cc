// Grouped expert FFN forward and backward.
#include "model/experts.h"

#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"

#include <cmath>

namespace moe {

FfnExperts::FfnExperts(ParamSet& params, const std::string& prefix, const Config& config, int num_experts,
                       int ffn_hidden, ParamScope scope, bool fused, int64_t expert_offset)
    : type_(config.moe.expert_type),
      num_experts_(num_experts),
      ffn_hidden_(ffn_hidden),
      hidden_(config.model.hidden),
      fused_(fused),
      bf16_(config.runtime.precision == Precision::kBf16) {
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

Tensor FfnExperts::grad(Param* p) const {
  return fused_ ? p->grad.reshape({1, int64_t{num_experts_} * ffn_hidden_, hidden_}) : p->grad;
}

Tensor FfnExperts::compute_copy(Backend& backend, const Tensor& t) const {
  if (!bf16_ || t.dtype() == DType::kBF16) return t;
  Tensor c = backend.empty(t.shape(), DType::kBF16);
  backend.convert(t, c);
  return c;
}

void FfnExperts::accumulate_weight_grad(Backend& backend, const Tensor& a, const Tensor& b, Param* p) {
  Tensor g = grad(p);
  if (a.dtype() == g.dtype()) {
    grouped_gemm_tn(backend, a, b, g, group_rows_, 1.0, 1.0);
    return;
  }
  Tensor tmp = backend.empty(g.shape(), a.dtype());
  grouped_gemm_tn(backend, a, b, tmp, group_rows_, 1.0, 0.0);
  axpy(backend, 1.0, tmp, g);
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
  x_ = compute_copy(backend, x);
  const DType ct = x_.dtype();
  group_rows_ = group_rows;
  wg_ = w_gate_ ? compute_copy(backend, weight(w_gate_)) : Tensor();
  wu_ = compute_copy(backend, weight(w_up_));
  wd_ = compute_copy(backend, weight(w_down_));
  a_ = backend.empty({n, mid}, ct);
  h_ = backend.empty({n, mid}, ct);
  if (type_ == ExpertType::kSwiGLU) {
    b_ = backend.empty({n, mid}, ct);
    grouped_gemm(backend, x_, wg_, Trans::kT, a_, group_rows, 1.0, 0.0);
    grouped_gemm(backend, x_, wu_, Trans::kT, b_, group_rows, 1.0, 0.0);
    swiglu_forward(backend, a_, b_, h_);
  } else {
    grouped_gemm(backend, x_, wu_, Trans::kT, a_, group_rows, 1.0, 0.0);
    activation_forward(backend, type_ == ExpertType::kGelu ? Activation::kGelu : Activation::kRelu, a_, h_);
  }
  Tensor y = backend.empty({n, hidden_}, ct);
  grouped_gemm(backend, h_, wd_, Trans::kN, y, group_rows, 1.0, 0.0);
  if (ct == x.dtype()) return y;
  Tensor out = backend.empty({n, hidden_}, x.dtype());
  backend.convert(y, out);
  return out;
}

Tensor FfnExperts::backward(Backend& backend, const Tensor& dy_in) {
  const int64_t n = dy_in.dim(0);
  const int64_t mid = a_.dim(1);
  Tensor dy = compute_copy(backend, dy_in);
  const DType ct = dy.dtype();
  Tensor dh = backend.empty({n, mid}, ct);
  grouped_gemm(backend, dy, wd_, Trans::kT, dh, group_rows_, 1.0, 0.0);  // dh = dy W_down^T
  accumulate_weight_grad(backend, h_, dy, w_down_);                      // dW_down += h^T dy
  Tensor dx = backend.empty({n, hidden_}, ct);
  Tensor da = backend.empty({n, mid}, ct);
  if (type_ == ExpertType::kSwiGLU) {
    Tensor db = backend.empty({n, mid}, ct);
    swiglu_backward(backend, dh, a_, b_, da, db);
    accumulate_weight_grad(backend, da, x_, w_gate_);  // dW_gate += da^T x
    accumulate_weight_grad(backend, db, x_, w_up_);    // dW_up += db^T x
    grouped_gemm(backend, da, wg_, Trans::kN, dx, group_rows_, 1.0, 0.0);
    grouped_gemm(backend, db, wu_, Trans::kN, dx, group_rows_, 1.0, 1.0);
  } else {
    activation_backward(backend, type_ == ExpertType::kGelu ? Activation::kGelu : Activation::kRelu, dh, a_, da);
    accumulate_weight_grad(backend, da, x_, w_up_);
    grouped_gemm(backend, da, wu_, Trans::kN, dx, group_rows_, 1.0, 0.0);
  }
  if (ct == dy_in.dtype()) return dx;
  Tensor out = backend.empty({n, hidden_}, dy_in.dtype());
  backend.convert(dx, out);
  return out;
}

}  // namespace moe
