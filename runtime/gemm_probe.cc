// Dense GEMM rate probe.
#include "runtime/gemm_probe.h"

#include <chrono>

#include "runtime/ops/gemm.h"

namespace moe {

int64_t gemm_probe_size(const Backend& backend) { return backend.device() == Device::kCuda ? 4096 : 256; }

double dense_gemm_seconds(Backend& backend, DType dtype, int64_t n, int reps) {
  RngStream rng{1, rng_stream(RngPurpose::kTest, 1000)};
  const DType dt = dtype == DType::kF64 ? DType::kF64 : DType::kF32;
  Tensor a = normal_tensor(backend, {n, n}, dt, rng, 0);
  Tensor b = normal_tensor(backend, {n, n}, dt, rng, n * n);
  Tensor c = backend.empty({n, n}, dt);
  gemm(backend, a, Trans::kN, b, Trans::kN, c, 1.0, 0.0);  // warm-up (library initialisation, caches)
  backend.synchronize();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) gemm(backend, a, Trans::kN, b, Trans::kN, c, 1.0, 0.0);
  backend.synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace moe
