// CPU permutation family (runtime/ops/permute.h): token rows to the expert-major layout and back, row
// gather/scatter, the embedding. The contracts (runtime/ops/permute.cc) have checked shapes and dtypes;
// the index values are read here, so their ranges are checked here.
#include <algorithm>
#include <cstring>
#include <vector>

#include "runtime/cpu/cpu_common.h"
#include "runtime/ops/permute.h"

namespace moe::cpu {

namespace {

// Zeroes the rows of `out` that row_idx names nowhere (write first: the rows it names are written in
// full by the caller, so only the others need the memset, e.g. the capacity slack of the padded layout).
void zero_unnamed_rows(const Tensor& row_idx, Tensor& out) {
  std::vector<uint8_t> named(static_cast<size_t>(out.dim(0)), 0);
  const int32_t* rows = row_idx.data<int32_t>();
  for (int64_t i = 0, n = row_idx.numel(); i < n; ++i) {
    if (rows[i] >= 0) {
      MOE_CHECK(rows[i] < out.dim(0), "permute: row ", rows[i], " outside ", out.str());
      named[static_cast<size_t>(rows[i])] = 1;
    }
  }
  const size_t row_bytes = static_cast<size_t>(row_len(out)) * dtype_size(out.dtype());
  for (int64_t r = 0; r < out.dim(0); ++r) {
    if (!named[static_cast<size_t>(r)]) std::memset(static_cast<char*>(out.raw()) + r * row_bytes, 0, row_bytes);
  }
}

}  // namespace

void permute(Backend& backend, const Tensor& x, const Tensor& row_idx, Tensor& out) {
  int64_t t_count = x.dim(0), h = x.dim(1), k = row_idx.dim(1);
  zero_unnamed_rows(row_idx, out);
  const int32_t* rows = row_idx.data<int32_t>();
  const size_t row_bytes = static_cast<size_t>(h) * dtype_size(x.dtype());  // a copy: F32, F64 or BF16 rows
  for (int64_t t = 0; t < t_count; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int32_t r = rows[t * k + j];
      if (r < 0) continue;
      MOE_CHECK(r < out.dim(0), "permute: row ", r, " outside ", out.str());
      std::memcpy(static_cast<char*>(out.raw()) + r * row_bytes, static_cast<const char*>(x.raw()) + t * row_bytes,
                  row_bytes);
    }
}

void permute_backward(Backend&, const Tensor& dout, const Tensor& row_idx, Tensor& dx) {
  int64_t t_count = dx.dim(0), h = dx.dim(1), k = row_idx.dim(1);
  const int32_t* rows = row_idx.data<int32_t>();
  dispatch_float(dx.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t)
      for (int64_t j = 0; j < k; ++j) {
        int32_t r = rows[t * k + j];
        if (r < 0) continue;
        const T* src = dout.data<T>() + int64_t{r} * h;
        T* dst = dx.data<T>() + t * h;
        for (int64_t c = 0; c < h; ++c) dst[c] += src[c];
      }
  });
}

void unpermute(Backend&, const Tensor& rows, const Tensor& row_idx, const Tensor& gate, Tensor& y) {
  int64_t t_count = y.dim(0), h = y.dim(1), k = row_idx.dim(1);
  const int32_t* ri = row_idx.data<int32_t>();
  dispatch_float(y.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pg = gate.data<T>();
    for (int64_t t = 0; t < t_count; ++t) {
      T* dst = y.data<T>() + t * h;
      std::fill(dst, dst + h, T(0));
      for (int64_t j = 0; j < k; ++j) {
        int32_t r = ri[t * k + j];
        if (r < 0) continue;
        T g = pg[t * k + j];
        const T* src = rows.data<T>() + int64_t{r} * h;
        for (int64_t c = 0; c < h; ++c) dst[c] += g * src[c];
      }
    }
  });
}

void unpermute_backward(Backend& backend, const Tensor& dy, const Tensor& rows, const Tensor& row_idx, const Tensor& gate,
                        Tensor& drows, Tensor& dgate) {
  int64_t t_count = dy.dim(0), h = dy.dim(1), k = row_idx.dim(1);
  zero_unnamed_rows(row_idx, drows);
  const int32_t* ri = row_idx.data<int32_t>();
  dispatch_float(dy.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pg = gate.data<T>();
    T* pdg = dgate.data<T>();
    for (int64_t t = 0; t < t_count; ++t)
      for (int64_t j = 0; j < k; ++j) {
        int32_t r = ri[t * k + j];
        if (r < 0) {
          pdg[t * k + j] = 0;
          continue;
        }
        const T* pdy = dy.data<T>() + t * h;
        const T* src = rows.data<T>() + int64_t{r} * h;
        T* dst = drows.data<T>() + int64_t{r} * h;
        T g = pg[t * k + j], dot = 0;
        for (int64_t c = 0; c < h; ++c) {
          dst[c] = g * pdy[c];
          dot += pdy[c] * src[c];
        }
        pdg[t * k + j] = dot;
      }
  });
}

void gather_rows(Backend&, const Tensor& src, const Tensor& idx, Tensor& dst) {
  int64_t n = idx.numel(), h = row_len(src);
  const int32_t* pi = idx.data<int32_t>();
  size_t bytes = static_cast<size_t>(h) * dtype_size(src.dtype());
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(pi[i] >= 0 && pi[i] < src.dim(0), "gather_rows: row ", pi[i], " outside ", src.str());
    std::memcpy(static_cast<char*>(dst.raw()) + i * bytes, static_cast<const char*>(src.raw()) + pi[i] * bytes, bytes);
  }
}

void scatter_rows(Backend& backend, const Tensor& src, const Tensor& idx, Tensor& dst) {
  int64_t n = idx.numel(), h = row_len(dst);
  const int32_t* pi = idx.data<int32_t>();
  size_t bytes = static_cast<size_t>(h) * dtype_size(src.dtype());
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(pi[i] >= 0 && pi[i] < dst.dim(0), "scatter_rows: row ", pi[i], " outside ", dst.str());
    std::memcpy(static_cast<char*>(dst.raw()) + pi[i] * bytes, static_cast<const char*>(src.raw()) + i * bytes, bytes);
  }
}

void embedding_forward(Backend& backend, const Tensor& ids, const Tensor& table, Tensor& out) {
  int64_t t_count = ids.numel(), h = table.dim(1), v = table.dim(0);
  const int32_t* pid = ids.data<int32_t>();
  dispatch_float(table.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t) {
      MOE_CHECK(pid[t] >= 0 && pid[t] < v, "token id ", pid[t], " outside vocabulary of ", v);
      std::memcpy(out.data<T>() + t * h, table.data<T>() + int64_t{pid[t]} * h, sizeof(T) * h);
    }
  });
}

void embedding_backward(Backend&, const Tensor& ids, const Tensor& dout, Tensor& dtable) {
  int64_t t_count = ids.numel(), h = dtable.dim(1);
  const int32_t* pid = ids.data<int32_t>();
  dispatch_float(dtable.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t t = 0; t < t_count; ++t) {
      T* row = dtable.data<T>() + int64_t{pid[t]} * h;
      const T* g = dout.data<T>() + t * h;
      for (int64_t j = 0; j < h; ++j) row[j] += g[j];
    }
  });
}

}  // namespace moe::cpu
