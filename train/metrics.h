// The run's metrics files, written by rank 0 and read back by the study reports and the cost model.
//
//   <path>                 one JSON line per step (metrics_line), nothing else
//   <stem>.events.jsonl    the start event of a fresh run, then a resume event per resume
//
// A resume at step S cuts both back to S (lines of later steps belong to the run it replaces) and drops a
// torn last line. A metrics file of the earlier format (its events inline) is read as it is, and its events
// move to the events file at the next resume: that migration lives here and nowhere else.
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "config/enums.h"
#include "model/context.h"
#include "model/transformer.h"
#include "train/evaluate.h"

namespace moe {

// Everything reported about one step (global values; times from rank 0).
struct StepRecord {
  int64_t step = 0;  // 1-based: the number of steps completed
  StepStats stats;
  double lr = 0;
  double grad_norm = 0;
  double dropped_frac = 0;   // capacity-dropped assignments / all assignments, all MoE layers
  double max_mean_load = 0;  // max over MoE layers of max_i load_i / mean load (before capacity)
  double tokens_per_s = 0;   // global tokens / wall_s
  double wall_s = 0;         // the step on the host clock, start to end
  double mfu = 0;            // model FLOP utilisation: achieved FLOP/s / the measured dense GEMM rate
  std::optional<EvalResult> eval;  // the validation loss, on evaluation steps
  bool stop_requested = false;     // a rank received a stop signal before this step's loss all-reduce
  PhaseTimes times;
};

// What a study report needs to know about a run besides its steps: the start event.
struct RunStart {
  int ranks = 0, ep = 0;
  int64_t params_total = 0, params_active = 0, tokens_per_step = 0;
  double flops_per_token = 0;
  double dense_gflops_per_rank = 0;  // the measured dense GEMM rate of one rank (the MFU denominator / ranks)
  ForcedRouting routing;
};

// "<stem>.events.jsonl" for "<stem>.jsonl", else "<path>.events.jsonl".
std::string metrics_events_path(const std::string& metrics_path);
// The step's JSON line (without the newline). `routing` is recorded when forced.
std::string metrics_line(const StepRecord& r, const ForcedRouting& routing);

// The metrics and events files of one run, open for appending step lines.
class MetricsLog {
 public:
  // Opens `path` for a run at `resumed_step` (0: a fresh run, which starts both files over and writes the
  // start event; S > 0: cuts both back to step S and writes a resume event with the steps lost). Throws
  // InputError naming the file.
  MetricsLog(const std::string& path, int64_t resumed_step, const RunStart& start);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  // Appends the step's line and flushes it. Throws InputError (key train.metrics_path) when it cannot.
  void write(const StepRecord& r, const ForcedRouting& routing);

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
};

// What one training run's metrics say.
struct RunSummary {
  bool started = false;
  int64_t steps = 0;    // step lines read
  int64_t skipped = 0;  // of which the first `skipped` are warm-up, outside the medians and means
  int64_t last_step = 0;
  int ranks = 0, ep = 0;
  int64_t params_total = 0, params_active = 0, tokens_per_step = 0;
  double flops_per_token = 0;
  std::string routing = "off";
  // Medians / means over the measured steps (all but the warm-up).
  double tokens_per_s = 0, mfu = 0;
  PhaseTimes times;   // mean seconds per step of every phase, and of the hidden times
  double wall_s = 0;  // mean wall seconds per step
  double max_mean_load = 0, dropped_frac = 0;
  struct Eval {
    int64_t step;
    double tokens, wall_s, loss, bpb;  // bpb: bits per byte for byte-level models, else bits per token
  };
  std::vector<Eval> evals;  // wall_s: the steps' wall time up to this step
  // Per MoE layer, per step (one row per step), the load of each expert over the mean load.
  std::vector<std::vector<std::vector<double>>> load;  // [layer][step][expert]
};
// `warmup` is the fraction of the steps left out of the medians and means (at least one step, never all).
// `jsonl`: event and step lines in any order (a metrics file of the earlier format holds both).
RunSummary summarize_metrics(const std::string& jsonl, const std::string& what, double warmup = 0.1);
// The same for the run whose train.metrics_path is `metrics_path`: its events file (when there is one)
// and its metrics file.
RunSummary summarize_metrics_file(const std::string& metrics_path, double warmup = 0.1);

}  // namespace moe
