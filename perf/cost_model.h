// The step-time model: a machine's constants (measured by `moe_bench calibrate`, or documented for
// hardware we do not have) and a prediction of one training step's time and its split for any
// configuration, rank count and nodes. docs/STUDIES.md, "The cost model", gives every equation.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "config/config.h"
#include "model/context.h"

namespace moe {

// t(bytes) = alpha + bytes * f(g) / bytes_per_s for a collective over g ranks, where f is the share of
// the buffer that crosses links: (g-1)/g for all_to_all, 2(g-1)/g for all_reduce (the nccl-tests
// "bus bandwidth" convention, so one constant holds for any group size).
struct AlphaBeta {
  double alpha_s = 0;
  double bytes_per_s = 0;  // bus bandwidth
  double seconds(double bus_bytes) const { return bus_bytes <= 0 ? 0.0 : alpha_s + bus_bytes / bytes_per_s; }
};

// Seconds of one GEMM C(m, n) = A(m, k) B(k, n): measured on a grid of sizes (`dims`, ascending, the same
// for m, n and k) and interpolated in log space; beyond the grid it scales with the FLOPs. Without a grid
// it is alpha_s + 2mnk / flops_per_s.
struct GemmModel {
  std::vector<double> dims;
  std::vector<double> seconds;  // [i_m][i_n][i_k], dims.size()^3 values
  double alpha_s = 0, flops_per_s = 0;
  double time(double m, double n, double k) const;
};

// What one node gives each of `ranks` ranks running at once.
struct NodeConstants {
  int ranks = 1;
  GemmModel gemm;               // fp32
  GemmModel gemm_bf16;          // bf16 inputs, fp32 accumulation (GPU); empty: the fp32 model
  double stream_bytes_per_s = 0;     // streaming element-wise work (axpy: 12 bytes per element)
  double softmax_elems_per_s = 0;    // causal softmax forward + backward, per score element
  double swiglu_elems_per_s = 0;     // SwiGLU forward + backward, per mid element
  double adamw_params_per_s = 0;     // AdamW, per parameter
  double op_alpha_s = 0;             // fixed cost of one element-wise op (a kernel launch on a GPU)
  AlphaBeta all_to_all, all_reduce;  // among these ranks
  // What one synchronising collective costs beyond its alpha when the ranks arrive from computing
  // (ranks descheduled on shared cores, arrival skew); charged at each point where a step waits for
  // every rank of its group.
  double sync_s = 0;
  // Measured / predicted compute time of a reference training step (calibrate): what the op
  // benchmarks miss in a real step (data leaving the caches between ops, ranks sharing cores while
  // others wait). Multiplies every compute term; 1 when not measured.
  double step_efficiency = 1;
};

struct CostConstants {
  std::string device;       // cpu | cuda
  std::string description;  // the machine, where the numbers come from
  std::vector<NodeConstants> nodes;  // by ranks per node, ascending
  AlphaBeta inter_all_to_all, inter_all_reduce;  // across nodes, per rank (bus bandwidth)
  bool overlap = false;  // shared experts beside the exchange and gradient sums beside the backward
  // The entry for `ranks` ranks on one node: the exact one, else the nearest calibrated above (below when
  // none is above). Throws InputError when there is none.
  const NodeConstants& node(int ranks) const;
};

std::string constants_to_json(const CostConstants& c);
// The element-wise median of calibrations of the same machine (each constant of each rank count over the
// files that have that rank count), so that one slow period of a shared machine does not set the model.
// Throws InputError when the files disagree on the device or a GEMM grid.
CostConstants median_constants(const std::vector<CostConstants>& runs);
// Reads a constants file; a malformed or incomplete one is an InputError naming the file and the field.
CostConstants read_constants(const std::string& path);
// Writes `c`, keeping the other node entries of the file at `path` when it exists (calibrate runs once
// per rank count and adds its entry).
void merge_constants_file(const std::string& path, const CostConstants& c);

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

// One training step of `c` (train.batch_size sequences over opt.ranks ranks) on a machine of `k`.
StepPrediction predict_step(const Config& c, const CostConstants& k, const PredictOptions& opt);

}  // namespace moe
