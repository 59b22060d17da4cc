// CUDA kernels and host launchers for the dense ops (see dense_ops.h); the CPU backend is the reference
// for every formula, argument order and edge case.
//
// Design:
// - GEMMs are cuBLAS, row-major by the transpose trick: C (M, N) row-major is C^T (N, M) column-major,
//   so we ask cuBLAS for C^T = op(B)^T op(A)^T with the operands swapped. CUBLAS_COMPUTE_32F always (F32
//   operands stay FP32, no TF32). k = 0 is done by us (c = beta * c, exactly 0 when beta = 0, as the CPU).
//   grouped_gemm / grouped_gemm_tn issue one cublasGemmGroupedBatchedEx per 2730 non-empty groups
//   (each its own cuBLAS group of batch 1); the three device pointer arrays go up in one ctx.stage()
//   slot, the other per-group arrays are host arrays. Empty groups of grouped_gemm_tn get c[g] *= beta.
// - Elementwise ops (fill, convert, axpy, scale, activations, optimizer steps) are grid-stride loops,
//   256 threads per block, the grid capped by grid_for(). Each op is one kernel: SwiGLU forward and
//   backward compute silu, both gradients and the casts in one pass; AdamW updates m, v and the
//   parameter in one pass. A float tensor is passed as (pointer, is_bf16) and read or written as float,
//   so every input and output can be F32 or BF16 independently without a template per combination
//   (the branch is uniform across the grid).
// - Row ops (RMSNorm, cross-entropy) run one block per row, 128..1024 threads by row length, with
//   warp-shuffle block reductions. Cross-entropy reads a row twice: an online max/sum-of-exp pass, then
//   the gradient pass (vocabularies of 200k do not fit on chip). RMSNorm sums in double like the CPU.
// - Values that return to the host (sum_squares, the cross-entropy loss) are reduced deterministically:
//   per-block or per-row partials in scratch, then one block sums them in double in a fixed order, and
//   the 16-byte result comes back through a pinned buffer and wait_stream().
// - rmsnorm_backward's dw: each of G = min(rows, 2 * SMs) blocks owns a scratch row of H partial sums
//   (each thread its own columns, so no atomics) over the rows it handles; a column kernel adds the G
//   partials to dw in a fixed order. Deterministic for a given device.
// - embedding_backward accumulates with float atomicAdd (order of repeated ids not fixed).
// - gather/scatter/embedding copies move rows as the widest of 16/8/4/2/1-byte words that the row size
//   and both base addresses allow.
// - Scratch memory is stream-ordered (cudaMallocAsync / cudaFreeAsync on ctx.stream).
#include "runtime/cuda/dense_ops.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <utility>
#include <vector>

namespace moe::cuda {
namespace {

// ---------------------------------------------------------------------------------------------------
// helpers

constexpr int kBlock = 256;             // threads per block of the elementwise kernels
constexpr int kMaxPartials = 1024;      // blocks of a reduction whose partials one block then sums
constexpr unsigned kFullMask = 0xffffffffu;

#define GRID_STRIDE_LOOP(i, n)                                                    \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Elements per row: the product of every dimension after the first (as the CPU backend).
int64_t row_len(const Tensor& t) {
  int64_t n = 1;
  for (int i = 1; i < t.rank(); ++i) n *= t.dim(i);
  return n;
}

int to_int(int64_t value, const char* what) {
  MOE_CHECK(value >= 0 && value <= INT_MAX, what, " = ", value, " does not fit cuBLAS's 32-bit int");
  return static_cast<int>(value);
}

// Threads per block for a kernel that gives one block to a row of n elements.
int row_block(int64_t n) { return n >= 16384 ? 1024 : n >= 4096 ? 512 : n >= 1024 ? 256 : 128; }

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

void check_float(const Tensor& t, const char* what) {
  MOE_CHECK(t.defined(), what, " is undefined");
  MOE_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kBF16, what, " must be F32 or BF16, got ", t.str());
}
FloatIn float_in(const Tensor& t, const char* what) {
  check_float(t, what);
  return {t.raw(), t.dtype() == DType::kBF16};
}
FloatOut float_out(Tensor& t, const char* what) {
  check_float(t, what);
  return {t.raw(), t.dtype() == DType::kBF16};
}
const float* f32_in(const Tensor& t, const char* what) {
  MOE_CHECK(t.defined() && t.dtype() == DType::kF32, what, " must be F32, got ", t.str());
  return static_cast<const float*>(t.raw());
}
float* f32_out(Tensor& t, const char* what) {
  MOE_CHECK(t.defined() && t.dtype() == DType::kF32, what, " must be F32, got ", t.str());
  return static_cast<float*>(t.raw());
}
const int32_t* i32_in(const Tensor& t, const char* what) {
  MOE_CHECK(t.defined() && t.dtype() == DType::kI32, what, " must be I32, got ", t.str());
  return static_cast<const int32_t*>(t.raw());
}

// Stream-ordered scratch: allocated on the stream now, freed on it when the scope ends, so the kernels
// issued in between may use it and nothing waits.
class Scratch {
 public:
  Scratch(cudaStream_t stream, size_t bytes) : stream_(stream) {
    if (bytes) MOE_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream_));
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
ReduceResult fetch_result(Context& ctx, const ReduceResult* device) {
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

__device__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(kFullMask, v, mask); }
__device__ double shfl_xor(double v, int mask) { return __shfl_xor_sync(kFullMask, v, mask); }
__device__ SoftmaxStat shfl_xor(SoftmaxStat v, int mask) { return {shfl_xor(v.max, mask), shfl_xor(v.sum, mask)}; }

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

__device__ void softmax_push(SoftmaxStat& s, float x) {
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
// elementwise kernels

template <typename T>
__global__ void fill_kernel(T* p, int64_t n, T value) {
  GRID_STRIDE_LOOP(i, n) p[i] = value;
}

__global__ void convert_kernel(FloatIn src, FloatOut dst, int64_t n) {
  GRID_STRIDE_LOOP(i, n) dst.set(i, src[i]);
}

__global__ void axpy_kernel(float alpha, FloatIn x, FloatOut y, int64_t n) {
  GRID_STRIDE_LOOP(i, n) y.set(i, y.get(i) + alpha * x[i]);
}

__global__ void scale_kernel(FloatOut x, int64_t n, float alpha) {
  GRID_STRIDE_LOOP(i, n) x.set(i, x.get(i) * alpha);
}

__global__ void sum_squares_kernel(FloatIn x, int64_t n, double* partial) {
  double s = 0;
  GRID_STRIDE_LOOP(i, n) {
    double v = x[i];
    s += v * v;
  }
  s = block_reduce(s, Sum{}, 0.0);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__device__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__global__ void swiglu_forward_kernel(FloatIn a, FloatIn b, FloatOut h, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    float x = a[i];
    h.set(i, x * sigmoid(x) * b[i]);
  }
}

__global__ void swiglu_backward_kernel(FloatIn dh, FloatIn a, FloatIn b, FloatOut da, FloatOut db, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    float x = a[i], g = dh[i];
    float s = sigmoid(x);
    db.set(i, g * (x * s));
    da.set(i, g * b[i] * s * (1.f + x * (1.f - s)));
  }
}

// GELU, tanh approximation (as the CPU backend).
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;
constexpr float kGeluA3 = static_cast<float>(3 * 0.044715);

__global__ void activation_forward_kernel(Activation act, FloatIn a, FloatOut h, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    float x = a[i];
    if (act == Activation::kRelu) {
      h.set(i, x > 0.f ? x : 0.f);
    } else {
      h.set(i, 0.5f * x * (1.f + tanhf(kGeluC * (x + kGeluA * x * x * x))));
    }
  }
}

__global__ void activation_backward_kernel(Activation act, FloatIn dh, FloatIn a, FloatOut da, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    float x = a[i];
    if (act == Activation::kRelu) {
      da.set(i, x > 0.f ? dh[i] : 0.f);
    } else {
      float th = tanhf(kGeluC * (x + kGeluA * x * x * x));
      float du = kGeluC * (1.f + kGeluA3 * x * x);
      da.set(i, dh[i] * (0.5f * (1.f + th) + 0.5f * x * (1.f - th * th) * du));
    }
  }
}

__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, float beta1, float beta2,
                             float lr, float wd, float eps, float inv_bc1, float inv_bc2) {
  GRID_STRIDE_LOOP(i, n) {
    float gi = g[i];
    float mi = beta1 * m[i] + (1.f - beta1) * gi;
    float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps);
    p[i] -= lr * (update + wd * p[i]);
  }
}

__global__ void sgd_kernel(float* p, const float* g, int64_t n, float lr, float wd) {
  GRID_STRIDE_LOOP(i, n) p[i] -= lr * (g[i] + wd * p[i]);
}

// ---------------------------------------------------------------------------------------------------
// row kernels

enum class RowCopy : uint8_t { kGather, kScatter };

// kGather: dst[i] = src[idx[i]] (zero row when idx[i] is outside [0, bound)).
// kScatter: dst[idx[i]] = src[i] (skipped when outside). Rows of row_words words of type Word.
template <typename Word>
__global__ void copy_rows_kernel(const Word* src, Word* dst, const int32_t* idx, int64_t num_rows, int64_t row_words,
                                 int64_t bound, RowCopy mode) {
  GRID_STRIDE_LOOP(i, num_rows * row_words) {
    int64_t row = i / row_words, col = i - row * row_words;
    int64_t target = idx[row];
    bool valid = target >= 0 && target < bound;
    if (mode == RowCopy::kGather) {
      dst[i] = valid ? src[target * row_words + col] : Word{};
    } else if (valid) {
      dst[target * row_words + col] = src[i];
    }
  }
}

__global__ void embedding_backward_kernel(const int32_t* ids, FloatIn dout, float* dtable, int64_t num_tokens,
                                          int64_t h, int64_t vocab) {
  GRID_STRIDE_LOOP(i, num_tokens * h) {
    int64_t t = i / h;
    int64_t id = ids[t];
    if (id >= 0 && id < vocab) atomicAdd(&dtable[id * h + (i - t * h)], dout[i]);
  }
}

// One block per row: rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w.
__global__ void rmsnorm_forward_kernel(FloatIn x, const float* w, double eps, FloatOut y, float* rstd, int64_t h) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * h;
  double ss = 0;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    double v = x[base + j];
    ss += v * v;
  }
  ss = block_reduce(ss, Sum{}, 0.0);
  const float r = static_cast<float>(1.0 / sqrt(ss / h + eps));
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) y.set(base + j, x[base + j] * r * w[j]);
}

// Block b handles rows b, b + G, ...: dx of each, and its partial dw sums in dw_partial[b] (H floats;
// thread t always owns columns t, t + blockDim, ..., so the partials need no atomics).
__global__ void rmsnorm_backward_kernel(FloatIn dy, FloatIn x, const float* w, const float* rstd, FloatOut dx,
                                        float* dw_partial, int64_t rows, int64_t h) {
  float* partial = dw_partial + static_cast<int64_t>(blockIdx.x) * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) partial[j] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * h;
    const float r = rstd[row];
    double dot = 0;  // sum over j of (dy * w) * n, n = x * r
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x)
      dot += static_cast<double>(dy[base + j]) * w[j] * x[base + j] * r;
    dot = block_reduce(dot, Sum{}, 0.0);
    const float mean = static_cast<float>(dot / h);
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      float g = dy[base + j], n = x[base + j] * r;
      dx.set(base + j, r * (g * w[j] - n * mean));
      partial[j] += g * n;
    }
  }
}

// dw[j] += sum over b of partial[b][j], b in order.
__global__ void column_sum_kernel(const float* partial, int64_t num_partials, int64_t h, float* dw) {
  GRID_STRIDE_LOOP(j, h) {
    float s = 0.f;
    for (int64_t b = 0; b < num_partials; ++b) s += partial[b * h + j];
    dw[j] += s;
  }
}

// One block per row: loss[row] = logsumexp(row) - row[target]; dlogits = scale * (softmax - onehot).
// A target outside [0, vocab) gives loss 0 and is counted in bad = {count, value}.
__global__ void cross_entropy_kernel(FloatIn logits, const int32_t* targets, float scale, FloatOut dlogits,
                                     float* loss, int32_t* bad, int64_t vocab) {
  const int64_t row = blockIdx.x, base = row * vocab;
  SoftmaxStat stat{-INFINITY, 0.f};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) softmax_push(stat, logits[base + j]);
  stat = block_reduce(stat, SoftmaxMerge{}, SoftmaxStat{-INFINITY, 0.f});
  const float inv = 1.f / stat.sum;
  const int64_t target = targets[row];
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float p = expf(logits[base + j] - stat.max) * inv * scale;
    dlogits.set(base + j, j == target ? p - scale : p);
  }
  if (threadIdx.x == 0) {
    if (target >= 0 && target < vocab) {
      loss[row] = (stat.max + logf(stat.sum)) - logits[base + target];
    } else {
      loss[row] = 0.f;
      atomicAdd(&bad[0], 1);
      bad[1] = static_cast<int32_t>(target);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// launch helpers

template <typename... Params, typename... Args>
void launch_elementwise(Context& ctx, int64_t n, void (*kernel)(Params...), Args... args) {
  if (n == 0) return;
  kernel<<<grid_for(n, kBlock), kBlock, 0, ctx.stream>>>(args...);
  MOE_CUDA_LAUNCH_CHECK();
}

// c = beta * c, exactly zero when beta == 0 (what a GEMM with k = 0 leaves, as in the CPU backend).
void scale_by_beta(Context& ctx, Tensor& c, double beta) {
  if (c.numel() == 0 || beta == 1.0) return;
  if (beta == 0.0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(c.raw(), 0, c.nbytes(), ctx.stream));
    return;
  }
  scale(ctx, c, beta);
}

void copy_rows(Context& ctx, const Tensor& src, const Tensor& idx, Tensor& dst, int64_t num_rows, size_t row_bytes,
               int64_t bound, RowCopy mode) {
  if (num_rows == 0 || row_bytes == 0) return;
  const int32_t* pidx = i32_in(idx, "row index");
  const uintptr_t align = row_bytes | reinterpret_cast<uintptr_t>(src.raw()) | reinterpret_cast<uintptr_t>(dst.raw());
  auto run = [&](auto word) {
    using Word = decltype(word);
    const int64_t row_words = static_cast<int64_t>(row_bytes / sizeof(Word));
    launch_elementwise(ctx, num_rows * row_words, copy_rows_kernel<Word>, static_cast<const Word*>(src.raw()),
                       static_cast<Word*>(dst.raw()), pidx, num_rows, row_words, bound, mode);
  };
  if (align % 16 == 0) {
    run(uint4{});
  } else if (align % 8 == 0) {
    run(uint2{});
  } else if (align % 4 == 0) {
    run(uint32_t{});
  } else if (align % 2 == 0) {
    run(uint16_t{});
  } else {
    run(uint8_t{});
  }
}

// ---------------------------------------------------------------------------------------------------
// cuBLAS

cudaDataType_t blas_type(DType dtype) { return dtype == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }
cublasOperation_t blas_op(Trans t) { return t == Trans::kT ? CUBLAS_OP_T : CUBLAS_OP_N; }

struct GemmTypes {
  cudaDataType_t ab, c;
};

// The (operand, result) pairs we use with CUBLAS_COMPUTE_32F: cublasGemmEx takes F32/F32, BF16/BF16 and
// BF16/F32; cublasGemmGroupedBatchedEx documents F32/F32 and BF16/BF16 (FP16 too) only.
GemmTypes gemm_types(const Tensor& a, const Tensor& b, const Tensor& c, bool grouped, const char* op) {
  MOE_CHECK(a.dtype() == b.dtype(), op, ": operand dtypes differ: ", a.str(), " vs ", b.str());
  const DType in = a.dtype(), out = c.dtype();
  const bool ok = (in == DType::kF32 && out == DType::kF32) || (in == DType::kBF16 && out == DType::kBF16) ||
                  (!grouped && in == DType::kBF16 && out == DType::kF32);
  MOE_CHECK(ok, op, ": ", dtype_name(in), " operands with a ", dtype_name(out), " result are not supported (",
            grouped ? "cublasGemmGroupedBatchedEx" : "cublasGemmEx", ", CUBLAS_COMPUTE_32F)");
  return {blas_type(in), blas_type(out)};
}

// One GEMM of a grouped call, in cuBLAS's column-major terms: C (m, n) = op(A) (m, k) op(B) (k, n).
struct GroupProblem {
  const void* a;
  const void* b;
  void* c;
  int m, n, k, lda, ldb, ldc;
};

// cuBLAS asks the matrices of a 16-bit grouped GEMM to be 16-byte aligned when k % 8 == 0 and 4-byte
// aligned when k % 2 == 0; a misaligned one faults on the device (and kills the context), so refuse it.
void check_half_alignment(const GroupProblem& p, const char* op) {
  const uintptr_t need = p.k % 8 == 0 ? 16 : p.k % 2 == 0 ? 4 : 2;
  for (const void* ptr : {p.a, p.b, static_cast<const void*>(p.c)}) {
    MOE_CHECK(reinterpret_cast<uintptr_t>(ptr) % need == 0, op, ": BF16 matrix at ", ptr, " is not ", need,
              "-byte aligned, as cuBLAS needs for k = ", p.k);
  }
}

// Runs the problems (all with the same transposes and scalars) as cuBLAS groups of batch size 1, as many
// per call as one staging slot holds pointer triples for.
void run_grouped(Context& ctx, cublasOperation_t ta, cublasOperation_t tb, const std::vector<GroupProblem>& problems,
                 GemmTypes types, double alpha, double beta) {
  constexpr size_t kMaxPerCall = Context::kSlotBytes / (3 * sizeof(void*));
  for (size_t first = 0; first < problems.size(); first += kMaxPerCall) {
    const size_t count = std::min(kMaxPerCall, problems.size() - first);
    // Device pointer arrays, one slot: [A pointers | B pointers | C pointers].
    std::vector<void*> ptrs(3 * count);
    std::vector<int> m(count), n(count), k(count), lda(count), ldb(count), ldc(count);
    for (size_t i = 0; i < count; ++i) {
      const GroupProblem& p = problems[first + i];
      ptrs[i] = const_cast<void*>(p.a);
      ptrs[count + i] = const_cast<void*>(p.b);
      ptrs[2 * count + i] = p.c;
      m[i] = p.m;
      n[i] = p.n;
      k[i] = p.k;
      lda[i] = p.lda;
      ldb[i] = p.ldb;
      ldc[i] = p.ldc;
    }
    std::vector<cublasOperation_t> trans_a(count, ta), trans_b(count, tb);
    std::vector<float> alphas(count, static_cast<float>(alpha)), betas(count, static_cast<float>(beta));
    std::vector<int> group_size(count, 1);
    void** staged = static_cast<void**>(ctx.stage(ptrs.data(), ptrs.size() * sizeof(void*)));
    MOE_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        ctx.cublas, trans_a.data(), trans_b.data(), m.data(), n.data(), k.data(), alphas.data(), staged, types.ab,
        lda.data(), staged + count, types.ab, ldb.data(), betas.data(), staged + 2 * count, types.c, ldc.data(),
        static_cast<int>(count), group_size.data(), CUBLAS_COMPUTE_32F));
  }
}

char* element_ptr(const Tensor& t, int64_t offset) {
  return static_cast<char*>(const_cast<void*>(t.raw())) + offset * static_cast<int64_t>(dtype_size(t.dtype()));
}

void check_group_rows(const std::vector<int64_t>& group_rows, int64_t rows, const char* op) {
  int64_t total = 0;
  for (int64_t m : group_rows) {
    MOE_CHECK(m >= 0, op, ": negative group size ", m);
    total += m;
  }
  MOE_CHECK(total == rows, op, ": group rows sum to ", total, ", a has ", rows);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// memory

void fill(Context& ctx, Tensor& t, double value) {
  const int64_t n = t.numel();
  if (n == 0) return;
  if (value == 0.0) {  // every dtype's zero is all-zero bits
    MOE_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, t.nbytes(), ctx.stream));
    return;
  }
  switch (t.dtype()) {
    case DType::kF32:
      launch_elementwise(ctx, n, fill_kernel<float>, static_cast<float*>(t.raw()), n, static_cast<float>(value));
      return;
    case DType::kF64:
      launch_elementwise(ctx, n, fill_kernel<double>, static_cast<double*>(t.raw()), n, value);
      return;
    case DType::kI32:
      launch_elementwise(ctx, n, fill_kernel<int32_t>, static_cast<int32_t*>(t.raw()), n,
                         static_cast<int32_t>(value));
      return;
    case DType::kBF16:
      launch_elementwise(ctx, n, fill_kernel<__nv_bfloat16>, static_cast<__nv_bfloat16*>(t.raw()), n,
                         __float2bfloat16(static_cast<float>(value)));
      return;
  }
  MOE_CHECK(false, "fill: unknown dtype of ", t.str());
}

void convert(Context& ctx, const Tensor& src, Tensor& dst) {
  MOE_CHECK(src.numel() == dst.numel(), "convert: ", src.str(), " to ", dst.str());
  const int64_t n = src.numel();
  if (n == 0) return;
  if (src.dtype() == dst.dtype()) {
    MOE_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, ctx.stream));
    return;
  }
  launch_elementwise(ctx, n, convert_kernel, float_in(src, "convert source"), float_out(dst, "convert target"), n);
}

// ---------------------------------------------------------------------------------------------------
// dense algebra

void gemm(Context& ctx, const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, double alpha,
          double beta) {
  MOE_CHECK(a.rank() == 2 && b.rank() == 2 && c.rank() == 2, "gemm needs 2-D tensors: ", a.str(), b.str(), c.str());
  const GemmTypes types = gemm_types(a, b, c, false, "gemm");
  const bool at = ta == Trans::kT, bt = tb == Trans::kT;
  const int64_t m = at ? a.dim(1) : a.dim(0), k = at ? a.dim(0) : a.dim(1);
  const int64_t kb = bt ? b.dim(1) : b.dim(0), n = bt ? b.dim(0) : b.dim(1);
  MOE_CHECK(k == kb && c.dim(0) == m && c.dim(1) == n, "gemm shapes: ", a.str(), at ? "^T" : "", " x ", b.str(),
            bt ? "^T" : "", " -> ", c.str());
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_by_beta(ctx, c, beta);
  // Column-major C^T (n, m) = op(b)^T (n, k) op(a)^T (k, m); a row-major matrix is its own transpose
  // column-major, with its row length as leading dimension.
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  MOE_CUBLAS_CHECK(cublasGemmEx(ctx.cublas, blas_op(tb), blas_op(ta), to_int(n, "gemm n"), to_int(m, "gemm m"),
                                to_int(k, "gemm k"), &alpha_f, b.raw(), types.ab, to_int(b.dim(1), "gemm ldb"),
                                a.raw(), types.ab, to_int(a.dim(1), "gemm lda"), &beta_f, c.raw(), types.c,
                                to_int(n, "gemm ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void grouped_gemm(Context& ctx, const Tensor& a, const Tensor& b, Trans tb, Tensor& c,
                  const std::vector<int64_t>& group_rows, double alpha, double beta) {
  MOE_CHECK(a.rank() == 2 && b.rank() == 3 && c.rank() == 2, "grouped_gemm shapes: ", a.str(), b.str(), c.str());
  MOE_CHECK(static_cast<int64_t>(group_rows.size()) == b.dim(0), "grouped_gemm: ", group_rows.size(),
            " groups for weights ", b.str());
  const GemmTypes types = gemm_types(a, b, c, true, "grouped_gemm");
  const bool bt = tb == Trans::kT;
  const int64_t k = a.dim(1), n = bt ? b.dim(1) : b.dim(2);
  MOE_CHECK((bt ? b.dim(2) : b.dim(1)) == k && c.dim(1) == n && c.dim(0) == a.dim(0), "grouped_gemm shapes: ",
            a.str(), " x ", b.str(), bt ? "^T" : "", " -> ", c.str());
  check_group_rows(group_rows, a.dim(0), "grouped_gemm");
  if (a.dim(0) == 0 || n == 0) return;
  if (k == 0) return scale_by_beta(ctx, c, beta);  // every row of c belongs to a non-empty group

  // Group g, column-major: c_g^T (n, m_g) = op(b_g)^T (n, k) a_g^T (k, m_g).
  std::vector<GroupProblem> problems;
  int64_t row = 0;
  for (size_t g = 0; g < group_rows.size(); ++g) {
    const int64_t m = group_rows[g];
    if (m > 0) {
      GroupProblem p{element_ptr(b, static_cast<int64_t>(g) * n * k), element_ptr(a, row * k), element_ptr(c, row * n),
                     to_int(n, "grouped_gemm n"), to_int(m, "grouped_gemm group rows"), to_int(k, "grouped_gemm k"),
                     to_int(bt ? k : n, "grouped_gemm weight row length"), to_int(k, "grouped_gemm k"),
                     to_int(n, "grouped_gemm n")};
      if (types.ab == CUDA_R_16BF) check_half_alignment(p, "grouped_gemm");
      problems.push_back(p);
    }
    row += m;
  }
  run_grouped(ctx, blas_op(tb), CUBLAS_OP_N, problems, types, alpha, beta);
}

void grouped_gemm_tn(Context& ctx, const Tensor& a, const Tensor& b, Tensor& c,
                     const std::vector<int64_t>& group_rows, double alpha, double beta) {
  MOE_CHECK(a.rank() == 2 && b.rank() == 2 && c.rank() == 3, "grouped_gemm_tn shapes: ", a.str(), b.str(), c.str());
  const GemmTypes types = gemm_types(a, b, c, true, "grouped_gemm_tn");
  const int64_t p = a.dim(1), q = b.dim(1);
  MOE_CHECK(a.dim(0) == b.dim(0) && c.dim(0) == static_cast<int64_t>(group_rows.size()) && c.dim(1) == p &&
                c.dim(2) == q,
            "grouped_gemm_tn shapes: ", a.str(), "^T x ", b.str(), " -> ", c.str());
  check_group_rows(group_rows, a.dim(0), "grouped_gemm_tn");
  if (p == 0 || q == 0) return;

  // Group g, column-major: c[g]^T (q, p) = b_g^T (q, m_g) a_g (m_g, p). A group without rows is a
  // GEMM with k = 0: c[g] = beta * c[g], done here for each run of consecutive empty groups.
  std::vector<GroupProblem> problems;
  std::vector<std::pair<int64_t, int64_t>> empty_runs;  // [first, last) groups
  int64_t row = 0;
  for (size_t g = 0; g < group_rows.size(); ++g) {
    const int64_t m = group_rows[g], gi = static_cast<int64_t>(g);
    if (m == 0) {
      if (!empty_runs.empty() && empty_runs.back().second == gi) {
        ++empty_runs.back().second;
      } else {
        empty_runs.push_back({gi, gi + 1});
      }
      continue;
    }
    GroupProblem pr{element_ptr(b, row * q), element_ptr(a, row * p), element_ptr(c, gi * p * q),
                    to_int(q, "grouped_gemm_tn q"), to_int(p, "grouped_gemm_tn p"),
                    to_int(m, "grouped_gemm_tn group rows"), to_int(q, "grouped_gemm_tn q"),
                    to_int(p, "grouped_gemm_tn p"), to_int(q, "grouped_gemm_tn q")};
    if (types.ab == CUDA_R_16BF) check_half_alignment(pr, "grouped_gemm_tn");
    problems.push_back(pr);
    row += m;
  }
  for (const auto& [first, last] : empty_runs) {
    Tensor part = c.rows(first, last);
    scale_by_beta(ctx, part, beta);
  }
  run_grouped(ctx, CUBLAS_OP_N, CUBLAS_OP_T, problems, types, alpha, beta);
}

void axpy(Context& ctx, double alpha, const Tensor& x, Tensor& y) {
  MOE_CHECK(x.numel() == y.numel(), "axpy: ", x.str(), " vs ", y.str());
  const int64_t n = x.numel();
  if (n == 0) return;
  launch_elementwise(ctx, n, axpy_kernel, static_cast<float>(alpha), float_in(x, "axpy x"), float_out(y, "axpy y"),
                     n);
}

void scale(Context& ctx, Tensor& x, double alpha) {
  const int64_t n = x.numel();
  if (n == 0) return;
  launch_elementwise(ctx, n, scale_kernel, float_out(x, "scale x"), n, static_cast<float>(alpha));
}

double sum_squares(Context& ctx, const Tensor& x) {
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  const FloatIn in = float_in(x, "sum_squares x");
  const unsigned blocks = std::min<unsigned>(grid_for(n, kBlock), kMaxPartials);
  Scratch partial(ctx.stream, blocks * sizeof(double));
  Scratch result(ctx.stream, sizeof(ReduceResult));
  sum_squares_kernel<<<blocks, kBlock, 0, ctx.stream>>>(in, n, partial.as<double>());
  MOE_CUDA_LAUNCH_CHECK();
  finish_sum_kernel<double><<<1, 1024, 0, ctx.stream>>>(partial.as<double>(), blocks, nullptr,
                                                          result.as<ReduceResult>());
  MOE_CUDA_LAUNCH_CHECK();
  return fetch_result(ctx, result.as<ReduceResult>()).sum;
}

// ---------------------------------------------------------------------------------------------------
// activations

void swiglu_forward(Context& ctx, const Tensor& a, const Tensor& b, Tensor& h) {
  MOE_CHECK(a.numel() == b.numel() && a.numel() == h.numel(), "swiglu: ", a.str(), b.str(), h.str());
  launch_elementwise(ctx, a.numel(), swiglu_forward_kernel, float_in(a, "swiglu a"), float_in(b, "swiglu b"),
                     float_out(h, "swiglu h"), a.numel());
}

void swiglu_backward(Context& ctx, const Tensor& dh, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db) {
  const int64_t n = a.numel();
  MOE_CHECK(dh.numel() == n && b.numel() == n && da.numel() == n && db.numel() == n, "swiglu_backward shapes: ",
            dh.str(), a.str(), b.str(), da.str(), db.str());
  launch_elementwise(ctx, n, swiglu_backward_kernel, float_in(dh, "swiglu dh"), float_in(a, "swiglu a"),
                     float_in(b, "swiglu b"), float_out(da, "swiglu da"), float_out(db, "swiglu db"), n);
}

void activation_forward(Context& ctx, Activation act, const Tensor& a, Tensor& h) {
  MOE_CHECK(a.numel() == h.numel(), "activation: ", a.str(), h.str());
  launch_elementwise(ctx, a.numel(), activation_forward_kernel, act, float_in(a, "activation a"),
                     float_out(h, "activation h"), a.numel());
}

void activation_backward(Context& ctx, Activation act, const Tensor& dh, const Tensor& a, Tensor& da) {
  MOE_CHECK(a.numel() == dh.numel() && a.numel() == da.numel(), "activation_backward shapes: ", dh.str(), a.str(),
            da.str());
  launch_elementwise(ctx, a.numel(), activation_backward_kernel, act, float_in(dh, "activation dh"),
                     float_in(a, "activation a"), float_out(da, "activation da"), a.numel());
}

// ---------------------------------------------------------------------------------------------------
// embedding, norm, loss

void embedding_forward(Context& ctx, const Tensor& ids, const Tensor& table, Tensor& out) {
  MOE_CHECK(table.rank() == 2, "embedding table must be 2-D: ", table.str());
  const int64_t num_tokens = ids.numel(), h = table.dim(1);
  check_shape(out, {num_tokens, h}, "embedding output");
  MOE_CHECK(out.dtype() == table.dtype(), "embedding: output ", out.str(), " for table ", table.str());
  copy_rows(ctx, table, ids, out, num_tokens, static_cast<size_t>(h) * dtype_size(table.dtype()), table.dim(0),
            RowCopy::kGather);
}

void embedding_backward(Context& ctx, const Tensor& ids, const Tensor& dout, Tensor& dtable) {
  MOE_CHECK(dtable.rank() == 2, "embedding gradient table must be 2-D: ", dtable.str());
  const int64_t num_tokens = ids.numel(), h = dtable.dim(1);
  check_shape(dout, {num_tokens, h}, "embedding gradient");
  float* table = f32_out(dtable, "embedding dtable");
  if (num_tokens == 0 || h == 0) return;
  launch_elementwise(ctx, num_tokens * h, embedding_backward_kernel, i32_in(ids, "embedding ids"),
                     float_in(dout, "embedding dout"), table, num_tokens, h, dtable.dim(0));
}

void rmsnorm_forward(Context& ctx, const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  MOE_CHECK(x.rank() == 2, "rmsnorm input must be 2-D: ", x.str());
  const int64_t rows = x.dim(0), h = x.dim(1);
  check_shape(y, x.shape(), "rmsnorm output");
  check_shape(rstd, {rows}, "rmsnorm rstd");
  MOE_CHECK(w.numel() == h, "rmsnorm weight ", w.str(), " for ", x.str());
  const FloatIn in = float_in(x, "rmsnorm x");
  const FloatOut out = float_out(y, "rmsnorm y");
  const float* pw = f32_in(w, "rmsnorm w");
  float* pr = f32_out(rstd, "rmsnorm rstd");
  if (rows == 0) return;
  MOE_CHECK(rows <= INT_MAX, "rmsnorm: ", rows, " rows");
  const int block = row_block(h);
  rmsnorm_forward_kernel<<<static_cast<unsigned>(rows), block, 0, ctx.stream>>>(in, pw, eps, out, pr, h);
  MOE_CUDA_LAUNCH_CHECK();
}

void rmsnorm_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Tensor& dx, Tensor& dw) {
  MOE_CHECK(x.rank() == 2, "rmsnorm input must be 2-D: ", x.str());
  const int64_t rows = x.dim(0), h = x.dim(1);
  check_shape(dy, x.shape(), "rmsnorm dy");
  check_shape(dx, x.shape(), "rmsnorm dx");
  check_shape(rstd, {rows}, "rmsnorm rstd");
  MOE_CHECK(w.numel() == h && dw.numel() == h, "rmsnorm weight ", w.str(), " / gradient ", dw.str(), " for ",
            x.str());
  const FloatIn pdy = float_in(dy, "rmsnorm dy"), px = float_in(x, "rmsnorm x");
  const FloatOut pdx = float_out(dx, "rmsnorm dx");
  const float* pw = f32_in(w, "rmsnorm w");
  const float* pr = f32_in(rstd, "rmsnorm rstd");
  float* pdw = f32_out(dw, "rmsnorm dw");
  if (rows == 0 || h == 0) return;
  const int64_t num_sms = ctx.num_sms > 0 ? ctx.num_sms : 132;
  const int64_t blocks = std::min(rows, 2 * num_sms);
  Scratch partial(ctx.stream, static_cast<size_t>(blocks * h) * sizeof(float));
  rmsnorm_backward_kernel<<<static_cast<unsigned>(blocks), row_block(h), 0, ctx.stream>>>(
      pdy, px, pw, pr, pdx, partial.as<float>(), rows, h);
  MOE_CUDA_LAUNCH_CHECK();
  launch_elementwise(ctx, h, column_sum_kernel, partial.as<float>(), blocks, h, pdw);
}

double cross_entropy(Context& ctx, const Tensor& logits, const Tensor& targets, double grad_scale,
                     Tensor& dlogits) {
  MOE_CHECK(logits.rank() == 2, "cross_entropy logits must be 2-D: ", logits.str());
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  check_shape(dlogits, logits.shape(), "cross_entropy dlogits");
  MOE_CHECK(targets.numel() == rows, "cross_entropy: ", targets.numel(), " targets for ", rows, " rows");
  const FloatIn in = float_in(logits, "cross_entropy logits");
  const FloatOut out = float_out(dlogits, "cross_entropy dlogits");
  const int32_t* pt = i32_in(targets, "cross_entropy targets");
  if (rows == 0) return 0.0;
  MOE_CHECK(vocab > 0, "cross_entropy: empty vocabulary in ", logits.str());
  MOE_CHECK(rows <= INT_MAX, "cross_entropy: ", rows, " rows");

  Scratch loss(ctx.stream, static_cast<size_t>(rows) * sizeof(float));
  Scratch bad(ctx.stream, 2 * sizeof(int32_t));
  Scratch result(ctx.stream, sizeof(ReduceResult));
  MOE_CUDA_CHECK(cudaMemsetAsync(bad.as<int32_t>(), 0, 2 * sizeof(int32_t), ctx.stream));
  cross_entropy_kernel<<<static_cast<unsigned>(rows), row_block(vocab), 0, ctx.stream>>>(
      in, pt, static_cast<float>(grad_scale), out, loss.as<float>(), bad.as<int32_t>(), vocab);
  MOE_CUDA_LAUNCH_CHECK();
  finish_sum_kernel<float><<<1, 1024, 0, ctx.stream>>>(loss.as<float>(), rows, bad.as<int32_t>(),
                                                        result.as<ReduceResult>());
  MOE_CUDA_LAUNCH_CHECK();
  const ReduceResult r = fetch_result(ctx, result.as<ReduceResult>());
  MOE_CHECK(r.num_bad == 0, "target ", r.bad_value, " outside vocabulary of ", vocab, " (", r.num_bad, " rows)");
  return r.sum;
}

// ---------------------------------------------------------------------------------------------------
// rows

void gather_rows(Context& ctx, const Tensor& src, const Tensor& idx, Tensor& dst) {
  const int64_t n = idx.numel(), h = row_len(src);
  MOE_CHECK(src.rank() >= 1 && dst.rank() >= 1 && dst.dim(0) == n && row_len(dst) == h, "gather_rows shapes: ",
            src.str(), idx.str(), dst.str());
  MOE_CHECK(src.dtype() == dst.dtype(), "gather_rows: dtype mismatch ", src.str(), " vs ", dst.str());
  copy_rows(ctx, src, idx, dst, n, static_cast<size_t>(h) * dtype_size(src.dtype()), src.dim(0), RowCopy::kGather);
}

void scatter_rows(Context& ctx, const Tensor& src, const Tensor& idx, Tensor& dst) {
  const int64_t n = idx.numel(), h = row_len(dst);
  MOE_CHECK(src.rank() >= 1 && dst.rank() >= 1 && src.dim(0) == n && row_len(src) == h, "scatter_rows shapes: ",
            src.str(), idx.str(), dst.str());
  MOE_CHECK(src.dtype() == dst.dtype(), "scatter_rows: dtype mismatch ", src.str(), " vs ", dst.str());
  copy_rows(ctx, src, idx, dst, n, static_cast<size_t>(h) * dtype_size(src.dtype()), dst.dim(0), RowCopy::kScatter);
}

// ---------------------------------------------------------------------------------------------------
// optimizer

void adamw_step(Context& ctx, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& args) {
  const int64_t n = param.numel();
  MOE_CHECK(grad.numel() == n && m.numel() == n && v.numel() == n, "adamw shapes: ", param.str(), grad.str(),
            m.str(), v.str());
  const double bc1 = 1.0 - std::pow(args.beta1, static_cast<double>(args.step));
  const double bc2 = 1.0 - std::pow(args.beta2, static_cast<double>(args.step));
  launch_elementwise(ctx, n, adamw_kernel, f32_out(param, "adamw param"), f32_in(grad, "adamw grad"),
                     f32_out(m, "adamw m"), f32_out(v, "adamw v"), n, static_cast<float>(args.beta1),
                     static_cast<float>(args.beta2), static_cast<float>(args.lr),
                     static_cast<float>(args.weight_decay), static_cast<float>(args.eps),
                     static_cast<float>(1.0 / bc1), static_cast<float>(1.0 / bc2));
}

void sgd_step(Context& ctx, Tensor& param, const Tensor& grad, double lr, double weight_decay) {
  const int64_t n = param.numel();
  MOE_CHECK(grad.numel() == n, "sgd shapes: ", param.str(), grad.str());
  launch_elementwise(ctx, n, sgd_kernel, f32_out(param, "sgd param"), f32_in(grad, "sgd grad"), n,
                     static_cast<float>(lr), static_cast<float>(weight_decay));
}

}  // namespace moe::cuda
