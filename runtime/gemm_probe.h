// The dense GEMM rate of a backend, measured: the denominator of model FLOP utilisation.
#pragma once

#include "runtime/backend.h"

namespace moe {

// FLOP/s of square n x n x n GEMMs (2 n^3 FLOPs each) in `dtype` on `backend`: one warm-up, then
// repetitions until `seconds` have passed (at least three). n = 0 picks 256 on the CPU, 4096 on a GPU.
double dense_gemm_rate(Backend& backend, DType dtype, int64_t n = 0, double seconds = 0.2);

}  // namespace moe
