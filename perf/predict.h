// `moe_study predict` and `moe_study validate`: the cost model's tables (launch/moe predict).
#pragma once

#include <string>
#include <vector>

#include "perf/cost_model.h"
#include "perf/table.h"
#include "train/metrics.h"

namespace moe {

struct PredictRequest {
  std::vector<int> ranks{8};
  int ranks_per_node = 0;   // 0: all on one node
  int ep = 0;               // 0: the largest that divides both the rank count and moe.num_experts
  int batch_per_rank = 0;   // 0: train.batch_size is the global batch at every rank count
  bool bf16_everywhere = false;
  std::string load_from;    // a metrics file whose observed expert load replaces the routing's own
};

// One row per rank count: step time, its split, tokens/s, achieved FLOP/s per rank, imbalance, drops.
Table predict_table(const Config& c, const CostConstants& k, const PredictRequest& request);

// The prediction against the measurement for every configuration of a study directory (scale or
// compare) with finished training runs: a run's measured step is the mean wall time of the second half
// of its steps (the first half warms up: allocations, routing); with repeats (runs named -repN) the
// median repeat is the measurement, and the table gives the range. Learned routing uses the run's own
// observed expert loads of the same steps. `summary` gets the median and worst |error| and the count.
Table validate_study(const std::string& dir, const CostConstants& k, std::string* summary);

// The expert loads a metrics file recorded, as PredictOptions::observed_load wants them: [MoE layer]
// [measured step][expert]; empty when it records none.
std::vector<std::vector<std::vector<double>>> observed_expert_load(const RunSummary& m);

}  // namespace moe
