// Permutation family: moving rows between token order and the dispatcher's expert-major layout, row
// gather/scatter, and the token embedding (a gather by id).
//
// Index tensors are I32. Dtypes: CPU F32 or F64, one per call; CUDA: F32 where rows are added or scaled
// (permute_backward, unpermute, unpermute_backward, embedding_backward's dtable), F32 or BF16 where they
// are copied. The contracts are in runtime/ops/permute.cc. Index values are device memory, so the
// contracts do not read them: the CPU checks them in permute, gather_rows, scatter_rows and
// embedding_forward, and trusts them in the others (row indices that route wrote, ids that
// embedding_forward read); on CUDA an index cannot be checked without a host wait, so an out-of-range one
// reads as a zero row (gathers) or is skipped (scatters).
#pragma once

#include "runtime/ops/op.h"

namespace moe {

// out (R, H): rows row_idx[t, j] = x[t]; every other row zero. row_idx (T, k), -1 = not sent. A copy, so
// BF16 rows too (on both backends), x and out of one dtype.
MOE_OP(void, permute, (Backend& b, const Tensor& x, const Tensor& row_idx, Tensor& out), (b, x, row_idx, out))
// dx (T, H) += sum_j dout[row_idx[t, j]]
MOE_OP(void, permute_backward, (Backend& b, const Tensor& dout, const Tensor& row_idx, Tensor& dx),
       (b, dout, row_idx, dx))
// y (T, H) = sum_j gate[t, j] * rows[row_idx[t, j]], gate (T, k) (written, not accumulated: zero for a token with no
// row; only the rows row_idx names are read)
MOE_OP(void, unpermute, (Backend& b, const Tensor& rows, const Tensor& row_idx, const Tensor& gate, Tensor& y),
       (b, rows, row_idx, gate, y))
// drows[row_idx[t, j]] = gate[t, j] * dy[t] (other rows zero); dgate[t, j] = <dy[t], rows[row_idx[t, j]]>
// (0 when unsent)
MOE_OP(void, unpermute_backward,
       (Backend& b, const Tensor& dy, const Tensor& rows, const Tensor& row_idx, const Tensor& gate, Tensor& drows,
        Tensor& dgate),
       (b, dy, rows, row_idx, gate, drows, dgate))
// dst[i] = src[idx[i]] (rows of any dtype, src and dst the same)
MOE_OP(void, gather_rows, (Backend& b, const Tensor& src, const Tensor& idx, Tensor& dst), (b, src, idx, dst))
// dst[idx[i]] = src[i]; rows of dst not named in idx are left as they are
MOE_OP(void, scatter_rows, (Backend& b, const Tensor& src, const Tensor& idx, Tensor& dst), (b, src, idx, dst))

// out (T, H) = table[ids]; ids (T) I32, table (V, H) of one of the device's floats, out of its dtype
MOE_OP(void, embedding_forward, (Backend& b, const Tensor& ids, const Tensor& table, Tensor& out),
       (b, ids, table, out))
// dtable[ids[t]] += dout[t] (CUDA: F32 atomics, so the order of repeated ids is not fixed)
MOE_OP(void, embedding_backward, (Backend& b, const Tensor& ids, const Tensor& dout, Tensor& dtable),
       (b, ids, dout, dtable))

}  // namespace moe
