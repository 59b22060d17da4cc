// The dense GEMM rate of a backend, measured: the denominator of model FLOP utilisation.
#pragma once

#include "runtime/backend.h"

namespace moe {

// The probe's square size: 256 on the CPU, 4096 on a GPU.
int64_t gemm_probe_size(const Backend& backend);
// Seconds that `reps` n x n x n GEMMs (2 n^3 FLOPs each) in `dtype` take on `backend`, after one warm-up.
double dense_gemm_seconds(Backend& backend, DType dtype, int64_t n, int reps);

}  // namespace moe
