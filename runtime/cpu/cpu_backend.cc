// CPU backend: host memory and copies (runtime/backend.h). The CPU ops, the reference implementation of
// every op, are in the family files beside this one (gemm.cc, elementwise.cc, ...); GEMMs go through
// CBLAS (OpenBLAS or BLIS, `threads` threads per rank; runtime/cpu/blas.h chooses the kernel).
#include <algorithm>
#include <cstring>
#include <fstream>
#include <string>

#include "runtime/backend.h"
#include "runtime/cpu/blas.h"
#include "runtime/cpu/cpu_common.h"

namespace moe {
namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuBackendOptions& options) {
    MOE_CHECK(options.threads >= 1, "threads must be >= 1");
    blas_setup(options.threads);
  }

  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::kCpu; }

  Tensor empty(const Shape& shape, DType dtype) override { return cpu_backend_tensor(shape, dtype); }

  // F32/F64 <-> BF16 (round to nearest even, as on the CUDA backend); otherwise a same-dtype copy.
  void convert(const Tensor& src, Tensor& dst) override {
    MOE_CHECK(src.numel() == dst.numel(), "convert: ", src.str(), " -> ", dst.str());
    const int64_t n = src.numel();
    if (dst.dtype() == DType::kBF16 && src.dtype() != DType::kBF16) {
      uint16_t* d = static_cast<uint16_t*>(dst.raw());
      return cpu::dispatch_float(src.dtype(), [&](auto tag) {
        const auto* s = src.data<decltype(tag)>();
        for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(static_cast<float>(s[i]));
      });
    }
    if (src.dtype() == DType::kBF16 && dst.dtype() != DType::kBF16) {
      const uint16_t* s = static_cast<const uint16_t*>(src.raw());
      return cpu::dispatch_float(dst.dtype(), [&](auto tag) {
        using T = decltype(tag);
        T* d = dst.data<T>();
        for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(bf16_to_float(s[i]));
      });
    }
    Backend::convert(src, dst);
  }

  void fill(Tensor& t, double value) override {
    if (t.dtype() == DType::kI32) {
      std::fill_n(t.data<int32_t>(), t.numel(), static_cast<int32_t>(value));
      return;
    }
    if (value == 0.0) {
      if (t.numel()) std::memset(t.raw(), 0, t.nbytes());
      return;
    }
    cpu::dispatch_float(t.dtype(), [&](auto tag) {
      using T = decltype(tag);
      std::fill_n(t.data<T>(), t.numel(), static_cast<T>(value));
    });
  }

  void copy(const Tensor& src, Tensor& dst) override {
    cpu::same_dtype(src, dst, "copy");
    MOE_CHECK(src.numel() == dst.numel(), "copy: ", src.str(), " to ", dst.str());
    if (src.numel()) std::memmove(dst.raw(), src.raw(), src.nbytes());
  }
  void copy_to_host(const Tensor& src, void* dst) override {
    if (src.numel()) std::memcpy(dst, src.raw(), src.nbytes());
  }
  void copy_from_host(const void* src, Tensor& dst) override {
    if (dst.numel()) std::memcpy(dst.raw(), src, dst.nbytes());
  }
  double memory_available() const override {
    std::ifstream in("/proc/meminfo");
    std::string name, unit;
    double kib = 0;
    while (in >> name >> kib >> unit) {
      if (name == "MemAvailable:") return kib * 1024.0;
    }
    return 0;
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

}  // namespace moe
