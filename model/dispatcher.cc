// Dispatch/combine: the plan of a routing, the permutation, and the block exchange between the token side
// and the expert side.
#include "model/dispatcher.h"

#include "runtime/ops/permute.h"

#include <numeric>

namespace moe {

namespace {
// t in `dtype`: t itself when it already is, else a converted copy.
Tensor as_dtype(Backend& backend, const Tensor& t, DType dtype) {
  if (t.dtype() == dtype) return t;
  Tensor out = backend.empty(t.shape(), dtype);
  backend.convert(t, out);
  return out;
}

// Appends a block of `rows` rows of hidden size h starting at row `row` of one side, to or from rank
// `peer`. Both sides list their blocks in (peer, local expert, group) order, so a sender's and a
// receiver's pair up.
void add_block(std::vector<Communicator::Block>& list, int64_t h, int peer, int64_t row, int64_t rows) {
  list.push_back({peer, static_cast<size_t>(row * h), static_cast<size_t>(rows * h)});
}

// The padded layout: every block is `capacity` rows per group, so the plan follows from the shapes.
DispatchPlan padded_plan(int num_experts, int64_t h, int peers, int local, int64_t groups, int64_t capacity) {
  DispatchPlan p;
  const int64_t block = groups * capacity;  // the groups of one (peer, local expert) are contiguous on both sides
  p.token_rows = p.expert_rows_total = int64_t{num_experts} * block;
  p.expert_rows.assign(local, int64_t{peers} * block);
  for (int q = 0; q < peers; ++q)
    for (int l = 0; l < local; ++l) {
      add_block(p.token_blocks, h, q, (int64_t{q} * local + l) * block, block);
      add_block(p.expert_blocks, h, q, (int64_t{l} * peers + q) * block, block);
    }
  p.sent_rows = p.token_rows;
  p.shared_storage = peers == 1;
  return p;
}

// One rank, compact layout: the token row of each expert row (the real rows, gathered).
Tensor local_gather_index(Backend& backend, const DispatchPlan& p, int64_t h) {
  std::vector<int32_t> idx;
  idx.reserve(static_cast<size_t>(p.expert_rows_total));
  for (const Communicator::Block& b : p.token_blocks) {
    for (size_t r = 0; r < b.count / static_cast<size_t>(h); ++r) {
      idx.push_back(static_cast<int32_t>(b.offset / static_cast<size_t>(h) + r));
    }
  }
  Tensor out = backend.empty({p.expert_rows_total}, DType::kI32);
  backend.copy_from_host(idx.data(), out);
  return out;
}
}  // namespace

Dispatcher::Dispatcher(int num_experts, int hidden, DispatchLayout layout, bool bf16_rows)
    : num_experts_(num_experts), hidden_(hidden), layout_(layout), bf16_rows_(bf16_rows) {
  MOE_CHECK(layout == DispatchLayout::kPadded || layout == DispatchLayout::kCompact,
            "Dispatcher needs a resolved layout (padded or compact)");
}

const DispatchPlan& Dispatcher::plan(Backend& backend, Communicator& ep, const RouteState& route) {
  const int64_t capacity = route.capacity();
  const int peers = ep.size();
  MOE_CHECK(num_experts_ % peers == 0, "dispatch: ", num_experts_, " experts over ", peers, " ranks");
  const int local = num_experts_ / peers;
  const int64_t groups = route.fill.dim(1);
  const int64_t h = hidden_;
  if (capacity > 0 && layout_ == DispatchLayout::kPadded) {  // built once per shape
    std::vector<int64_t> key{peers, local, groups, capacity};
    if (key != padded_key_) plan_ = padded_plan(num_experts_, h, peers, local, groups, capacity);
    padded_key_ = key;
    return plan_;
  }
  padded_key_.clear();
  auto add = [h](std::vector<Communicator::Block>& list, int peer, int64_t row, int64_t rows) {
    add_block(list, h, peer, row, rows);
  };

  // Fill counts: ours (E, G) out, theirs (peers, local, G) in.
  std::vector<int32_t> fill(static_cast<size_t>(num_experts_ * groups));
  backend.copy_to_host(route.fill, fill.data());
  std::vector<int32_t> recv_fill = fill;
  if (peers > 1) ep.host().all_to_all(fill.data(), recv_fill.data(), static_cast<size_t>(local * groups), DType::kI32);
  const bool dropless = capacity <= 0;
  auto at = [&](int q, int l, int64_t g) { return static_cast<size_t>((int64_t{q} * local + l) * groups + g); };

  DispatchPlan p;
  // Token side: with a capacity, block (e, g) starts at slot 0 of its `capacity` slots; dropless, the
  // blocks follow each other.
  std::vector<int64_t> token_begin(fill.size());
  int64_t row = 0;
  for (size_t b = 0; b < fill.size(); ++b) {
    token_begin[b] = dropless ? row : static_cast<int64_t>(b) * capacity;
    row += dropless ? fill[b] : capacity;
  }
  p.token_rows = row;
  MOE_CHECK(p.token_rows == route.num_rows, "dispatch: route has ", route.num_rows, " rows, layout ", p.token_rows);
  // Expert side: expert-major, then source rank, then group; real rows only.
  std::vector<int64_t> expert_begin(fill.size());
  p.expert_rows.assign(local, 0);
  row = 0;
  for (int l = 0; l < local; ++l)
    for (int q = 0; q < peers; ++q)
      for (int64_t g = 0; g < groups; ++g) {
        expert_begin[at(q, l, g)] = row;
        row += recv_fill[at(q, l, g)];
        p.expert_rows[l] += recv_fill[at(q, l, g)];
      }
  p.expert_rows_total = row;

  // Dropless, the groups of one (peer, local expert) are contiguous on both sides: one block. Compact with
  // a capacity, each group's real rows are a block of their own (padding stays behind).
  for (int q = 0; q < peers; ++q)
    for (int l = 0; l < local; ++l) {
      if (dropless) {
        int64_t sent = 0, got = 0;
        for (int64_t g = 0; g < groups; ++g) sent += fill[at(q, l, g)], got += recv_fill[at(q, l, g)];
        add(p.token_blocks, q, token_begin[at(q, l, 0)], sent);
        add(p.expert_blocks, q, expert_begin[at(q, l, 0)], got);
        p.sent_rows += sent;
        continue;
      }
      for (int64_t g = 0; g < groups; ++g) {
        add(p.token_blocks, q, token_begin[at(q, l, g)], fill[at(q, l, g)]);
        add(p.expert_blocks, q, expert_begin[at(q, l, g)], recv_fill[at(q, l, g)]);
        p.sent_rows += fill[at(q, l, g)];
      }
    }

  // One rank: the exchange is local. Dropless, both sides are the same rows in the same order; compact,
  // the expert side gathers the real rows.
  p.shared_storage = peers == 1 && dropless;
  if (peers == 1 && !dropless) p.local_idx = local_gather_index(backend, p, h);
  plan_ = std::move(p);
  return plan_;
}

Tensor Dispatcher::exchange(Backend& backend, Communicator& ep, const Tensor& rows, Exchange direction) {
  const bool to_experts = direction == Exchange::kToExperts;
  const int64_t in_rows = to_experts ? plan_.token_rows : plan_.expert_rows_total;
  const int64_t out_rows = to_experts ? plan_.expert_rows_total : plan_.token_rows;
  MOE_CHECK(rows.dim(0) == in_rows, "dispatcher exchange: ", rows.dim(0), " rows for a plan of ", in_rows);
  if (plan_.shared_storage) return rows;
  Tensor out = backend.empty({out_rows, hidden_}, rows.dtype());
  if (ep.size() == 1) {  // the rows stay here: no collective, whatever the communicator's memory
    if (to_experts) {
      gather_rows(backend, rows, plan_.local_idx, out);
    } else {
      scatter_rows(backend, rows, plan_.local_idx, out);
    }
    return out;
  }
  const auto& from = to_experts ? plan_.token_blocks : plan_.expert_blocks;
  const auto& to = to_experts ? plan_.expert_blocks : plan_.token_blocks;
  ep.all_to_all_blocks(rows.raw(), from, out.raw(), to, rows.dtype());
  return out;
}

Tensor Dispatcher::permute(Backend& backend, const Tensor& x, const RouteState& route) {
  MOE_CHECK(plan_.token_rows == route.num_rows, "dispatch: the plan has ", plan_.token_rows, " rows, the route ",
            route.num_rows, " (plan() first)");
  const Tensor rows = bf16_rows_ ? as_dtype(backend, x, DType::kBF16) : x;
  elem_size_ = dtype_size(rows.dtype());
  Tensor send = backend.empty({plan_.token_rows, hidden_}, rows.dtype());
  moe::permute(backend, rows, route.row_idx, send);
  return send;
}

void Dispatcher::unpermute(Backend& backend, const Tensor& returned, const RouteState& route, Tensor& y) {
  returned_ = as_dtype(backend, returned, y.dtype());
  moe::unpermute(backend, returned_, route.row_idx, route.gate, y);
}

Tensor Dispatcher::dispatch(Backend& backend, Communicator& ep, const Tensor& x, const RouteState& route) {
  return exchange(backend, ep, permute(backend, x, route), Exchange::kToExperts);
}

void Dispatcher::combine(Backend& backend, Communicator& ep, const Tensor& expert_out, const RouteState& route,
                         Tensor& y) {
  unpermute(backend, exchange(backend, ep, expert_out, Exchange::kFromExperts), route, y);
}

Tensor Dispatcher::combine_backward(Backend& backend, Communicator& ep, const Tensor& dy, const RouteState& route,
                                    Tensor& dgate) {
  Tensor dreturned = backend.empty(returned_.shape(), dy.dtype());
  unpermute_backward(backend, dy, returned_, route.row_idx, route.gate, dreturned, dgate);
  return exchange(backend, ep, bf16_rows_ ? as_dtype(backend, dreturned, DType::kBF16) : dreturned,
                  Exchange::kToExperts);
}

void Dispatcher::dispatch_backward(Backend& backend, Communicator& ep, const Tensor& d_expert_in,
                                   const RouteState& route, Tensor& dx) {
  Tensor dsend = as_dtype(backend, exchange(backend, ep, d_expert_in, Exchange::kFromExperts), dx.dtype());
  permute_backward(backend, dsend, route.row_idx, dx);
}

}  // namespace moe
