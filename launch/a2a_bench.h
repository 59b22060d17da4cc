// `moe_bench a2a`: the all-to-all collectives in the nccl-tests table format, self-verified, and one MoE
// layer's exchange against the raw collective moving the same bytes.
#pragma once

#include <string>

#include "launch/main_common.h"

namespace moe {

// Runs the benchmark under the job's MPI world; returns the process exit code (non-zero on a wrong result).
int run_a2a_bench(const CommandLine& cl);

// One row of the raw table.
struct RawRow {
  std::string op;        // all_to_all | all_to_all_v
  double bytes, count;   // what one rank sends (all_to_all_v: the mean over ranks)
  double time_us;        // the slowest rank's median
  double algbw, busbw;   // GB/s
  int64_t wrong;         // elements received that differ from what their sender was to send, all ranks
};
// all_to_all (vary = false) or all_to_all_v with uneven pair counts of about `bytes` per rank over comm;
// world times and sums. Collective over world.
RawRow a2a_row(Backend& backend, Communicator& comm, Communicator& world, bool vary, size_t bytes, int iters,
               int warmup);

// One row of the MoE table.
struct MoeRow {
  int64_t tokens, hidden, experts, top_k;
  std::string capacity_factor, routing;
  double bytes;            // bytes one rank sends in the dispatch (the mean over ranks)
  double ours_us, raw_us;  // dispatch + combine; two raw all_to_alls of the same bytes
  int64_t wrong;           // tokens whose output is not x times the sum of their kept gates, all ranks
};
// One MoE layer's routing for config c (model.seq_len tokens per rank, ep = every rank of groups), then
// the timed dispatch + combine with identity experts against the raw collective.
MoeRow moe_exchange_row(Backend& backend, ProcessGroups& groups, const Config& c, int iters, int warmup);

}  // namespace moe
