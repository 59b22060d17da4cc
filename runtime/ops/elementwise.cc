// Contracts of the elementwise family (runtime/ops/elementwise.h), run before either device's implementation.
#include "runtime/ops/elementwise.h"

#include "runtime/ops/contract.h"

namespace moe {

void check_axpy(Backend& b, double alpha, const Tensor& x, Tensor& y) {
  MOE_CHECK(x.numel() == y.numel(), "axpy: ", x.str(), " vs ", y.str());
  check_floats(b, "axpy", {{x, "x"}, {y, "y"}});
}

void check_scale(Backend& b, Tensor& x, double alpha) { check_floats(b, "scale", {{x, "x"}}); }

void check_sum_squares(Backend& b, const Tensor& x) { check_floats(b, "sum_squares", {{x, "x"}}); }

void check_swiglu_forward(Backend& b, const Tensor& a, const Tensor& g, Tensor& h) {
  MOE_CHECK(a.numel() == g.numel() && a.numel() == h.numel(), "swiglu_forward: ", a.str(), g.str(), h.str());
  check_floats(b, "swiglu_forward", {{a, "a"}, {g, "g"}, {h, "h"}});
}

void check_swiglu_backward(Backend& b, const Tensor& dh, const Tensor& a, const Tensor& g, Tensor& da, Tensor& dg) {
  const int64_t n = a.numel();
  MOE_CHECK(dh.numel() == n && g.numel() == n && da.numel() == n && dg.numel() == n, "swiglu_backward shapes: ",
            dh.str(), a.str(), g.str(), da.str(), dg.str());
  check_floats(b, "swiglu_backward", {{dh, "dh"}, {a, "a"}, {g, "g"}, {da, "da"}, {dg, "dg"}});
}

void check_activation_forward(Backend& b, Activation act, const Tensor& a, Tensor& h) {
  MOE_CHECK(a.numel() == h.numel(), "activation_forward: ", a.str(), h.str());
  check_floats(b, "activation_forward", {{a, "a"}, {h, "h"}});
}

void check_activation_backward(Backend& b, Activation act, const Tensor& dh, const Tensor& a, Tensor& da) {
  MOE_CHECK(a.numel() == dh.numel() && a.numel() == da.numel(), "activation_backward shapes: ", dh.str(), a.str(),
            da.str());
  check_floats(b, "activation_backward", {{dh, "dh"}, {a, "a"}, {da, "da"}});
}

void check_dropout(Backend& b, const Tensor& x, double p, const RngStream& rng, int64_t offset, Tensor& out) {
  MOE_CHECK(x.numel() == out.numel(), "dropout: ", x.str(), " -> ", out.str());
  MOE_CHECK(p >= 0.0 && p < 1.0, "dropout: p = ", p, " outside [0, 1)");
  check_floats(b, "dropout", {{x, "x"}, {out, "out"}});
}

}  // namespace moe
