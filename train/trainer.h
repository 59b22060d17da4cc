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
#include "train/metrics.h"
#include "train/optimizer.h"

namespace moe {

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
  void print_sample();
  // Opens the metrics files on rank 0 (train/metrics.h: cut back to the resumed step, the start or resume
  // event); a failure there stops every rank with one line.
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
  std::unique_ptr<MetricsLog> metrics_;  // rank 0, when train.metrics_path is set
  std::vector<double> recent_step_times_;
  std::string last_checkpoint_;
  std::unique_ptr<CheckpointDir> checkpoint_dir_;  // this job's lock on train.checkpoint_dir
  int stopped_by_ = 0;
};

}  // namespace moe
