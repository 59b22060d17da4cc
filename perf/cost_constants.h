// The cost model's constants: what a machine gives each rank (measured by `moe_bench calibrate`, or
// documented for hardware we do not have, configs/hardware/), per rank count on a node, and across nodes.
// docs/STUDIES.md, "The cost model", gives every equation that uses them.
#pragma once

#include <string>
#include <vector>

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

}  // namespace moe
