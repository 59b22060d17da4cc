// Dispatch/combine: permutation, the two all-to-all exchanges, and expert-major compaction.
#include "model/dispatcher.h"

#include "runtime/ops/permute.h"

#include <numeric>

namespace moe {

Tensor Dispatcher::exchange(Backend& backend, Communicator& ep, const Tensor& rows, bool forward) {
  const auto& sc = forward ? send_rows_ : recv_rows_;
  const auto& so = forward ? send_offsets_ : recv_offsets_;
  const auto& rc = forward ? recv_rows_ : send_rows_;
  const auto& ro = forward ? recv_offsets_ : send_offsets_;
  int64_t out_rows = forward ? recv_rows_total_ : send_rows_total_;
  Tensor out = backend.empty({out_rows, hidden_}, rows.dtype());
  const size_t h = static_cast<size_t>(hidden_);
  if (ep.size() == 1) {
    backend.copy(rows, out);  // the rows stay here: no collective, whatever the communicator's memory
  } else if (padded_) {
    // Every peer gets the same number of rows: one equal-count all-to-all, no counts needed.
    ep.all_to_all(rows.raw(), out.raw(), sc[0] * h, rows.dtype());
  } else {
    auto scale = [h](const std::vector<size_t>& v) {
      std::vector<size_t> o(v.size());
      for (size_t i = 0; i < v.size(); ++i) o[i] = v[i] * h;
      return o;
    };
    ep.all_to_all_v(rows.raw(), scale(sc), scale(so), out.raw(), scale(rc), scale(ro), rows.dtype());
  }
  return out;
}

Tensor Dispatcher::dispatch(Backend& backend, Communicator& ep, const Tensor& x, const RouteState& route) {
  const int64_t capacity = route.capacity();
  const int n_peers = ep.size();
  MOE_CHECK(num_experts_ % n_peers == 0, "dispatch: ", num_experts_, " experts over ", n_peers, " ranks");
  const int local = num_experts_ / n_peers;
  const int64_t groups = route.fill.dim(1);
  elem_size_ = dtype_size(x.dtype());
  padded_ = capacity > 0;

  send_rows_.assign(n_peers, 0);
  recv_rows_.assign(n_peers, 0);
  auto offsets = [](const std::vector<size_t>& counts) {
    std::vector<size_t> off(counts.size(), 0);
    for (size_t i = 1; i < counts.size(); ++i) off[i] = off[i - 1] + counts[i - 1];
    return off;
  };
  auto finish_layout = [&] {
    send_offsets_ = offsets(send_rows_);
    recv_offsets_ = offsets(recv_rows_);
    send_rows_total_ = static_cast<int64_t>(std::accumulate(send_rows_.begin(), send_rows_.end(), size_t{0}));
    recv_rows_total_ = static_cast<int64_t>(std::accumulate(recv_rows_.begin(), recv_rows_.end(), size_t{0}));
    MOE_CHECK(send_rows_total_ == route.num_rows, "dispatch: route has ", route.num_rows, " rows, layout ",
              send_rows_total_);
  };

  if (padded_ && !compact_) {
    // Every block is `capacity` rows: the layout follows from the shapes, and the reorder from
    // (peer, local, group, slot) to (local, peer, group, slot) is built once per shape.
    const size_t block_rows = static_cast<size_t>(local * groups * capacity);
    send_rows_.assign(n_peers, block_rows);
    recv_rows_.assign(n_peers, block_rows);
    finish_layout();
    expert_rows_.assign(local, int64_t{n_peers} * groups * capacity);
    std::vector<int64_t> key{n_peers, local, groups, capacity};
    if (key != padded_key_) {
      std::vector<int32_t> idx;
      idx.reserve(static_cast<size_t>(recv_rows_total_));
      for (int l = 0; l < local; ++l)
        for (int p = 0; p < n_peers; ++p)
          for (int64_t g = 0; g < groups; ++g)
            for (int64_t s = 0; s < capacity; ++s)
              idx.push_back(static_cast<int32_t>(((int64_t{p} * local + l) * groups + g) * capacity + s));
      compact_idx_ = backend.empty({recv_rows_total_}, DType::kI32);
      backend.copy_from_host(idx.data(), compact_idx_);
      padded_key_ = key;
    }
  } else {
    // Fill counts: ours (E, G) out, theirs (peers, local, G) in.
    std::vector<int32_t> fill(static_cast<size_t>(num_experts_ * groups));
    backend.copy_to_host(route.fill, fill.data());
    std::vector<int32_t> recv_fill(fill.size());
    ep.all_to_all(fill.data(), recv_fill.data(), static_cast<size_t>(local * groups), DType::kI32);
    for (int p = 0; p < n_peers; ++p) {
      for (int64_t i = 0; i < local * groups; ++i) {
        size_t b = static_cast<size_t>(p * local * groups + i);
        send_rows_[p] += padded_ ? static_cast<size_t>(capacity) : static_cast<size_t>(fill[b]);
        recv_rows_[p] += padded_ ? static_cast<size_t>(capacity) : static_cast<size_t>(recv_fill[b]);
      }
    }
    finish_layout();

    // Expert-major compaction of the receive buffer: for local expert l, from every peer p and group g,
    // the first fill rows of block (p, l, g).
    expert_rows_.assign(local, 0);
    std::vector<int64_t> block_begin(static_cast<size_t>(n_peers * local * groups));
    for (int p = 0; p < n_peers; ++p) {
      int64_t row = static_cast<int64_t>(recv_offsets_[p]);
      for (int64_t i = 0; i < local * groups; ++i) {
        size_t b = static_cast<size_t>(p * local * groups + i);
        block_begin[b] = row;
        row += padded_ ? capacity : recv_fill[b];
        expert_rows_[i / groups] += recv_fill[b];
      }
    }
    int64_t n_rows = std::accumulate(expert_rows_.begin(), expert_rows_.end(), int64_t{0});
    std::vector<int32_t> idx;
    idx.reserve(static_cast<size_t>(n_rows));
    for (int l = 0; l < local; ++l)
      for (int p = 0; p < n_peers; ++p)
        for (int64_t g = 0; g < groups; ++g) {
          size_t b = static_cast<size_t>((p * local + l) * groups + g);
          for (int32_t s = 0; s < recv_fill[b]; ++s) idx.push_back(static_cast<int32_t>(block_begin[b] + s));
        }
    compact_idx_ = backend.empty({n_rows}, DType::kI32);
    backend.copy_from_host(idx.data(), compact_idx_);
    padded_key_.clear();
  }

  Tensor send = backend.empty({send_rows_total_, hidden_}, x.dtype());
  permute(backend, x, route.row_idx, send);
  Tensor recv = exchange(backend, ep, send, /*forward=*/true);
  Tensor expert_in = backend.empty({compact_idx_.numel(), hidden_}, x.dtype());
  gather_rows(backend, recv, compact_idx_, expert_in);
  return expert_in;
}

void Dispatcher::combine(Backend& backend, Communicator& ep, const Tensor& expert_out, const RouteState& route,
                         Tensor& y) {
  Tensor back = full_scatter() ? backend.empty({recv_rows_total_, hidden_}, expert_out.dtype())
                               : backend.zeros({recv_rows_total_, hidden_}, expert_out.dtype());
  scatter_rows(backend, expert_out, compact_idx_, back);
  returned_ = exchange(backend, ep, back, /*forward=*/false);
  unpermute(backend, returned_, route.row_idx, route.gate, y);
}

Tensor Dispatcher::combine_backward(Backend& backend, Communicator& ep, const Tensor& dy, const RouteState& route,
                                    Tensor& dgate) {
  Tensor dreturned = backend.empty(returned_.shape(), dy.dtype());
  unpermute_backward(backend, dy, returned_, route.row_idx, route.gate, dreturned, dgate);
  Tensor dback = exchange(backend, ep, dreturned, /*forward=*/true);
  Tensor d_out = backend.empty({compact_idx_.numel(), hidden_}, dy.dtype());
  gather_rows(backend, dback, compact_idx_, d_out);
  return d_out;
}

void Dispatcher::dispatch_backward(Backend& backend, Communicator& ep, const Tensor& d_expert_in,
                                   const RouteState& route, Tensor& dx) {
  Tensor drecv = full_scatter() ? backend.empty({recv_rows_total_, hidden_}, d_expert_in.dtype())
                                : backend.zeros({recv_rows_total_, hidden_}, d_expert_in.dtype());
  scatter_rows(backend, d_expert_in, compact_idx_, drecv);
  Tensor dsend = exchange(backend, ep, drecv, /*forward=*/false);
  permute_backward(backend, dsend, route.row_idx, dx);
}

}  // namespace moe
