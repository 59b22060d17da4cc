// `moe_bench torch`: the PyTorch eager MoE block of `transformers` (tools/torch_moe_block.py) at the
// layer benchmark's shapes, one row per (shared experts, dtype), printed by the same engine as our rows so
// that the two tables read alike. Each row runs the script once, on one GPU; it times its own
// repetitions with CUDA events (warm-up and median as the engine does), since its work is in another
// process. The PyTorch block is the reference here, so its rows have nothing to check ("-").
#pragma once

#include "perf/bench.h"

namespace moe {

BenchFlags torch_bench_flags();
int run_torch_bench(BenchRun& run);

}  // namespace moe
