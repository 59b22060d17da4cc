// The CUDA entry points of a build without the CUDA toolkit: they say so.
#include "runtime/backend.h"
#include "base/error.h"

namespace moe {

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions&) {
  throw ConfigError("runtime.device", "cuda: " + cuda_unavailable_reason());
}

int cuda_device_count() { return 0; }

std::string cuda_unavailable_reason() {
  return "this build has no CUDA support (the CUDA toolkit and NCCL were not found at configure time)";
}

}  // namespace moe
