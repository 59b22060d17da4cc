// Dispatch -> combine across the expert-parallel group, forward and backward, with hand-made routing:
// balanced, every token to one expert, and most experts empty; dropless and with a capacity.
//
// The "experts" multiply their rows by (global expert index + 1), so a row that reached the wrong
// expert, or came back to the wrong token, shows up in the result:
//   y[t]  = sum_{sent j} g_tj (e_tj + 1) x[t]        dx[t] = sum_{sent j} g_tj (e_tj + 1) dy[t]
//   dgate[t, j] = (e_tj + 1) <dy[t], x[t]> when sent, else 0
// With gates summing to one and a single expert multiplier of one, y = x and dx = dy exactly.
#include <gtest/gtest.h>

#include <algorithm>

#include "comm/mpi/mpi_communicator.h"
#include "model/dispatcher.h"
#include "tests/test_util.h"

namespace moe {
namespace {

enum class Skew { kRandom, kAllToExpertZero, kLastTwoOnly };

struct Case {
  const char* name;
  Skew skew;
  int64_t capacity;  // 0: dropless
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class DispatchRoundTrip : public ::testing::TestWithParam<Case> {};

void scale_rows(Backend& backend, Tensor& rows, const std::vector<int64_t>& expert_rows, int64_t first_expert) {
  std::vector<double> v = to_doubles(backend, rows);
  const int64_t h = rows.numel() == 0 ? 0 : rows.numel() / rows.dim(0);
  int64_t r = 0;
  for (size_t l = 0; l < expert_rows.size(); ++l) {
    for (int64_t i = 0; i < expert_rows[l]; ++i, ++r) {
      for (int64_t j = 0; j < h; ++j) v[r * h + j] *= static_cast<double>(first_expert + l + 1);
    }
  }
  if (rows.dtype() == DType::kF64) return backend.copy_from_host(v.data(), rows);
  Tensor wide = backend.empty(rows.shape(), DType::kF64);  // BF16 rows: scaled in F64, rounded back
  backend.copy_from_host(v.data(), wide);
  backend.convert(wide, rows);
}

// bf16: the rows travel in BF16. The reference then rounds where the wire does: x before the experts,
// their outputs, g dy before the experts' backward and its output; every other step is F64 in the same
// order, so the comparison stays exact.
void run_case(const Case& c, int ep, bool compact, bool bf16) {
  SCOPED_TRACE(std::string(compact ? "compact layout" : "padded layout") + (bf16 ? ", bf16 rows" : ""));
  const int world = mpi_world_size(), rank = mpi_world_rank();
  const int experts = ep == 1 ? 4 : 2 * ep;  // two experts per rank of the ep group
  const int k = 2;
  const int64_t t = 9, h = 5, offset = t * rank;
  ProcessGroups groups = test::world_groups(ep);
  auto backend = make_cpu_backend({});

  // Router scores for this rank's tokens.
  Tensor probs = host_tensor({t, experts}, DType::kF64);
  RngStream rng{5, rng_stream(RngPurpose::kTest, 77)};
  for (int64_t i = 0; i < t; ++i) {
    for (int e = 0; e < experts; ++e) {
      double p = rng.uniform(static_cast<uint64_t>((offset + i) * experts + e));
      if (c.skew == Skew::kAllToExpertZero && e == 0) p += 10;
      if (c.skew == Skew::kLastTwoOnly && e >= experts - 2) p += 10;
      probs.data<double>()[i * experts + e] = p;
    }
  }
  RouteArgs args;
  args.num_experts = experts;
  args.top_k = k;
  args.capacity = c.capacity;
  args.token_offset = offset;
  RouteState route;
  moe::route(*backend, args, probs, Tensor(), route);

  Tensor x = test::random_tensor(*backend, {t, h}, DType::kF64, 21, offset * h);
  Tensor dy = test::random_tensor(*backend, {t, h}, DType::kF64, 22, offset * h);
  Dispatcher dispatcher(experts, static_cast<int>(h), compact ? DispatchLayout::kCompact : DispatchLayout::kPadded,
                        bf16);
  const int64_t first_expert = static_cast<int64_t>(experts / ep) * groups.ep->rank();

  dispatcher.plan(*backend, *groups.ep, route);
  Tensor expert_in = dispatcher.dispatch(*backend, *groups.ep, x, route);
  int64_t received = 0;
  for (int64_t n : dispatcher.expert_rows()) received += n;
  EXPECT_EQ(received, expert_in.dim(0));
  EXPECT_EQ(expert_in.dtype(), bf16 ? DType::kBF16 : DType::kF64);
  scale_rows(*backend, expert_in, dispatcher.expert_rows(), first_expert);
  Tensor y = backend->zeros({t, h}, DType::kF64);
  dispatcher.combine(*backend, *groups.ep, expert_in, route, y);

  Tensor dgate = backend->empty({t, k}, DType::kF64);
  Tensor d_out = dispatcher.combine_backward(*backend, *groups.ep, dy, route, dgate);
  scale_rows(*backend, d_out, dispatcher.expert_rows(), first_expert);
  Tensor dx = backend->zeros({t, h}, DType::kF64);
  dispatcher.dispatch_backward(*backend, *groups.ep, d_out, route, dx);

  std::vector<double> xv = to_doubles(*backend, x), dyv = to_doubles(*backend, dy);
  std::vector<double> gate = to_doubles(*backend, route.gate), idx = to_doubles(*backend, route.expert_idx),
                      row = to_doubles(*backend, route.row_idx);
  std::vector<double> want_y(t * h, 0), want_dx(t * h, 0), want_dgate(t * k, 0);
  auto wire = [bf16](double v) { return bf16 ? double{bf16_to_float(float_to_bf16(static_cast<float>(v)))} : v; };
  int64_t sent = 0;
  for (int64_t i = 0; i < t; ++i) {
    for (int j = 0; j < k; ++j) {
      if (row[i * k + j] < 0) continue;
      ++sent;
      const double g = gate[i * k + j], scale = idx[i * k + j] + 1;
      for (int64_t q = 0; q < h; ++q) {
        const double out = wire(wire(xv[i * h + q]) * scale);  // the expert's output row, back on the token side
        want_y[i * h + q] += g * out;
        want_dx[i * h + q] += wire(wire(g * dyv[i * h + q]) * scale);
        want_dgate[i * k + j] += dyv[i * h + q] * out;
      }
    }
  }
  const std::string where = std::string(c.name) + " ep=" + std::to_string(ep) + " world=" + std::to_string(world);
  EXPECT_LT(test::rel_diff(to_doubles(*backend, y), want_y), 1e-14) << where;
  EXPECT_LT(test::rel_diff(to_doubles(*backend, dx), want_dx), 1e-14) << where;
  EXPECT_LT(test::rel_diff(to_doubles(*backend, dgate), want_dgate), 1e-14) << where;
  if (c.capacity == 0) {
    EXPECT_EQ(sent, t * k) << where;  // dropless sends everything
  }

  // What travels: the padded layout sends every slot, the others only the real rows.
  const DispatchPlan& plan = dispatcher.last_plan();
  EXPECT_EQ(plan.sent_rows, !compact && c.capacity > 0 ? route.num_rows : sent) << where;
  EXPECT_EQ(dispatcher.send_bytes(), plan.sent_rows * h * (bf16 ? 2 : 8)) << where;
  // One rank whose two sides coincide shares storage instead of copying.
  EXPECT_EQ(plan.shared_storage, ep == 1 && (!compact || c.capacity == 0)) << where;

  // Every sent assignment arrives exactly once somewhere in the ep group.
  std::vector<double> counts{static_cast<double>(sent), static_cast<double>(received)};
  groups.ep->all_reduce_sum(counts);
  if (!compact && c.capacity > 0) {
    // padded: every slot of every expert arrives, used or not
    EXPECT_EQ(counts[1], static_cast<double>(groups.ep_size()) * experts * c.capacity) << where;
  } else {
    EXPECT_EQ(counts[0], counts[1]) << where;
  }
}

TEST_P(DispatchRoundTrip, IdentityExpertsReturnTheInputAndTheGradient) {
  for (int ep = 1; ep <= mpi_world_size(); ++ep) {
    if (mpi_world_size() % ep == 0) {
      for (bool bf16 : {false, true}) {
        run_case(GetParam(), ep, /*compact=*/true, bf16);
        run_case(GetParam(), ep, /*compact=*/false, bf16);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Routing, DispatchRoundTrip,
                         ::testing::Values(Case{"random_dropless", Skew::kRandom, 0},
                                           Case{"random_capacity", Skew::kRandom, 3},
                                           Case{"all_to_expert_zero_dropless", Skew::kAllToExpertZero, 0},
                                           Case{"all_to_expert_zero_capacity", Skew::kAllToExpertZero, 4},
                                           Case{"last_two_only_dropless", Skew::kLastTwoOnly, 0},
                                           Case{"last_two_only_capacity_no_drops", Skew::kLastTwoOnly, 9}),
                         [](const auto& info) { return std::string(info.param.name); });

// all_to_all_blocks: rank r sends peer q blocks of (r + q + b) % 3 elements (zeros included), at offsets
// with gaps and in an order that is not the buffer's; each element names (source, destination, block,
// index), and the receiver places its blocks backwards in its buffer. Adjacent blocks exercise merging.
TEST(AllToAllBlocks, EveryBlockLandsWhereTheReceiverListedIt) {
  const int world = mpi_world_size(), rank = mpi_world_rank();
  auto comm = make_mpi_world();
  const int per_peer = 4;
  auto value = [](int src, int dst, int b, size_t i) { return 1e6 * src + 1e4 * dst + 100.0 * b + double(i); };
  auto count = [](int src, int dst, int b) { return static_cast<size_t>((src + dst + b) % 3); };
  std::vector<Communicator::Block> send_blocks, recv_blocks;
  std::vector<double> send(4096, -1), recv(4096, -1);
  size_t at = 0;
  for (int b = 0; b < per_peer; ++b) {
    for (int q = world - 1; q >= 0; --q) {  // peers interleaved, last first
      size_t n = count(rank, q, b);
      send_blocks.push_back({q, at, n});
      for (size_t i = 0; i < n; ++i) send[at + i] = value(rank, q, b, i);
      at += n + (b % 2);  // a gap after odd blocks, none after even ones
    }
  }
  size_t end = recv.size();
  for (int q = 0; q < world; ++q)
    for (int b = 0; b < per_peer; ++b) {
      size_t n = count(q, rank, b);
      end -= n + 1;
      recv_blocks.push_back({q, end, n});
    }
  comm->all_to_all_blocks(send.data(), send_blocks, recv.data(), recv_blocks, DType::kF64);
  size_t written = 0;
  for (const Communicator::Block& blk : recv_blocks) {
    const int b = static_cast<int>(&blk - recv_blocks.data()) % per_peer;
    for (size_t i = 0; i < blk.count; ++i) EXPECT_EQ(recv[blk.offset + i], value(blk.peer, rank, b, i));
    EXPECT_EQ(recv[blk.offset + blk.count], -1.0) << "the gap after a block stays untouched";
    written += blk.count;
  }
  EXPECT_EQ(static_cast<size_t>(std::count_if(recv.begin(), recv.end(), [](double v) { return v != -1; })), written);
}

TEST(DispatchRoundTripExact, NormalisedGatesGiveBackTheInputItself) {
  // One expert multiplier of 1 everywhere: the round trip is the identity, y == x and dx == dy.
  const int rank = mpi_world_rank(), world = mpi_world_size();
  const int experts = world, k = 2;
  const int64_t t = 7, h = 3;
  ProcessGroups groups = test::world_groups(world);
  auto backend = make_cpu_backend({});
  Tensor probs = host_tensor({t, experts}, DType::kF64);
  for (int64_t i = 0; i < t * experts; ++i) probs.data<double>()[i] = 1.0 + (i * 7 % 5);
  RouteArgs args;
  args.num_experts = experts;
  args.top_k = std::min(k, experts);
  RouteState route;
  moe::route(*backend, args, probs, Tensor(), route);
  Tensor x = test::random_tensor(*backend, {t, h}, DType::kF64, 31, rank * t * h);
  Dispatcher d(experts, static_cast<int>(h), DispatchLayout::kCompact);
  d.plan(*backend, *groups.ep, route);
  Tensor in = d.dispatch(*backend, *groups.ep, x, route);
  Tensor y = backend->zeros({t, h}, DType::kF64);
  d.combine(*backend, *groups.ep, in, route, y);
  std::vector<double> xv = to_doubles(*backend, x), yv = to_doubles(*backend, y);
  EXPECT_LT(test::rel_diff(yv, xv), 1e-15);
  Tensor dgate = backend->empty({t, args.top_k}, DType::kF64);
  Tensor dout = d.combine_backward(*backend, *groups.ep, x, route, dgate);
  Tensor dx = backend->zeros({t, h}, DType::kF64);
  d.dispatch_backward(*backend, *groups.ep, dout, route, dx);
  EXPECT_LT(test::rel_diff(to_doubles(*backend, dx), xv), 1e-15);
}

}  // namespace
}  // namespace moe
