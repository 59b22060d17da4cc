// Dense GEMM rate probe.
#include "runtime/gemm_probe.h"

#include <chrono>

#include "runtime/ops/gemm.h"

namespace moe {

double dense_gemm_rate(Backend& backend, DType dtype, int64_t n, double seconds) {
  if (n <= 0) n = backend.device() == Device::kCuda ? 4096 : 256;
  RngStream rng{1, rng_stream(RngPurpose::kTest, 1000)};
  Tensor a = normal_tensor(backend, {n, n}, DType::kF64 == dtype ? DType::kF64 : DType::kF32, rng, 0);
  Tensor b = normal_tensor(backend, {n, n}, a.dtype(), rng, n * n);
  Tensor c = backend.empty({n, n}, a.dtype());
  gemm(backend, a, Trans::kN, b, Trans::kN, c, 1.0, 0.0);  // warm-up (library initialisation, caches)
  backend.synchronize();
  int reps = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (reps < 3 || elapsed < seconds) {
    gemm(backend, a, Trans::kN, b, Trans::kN, c, 1.0, 0.0);
    backend.synchronize();
    ++reps;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return 2.0 * static_cast<double>(n) * n * n * reps / elapsed;
}

}  // namespace moe
