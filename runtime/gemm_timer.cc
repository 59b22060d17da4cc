// The GEMM timer: operands for a list of shapes, issued in turn, timed between synchronisations.
#include "runtime/gemm_timer.h"

#include <chrono>
#include <cmath>

namespace moe {

GemmTimer::GemmTimer(Backend& backend, DType dtype, std::vector<GemmShape> shapes, int sets)
    : backend_(backend), dtype_(dtype), shapes_(std::move(shapes)) {
  const DType out = dtype == DType::kBF16 ? DType::kF32 : dtype;
  const DType draw = dtype == DType::kF64 ? DType::kF64 : DType::kF32;
  RngStream rng{1, rng_stream(RngPurpose::kTest, 1000)};
  int64_t offset = 0;
  auto operand = [&](const Shape& shape) {
    Tensor t = normal_tensor(backend, shape, draw, rng, offset);
    offset += shape_numel(shape);
    if (dtype != DType::kBF16) return t;
    Tensor b = backend.empty(shape, DType::kBF16);
    backend.convert(t, b);
    return b;
  };
  for (const GemmShape& s : shapes_) {
    std::vector<Operands> copies;
    for (int i = 0; i < std::max(1, sets); ++i) {
      Operands o;
      o.a = operand(s.ta == Trans::kN ? Shape{s.m, s.k} : Shape{s.k, s.m});
      o.w = operand(s.tw == Trans::kT ? Shape{s.n, s.k} : Shape{s.k, s.n});
      o.c = s.beta != 0 ? backend.zeros({s.m, s.n}, out) : backend.empty({s.m, s.n}, out);
      copies.push_back(std::move(o));
    }
    sets_.push_back(std::move(copies));
  }
}

void GemmTimer::issue(int reps) {
  for (int r = 0; r < reps; ++r) {
    for (size_t i = 0; i < shapes_.size(); ++i) {
      const GemmShape& s = shapes_[i];
      Operands& o = sets_[i][next_ % sets_[i].size()];
      gemm(backend_, o.a, s.ta, o.w, s.tw, o.c, 1.0, s.beta);
    }
    ++next_;
  }
}

double GemmTimer::seconds(int reps) {
  issue(1);  // warm-up: library initialisation, caches
  backend_.synchronize();
  const auto start = std::chrono::steady_clock::now();
  issue(reps);
  backend_.synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double GemmTimer::flops() const {
  double f = 0;
  for (const GemmShape& s : shapes_) f += s.flops();
  return f;
}

int64_t GemmTimer::wrong() const {
  int64_t wrong = 0;
  for (size_t i = 0; i < shapes_.size(); ++i) {
    const GemmShape& s = shapes_[i];
    if (s.beta != 0 || s.m == 0 || s.n == 0) continue;  // accumulated over the passes: no single reference
    const Operands& o = sets_[i][(next_ + sets_[i].size() - 1) % sets_[i].size()];
    const std::vector<double> a = to_doubles(backend_, o.a), w = to_doubles(backend_, o.w);
    const std::vector<double> c = to_doubles(backend_, o.c.rows(0, 1));
    // row 0 of op(A), column j of op(W)
    auto a_at = [&](int64_t kk) { return s.ta == Trans::kN ? a[static_cast<size_t>(kk)] : a[static_cast<size_t>(kk * s.m)]; };
    auto w_at = [&](int64_t kk, int64_t j) {
      return s.tw == Trans::kT ? w[static_cast<size_t>(j * s.k + kk)] : w[static_cast<size_t>(kk * s.n + j)];
    };
    // rounding of k products in the operand dtype, accumulated in at least fp32
    const double eps = dtype_ == DType::kF64 ? 1e-12 : dtype_ == DType::kBF16 ? 1e-2 : 1e-5;
    for (int64_t j = 0; j < s.n; ++j) {
      double ref = 0, scale = 0;
      for (int64_t kk = 0; kk < s.k; ++kk) {
        ref += a_at(kk) * w_at(kk, j);
        scale += std::abs(a_at(kk) * w_at(kk, j));
      }
      wrong += !(std::abs(c[static_cast<size_t>(j)] - ref) <= eps * (scale + 1e-30) * std::sqrt(static_cast<double>(s.k)));
    }
  }
  return wrong;
}

int64_t GemmTimer::probe_size(const Backend& backend) { return backend.device() == Device::kCuda ? 4096 : 256; }

}  // namespace moe
