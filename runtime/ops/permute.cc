// Contracts of the permutation family (runtime/ops/permute.h), run before either device's implementation.
#include "runtime/ops/permute.h"

#include "runtime/ops/contract.h"

namespace moe {
namespace {

constexpr FloatRule kSums = FloatRule::kF32OnCuda;  // the CUDA kernels that add or scale rows take F32

// Elements per row: the product of every dimension after the first.
int64_t row_len(const Tensor& t) {
  int64_t n = 1;
  for (int i = 1; i < t.rank(); ++i) n *= t.dim(i);
  return n;
}

// tokens (T, H) and row_idx (T, k) I32: the token side of permute and unpermute.
void check_token_rows(const char* op, const Tensor& tokens, const Tensor& row_idx) {
  MOE_CHECK(tokens.rank() == 2 && row_idx.rank() == 2 && row_idx.dim(0) == tokens.dim(0), op, " shapes: tokens ",
            tokens.str(), ", row_idx ", row_idx.str());
  check_dtype(op, row_idx, DType::kI32, "row_idx");
}

// rows (R, H): the expert-major side, with the tokens' row length.
void check_expert_rows(const char* op, const Tensor& rows, const Tensor& tokens) {
  MOE_CHECK(rows.rank() == 2 && rows.dim(1) == tokens.dim(1), op, " shapes: rows ", rows.str(), " for tokens ",
            tokens.str());
}

}  // namespace

void check_permute(Backend& b, const Tensor& x, const Tensor& row_idx, Tensor& out) {
  check_token_rows("permute", x, row_idx);
  check_expert_rows("permute", out, x);
  check_floats(b, "permute", {{x, "x", FloatRule::kCopy}, {out, "out", FloatRule::kCopy}});
  check_same_dtype("permute", x, "x", out, "out");
}

void check_permute_backward(Backend& b, const Tensor& dout, const Tensor& row_idx, Tensor& dx) {
  check_token_rows("permute_backward", dx, row_idx);
  check_expert_rows("permute_backward", dout, dx);
  check_floats(b, "permute_backward", {{dout, "dout", kSums}, {dx, "dx", kSums}});
}

void check_unpermute(Backend& b, const Tensor& rows, const Tensor& row_idx, const Tensor& gate, Tensor& y) {
  check_token_rows("unpermute", y, row_idx);
  check_expert_rows("unpermute", rows, y);
  check_shape(gate, row_idx.shape(), "unpermute gate");
  check_floats(b, "unpermute", {{rows, "rows", kSums}, {gate, "gate", kSums}, {y, "y", kSums}});
}

void check_unpermute_backward(Backend& b, const Tensor& dy, const Tensor& rows, const Tensor& row_idx,
                              const Tensor& gate, Tensor& drows, Tensor& dgate) {
  check_token_rows("unpermute_backward", dy, row_idx);
  check_expert_rows("unpermute_backward", rows, dy);
  check_shape(gate, row_idx.shape(), "unpermute_backward gate");
  check_shape(drows, rows.shape(), "unpermute_backward drows");
  check_shape(dgate, gate.shape(), "unpermute_backward dgate");
  check_floats(b, "unpermute_backward",
               {{dy, "dy", kSums}, {rows, "rows", kSums}, {gate, "gate", kSums}, {drows, "drows", kSums},
                {dgate, "dgate", kSums}});
}

void check_gather_rows(Backend& b, const Tensor& src, const Tensor& idx, Tensor& dst) {
  MOE_CHECK(src.rank() >= 1 && dst.rank() >= 1 && dst.dim(0) == idx.numel() && row_len(dst) == row_len(src),
            "gather_rows shapes: ", src.str(), idx.str(), dst.str());
  check_dtype("gather_rows", idx, DType::kI32, "idx");
  check_same_dtype("gather_rows", src, "src", dst, "dst");
}

void check_scatter_rows(Backend& b, const Tensor& src, const Tensor& idx, Tensor& dst) {
  MOE_CHECK(src.rank() >= 1 && dst.rank() >= 1 && src.dim(0) == idx.numel() && row_len(src) == row_len(dst),
            "scatter_rows shapes: ", src.str(), idx.str(), dst.str());
  check_dtype("scatter_rows", idx, DType::kI32, "idx");
  check_same_dtype("scatter_rows", src, "src", dst, "dst");
}

void check_embedding_forward(Backend& b, const Tensor& ids, const Tensor& table, Tensor& out) {
  MOE_CHECK(table.rank() == 2, "embedding_forward: table must be 2-D: ", table.str());
  check_shape(out, {ids.numel(), table.dim(1)}, "embedding_forward out");
  check_dtype("embedding_forward", ids, DType::kI32, "ids");
  check_floats(b, "embedding_forward", {{table, "table"}, {out, "out"}});
  check_same_dtype("embedding_forward", table, "table", out, "out");
}

void check_embedding_backward(Backend& b, const Tensor& ids, const Tensor& dout, Tensor& dtable) {
  MOE_CHECK(dtable.rank() == 2, "embedding_backward: dtable must be 2-D: ", dtable.str());
  check_shape(dout, {ids.numel(), dtable.dim(1)}, "embedding_backward dout");
  check_dtype("embedding_backward", ids, DType::kI32, "ids");
  check_floats(b, "embedding_backward", {{dout, "dout"}, {dtable, "dtable", FloatRule::kF32OnCuda}});
}

}  // namespace moe
