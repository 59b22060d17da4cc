// The raw collectives' rows, self-verified, and the raw reference of an MoE exchange.
#include "perf/collectives.h"

#include <algorithm>

#include "base/error.h"

namespace moe {
namespace {

constexpr uint64_t kSeed = 20261130;

// The value rank `src` sends to rank `dst` at index k: 20 random bits, exact in F32.
float sent_value(int src, int dst, uint64_t k) {
  uint64_t z = kSeed ^ (static_cast<uint64_t>(src) << 48) ^ (static_cast<uint64_t>(dst) << 32) ^ k;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64 finaliser
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 44);
}

// all_reduce: 11 bits per rank, so that the sum over up to 8192 ranks stays exact in F32.
float summand(int rank, uint64_t k) { return static_cast<float>(static_cast<uint32_t>(sent_value(rank, 0, k)) >> 9); }

// Elements rank src sends to rank dst in all_to_all_v: `base` times a weight 1..3 of the pair, so the
// exchange is uneven in both directions.
size_t v_count(size_t base, int src, int dst) {
  return std::max<size_t>(1, base * static_cast<size_t>(1 + (src * 7 + dst * 13) % 3) / 2);
}

}  // namespace

const char* collective_name(Collective op) {
  switch (op) {
    case Collective::kAllToAll: return "all_to_all";
    case Collective::kAllToAllV: return "all_to_all_v";
    case Collective::kAllReduce: return "all_reduce";
  }
  return "?";
}

CollectiveBench::CollectiveBench(Collective op, Communicator& comm, std::vector<size_t> sizes)
    : op_(op), comm_(comm), sizes_(std::move(sizes)), rows_(sizes_.size()) {}

std::vector<std::string> CollectiveBench::title(BenchRun& run) {
  const char* what = op_ == Collective::kAllToAllV ? "all_to_all_v (uneven: pair weights 1..3)"
                     : op_ == Collective::kAllReduce ? "all_reduce (in place)"
                                                     : "all_to_all";
  const BenchOptions& o = run.options();
  return {std::string(what) + " over " + comm_.name() + " (" + run.backend().name() + " buffers), " +
              std::to_string(comm_.size()) + " rank(s), float32, " + std::to_string(o.iters) + " iters after " +
              std::to_string(o.warmup) + " warm-up, the slowest rank's median",
          op_ == Collective::kAllReduce ? "size: the buffer; busbw = algbw * 2(n-1)/n"
                                        : "size: bytes one rank sends (all_to_all_v: the mean over ranks); busbw = "
                                          "algbw * (n-1)/n"};
}

std::vector<Column> CollectiveBench::columns() const {
  return {{"op", "", 0, 0},          {"ranks", "", 0, 0},           {"comm", "", 0, 0},
          {"bytes", "size", 12, 0},  {"count", "count", 10, 0},     {"type", "type", 5, 0},
          {"time_us", "time(us)", 11, 2}, {"algbw_gbs", "algbw(GB/s)", 11, 3}, {"busbw_gbs", "busbw(GB/s)", 11, 3}};
}

void CollectiveBench::setup(BenchRun& run, size_t i) {
  Backend& backend = run.backend();
  const int n = comm_.size(), me = comm_.rank();
  const bool vary = op_ == Collective::kAllToAllV;
  base_ = std::max<size_t>(1, sizes_[i] / sizeof(float) / (op_ == Collective::kAllReduce ? 1 : static_cast<size_t>(n)));
  const int peers = op_ == Collective::kAllReduce ? 1 : n;
  send_counts_.assign(peers, 0), send_offsets_.assign(peers, 0), recv_counts_.assign(peers, 0), recv_offsets_.assign(peers, 0);
  for (int p = 0; p < peers; ++p) {
    send_counts_[p] = vary ? v_count(base_, me, p) : base_;
    recv_counts_[p] = vary ? v_count(base_, p, me) : base_;
  }
  for (int p = 1; p < peers; ++p) {
    send_offsets_[p] = send_offsets_[p - 1] + send_counts_[p - 1];
    recv_offsets_[p] = recv_offsets_[p - 1] + recv_counts_[p - 1];
  }
  const size_t send_total = send_offsets_.back() + send_counts_.back(), recv_total = recv_offsets_.back() + recv_counts_.back();
  std::vector<float> host(send_total);
  for (int p = 0; p < peers; ++p)
    for (size_t k = 0; k < send_counts_[p]; ++k)
      host[send_offsets_[p] + k] = op_ == Collective::kAllReduce ? summand(me, k) : sent_value(me, p, k);
  send_ = backend.empty({static_cast<int64_t>(send_total)}, DType::kF32);
  backend.copy_from_host(host.data(), send_);
  if (op_ == Collective::kAllReduce) {  // in place: every repetition starts from what was sent
    pristine_ = send_;
    send_ = backend.empty({static_cast<int64_t>(send_total)}, DType::kF32);
  }
  recv_ = backend.zeros({static_cast<int64_t>(recv_total)}, DType::kF32);
}

void CollectiveBench::prepare(BenchRun& run, size_t i) {
  if (op_ == Collective::kAllReduce) run.backend().copy(pristine_, send_);
}

void CollectiveBench::run(BenchRun& run, size_t i) {
  switch (op_) {
    case Collective::kAllToAll: comm_.all_to_all(send_.raw(), recv_.raw(), base_, DType::kF32); break;
    case Collective::kAllToAllV:
      comm_.all_to_all_v(send_.raw(), send_counts_, send_offsets_, recv_.raw(), recv_counts_, recv_offsets_, DType::kF32);
      break;
    case Collective::kAllReduce: comm_.all_reduce_sum(send_.raw(), send_.raw(), base_, DType::kF32); break;
  }
}

int64_t CollectiveBench::check(BenchRun& run, size_t i) {
  const int n = comm_.size(), me = comm_.rank();
  int64_t wrong = 0;
  if (op_ == Collective::kAllReduce) {
    const std::vector<double> got = to_doubles(run.backend(), send_);
    for (size_t k = 0; k < base_; ++k) {
      double want = 0;
      for (int r = 0; r < n; ++r) want += summand(r, k);
      wrong += got[k] != want;
    }
  } else {
    const std::vector<double> got = to_doubles(run.backend(), recv_);
    for (int p = 0; p < n; ++p)
      for (size_t k = 0; k < recv_counts_[p]; ++k) wrong += got[recv_offsets_[p] + k] != sent_value(p, me, k);
  }
  rows_[i].wrong = static_cast<int64_t>(run.sum(static_cast<double>(wrong)));
  return rows_[i].wrong;
}

std::vector<Cell> CollectiveBench::cells(BenchRun& run, size_t i, double seconds) {
  const int n = comm_.size();
  CollectiveRow& r = rows_[i];
  const size_t sent = send_offsets_.back() + send_counts_.back();
  r.count = op_ == Collective::kAllReduce ? static_cast<double>(base_) : run.sum(static_cast<double>(sent)) / run.groups().world->size();
  r.bytes = r.count * sizeof(float);
  r.seconds = seconds;
  r.algbw = r.bytes / seconds * 1e-9;
  const double factor = op_ == Collective::kAllReduce ? 2.0 * (n - 1) / n : static_cast<double>(n - 1) / n;
  r.busbw = r.algbw * factor;
  r.bus_bytes = r.bytes * factor;
  return {collective_name(op_), n, comm_.name(), r.bytes, r.count, "float", seconds * 1e6, r.algbw, r.busbw};
}

void CollectiveBench::teardown(size_t i) { send_ = recv_ = pristine_ = Tensor(); }

RawExchange raw_exchange(BenchRun& run, double bytes_here, DType dtype) {
  ProcessGroups& groups = run.groups();
  RawExchange r;
  r.bytes = run.sum(bytes_here) / groups.world->size();
  const int n = groups.ep->size();
  const size_t per_peer =
      std::max<size_t>(1, static_cast<size_t>(r.bytes / static_cast<double>(dtype_size(dtype))) / static_cast<size_t>(n));
  Tensor a = run.backend().zeros({static_cast<int64_t>(per_peer) * n}, dtype);
  Tensor b = run.backend().empty({static_cast<int64_t>(per_peer) * n}, dtype);
  r.seconds = run.time([&] {
    groups.ep->all_to_all(a.raw(), b.raw(), per_peer, dtype);
    groups.ep->all_to_all(b.raw(), a.raw(), per_peer, dtype);
  });
  return r;
}

}  // namespace moe
