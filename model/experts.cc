// Grouped expert FFN forward and backward.
#include "model/experts.h"

#include <algorithm>
#include <cmath>

#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"

namespace moe {

FfnExperts::FfnExperts(ParamSet& params, const std::string& prefix, const Config& config, ExpertType type,
                       int num_experts, int ffn_hidden, ParamScope scope, bool fused, int64_t expert_offset)
    : type_(type),
      num_experts_(num_experts),
      ffn_hidden_(ffn_hidden),
      hidden_(config.model.hidden),
      fused_(fused),
      bf16_(config.runtime.precision == Precision::kBf16),
      path_(config.runtime.expert_gemm),
      params_(params) {
  const int64_t h = hidden_, f = ffn_hidden_, n = num_experts_;
  auto add = [&](const char* name, Shape shape, double std) {
    Param p;
    p.name = prefix + "." + name;
    p.shape = std::move(shape);
    p.scope = scope;
    p.init_std = std;
    p.expert_offset = expert_offset;
    p.bf16_shadow = bf16_;
    return params.add(p);
  };
  const double std = config.model.init_std;
  const Shape in = fused ? Shape{n * f, h} : Shape{n, f, h};
  const Shape out = fused ? Shape{h, n * f} : Shape{n, h, f};
  if (type_ == ExpertType::kSwiGLU) w_gate_ = add("w_gate", in, std);
  w_up_ = add("w_up", in, std);
  w_down_ = add("w_down", out, std / std::sqrt(2.0 * config.model.layers));
}

Tensor FfnExperts::weight(Backend& backend, Param* p) const {
  const Tensor& w = bf16_ ? params_.bf16_value(backend, p) : p->value;
  if (!fused_) return w;
  return w.reshape({1, p->shape[0], p->shape[1]});
}

Tensor FfnExperts::grad(Param* p) const {
  if (!fused_) return p->grad;
  return p->grad.reshape({1, p->shape[0], p->shape[1]});
}

Tensor FfnExperts::compute_copy(Backend& backend, const Tensor& t) const {
  if (!bf16_ || t.dtype() == DType::kBF16) return t;
  Tensor c = backend.empty(t.shape(), DType::kBF16);
  backend.convert(t, c);
  return c;
}

void FfnExperts::accumulate_weight_grad(Backend& backend, const Tensor& a, const Tensor& b, Param* p) {
  Tensor g = grad(p);
  const std::vector<int64_t>& rows = saved_.group_rows;
  const int64_t groups = static_cast<int64_t>(rows.size());
  if (!rows.empty() && std::all_of(rows.begin(), rows.end(), [&](int64_t m) { return m == rows[0]; })) {
    // Groups of one size (the padded layout, a fused set): one strided-batched GEMM, straight into the
    // gradient buffer whatever the operand dtype (bf16 in, fp32 out on CUDA).
    const int64_t m = rows[0];
    if (m == 0) return;
    batched_gemm(backend, a.reshape({groups, m, a.dim(1)}), Trans::kT, b.reshape({groups, m, b.dim(1)}), Trans::kN, g,
                 1.0, 1.0);
    return;
  }
  if (a.dtype() == g.dtype() || path_ == GroupedGemmPath::kStreams) {  // cublasGemmEx takes bf16 -> fp32
    grouped_gemm_tn(backend, a, b, g, rows, 1.0, 1.0, path_);
    return;
  }
  Tensor tmp = backend.empty(g.shape(), a.dtype());
  grouped_gemm_tn(backend, a, b, tmp, rows, 1.0, 0.0, path_);
  axpy(backend, 1.0, tmp, g);
}

int64_t FfnExperts::params_per_expert() const {
  const int64_t mid = fused_ ? int64_t{num_experts_} * ffn_hidden_ : ffn_hidden_;
  return (type_ == ExpertType::kSwiGLU ? 3 : 2) * int64_t{hidden_} * mid;
}

double FfnExperts::forward_flops_per_row() const { return 2.0 * static_cast<double>(params_per_expert()); }

Tensor FfnExperts::forward(Backend& backend, const Tensor& x_in, const std::vector<int64_t>& group_rows, bool save) {
  const int64_t n = x_in.dim(0);
  const int64_t mid = fused_ ? int64_t{num_experts_} * ffn_hidden_ : ffn_hidden_;
  Saved s;
  s.x = compute_copy(backend, x_in);
  const DType ct = s.x.dtype();
  s.group_rows = group_rows;
  s.w_gate = w_gate_ ? weight(backend, w_gate_) : Tensor();
  s.w_up = weight(backend, w_up_);
  s.w_down = weight(backend, w_down_);
  s.a = backend.empty({n, mid}, ct);  // (N, mid)
  s.h = backend.empty({n, mid}, ct);  // (N, mid)
  if (type_ == ExpertType::kSwiGLU) {
    s.g = backend.empty({n, mid}, ct);
    grouped_gemm(backend, s.x, s.w_gate, Trans::kT, s.a, group_rows, 1.0, 0.0, path_);  // a = x W_gate^T
    grouped_gemm(backend, s.x, s.w_up, Trans::kT, s.g, group_rows, 1.0, 0.0, path_);    // g = x W_up^T
    swiglu_forward(backend, s.a, s.g, s.h);
  } else {
    grouped_gemm(backend, s.x, s.w_up, Trans::kT, s.a, group_rows, 1.0, 0.0, path_);
    activation_forward(backend, type_ == ExpertType::kGelu ? Activation::kGelu : Activation::kRelu, s.a, s.h);
  }
  Tensor y = backend.empty({n, hidden_}, ct);
  grouped_gemm(backend, s.h, s.w_down, Trans::kT, y, group_rows, 1.0, 0.0, path_);  // y = h W_down^T
  if (save) saved_ = std::move(s);
  if (ct == x_in.dtype()) return y;
  Tensor out = backend.empty({n, hidden_}, x_in.dtype());
  backend.convert(y, out);
  return out;
}

Tensor FfnExperts::backward(Backend& backend, const Tensor& dy_in) {
  const Saved& s = saved_;
  const int64_t n = dy_in.dim(0);
  const int64_t mid = s.a.dim(1);
  Tensor dy = compute_copy(backend, dy_in);
  const DType ct = dy.dtype();
  Tensor dh = backend.empty({n, mid}, ct);
  grouped_gemm(backend, dy, s.w_down, Trans::kN, dh, s.group_rows, 1.0, 0.0, path_);  // dh = dy W_down
  accumulate_weight_grad(backend, dy, s.h, w_down_);                           // dW_down += dy^T h
  Tensor dx = backend.empty({n, hidden_}, ct);
  Tensor da = backend.empty({n, mid}, ct);
  if (type_ == ExpertType::kSwiGLU) {
    Tensor dg = backend.empty({n, mid}, ct);
    swiglu_backward(backend, dh, s.a, s.g, da, dg);
    accumulate_weight_grad(backend, da, s.x, w_gate_);  // dW_gate += da^T x
    accumulate_weight_grad(backend, dg, s.x, w_up_);    // dW_up += dg^T x
    grouped_gemm(backend, da, s.w_gate, Trans::kN, dx, s.group_rows, 1.0, 0.0, path_);
    grouped_gemm(backend, dg, s.w_up, Trans::kN, dx, s.group_rows, 1.0, 1.0, path_);
  } else {
    activation_backward(backend, type_ == ExpertType::kGelu ? Activation::kGelu : Activation::kRelu, dh, s.a, da);
    accumulate_weight_grad(backend, da, s.x, w_up_);
    grouped_gemm(backend, da, s.w_up, Trans::kN, dx, s.group_rows, 1.0, 0.0, path_);
  }
  saved_ = Saved{};
  if (ct == dy_in.dtype()) return dx;
  Tensor out = backend.empty({n, hidden_}, dy_in.dtype());
  backend.convert(dx, out);
  return out;
}

}  // namespace moe
