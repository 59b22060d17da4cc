// `moe_bench calibrate`: measures the cost model's constants for the job's rank count (every rank
// running the same work at once, as in training) and adds them to a constants file. Every measurement is
// a row of a benchmark table (perf/bench.h), printed as it goes.
#pragma once

#include <vector>

#include "perf/bench.h"
#include "perf/cost_model.h"

namespace moe {

// The flags and defaults of moe_bench calibrate (--out=FILE, --quick=1, --iters, --warmup).
BenchFlags calibrate_flags();
// Runs under the job's MPI world; rank 0 writes --out. Returns the exit code.
int run_calibrate(BenchRun& run);

// Least-squares fit of t = alpha + x / rate to points (x, t), weighted by 1/t^2 (relative error), so
// small and large sizes count alike; alpha is kept >= 0. Throws InternalError with fewer than 2 points.
AlphaBeta fit_alpha_beta(const std::vector<double>& x, const std::vector<double>& t);

}  // namespace moe
