// `moe_bench layer`: MoE layer forward+backward throughput against the dense GEMM rate of the same FLOPs.
#pragma once

#include "launch/main_common.h"

namespace moe {

// Runs the benchmark under the job's MPI world; returns the process exit code (non-zero on a wrong result).
int run_layer_bench(const CommandLine& cl);

}  // namespace moe
