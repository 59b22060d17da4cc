// The one GEMM timer: the dense GEMM rate behind the MFU denominator (the trainer's start-up probe), the
// dense reference of the layer benchmark and the cost model's GEMM grid all issue their GEMMs through it.
#pragma once

#include <vector>

#include "runtime/backend.h"
#include "runtime/ops/gemm.h"

namespace moe {

// One product C (m, n) = alpha op(A) op(W) + beta C, with op(A) (m, k) and op(W) (k, n).
struct GemmShape {
  int64_t m = 0, n = 0, k = 0;
  Trans ta = Trans::kN, tw = Trans::kT;
  double beta = 0;  // 1: accumulate into C (a weight gradient)
  double flops() const { return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k); }
};

// Operands for a list of GEMM shapes, issued in turn. Operands are random (normal, from the test streams)
// in `dtype` (BF16: bf16 operands into an F32 C); `sets` copies of each shape's operands are used one after
// another, so that repeated products find their operands in memory, not in the cache of the previous call
// (the cold-cache measurement of the cost model's grid).
class GemmTimer {
 public:
  GemmTimer(Backend& backend, DType dtype, std::vector<GemmShape> shapes, int sets = 1);

  // Issues `reps` passes over the shapes (no synchronisation: the caller times).
  void issue(int reps = 1);
  // Seconds `reps` passes take, after one warm-up pass, between two device synchronisations.
  double seconds(int reps);
  double flops() const;  // of one pass
  // Elements of C[0, 0..] of the last product of each shape that differ from a host evaluation in double
  // by more than the dtype's rounding allows (a check that the timed GEMMs compute what they should).
  int64_t wrong() const;

  // The square size the start-up probe uses: 256 on the CPU, 4096 on a GPU.
  static int64_t probe_size(const Backend& backend);

 private:
  struct Operands {
    Tensor a, w, c;
  };
  Backend& backend_;
  DType dtype_;
  std::vector<GemmShape> shapes_;
  std::vector<std::vector<Operands>> sets_;  // [shape][set]
  size_t next_ = 0;                          // the set the next pass uses
};

}  // namespace moe
