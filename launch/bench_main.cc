// moe_bench: benchmarks with one table format (nccl-tests style); exit code 1 on a wrong result.
// See kUsage for the options.
#include <cstdio>
#include <string>

#include "launch/a2a_bench.h"
#include "launch/calibrate.h"
#include "launch/layer_bench.h"

using namespace moe;

namespace {
const char* kUsage =
    "usage: mpirun -np N moe_bench layer [--tokens=4096] [--hidden=512] [--experts=8] [--top_k=2]\n"
    "                 [--shared=0,1] [--ffn_hidden=0] [--capacity_factor=1.25] [--expert_type=swiglu]\n"
    "                 [--force_routing=off] [--precision=fp32] [--threads=1] [--dtype=float32] [--device=cpu]\n"
    "                 [--section.key=value ...] [--iters=10] [--warmup=2] [--format=table|json|csv]\n"
    "The short names stand for configuration keys (tokens: model.seq_len, tokens per rank; experts:\n"
    "moe.num_experts; shared: moe.num_shared_experts; ...); any other key of docs/CONFIG.md may be given\n"
    "as --section.key. A comma list of a sweepable key gives one row per combination. ep = ranks.\n"
    "\n"
    "       mpirun -np N moe_bench a2a [--min_bytes=1024] [--max_bytes=16777216] [--factor=4] [--iters=20]\n"
    "                 [--warmup=5] [--device=cpu|cuda] [--moe=1] [--tokens=1024] [--hidden=512] [--experts=2N]\n"
    "                 [--top_k=2] [--capacity_factor=1.25,0] [--force_routing=off] [--format=table|json|csv]\n"
    "all_to_all and all_to_all_v over the size sweep (nccl-tests columns, each rank verifies what it got),\n"
    "then per MoE shape (--moe=0: none) one layer's dispatch + combine against the raw collective.\n"
    "\n"
    "       mpirun -np N moe_bench calibrate --out=FILE [--iters=7] [--quick=1] [--device=cpu|cuda]\n"
    "the cost model's constants with N ranks running at once (GEMM grid, element-wise rates, all_to_all and\n"
    "all_reduce alpha-beta), added to FILE as its entry for N ranks per node (docs/STUDIES.md).\n";
}

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  for (int i = 2; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  std::string what = argv[1];
  if (what == "a2a") {
    return run_job(argc, argv, "moe_bench", [&] { return run_a2a_bench(parse_command_line(argc, argv, 2)); });
  }
  if (what == "calibrate") {
    return run_job(argc, argv, "moe_bench", [&] { return run_calibrate(parse_command_line(argc, argv, 2)); });
  }
  if (what != "layer") {
    std::fprintf(stderr, "moe_bench: unknown benchmark '%s'\n%s", what.c_str(), kUsage);
    return 2;
  }
  return run_job(argc, argv, "moe_bench", [&] {
    CommandLine cl = parse_command_line(argc, argv, 2);
    return run_layer_bench(cl);
  });
}
