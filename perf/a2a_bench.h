// `moe_bench a2a`: the all-to-all collectives in the nccl-tests table format, self-verified
// (perf/collectives.h), and one MoE layer's exchange against the raw collective moving the same bytes.
#pragma once

#include <string>
#include <vector>

#include "config/config.h"
#include "perf/bench.h"

namespace moe {

// The flags and defaults of moe_bench a2a.
BenchFlags a2a_bench_flags();
// The whole benchmark: raw all_to_all and all_to_all_v rows over the size sweep, then the MoE rows (one
// per sweep point, unless --moe=0). Returns the exit code (1 on a wrong result).
int run_a2a_bench(BenchRun& run);

// One MoE row's result.
struct ExchangeRow {
  double bytes = 0;                // bytes one rank sends in the dispatch (the mean over ranks)
  double ours_s = 0, raw_s = 0;    // dispatch + combine; two raw all_to_alls of the same bytes
  int64_t wrong = 0;               // tokens whose output is not x times the sum of their kept gates, all ranks
};

// Rows: one MoE layer's routing per configuration (model.seq_len tokens per rank, ep = every rank of the
// run's ep group), then the timed dispatch + combine with identity experts against the raw collective.
class MoeExchangeBench : public Bench {
 public:
  // extra_keys: swept keys shown in a column of their own (other_swept_keys).
  MoeExchangeBench(std::vector<Config> configs, std::vector<std::string> extra_keys);
  ~MoeExchangeBench() override;

  std::vector<std::string> title(BenchRun& run) override;
  std::vector<Column> columns() const override;
  size_t num_rows() const override { return configs_.size(); }
  void setup(BenchRun& run, size_t i) override;
  void run(BenchRun& run, size_t i) override;
  int64_t check(BenchRun& run, size_t i) override;
  std::vector<Cell> cells(BenchRun& run, size_t i, double seconds) override;
  void teardown(size_t i) override;

  const ExchangeRow& result(size_t i) const { return rows_.at(i); }

 private:
  struct State;
  std::vector<Config> configs_;
  std::vector<std::string> extra_keys_;  // swept keys shown in their own column
  std::vector<ExchangeRow> rows_;
  std::unique_ptr<State> state_;  // the row being measured
};

}  // namespace moe
