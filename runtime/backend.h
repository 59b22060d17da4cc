// The backend: memory, copies, streams and timing of one device (the CPU, or one GPU).
//
// The ops themselves live in families under runtime/ops/ (gemm, elementwise, norm_loss, routing,
// permute, optimizer, attention): free functions taking the Backend first, each implemented once for the
// CPU (runtime/cpu/, the reference for every op and the one that runs tests, F32 and F64) and once for
// CUDA (runtime/cuda/). The model (model/) composes ops and never touches tensor memory itself.
//
// Conventions: tensors are row-major and contiguous; shapes are given in comments as (rows, cols);
// "accumulate" outputs are added to, every other output is overwritten. Index tensors are I32.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace moe {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;

  // ---- memory
  virtual Tensor empty(const Shape& shape, DType dtype) = 0;  // contents unspecified
  Tensor zeros(const Shape& shape, DType dtype) {
    Tensor t = empty(shape, dtype);
    fill(t, 0.0);
    return t;
  }
  virtual void fill(Tensor& t, double value) = 0;
  virtual void copy(const Tensor& src, Tensor& dst) = 0;  // same dtype and element count
  virtual void copy_to_host(const Tensor& src, void* dst) = 0;
  virtual void copy_from_host(const void* src, Tensor& dst) = 0;
  // Bytes this device can still allocate (the host's MemAvailable; a GPU's free memory), or 0 unknown.
  virtual double memory_available() const = 0;

  // ---- precision
  // dst = src with dtype conversion (F32 <-> BF16 on devices that have BF16; same dtype: a copy)
  virtual void convert(const Tensor& src, Tensor& dst);

  // ---- streams and timing
  // A device backend issues ops in order on a main stream. Between begin_side() and end_side(), ops go
  // to a side stream that starts after everything issued so far; join_side() makes later main-stream
  // ops wait for all side work. The CPU backend runs everything inline, in issue order.
  virtual void begin_side() {}
  virtual void end_side() {}
  virtual void join_side() {}
  virtual bool side_runs_inline() const { return true; }
  // Blocks the host until every issued op has finished.
  virtual void synchronize() {}
  // Records a point on the stream ops are issued to and returns its id; seconds_between(a, b) is
  // valid once synchronize() has returned. Ids are recycled after 4096 marks.
  virtual int mark();
  virtual double seconds_between(int a, int b);
  // The native handle of the main stream (cudaStream_t), or null on the CPU.
  virtual void* native_stream() { return nullptr; }

 private:
  std::vector<double> host_marks_;  // seconds since an arbitrary origin, for the default mark()
  size_t next_mark_ = 0;
};

// Host-side helpers over any backend.
// A tensor of N(0, scale^2) values, element i drawn from rng at offset + i (so ranks can build slices of
// one global tensor from the same numbers).
Tensor normal_tensor(Backend& backend, const Shape& shape, DType dtype, const RngStream& rng, int64_t offset,
                     double scale = 1.0);
// Every element of t, copied to the host as double.
std::vector<double> to_doubles(Backend& backend, const Tensor& t);

struct CpuBackendOptions {
  int threads = 1;  // BLAS threads per rank
};
std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options);

// The CUDA backend on device `device` (of this process's visible devices). Throws ConfigError
// (key runtime.device) when this build has no CUDA support or no device is present.
struct CudaBackendOptions {
  int device = 0;
};
std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options);
// Number of CUDA devices this process sees; 0 without a driver or without CUDA support in the build.
int cuda_device_count();
// Why cuda_device_count() is 0 ("no CUDA driver", "built without CUDA", ...), or "".
std::string cuda_unavailable_reason();

}  // namespace moe
