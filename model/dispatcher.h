// Token dispatch and combine across the expert-parallel group, forward and backward, as a plan and steps.
//
// Two layouts of the same rows meet in the exchange:
//   token side   send (R, H): this rank's choices, expert-major over all experts (so peer-major too),
//                one block per (expert, group): `capacity` rows with a capacity (slots past the fill are
//                padding), the fill rows when dropless. RouteState.row_idx names the rows.
//   expert side  expert_in (N, H): the rows of this rank's experts, expert-major, in (source rank, group)
//                order within an expert; expert_rows() gives the rows of each local expert.
// A block is the rows one rank sends to one (local expert, group) of a peer. The plan lists where every
// block lies on both sides; the exchange moves each block straight from one side to the other, so there
// is no packing or compaction pass (MPI: derived datatypes, NCCL: one send/receive per block).
//
// Layouts of the expert side:
//   kPadded   with a capacity, every slot travels and reaches the experts, padding included: the plan
//             follows from the shapes alone, so the host never waits for the device. Padding rows are
//             zero and stay zero through the experts, so both layouts give the same result.
//   kCompact  only the real rows travel and reach the experts (fewer bytes and FLOPs); the plan needs
//             every peer's fill counts, exchanged with one all-to-all of host ints.
//   Dropless routing (no capacity) always has real rows only, and exchanges its counts.
//
// Steps, in order (plan() first, then as many of the others as the pass needs):
//   plan          from the routing: fill counts (the only place the host may wait) and the block lists
//   dispatch      permute x into the token side, exchange to the experts
//   combine       exchange back, gate-weighted unpermute: y[t] = sum_j g_tj * out[row_tj]
//   combine_backward   the gradient of combine is a dispatch of dy (with dgate on the way)
//   dispatch_backward  the gradient of dispatch is a combine without gates
// With one rank and identical layouts (padded or dropless) the exchange shares storage: no copy at all.
//
// BF16 rows (bf16 experts): the rows travel, and reach the experts, in BF16. x is rounded before the
// permutation, the experts' BF16 outputs come back as they are and are widened before the gate-weighted
// sum, and the gradients likewise. The bf16 experts round their inputs and outputs to BF16 anyway, so the
// result is the same bit for bit, with half the bytes on the wire.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "model/context.h"
#include "config/config.h"
#include "runtime/ops/routing.h"

namespace moe {

enum class Exchange { kToExperts, kFromExperts };

// Where the rows of one routing lie on both sides of the exchange (element offsets, for hidden H).
struct DispatchPlan {
  int64_t token_rows = 0;                     // R
  int64_t expert_rows_total = 0;              // N
  std::vector<int64_t> expert_rows;           // per local expert
  std::vector<Communicator::Block> token_blocks;   // this rank's blocks on the token side, to their expert's rank
  std::vector<Communicator::Block> expert_blocks;  // this rank's experts' blocks, from their source rank
  int64_t sent_rows = 0;                      // rows in token_blocks (what this rank puts on the wire)
  bool shared_storage = false;                // one rank, and the two sides coincide row for row
  Tensor local_idx;                           // (N) I32, one rank otherwise: the token row of each expert row
};

class Dispatcher {
 public:
  // layout: kPadded or kCompact (runtime.dispatch_layout resolved); dropless routing needs neither.
  // bf16_rows: rows travel in BF16 (for bf16 experts, runtime.precision: bf16).
  Dispatcher(int num_experts, int hidden, DispatchLayout layout, bool bf16_rows = false);

  // Builds the plan of `route` (collective over ep when the layout exchanges fill counts).
  const DispatchPlan& plan(Backend& backend, Communicator& ep, const RouteState& route);

  // The steps, with the last plan. permute: x (T, H) -> the token side (R, H), in BF16 with bf16_rows.
  Tensor permute(Backend& backend, const Tensor& x, const RouteState& route);
  // The token side back from the experts (R, H) -> y (T, H) = gate-weighted sum (written), in y's dtype.
  // Keeps `returned` (widened to y's dtype) for combine_backward.
  void unpermute(Backend& backend, const Tensor& returned, const RouteState& route, Tensor& y);
  // permute + exchange: returns expert_in (N, H) for this rank's experts.
  Tensor dispatch(Backend& backend, Communicator& ep, const Tensor& x, const RouteState& route);
  // exchange + unpermute: expert_out (N, H) -> y (T, H).
  void combine(Backend& backend, Communicator& ep, const Tensor& expert_out, const RouteState& route, Tensor& y);
  // dy (T, H) -> d expert_out (N, H) (BF16 with bf16_rows); dgate (T, k) overwritten.
  Tensor combine_backward(Backend& backend, Communicator& ep, const Tensor& dy, const RouteState& route, Tensor& dgate);
  // d expert_in (N, H) -> dx (T, H) += (widened to dx's dtype)
  void dispatch_backward(Backend& backend, Communicator& ep, const Tensor& d_expert_in, const RouteState& route,
                         Tensor& dx);

  // Moves rows from one side to the other: token side (R, H) -> expert side (N, H), or back. Rows of the
  // target that no block names (padding left behind in the compact layout) are not written.
  Tensor exchange(Backend& backend, Communicator& ep, const Tensor& rows, Exchange direction);

  const DispatchPlan& last_plan() const { return plan_; }
  const std::vector<int64_t>& expert_rows() const { return plan_.expert_rows; }
  // Bytes this rank put on the wire in the last dispatch (for bandwidth figures).
  int64_t send_bytes() const { return plan_.sent_rows * hidden_ * static_cast<int64_t>(elem_size_); }

 private:
  int num_experts_;
  int hidden_;
  DispatchLayout layout_;
  bool bf16_rows_;
  size_t elem_size_ = 4;
  DispatchPlan plan_;
  std::vector<int64_t> padded_key_;  // (peers, local, groups, capacity) a padded plan_ was built for
  Tensor returned_;                  // (R, H) expert outputs back on the token side (for dgate)
};

}  // namespace moe
