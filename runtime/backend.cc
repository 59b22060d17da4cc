// Host-side helpers over any backend.
#include "runtime/backend.h"

#include <chrono>

#include "base/error.h"
#include "runtime/parallel.h"

namespace moe {

Tensor normal_tensor(Backend& backend, const Shape& shape, DType dtype, const RngStream& rng, int64_t offset,
                     double scale) {
  MOE_CHECK(dtype == DType::kF32 || dtype == DType::kF64, "normal_tensor: floating dtype needed");
  Tensor h = host_tensor_uninitialized(shape, dtype);
  parallel_chunks(h.numel(), int64_t{1} << 18, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double v = scale * rng.normal(static_cast<uint64_t>(offset + i));
      if (dtype == DType::kF64) {
        h.data<double>()[i] = v;
      } else {
        h.data<float>()[i] = static_cast<float>(v);
      }
    }
  });
  Tensor d = backend.empty(shape, dtype);
  backend.copy_from_host(h.raw(), d);
  return d;
}

std::vector<double> to_doubles(Backend& backend, const Tensor& t) {
  Tensor h = host_tensor(t.shape(), t.dtype());
  backend.copy_to_host(t, h.raw());
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype()) {
      case DType::kF64: out[i] = h.data<double>()[i]; break;
      case DType::kF32: out[i] = h.data<float>()[i]; break;
      case DType::kI32: out[i] = h.data<int32_t>()[i]; break;
      case DType::kBF16: out[i] = bf16_to_float(static_cast<const uint16_t*>(h.raw())[i]); break;
    }
  }
  return out;
}

void Backend::convert(const Tensor& src, Tensor& dst) {
  MOE_CHECK(src.dtype() == dst.dtype() && src.numel() == dst.numel(), "convert: ", src.str(), " -> ", dst.str(),
            " is not supported by the ", name(), " backend");
  copy(src, dst);
}

int Backend::mark() {
  constexpr size_t kMarks = 4096;
  if (host_marks_.size() < kMarks) host_marks_.resize(kMarks);
  size_t id = next_mark_++ % kMarks;
  host_marks_[id] = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  return static_cast<int>(id);
}

double Backend::seconds_between(int a, int b) {
  return host_marks_[static_cast<size_t>(b)] - host_marks_[static_cast<size_t>(a)];
}

}  // namespace moe
