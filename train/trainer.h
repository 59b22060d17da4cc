// The training loop: data -> forward -> backward (gradient sums started as blocks finish) -> clipping ->
// optimizer -> loss-free bias update, with progress lines, JSON metrics, evaluation and checkpoints.
#pragma once

#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/evaluate.h"
#include "train/grad_reduce.h"
#include "train/optimizer.h"

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

// The run's events file beside the metrics file: "<stem>.events.jsonl" for "<stem>.jsonl", else
// "<path>.events.jsonl". The metrics file holds one line per step and nothing else; the events file holds
// the start event of a fresh run and a resume event per resume.
std::string metrics_events_path(const std::string& metrics_path);

class Trainer {
 public:
  Trainer(const Config& config, Backend& backend, ProcessGroups& groups);
  ~Trainer();

  // Resumes if configured, trains to train.steps, evaluates, writes checkpoints and metrics. Returns the
  // records of the steps it ran. A stop signal (runtime/signals.h) ends the run at the next step
  // boundary on every rank, after a final checkpoint.
  std::vector<StepRecord> run();
  // The signal that stopped the run early (0 when it ran to train.steps): main() exits with 128 + it.
  int stopped_by() const { return stopped_by_; }
  StepRecord train_step();
  // The validation loss of the model as it is (collective).
  EvalResult evaluate();

  void save(const std::string& dir);
  void load(const std::string& step_dir);
  int64_t step() const { return state_.step; }
  Transformer& model() { return *model_; }
  const ModelSize& size() const { return size_; }

 private:
  void report(const StepRecord& r, double elapsed, int64_t first_step);
  std::string metrics_line(const StepRecord& r) const;
  void print_sample();
  // Opens the metrics file (rank 0): after resuming at step S, lines of later steps (a run that died
  // after S) and a torn last line are cut off first, in the metrics file and in the events file
  // (metrics_events_path), which gets the start event of a fresh run or a resume event recording how many
  // steps are redone. Events inline in a metrics file of the earlier format move to the events file.
  void open_metrics();
  // The divergence error of a step with a non-finite loss or gradient norm.
  [[noreturn]] void diverged(const StepRecord& r);

  Config config_;
  Backend& backend_;
  ProcessGroups& groups_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<GradReducer> reducer_;
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<DataSet> data_, val_;
  TrainingState state_;
  ModelSize size_;
  double dense_rate_ = 0;  // FLOP/s of dense GEMMs, summed over the ranks (measured at start-up)
  std::FILE* metrics_ = nullptr;
  std::vector<double> recent_step_times_;
  std::string last_checkpoint_;
  std::unique_ptr<CheckpointDir> checkpoint_dir_;  // this job's lock on train.checkpoint_dir
  int stopped_by_ = 0;
};

}  // namespace moe
