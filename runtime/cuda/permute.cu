// CUDA permutation family (runtime/ops/permute.h). Permute/unpermute give a block to a token (or an
// assignment) and stride its threads over H. gather/scatter/embedding copies move rows as the widest of
// 16/8/4/2/1-byte words that the row size and both base addresses allow. embedding_backward accumulates
// with float atomicAdd (the order of repeated ids is not fixed).
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/permute.h"

namespace moe::cuda {
namespace {

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


// out[row_idx[t, j]] = x[t]: one block per assignment; a copy of elements of Word's size (F32 or BF16)
template <typename Word>
__global__ void permute_kernel(const Word* x, const int* row_idx, Word* out, int64_t assignments, int k,
                               int64_t h) {
  for (int64_t a = blockIdx.x; a < assignments; a += gridDim.x) {
    int r = row_idx[a];
    if (r < 0) continue;
    const Word* src = x + (a / k) * h;
    Word* dst = out + int64_t{r} * h;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) dst[c] = src[c];
  }
}

// dx[t] += sum_j dout[row_idx[t, j]]: one block per token
__global__ void permute_backward_kernel(const float* dout, const int* row_idx, float* dx, int64_t tokens, int k,
                                        int64_t h) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
      float acc = dx[t * h + c];
      for (int j = 0; j < k; ++j) {
        int r = row_idx[t * k + j];
        if (r >= 0) acc += dout[int64_t{r} * h + c];
      }
      dx[t * h + c] = acc;
    }
  }
}

// y[t] = sum_j gate[t, j] * rows[row_idx[t, j]]: one block per token
__global__ void unpermute_kernel(const float* rows, const int* row_idx, const float* gate, float* y, int64_t tokens,
                                 int k, int64_t h) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
      float acc = 0;
      for (int j = 0; j < k; ++j) {
        int r = row_idx[t * k + j];
        if (r >= 0) acc += gate[t * k + j] * rows[int64_t{r} * h + c];
      }
      y[t * h + c] = acc;
    }
  }
}

// drows[r] = g * dy[t]; dgate[t, j] = <dy[t], rows[r]>: one block per assignment
__global__ void unpermute_backward_kernel(const float* dy, const float* rows, const int* row_idx, const float* gate,
                                          float* drows, float* dgate, int64_t assignments, int k, int64_t h) {
  __shared__ float partial[kBlock / 32];
  for (int64_t a = blockIdx.x; a < assignments; a += gridDim.x) {
    int r = row_idx[a];
    if (r < 0) {
      if (threadIdx.x == 0) dgate[a] = 0;
      continue;
    }
    const float* pdy = dy + (a / k) * h;
    const float* src = rows + int64_t{r} * h;
    float* dst = drows + int64_t{r} * h;
    float g = gate[a], dot = 0;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
      dst[c] = g * pdy[c];
      dot += pdy[c] * src[c];
    }
    for (int o = 16; o > 0; o /= 2) dot += __shfl_down_sync(0xffffffffu, dot, o);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0;
      for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += partial[w];
      dgate[a] = s;
    }
    __syncthreads();
  }
}

}  // namespace

void embedding_forward(Backend& backend, const Tensor& ids, const Tensor& table, Tensor& out) {
  Context& ctx = context(backend);
  const int64_t num_tokens = ids.numel(), h = table.dim(1);
  copy_rows(ctx, table, ids, out, num_tokens, static_cast<size_t>(h) * dtype_size(table.dtype()), table.dim(0),
            RowCopy::kGather);
}

void embedding_backward(Backend& backend, const Tensor& ids, const Tensor& dout, Tensor& dtable) {
  Context& ctx = context(backend);
  const int64_t num_tokens = ids.numel(), h = dtable.dim(1);
  float* table = f32_out(dtable, "embedding dtable");
  if (num_tokens == 0 || h == 0) return;
  launch_elementwise(ctx, num_tokens * h, embedding_backward_kernel, i32_in(ids, "embedding ids"),
                     float_in(dout, "embedding dout"), table, num_tokens, h, dtable.dim(0));
}


void gather_rows(Backend& backend, const Tensor& src, const Tensor& idx, Tensor& dst) {
  Context& ctx = context(backend);
  const int64_t n = idx.numel(), h = row_len(src);
  copy_rows(ctx, src, idx, dst, n, static_cast<size_t>(h) * dtype_size(src.dtype()), src.dim(0), RowCopy::kGather);
}

void scatter_rows(Backend& backend, const Tensor& src, const Tensor& idx, Tensor& dst) {
  Context& ctx = context(backend);
  const int64_t n = idx.numel(), h = row_len(dst);
  copy_rows(ctx, src, idx, dst, n, static_cast<size_t>(h) * dtype_size(src.dtype()), dst.dim(0), RowCopy::kScatter);
}


void permute(Backend& backend, const Tensor& x, const Tensor& row_idx, Tensor& out) {
  Context& ctx = context(backend);
  int64_t t_count = x.dim(0), h = x.dim(1), k = row_idx.dim(1);
  MOE_CUDA_CHECK(cudaMemsetAsync(out.raw(), 0, out.nbytes(), ctx.stream));
  if (t_count == 0) return;
  auto run = [&](auto word) {
    using Word = decltype(word);
    permute_kernel<Word><<<block_grid(t_count * k), kBlock, 0, ctx.stream>>>(
        static_cast<const Word*>(x.raw()), row_idx.data<int32_t>(), static_cast<Word*>(out.raw()), t_count * k,
        static_cast<int>(k), h);
  };
  if (x.dtype() == DType::kBF16) {
    run(uint16_t{});
  } else {
    run(float{});
  }
  MOE_CUDA_LAUNCH_CHECK();
}

void permute_backward(Backend& backend, const Tensor& dout, const Tensor& row_idx, Tensor& dx) {
  Context& ctx = context(backend);
  int64_t t_count = dx.dim(0), h = dx.dim(1), k = row_idx.dim(1);
  if (t_count == 0) return;
  permute_backward_kernel<<<block_grid(t_count), kBlock, 0, ctx.stream>>>(
      dout.data<float>(), row_idx.data<int32_t>(), dx.data<float>(), t_count, static_cast<int>(k), h);
  MOE_CUDA_LAUNCH_CHECK();
}

void unpermute(Backend& backend, const Tensor& rows, const Tensor& row_idx, const Tensor& gate, Tensor& y) {
  Context& ctx = context(backend);
  int64_t t_count = y.dim(0), h = y.dim(1), k = row_idx.dim(1);
  if (t_count == 0) return;
  unpermute_kernel<<<block_grid(t_count), kBlock, 0, ctx.stream>>>(rows.data<float>(), row_idx.data<int32_t>(),
                                                                  gate.data<float>(), y.data<float>(), t_count,
                                                                  static_cast<int>(k), h);
  MOE_CUDA_LAUNCH_CHECK();
}

void unpermute_backward(Backend& backend, const Tensor& dy, const Tensor& rows, const Tensor& row_idx,
                        const Tensor& gate, Tensor& drows, Tensor& dgate) {
  Context& ctx = context(backend);
  int64_t t_count = dy.dim(0), h = dy.dim(1), k = row_idx.dim(1);
  MOE_CUDA_CHECK(cudaMemsetAsync(drows.raw(), 0, drows.nbytes(), ctx.stream));
  if (t_count == 0) return;
  unpermute_backward_kernel<<<block_grid(t_count * k), kBlock, 0, ctx.stream>>>(
      dy.data<float>(), rows.data<float>(), row_idx.data<int32_t>(), gate.data<float>(), drows.data<float>(),
      dgate.data<float>(), t_count * k, static_cast<int>(k), h);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda
