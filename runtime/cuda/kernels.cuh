// What the CUDA op files share: float tensors of either dtype, typed access, stream-ordered scratch,
// block reductions, results returned to the host, and the launch helper of elementwise kernels.
// Included by .cu files only.
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "runtime/backend.h"
#include "runtime/cuda/cuda_common.h"

namespace moe::cuda {

constexpr int kBlock = 256;             // threads per block of the elementwise kernels
constexpr int kMaxPartials = 1024;      // blocks of a reduction whose partials one block then sums
constexpr unsigned kFullMask = 0xffffffffu;

#define GRID_STRIDE_LOOP(i, n)                                                    \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Elements per row: the product of every dimension after the first (as the CPU backend).
inline int64_t row_len(const Tensor& t) {
  int64_t n = 1;
  for (int i = 1; i < t.rank(); ++i) n *= t.dim(i);
  return n;
}

inline int to_int(int64_t value, const char* what) {
  MOE_CHECK(value >= 0 && value <= INT_MAX, what, " = ", value, " does not fit cuBLAS's 32-bit int");
  return static_cast<int>(value);
}

// Threads per block for a kernel that gives one block to a row of n elements.
inline int row_block(int64_t n) { return n >= 16384 ? 1024 : n >= 4096 ? 512 : n >= 1024 ? 256 : 128; }

// A float tensor of either dtype, read (FloatIn) or read and written (FloatOut) as float.
struct FloatIn {
  const void* ptr;
  bool bf16;
  __device__ float operator[](int64_t i) const {
    return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[i]) : static_cast<const float*>(ptr)[i];
  }
};

struct FloatOut {
  void* ptr;
  bool bf16;
  __device__ float get(int64_t i) const {
    return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[i]) : static_cast<const float*>(ptr)[i];
  }
  __device__ void set(int64_t i, float v) const {
    if (bf16) {
      static_cast<__nv_bfloat16*>(ptr)[i] = __float2bfloat16(v);
    } else {
      static_cast<float*>(ptr)[i] = v;
    }
  }
};

// Typed access to a tensor's memory. The op contracts (runtime/ops/contract.h) have checked every dtype
// before an op gets here; these checks guard the reinterpretation, as Tensor::data<T>() does, for code
// that reaches the kernels without a contract (the backend's convert, one CUDA function calling another).
inline void check_float(const Tensor& t, const char* what) {
  MOE_CHECK(t.defined(), what, " is undefined");
  MOE_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kBF16, what, " must be F32 or BF16, got ", t.str());
}
inline FloatIn float_in(const Tensor& t, const char* what) {
  check_float(t, what);
  return {t.raw(), t.dtype() == DType::kBF16};
}
inline FloatOut float_out(Tensor& t, const char* what) {
  check_float(t, what);
  return {t.raw(), t.dtype() == DType::kBF16};
}
inline const float* f32_in(const Tensor& t, const char* what) {
  MOE_CHECK(t.defined() && t.dtype() == DType::kF32, what, " must be F32, got ", t.str());
  return static_cast<const float*>(t.raw());
}
inline float* f32_out(Tensor& t, const char* what) {
  MOE_CHECK(t.defined() && t.dtype() == DType::kF32, what, " must be F32, got ", t.str());
  return static_cast<float*>(t.raw());
}
inline const int32_t* i32_in(const Tensor& t, const char* what) {
  MOE_CHECK(t.defined() && t.dtype() == DType::kI32, what, " must be I32, got ", t.str());
  return static_cast<const int32_t*>(t.raw());
}

// Stream-ordered scratch: allocated on the stream now, freed on it when the scope ends, so the kernels
// issued in between may use it and nothing waits.
class Scratch {
 public:
  Scratch(cudaStream_t stream, size_t bytes) : stream_(stream) {
    if (bytes == 0) return;
    const cudaError_t err = cudaMallocAsync(&ptr_, bytes, stream_);
    if (err == cudaErrorMemoryAllocation) throw_out_of_memory(bytes, "an op's scratch");
    MOE_CUDA_CHECK(err);
  }
  ~Scratch() {
    if (ptr_) (void)cudaFreeAsync(ptr_, stream_);  // a destructor cannot throw; a failure resurfaces later
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  void* ptr() const { return ptr_; }

 private:
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

// What a reduction returns to the host.
struct ReduceResult {
  double sum;
  int32_t num_bad;    // cross_entropy: rows whose target is outside the vocabulary
  int32_t bad_value;  // one such target
};

// Copies a device ReduceResult to the host and waits (interruptibly) for it.
inline ReduceResult fetch_result(Context& ctx, const ReduceResult* device) {
  // One pinned slot per host thread, allocated on first use and kept: a few bytes, no per-call
  // cudaMallocHost, and a pinned destination keeps the copy asynchronous so wait_stream() does the wait.
  thread_local ReduceResult* pinned = nullptr;
  if (!pinned) MOE_CUDA_CHECK(cudaMallocHost(&pinned, sizeof(ReduceResult)));
  MOE_CUDA_CHECK(cudaMemcpyAsync(pinned, device, sizeof(ReduceResult), cudaMemcpyDeviceToHost, ctx.stream));
  wait_stream(ctx.stream);
  return *pinned;
}

// ---------------------------------------------------------------------------------------------------
// block reductions (blockDim.x a multiple of 32, at most 1024; every thread gets the result)

// Running max and sum of exp(x - max) of a softmax row.
struct SoftmaxStat {
  float max;
  float sum;
};

__device__ inline float shfl_xor(float v, int mask) { return __shfl_xor_sync(kFullMask, v, mask); }
__device__ inline double shfl_xor(double v, int mask) { return __shfl_xor_sync(kFullMask, v, mask); }
__device__ inline SoftmaxStat shfl_xor(SoftmaxStat v, int mask) { return {shfl_xor(v.max, mask), shfl_xor(v.sum, mask)}; }

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct SoftmaxMerge {
  __device__ SoftmaxStat operator()(SoftmaxStat a, SoftmaxStat b) const {
    float m = fmaxf(a.max, b.max);
    if (m == -INFINITY) return {m, 0.f};
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
  }
};

__device__ inline void softmax_push(SoftmaxStat& s, float x) {
  if (x > s.max) {
    s.sum = s.sum * expf(s.max - x) + 1.f;
    s.max = x;
  } else if (x != -INFINITY) {  // -inf adds 0; while max is still -inf, exp(-inf - -inf) would be NaN
    s.sum += expf(x - s.max);
  }
}

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  for (int mask = 16; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask));
  __syncthreads();  // an earlier call's readers are done with `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? partial[lane] : identity;
    for (int mask = 16; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask));
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

// One block: out = sum of values[0, n) in double, in a fixed order; bad = {count, value} or null.
template <typename T>
__global__ void finish_sum_kernel(const T* values, int64_t n, const int32_t* bad, ReduceResult* out) {
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(values[i]);
  s = block_reduce(s, Sum{}, 0.0);
  if (threadIdx.x == 0) *out = {s, bad ? bad[0] : 0, bad ? bad[1] : 0};
}


// ---------------------------------------------------------------------------------------------------
// launch helpers

template <typename... Params, typename... Args>
inline void launch_elementwise(Context& ctx, int64_t n, void (*kernel)(Params...), Args... args) {
  if (n == 0) return;
  kernel<<<grid_for(n, kBlock), kBlock, 0, ctx.stream>>>(args...);
  MOE_CUDA_LAUNCH_CHECK();
}

// Blocks for a kernel that loops over `items` blocks (one block per item, grid-stride over items).
inline unsigned block_grid(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(items, 1 << 20)));
}

}  // namespace moe::cuda
