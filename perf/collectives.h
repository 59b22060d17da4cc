// The raw collectives, measured the nccl-tests way: all_to_all, all_to_all_v and all_reduce over a size
// sweep, each rank verifying what it received. `moe_bench a2a` prints them; calibration fits its
// alpha-beta constants to them; the MoE exchange is compared with raw_exchange().
#pragma once

#include <string>
#include <vector>

#include "perf/bench.h"

namespace moe {

enum class Collective : uint8_t { kAllToAll, kAllToAllV, kAllReduce };
const char* collective_name(Collective op);  // "all_to_all", "all_to_all_v", "all_reduce"

// One measured row.
struct CollectiveRow {
  double bytes = 0, count = 0;  // what one rank sends (all_to_all_v: the mean over ranks); all_reduce: the buffer
  double seconds = 0;           // the slowest rank's median
  double algbw = 0, busbw = 0;  // GB/s; busbw = algbw (n-1)/n for all_to_all, 2 (n-1)/n for all_reduce
  double bus_bytes = 0;         // bytes * the same factor: what crosses links, for the alpha-beta fits
  int64_t wrong = 0;            // elements received that differ from what was sent, all ranks
};

// Rows: `op` over `comm` with about `sizes[i]` bytes per rank (F32 elements). Every element sent is a
// function of (seed, source rank, destination rank, index), so each rank checks what it received on its
// own; all_reduce sums integers that stay exact in F32. Times and sums over the world.
class CollectiveBench : public Bench {
 public:
  CollectiveBench(Collective op, Communicator& comm, std::vector<size_t> sizes);

  std::vector<std::string> title(BenchRun& run) override;
  std::vector<Column> columns() const override;
  size_t num_rows() const override { return sizes_.size(); }
  void setup(BenchRun& run, size_t i) override;
  void prepare(BenchRun& run, size_t i) override;
  void run(BenchRun& run, size_t i) override;
  int64_t check(BenchRun& run, size_t i) override;
  std::vector<Cell> cells(BenchRun& run, size_t i, double seconds) override;
  void teardown(size_t i) override;

  const CollectiveRow& result(size_t i) const { return rows_.at(i); }

 private:
  Collective op_;
  Communicator& comm_;
  std::vector<size_t> sizes_;
  std::vector<CollectiveRow> rows_;
  // The row being measured: counts and offsets per peer (elements), the buffers, what was sent.
  std::vector<size_t> send_counts_, send_offsets_, recv_counts_, recv_offsets_;
  size_t base_ = 0;
  Tensor send_, recv_, pristine_;
};

// The raw collective an MoE exchange is compared with: two all_to_alls over groups.ep (there and back),
// each moving the mean over the world of `bytes_here` per rank (what a rank's dispatch sends depends on
// its routing), evenly split over the ep ranks, in `dtype`. Collective over the world.
struct RawExchange {
  double seconds = 0;  // the slowest rank's median of the pair
  double bytes = 0;    // per rank, the mean
};
RawExchange raw_exchange(BenchRun& run, double bytes_here, DType dtype);

}  // namespace moe
