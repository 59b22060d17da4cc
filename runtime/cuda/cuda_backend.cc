// The CUDA backend: one GPU per rank, ops issued in order on a main stream, shared-expert work on a
// side stream, memory from the stream-ordered allocator.
//
// Streams. Every op goes to the current stream: the main one, or the side one between begin_side() and
// end_side(). begin_side() makes the side stream wait for everything issued so far on the main stream;
// join_side() makes the main stream wait for the side stream.
//
// Memory. Tensors come from cudaMallocAsync on the current stream and go back with cudaFreeAsync on the
// main stream, so a block is reused only by work ordered after its last use. Side-stream work is not
// ordered by the main stream, so a tensor released while a side window is open (begin_side() until the
// matching join_side()) is kept until the join and freed behind it. The default memory pool keeps
// freed memory cached (release threshold: unlimited), so steady-state steps do not call the driver. An
// allocation the device cannot make is a ResourceError: the bytes requested, and the device's free and
// total memory.
//
// Host waits. Only where the host needs a value (copy_to_host, sum_squares, cross_entropy, dropless
// row counts, synchronize): through cuda::wait_stream, which polls and lets the communicator's
// watchdog turn a stuck collective into an error.
#include <cuda_runtime.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <mutex>
#include <vector>

#include "runtime/backend.h"
#include "runtime/cuda/cuda_common.h"

namespace moe {
namespace {

// What tensor deleters need; outlives the backend if tensors do.
struct AllocState {
  std::mutex mutex;
  cudaStream_t stream = nullptr;  // main stream: where memory is freed
  bool alive = true;              // false once the backend (and its stream) is gone
  bool side_window = false;       // a side window is open: defer frees to the join
  std::vector<void*> deferred;

  void release(void* p) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!alive) {
      cudaFree(p);  // the stream is gone; a synchronous free is ordered after all work
    } else if (side_window) {
      deferred.push_back(p);
    } else {
      cudaFreeAsync(p, stream);
    }
  }
  void flush() {
    std::lock_guard<std::mutex> lock(mutex);
    for (void* p : deferred) cudaFreeAsync(p, stream);
    deferred.clear();
  }
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options) {
    int count = cuda_device_count();
    if (count == 0) throw ConfigError("runtime.device", "cuda: " + cuda_unavailable_reason());
    if (options.device < 0 || options.device >= count) {
      throw ConfigError("runtime.device", detail::concat("cuda: device ", options.device, " requested, ", count,
                                                         " visible (CUDA_VISIBLE_DEVICES?)"));
    }
    device_ = options.device;
    MOE_CUDA_CHECK(cudaSetDevice(device_));
    cudaMemPool_t pool;
    MOE_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device_));
    uint64_t threshold = UINT64_MAX;
    MOE_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    cudaStream_t main_stream, side_stream;
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&main_stream, cudaStreamNonBlocking));
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream, cudaStreamNonBlocking));
    main_.init(device_, main_stream);
    side_.init(device_, side_stream);
    cur_ = &main_;
    alloc_ = std::make_shared<AllocState>();
    alloc_->stream = main_stream;
    MOE_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    MOE_CUDA_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
    cudaDeviceProp prop;
    MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    device_name_ = prop.name;
  }

  ~CudaBackend() override {
    // Bounded waits: a stream stuck behind a dead peer's collective must not hang the exit.
    drain(main_.stream);
    drain(side_.stream);
    alloc_->flush();
    {
      std::lock_guard<std::mutex> lock(alloc_->mutex);
      alloc_->alive = false;
    }
    const bool idle = drain(main_.stream);
    if (bounce_ && idle) cudaFreeHost(bounce_);  // (a busy device would make it wait; leak it then)
    for (cudaEvent_t e : marks_) cudaEventDestroy(e);
    cudaEventDestroy(fork_);
    cudaEventDestroy(join_);
    cudaStream_t m = main_.stream, s = side_.stream;
    main_.destroy();
    side_.destroy();
    cudaStreamDestroy(m);
    cudaStreamDestroy(s);
  }

  std::string name() const override { return "cuda (" + device_name_ + ")"; }
  Device device() const override { return Device::kCuda; }

  Tensor empty(const Shape& shape, DType dtype) override {
    size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
    size_t alloc_bytes = std::max<size_t>(bytes, 256);
    void* p = nullptr;
    cudaError_t err = cudaMallocAsync(&p, alloc_bytes, cur_->stream);
    if (err == cudaErrorMemoryAllocation) {
      cuda::throw_out_of_memory(alloc_bytes, detail::concat("a tensor ", dtype_name(dtype), shape_str(shape)));
    }
    MOE_CUDA_CHECK(err);
    auto state = alloc_;
    auto storage = std::make_shared<Storage>(p, alloc_bytes, Device::kCuda, [state](void* q) { state->release(q); });
    return Tensor(storage, 0, shape, dtype);
  }

  void fill(Tensor& t, double value) override { cuda::fill_tensor(*cur_, t, value); }
  void copy(const Tensor& src, Tensor& dst) override {
    MOE_CHECK(src.numel() == dst.numel() && src.dtype() == dst.dtype(), "copy ", src.str(), " -> ", dst.str());
    MOE_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, cur_->stream));
  }
  void convert(const Tensor& src, Tensor& dst) override { cuda::convert_tensor(*cur_, src, dst); }

  void copy_to_host(const Tensor& src, void* dst) override {
    size_t bytes = src.nbytes();
    if (bytes == 0) return;
    if (bytes > bounce_bytes_) {
      synchronize();  // cudaFreeHost may wait for the device: let the polling wait do that first
      if (bounce_) cudaFreeHost(bounce_);
      bounce_ = nullptr;
      MOE_CUDA_CHECK(cudaMallocHost(&bounce_, bytes));
      bounce_bytes_ = bytes;
    }
    MOE_CUDA_CHECK(cudaMemcpyAsync(bounce_, src.raw(), bytes, cudaMemcpyDeviceToHost, cur_->stream));
    cuda::wait_stream(cur_->stream);
    std::memcpy(dst, bounce_, bytes);
  }
  double memory_available() const override {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return static_cast<double>(free_b);
  }
  void copy_from_host(const void* src, Tensor& dst) override {
    const size_t bytes = dst.nbytes();
    if (bytes == 0) return;
    if (bytes <= cuda::Context::kSlotBytes) {  // small: through a pinned staging slot, fully asynchronous
      void* staged = cur_->stage(src, bytes);
      MOE_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), staged, bytes, cudaMemcpyDeviceToDevice, cur_->stream));
      return;
    }
    // Large and pageable: the driver may block until the stream reaches the copy, so the stream is drained
    // first through the polling wait (a stuck collective then becomes an error, not a hang).
    cuda::wait_stream(cur_->stream);
    MOE_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src, bytes, cudaMemcpyHostToDevice, cur_->stream));
  }

  // ---- streams
  void begin_side() override {
    MOE_CHECK(cur_ == &main_, "begin_side inside a side window");
    MOE_CUDA_CHECK(cudaEventRecord(fork_, main_.stream));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(side_.stream, fork_, 0));
    {
      std::lock_guard<std::mutex> lock(alloc_->mutex);
      alloc_->side_window = true;
    }
    cur_ = &side_;
  }
  void end_side() override { cur_ = &main_; }
  void join_side() override {
    MOE_CUDA_CHECK(cudaEventRecord(join_, side_.stream));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(main_.stream, join_, 0));
    {
      std::lock_guard<std::mutex> lock(alloc_->mutex);
      alloc_->side_window = false;
    }
    alloc_->flush();  // behind the join: ordered after the side work
  }
  bool side_runs_inline() const override { return false; }
  void synchronize() override {
    cuda::wait_stream(side_.stream);
    cuda::wait_stream(main_.stream);
  }
  int mark() override {
    constexpr size_t kMarks = 4096;
    if (marks_.empty()) {
      marks_.resize(kMarks);
      for (cudaEvent_t& e : marks_) MOE_CUDA_CHECK(cudaEventCreate(&e));
    }
    size_t id = next_mark_++ % kMarks;
    MOE_CUDA_CHECK(cudaEventRecord(marks_[id], cur_->stream));
    return static_cast<int>(id);
  }
  double seconds_between(int a, int b) override {
    float ms = 0;
    MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, marks_[static_cast<size_t>(a)], marks_[static_cast<size_t>(b)]));
    return ms / 1000.0;
  }
  void* native_stream() override { return main_.stream; }
  // Waits for a stream without throwing, at most kDrainLimitS; false when it did not finish.
  static bool drain(cudaStream_t s) {
    constexpr double kDrainLimitS = 30.0;
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      cudaError_t e = cudaStreamQuery(s);
      if (e != cudaErrorNotReady) return e == cudaSuccess;
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > kDrainLimitS) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
  cuda::Context& current() { return *cur_; }

 private:
  int device_ = 0;
  std::string device_name_;
  cuda::Context main_, side_;
  cuda::Context* cur_ = nullptr;
  std::shared_ptr<AllocState> alloc_;
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
  std::vector<cudaEvent_t> marks_;
  size_t next_mark_ = 0;
  void* bounce_ = nullptr;  // pinned host buffer of copy_to_host
  size_t bounce_bytes_ = 0;
};

}  // namespace

cuda::Context& cuda::context(Backend& b) {
  auto* cuda_backend = dynamic_cast<CudaBackend*>(&b);  // not a static_cast: a backend may claim kCuda (tests)
  MOE_CHECK(cuda_backend != nullptr, "a CUDA op was called with the ", b.name(), " backend");
  return cuda_backend->current();
}

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(options);
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_unavailable_reason() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device (") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ")";
  }
  return n == 0 ? "no CUDA device visible" : "";
}

}  // namespace moe
