// The step-time model: a prediction of one training step's time and its split, phase by phase, for any
// configuration, rank count and nodes, on a machine described by its constants (perf/cost_constants.h).
// docs/STUDIES.md, "The cost model", gives every equation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"
#include "model/context.h"
#include "perf/cost_constants.h"

namespace moe {

// The chance that a token picks each expert among its top-k: k/E each for learned routing (the balance
// loss at work), exactly the forced distribution's (moe.force_routing, by drawing `samples` tokens
// through forced_choice), or `observed` (per-expert shares of the choices, e.g. a metrics file's load).
std::vector<double> expert_choice_probability(const Config& c, const std::vector<double>& observed = {},
                                              int samples = 20000);

// Per expert: E[min(X, C)] and Var[min(X, C)] for X ~ Binomial(n, p) (C <= 0: no capacity, X itself).
struct KeptRows {
  double mean = 0, variance = 0;
};
KeptRows kept_rows(int64_t n, double p, int64_t capacity);

struct StepPrediction {
  int ranks = 1, ep = 1, dp = 1, nodes = 1;
  int64_t tokens_per_rank = 0;
  PhaseTimes phases;                      // the metrics file's phases (model/context.h kPhases)
  double hidden_s = 0;                    // overlapped time (outside the sum)
  double step_s = 0;                      // sum of the phases
  double tokens_per_s = 0;                // all ranks
  double comm_s = 0;                      // the collectives' share of step_s (not scaled by step_efficiency)
  double imbalance = 1;                   // most loaded rank's expert rows / mean rows
  double dropped_frac = 0;
};

struct PredictOptions {
  int ranks = 1;
  int ranks_per_node = 0;       // 0: every rank on one node
  int ep = 0;                   // 0: the configuration's parallel.ep
  // Observed expert loads (e.g. a metrics file's): [MoE layer][sample][expert], each sample a step's
  // per-expert share of the choices; a layer's rows are the mean over its samples. Empty: the routing's
  // own distribution. Fewer layers than the model's: layer l uses entry l mod size.
  std::vector<std::vector<std::vector<double>>> observed_load;
  bool bf16_everywhere = false;  // what-if: every GEMM in bf16 and bf16 exchanges (as Megatron runs)
};

// The rows of an MoE layer's exchange buffer on a rank of `tokens` tokens: every padded slot in the padded
// layout with a capacity (E x groups x moe_capacity(), the router's own formula), else the larger of what
// the rank sends (`sent_rows`, its kept choices) and what its experts receive (`max_rows`).
double expert_buffer_rows(const Config& c, int64_t tokens, double max_rows, double sent_rows);

// One training step of `c` (train.batch_size sequences over opt.ranks ranks) on a machine of `k`, phase by
// phase (kPhases).
StepPrediction predict_step(const Config& c, const CostConstants& k, const PredictOptions& opt);

}  // namespace moe
