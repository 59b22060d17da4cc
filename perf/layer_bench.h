// `moe_bench layer`: MoE layer forward+backward throughput against the dense GEMM rate of the same FLOPs.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "perf/bench.h"

namespace moe {

// The flags and defaults of moe_bench layer.
BenchFlags layer_bench_flags();
// One row per sweep point; returns the exit code (1 on a wrong result).
int run_layer_bench(BenchRun& run);

// Rows: one MoE layer per configuration (model.seq_len tokens per rank, ep = every rank), forward and
// backward timed; #wrong: sampled tokens whose output differs from a direct evaluation of the layer
// formula in double precision.
class LayerBench : public Bench {
 public:
  // extra_keys: swept keys shown in a column of their own (other_swept_keys).
  LayerBench(std::vector<Config> configs, std::vector<std::string> extra_keys);
  ~LayerBench() override;

  std::vector<std::string> title(BenchRun& run) override;
  std::vector<Column> columns() const override;
  size_t num_rows() const override { return configs_.size(); }
  void setup(BenchRun& run, size_t i) override;
  void prepare(BenchRun& run, size_t i) override;
  void run(BenchRun& run, size_t i) override;
  void after(BenchRun& run, size_t i, bool timed) override;
  int64_t check(BenchRun& run, size_t i) override;
  std::vector<Cell> cells(BenchRun& run, size_t i, double seconds) override;
  void teardown(size_t i) override;
  std::string summary() const override;

 private:
  struct State;
  std::vector<Config> configs_;
  std::vector<std::string> extra_keys_;
  std::unique_ptr<State> state_;
  std::vector<double> ratios_;  // expert / dense rate of every row so far
};

}  // namespace moe
