// Error reporting, per-stream contexts and interruptible host waits of the CUDA backend.
#include "runtime/cuda/cuda_common.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "runtime/device_wait.h"

namespace moe {
namespace cuda {

namespace {

constexpr double kMiB = 1024.0 * 1024.0;

std::string mib(double bytes) {
  char text[48];
  std::snprintf(text, sizeof text, "%.1f MiB", bytes / kMiB);
  return text;
}

// "device 0 has 512.0 MiB free of 81559.0 MiB": what cudaMemGetInfo says now.
std::string device_memory() {
  int device = 0;
  size_t free_b = 0, total_b = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return "the device's free and total memory are unknown";
  }
  return detail::concat("device ", device, " has ", mib(free_b), " free of ", mib(total_b));
}

}  // namespace

void throw_cuda_error(cudaError_t code, const char* stmt, const char* file, int line) {
  if (code == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw ResourceError(detail::concat("CUDA out of memory in ", stmt, " at ", file, ":", line, "; ", device_memory()));
  }
  throw InternalError(detail::concat("CUDA call failed: ", stmt, " at ", file, ":", line, ": ",
                                     cudaGetErrorName(code), ": ", cudaGetErrorString(code)));
}

void throw_cublas_error(cublasStatus_t code, const char* stmt, const char* file, int line) {
  if (code == CUBLAS_STATUS_ALLOC_FAILED) {
    throw ResourceError(detail::concat("cuBLAS out of memory in ", stmt, " at ", file, ":", line, "; ",
                                       device_memory()));
  }
  throw InternalError(detail::concat("cuBLAS call failed: ", stmt, " at ", file, ":", line, ": ",
                                     cublasGetStatusName(code), ": ", cublasGetStatusString(code)));
}

void throw_out_of_memory(size_t bytes, const std::string& what) {
  cudaGetLastError();  // the failed allocation's error, so that it does not resurface at the next check
  throw ResourceError(detail::concat("GPU out of memory: requested ", bytes, " bytes (", mib(bytes), ") for ", what,
                                     "; ", device_memory()));
}

void Context::init(int device_index, cudaStream_t s) {
  device = device_index;
  stream = s;
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  MOE_CUBLAS_CHECK(cublasCreate(&cublas));
  MOE_CUBLAS_CHECK(cublasSetStream(cublas, stream));
  MOE_CUBLAS_CHECK(cublasSetMathMode(cublas, CUBLAS_DEFAULT_MATH));  // no TF32: fp32 means fp32
  MOE_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned), kSlots * kSlotBytes));
  MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&staged), kSlots * kSlotBytes));
  for (cudaEvent_t& e : slot_done) MOE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
}

void Context::destroy() {
  for (cudaEvent_t& e : slot_done) {
    if (e) cudaEventDestroy(e);
    e = nullptr;
  }
  for (int i = 0; i < kGemmStreams; ++i) {
    if (gemm_join[i]) cudaEventDestroy(gemm_join[i]);
    if (gemm_cublas[i]) cublasDestroy(gemm_cublas[i]);
    if (gemm_streams[i]) cudaStreamDestroy(gemm_streams[i]);
    gemm_join[i] = nullptr;
    gemm_cublas[i] = nullptr;
    gemm_streams[i] = nullptr;
  }
  if (gemm_fork) cudaEventDestroy(gemm_fork);
  gemm_fork = nullptr;
  if (staged) cudaFree(staged);
  if (pinned) cudaFreeHost(pinned);
  if (cublas) cublasDestroy(cublas);
  staged = pinned = nullptr;
  cublas = nullptr;
}

void Context::fork_gemm_streams(int n) {
  MOE_CHECK(n >= 1 && n <= kGemmStreams, "fork_gemm_streams: ", n, " of ", kGemmStreams, " streams");
  if (gemm_fork == nullptr) {  // first use; gemm_fork is set last, so a failed set-up is redone next time
    for (int i = 0; i < kGemmStreams; ++i) {
      if (!gemm_streams[i]) MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&gemm_streams[i], cudaStreamNonBlocking));
      if (!gemm_join[i]) MOE_CUDA_CHECK(cudaEventCreateWithFlags(&gemm_join[i], cudaEventDisableTiming));
      if (!gemm_cublas[i]) MOE_CUBLAS_CHECK(cublasCreate(&gemm_cublas[i]));
      MOE_CUBLAS_CHECK(cublasSetStream(gemm_cublas[i], gemm_streams[i]));
      MOE_CUBLAS_CHECK(cublasSetMathMode(gemm_cublas[i], CUBLAS_DEFAULT_MATH));  // as the main handle
    }
    MOE_CUDA_CHECK(cudaEventCreateWithFlags(&gemm_fork, cudaEventDisableTiming));
  }
  MOE_CUDA_CHECK(cudaEventRecord(gemm_fork, stream));
  for (int i = 0; i < n; ++i) MOE_CUDA_CHECK(cudaStreamWaitEvent(gemm_streams[i], gemm_fork, 0));
}

void Context::join_gemm_streams(int n) {
  for (int i = 0; i < n; ++i) {
    MOE_CUDA_CHECK(cudaEventRecord(gemm_join[i], gemm_streams[i]));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(stream, gemm_join[i], 0));
  }
}

void* Context::stage(const void* host_src, size_t bytes) {
  MOE_CHECK(bytes <= kSlotBytes, "stage: ", bytes, " bytes exceed the ", kSlotBytes, "-byte slot");
  int s = next_slot;
  next_slot = (next_slot + 1) % kSlots;
  wait_event(slot_done[s]);  // the slot's previous copy has left the pinned buffer
  char* host = pinned + static_cast<size_t>(s) * kSlotBytes;
  char* dev = staged + static_cast<size_t>(s) * kSlotBytes;
  std::memcpy(host, host_src, bytes);
  MOE_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream));
  MOE_CUDA_CHECK(cudaEventRecord(slot_done[s], stream));
  return dev;
}

namespace {

// Polls `ready` until it says done; sleeps a little once the wait is long, and calls the registered
// pollers (communicator watchdogs) every millisecond or so.
template <typename Query>
void poll_until(Query ready) {
  auto start = std::chrono::steady_clock::now();
  auto last_poll = start;
  for (int spins = 0;; ++spins) {
    cudaError_t st = ready();
    if (st == cudaSuccess) return;
    if (st != cudaErrorNotReady) MOE_CUDA_CHECK(st);
    auto now = std::chrono::steady_clock::now();
    if (now - last_poll > std::chrono::milliseconds(1)) {
      poll_waiters(std::chrono::duration<double>(now - start).count());
      last_poll = now;
    }
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace

void wait_stream(cudaStream_t stream) {
  poll_until([&] { return cudaStreamQuery(stream); });
}

void wait_event(cudaEvent_t event) {
  poll_until([&] { return cudaEventQuery(event); });
}

int64_t read_back_int(Context& ctx, const int* device_value) {
  thread_local int* pinned_int = nullptr;
  if (!pinned_int) MOE_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned_int), sizeof(int)));
  MOE_CUDA_CHECK(cudaMemcpyAsync(pinned_int, device_value, sizeof(int), cudaMemcpyDeviceToHost, ctx.stream));
  wait_stream(ctx.stream);
  return *pinned_int;
}

cudaDataType_t cuda_dtype(DType dtype) {
  switch (dtype) {
    case DType::kF32: return CUDA_R_32F;
    case DType::kF64: return CUDA_R_64F;
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kI32: break;
  }
  throw InternalError(detail::concat("no cuBLAS data type for ", dtype_name(dtype)));
}

}  // namespace cuda
}  // namespace moe
