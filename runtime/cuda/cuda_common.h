// What every CUDA source of the runtime shares: error checks, the execution context of one backend,
// and the interruptible host wait. Included by .cu and .cc files alike (no device code here).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "base/error.h"
#include "runtime/tensor.h"

namespace moe {

class Backend;  // runtime/backend.h

namespace cuda {

// A failed call: InternalError, or ResourceError when it ran out of memory (with the device's free and
// total memory).
[[noreturn]] void throw_cuda_error(cudaError_t code, const char* stmt, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t code, const char* stmt, const char* file, int line);
// An allocation of `bytes` on the current device for `what` failed: ResourceError naming the bytes
// requested and the device's free and total memory. Clears the CUDA error first.
[[noreturn]] void throw_out_of_memory(size_t bytes, const std::string& what);

// Everything the ops of one backend need: the stream they are issued on, the cuBLAS handle bound to
// it, and a pinned host staging area for small per-call tables (grouped GEMM pointer arrays).
// A backend has one per stream (main, side), so staging slots are never shared between streams.
struct Context {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;  // bound to `stream`, pointer mode host, default math (no TF32)
  int device = 0;
  int num_sms = 0;

  // Copies `bytes` (at most kSlotBytes) of host data to the device in stream order and returns the
  // device address; valid for the kernels issued next on `stream`. A ring of pinned slots: a slot is
  // reused only after the event recorded behind its last copy has completed.
  void* stage(const void* host_src, size_t bytes);

  static constexpr size_t kSlotBytes = 64 * 1024;
  static constexpr int kSlots = 32;
  char* pinned = nullptr;       // kSlots * kSlotBytes, cudaMallocHost
  char* staged = nullptr;       // kSlots * kSlotBytes, cudaMalloc
  cudaEvent_t slot_done[kSlots] = {};
  int next_slot = 0;

  void init(int device_index, cudaStream_t s);  // creates the handle, the ring and its events
  void destroy();

  // The streams path of grouped GEMMs (GroupedGemmPath::kStreams): kGemmStreams streams, each with its
  // own cuBLAS handle, made on first use. fork_gemm_streams(n): the first n wait for the work issued on
  // `stream` so far; join_gemm_streams(n): `stream` waits for theirs.
  void fork_gemm_streams(int n);
  void join_gemm_streams(int n);
  static constexpr int kGemmStreams = 4;
  cudaStream_t gemm_streams[kGemmStreams] = {};
  cublasHandle_t gemm_cublas[kGemmStreams] = {};
  cudaEvent_t gemm_fork = nullptr;
  cudaEvent_t gemm_join[kGemmStreams] = {};
};

// The context ops issue on: b's current stream (main, or side inside a side window). b must be the CUDA
// backend (an op's CUDA implementation is only called for it).
Context& context(Backend& b);

// The backend's memory methods (runtime/cuda/elementwise.cu).
void fill_tensor(Context& ctx, Tensor& t, double value);          // F32, BF16, F64, I32
void convert_tensor(Context& ctx, const Tensor& src, Tensor& dst);  // F32 <-> BF16; same dtype: a copy

// Blocks the host until `stream` has finished, polling and calling poll_waiters() (device_wait.h)
// meanwhile, so a stuck collective becomes an error instead of a hang.
void wait_stream(cudaStream_t stream);
void wait_event(cudaEvent_t event);

// Copies one device int to the host in stream order and waits for it.
int64_t read_back_int(Context& ctx, const int* device_value);

// Launch geometry for a grid-stride loop over n elements.
inline unsigned grid_for(int64_t n, int block = 256) {
  int64_t g = (n + block - 1) / block;
  if (g < 1) g = 1;
  if (g > 65535LL * 32) g = 65535LL * 32;
  return static_cast<unsigned>(g);
}

cudaDataType_t cuda_dtype(DType dtype);  // F32, F64, BF16; throws for I32

}  // namespace cuda
}  // namespace moe

#define MOE_CUDA_CHECK(stmt)                                                                        \
  do {                                                                                              \
    cudaError_t moe_err_ = (stmt);                                                                  \
    if (moe_err_ != cudaSuccess) ::moe::cuda::throw_cuda_error(moe_err_, #stmt, __FILE__, __LINE__); \
  } while (0)

#define MOE_CUBLAS_CHECK(stmt)                                                                          \
  do {                                                                                                  \
    cublasStatus_t moe_st_ = (stmt);                                                                    \
    if (moe_st_ != CUBLAS_STATUS_SUCCESS) ::moe::cuda::throw_cublas_error(moe_st_, #stmt, __FILE__, __LINE__); \
  } while (0)

// Checks the last kernel launch (configuration errors surface here; faults surface at the next wait).
#define MOE_CUDA_LAUNCH_CHECK() MOE_CUDA_CHECK(cudaGetLastError())
