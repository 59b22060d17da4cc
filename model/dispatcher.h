// Token dispatch and combine across the expert-parallel group, forward and backward.
//
// dispatch: permute  x (T, H) -> send (R, H), expert-major (RouteState describes the rows)
//           exchange rows: all_to_all with a capacity (every (expert, group) block padded to C rows),
//           all_to_all_v when dropless; the compact layout and dropless first exchange the fill
//           counts (E, G) with an all_to_all of host ints
//           compact  recv -> expert_in (N, H): this rank's experts' real rows, expert-major, in
//           (source rank, group, slot) order; expert_rows() gives the rows of each local expert.
//           With a capacity and the padded layout, expert_in keeps every slot, padding included
//           (expert-major, (source rank, group, slot) order): its layout then depends on shapes alone, so
//           the host never waits for the device's fill counts. Padding rows are zero and stay zero
//           through the experts, so both layouts give the same result.
// combine:  the exact reverse, with the gate-weighted sum y[t] += sum_j g_tj * out[row_tj] at the end.
//
// The backward of combine is a dispatch of the gradient and the backward of dispatch is a combine
// without gates: the same two exchanges with the same counts, in the other direction.
// Pre- and post-processing (permute/compact) never communicate, so the exchanges can be overlapped.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "model/context.h"
#include "runtime/ops/routing.h"

namespace moe {

class Dispatcher {
 public:
  // compact: drop padding rows before the experts (saves FLOPs; the host reads the fill counts).
  Dispatcher(int num_experts, int hidden, bool compact)
      : num_experts_(num_experts), hidden_(hidden), compact_(compact) {}

  // Returns expert_in (N, H) for this rank's experts.
  Tensor dispatch(Backend& backend, Communicator& ep, const Tensor& x, const RouteState& route);
  // expert_out (N, H) -> y (T, H) += gate-weighted sum. Keeps what combine_backward needs.
  void combine(Backend& backend, Communicator& ep, const Tensor& expert_out, const RouteState& route, Tensor& y);

  // dy (T, H) -> d expert_out (N, H); dgate (T, k) overwritten.
  Tensor combine_backward(Backend& backend, Communicator& ep, const Tensor& dy, const RouteState& route, Tensor& dgate);
  // d expert_in (N, H) -> dx (T, H) +=
  void dispatch_backward(Backend& backend, Communicator& ep, const Tensor& d_expert_in, const RouteState& route,
                         Tensor& dx);

  const std::vector<int64_t>& expert_rows() const { return expert_rows_; }
  // Bytes this rank sent in the last dispatch (for bandwidth figures).
  int64_t send_bytes() const { return send_rows_total_ * hidden_ * static_cast<int64_t>(elem_size_); }

 private:
  // The expert rows cover every receive row (padded layout): scatters need no zeroed target.
  bool full_scatter() const { return compact_idx_.numel() == recv_rows_total_; }
  // Moves rows from the send layout to the receive layout (forward = true), or back.
  Tensor exchange(Backend& backend, Communicator& ep, const Tensor& rows, bool forward);

  int num_experts_;
  int hidden_;
  bool compact_;
  size_t elem_size_ = 4;
  bool padded_ = true;
  int64_t send_rows_total_ = 0, recv_rows_total_ = 0;
  std::vector<size_t> send_rows_, send_offsets_, recv_rows_, recv_offsets_;  // per peer, in rows
  Tensor compact_idx_;                 // (N) I32: recv row of each expert_in row
  std::vector<int64_t> padded_key_;    // (peers, local, groups, capacity) compact_idx_ was built for
  std::vector<int64_t> expert_rows_;   // per local expert
  Tensor returned_;                    // (R, H) expert outputs back in the send layout (for dgate)
};

}  // namespace moe
