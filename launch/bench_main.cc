// moe_bench: the benchmarks, each a set of rows on one engine (perf/bench.h) with one table format
// (nccl-tests style); exit code 1 on a wrong result. See kUsage for the options.
#include <cstdio>
#include <string>

#include "comm/mpi/mpi_communicator.h"
#include "launch/main_common.h"
#include "perf/a2a_bench.h"
#include "perf/calibrate.h"
#include "perf/layer_bench.h"
#include "perf/torch_bench.h"

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
    "       mpirun -np N moe_bench calibrate --out=FILE [--iters=7] [--warmup=1] [--quick=1] [--device=cpu|cuda]\n"
    "                 [--format=table|json|csv]\n"
    "the cost model's constants with N ranks running at once (GEMM grid, element-wise rates, all_to_all and\n"
    "all_reduce alpha-beta, a reference step), each measurement a row, added to FILE as its entry for N\n"
    "ranks per node (docs/STUDIES.md).\n"
    "\n"
    "       moe_bench torch [--tokens=16384] [--hidden=2048] [--experts=64] [--top_k=6] [--ffn_hidden=1408]\n"
    "                 [--shared=0,2] [--dtype=bf16,fp32] [--model=qwen2_moe|deepseek] [--iters=20] [--warmup=5]\n"
    "                 [--format=table|json|csv]\n"
    "the PyTorch eager MoE block of `transformers` at the same shapes (tools/torch_moe_block.py, a GPU and\n"
    "python3 with torch and transformers), its rows printed by the same engine.\n";

// The benchmark's options as "name=value" (configuration overrides and the bench's own flags alike).
std::vector<std::string> bench_args(const CommandLine& cl) {
  if (!cl.config_path.empty()) {
    throw collective(ConfigError(
        "", "moe_bench takes no configuration file (got '" + cl.config_path + "'); give keys as --section.key=value"));
  }
  std::vector<std::string> args = cl.flags;
  args.insert(args.end(), cl.overrides.begin(), cl.overrides.end());
  return args;
}

int bench(const std::string& what, const CommandLine& cl) {
  const BenchFlags flags = what == "a2a"         ? a2a_bench_flags()
                           : what == "calibrate" ? calibrate_flags()
                           : what == "torch"     ? torch_bench_flags()
                                                 : layer_bench_flags();
  const BenchOptions options = parse_bench_options(what, bench_args(cl), flags);
  // The backend and the groups of the first row's configuration: one ep group of every rank.
  Config base = on_every_rank([&] { return parse_config("", "", options.sweep.point(0)); });
  auto world = make_mpi_world();
  auto backend = make_backend(base, *world);
  base.parallel.ep = world->size();
  ProcessGroups groups = make_groups(base, *backend, std::move(world));
  BenchRun run(*backend, groups, options);
  if (what == "a2a") return run_a2a_bench(run);
  if (what == "calibrate") return run_calibrate(run);
  if (what == "torch") return run_torch_bench(run);
  return run_layer_bench(run);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (print_usage_if_asked(argc, argv, kUsage)) return 0;
  const std::string what = argv[1];
  if (what != "layer" && what != "a2a" && what != "calibrate" && what != "torch") {
    std::fprintf(stderr, "moe_bench: unknown benchmark '%s'\n%s", what.c_str(), kUsage);
    return 2;
  }
  return run_job(argc, argv, "moe_bench", [&] { return bench(what, parse_command_line(argc, argv, 2)); });
}
