// The training loop.
#include "train/trainer.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "runtime/gemm_probe.h"
#include "runtime/json.h"
#include "runtime/log.h"

namespace moe {
namespace {

std::string count_str(double n) {
  char buf[32];
  if (n >= 1e9) {
    std::snprintf(buf, sizeof(buf), "%.2fB", n / 1e9);
  } else if (n >= 1e6) {
    std::snprintf(buf, sizeof(buf), "%.2fM", n / 1e6);
  } else if (n >= 1e3) {
    std::snprintf(buf, sizeof(buf), "%.1fK", n / 1e3);
  } else {
    std::snprintf(buf, sizeof(buf), "%.0f", n);
  }
  return buf;
}

// 1234567 -> "1,234,567"
std::string grouped(int64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

// The dense GEMM rate of the whole job: every rank runs the same number of GEMMs at the same time (so on
// a shared machine each gets its share), and the rate is their FLOPs over the slowest rank's time.
double measure_dense_rate(Backend& backend, DType dtype, Communicator& world) {
  const int64_t n = gemm_probe_size(backend);
  auto slowest = [&](double seconds) {
    std::vector<double> all(static_cast<size_t>(world.size()));
    world.all_gather(&seconds, all.data(), 1, DType::kF64);
    return *std::max_element(all.begin(), all.end());
  };
  world.barrier();
  const double three = slowest(dense_gemm_seconds(backend, dtype, n, 3));  // calibration
  const int reps = std::max(3, static_cast<int>(0.3 / std::max(three / 3, 1e-6)));
  world.barrier();
  const double seconds = slowest(dense_gemm_seconds(backend, dtype, n, reps));
  return static_cast<double>(world.size()) * reps * 2.0 * static_cast<double>(n) * n * n / seconds;
}

}  // namespace

Trainer::Trainer(const Config& config, Backend& backend, ProcessGroups& groups)
    : config_(config), backend_(backend), groups_(groups) {
  Communicator& world = *groups.world;
  validate_config(config_, world.size());
  // Rank 0 checks the data files first, so a missing or bad file is one message, not one per rank.
  if (world.rank() == 0) {
    data_ = make_train_data(config_);
    if (!config_.data.val_path.empty()) val_ = make_val_data(config_);
  }
  world.barrier();
  if (!data_) data_ = make_train_data(config_);
  if (!val_ && !config_.data.val_path.empty()) val_ = make_val_data(config_);
  model_ = std::make_unique<Transformer>(config_, backend, groups);
  reducer_ = std::make_unique<GradReducer>(model_->params(), groups, kGradBucketBytes);
  optimizer_ = std::make_unique<Optimizer>(config_.train, backend, model_->params());

  size_ = model_size(config_);
  dense_rate_ = measure_dense_rate(backend, config_.runtime.dtype, world);
  log_info("model: " + grouped(size_.total_params) + " parameters, " + grouped(size_.active_params) +
           " active per token (" + grouped(size_.embedding_params) + " in embeddings), " +
           std::to_string(num_moe_layers(config_)) + " of " + std::to_string(config_.model.layers) +
           " layers MoE; " + count_str(size_.flops_per_token) + "FLOP per token (training)");
  log_info("dense GEMM rate: " + count_str(dense_rate_) + "FLOP/s over " + std::to_string(world.size()) +
           " ranks (" + backend.name() + ", " + dtype_name(config_.runtime.dtype) + "), the MFU denominator");
}

Trainer::~Trainer() {
  if (metrics_) std::fclose(metrics_);
}

StepRecord Trainer::train_step() {
  const int world = groups_.world->size(), rank = groups_.world->rank();
  const int64_t seq_len = config_.model.seq_len;
  const int64_t local_seqs = config_.train.batch_size / world;
  const int64_t tokens = local_seqs * seq_len;
  StepRecord r;
  auto t_start = std::chrono::steady_clock::now();
  Timeline timeline(backend_);

  // ---- data: this rank's slice of the global batch
  Tensor inputs = host_tensor({tokens}, DType::kI32), targets = host_tensor({tokens}, DType::kI32);
  data_->sequences(state_.next_sequence + rank * local_seqs, local_seqs, static_cast<int>(seq_len),
                   inputs.data<int32_t>(), targets.data<int32_t>());
  Tensor d_inputs = backend_.empty({tokens}, DType::kI32), d_targets = backend_.empty({tokens}, DType::kI32);
  backend_.copy_from_host(inputs.raw(), d_inputs);
  backend_.copy_from_host(targets.raw(), d_targets);
  model_->params().zero_grads(backend_);
  timeline.lap(&r.times.other);

  // ---- forward, backward (gradient sums start as blocks finish), the rest of the sums
  StepContext ctx;
  ctx.step = state_.step;
  ctx.training = true;
  ctx.seq_len = seq_len;
  ctx.token_offset = rank * tokens;
  ctx.global_tokens = int64_t{config_.train.batch_size} * seq_len;
  ctx.times = &r.times;
  ctx.timeline = &timeline;
  const double ce = model_->forward(d_inputs, d_targets, ctx);
  model_->backward([this](const Param* first) { reducer_->ready_from(first); });
  reducer_->finish();
  timeline.lap(&r.times.allreduce);
  r.stats = model_->read_stats();
  r.stats.ce_loss = ce;
  r.stats.loss = ce + r.stats.aux_loss + r.stats.z_loss;
  timeline.lap(&r.times.other);
  if (!std::isfinite(r.stats.loss)) {
    // The loss is global, so every rank stops here together: one line, a clean exit.
    Error e(ErrorKind::kInput, "training diverged: loss is " + format_double(r.stats.loss) + " at step " +
                                   std::to_string(state_.step + 1) + " (lower train.lr?)", "train.lr");
    e.mark_collective();
    throw e;
  }

  // ---- gradients (reduced): clip, update
  r.lr = learning_rate(config_.train, state_.step);
  r.grad_norm = global_grad_norm(model_->params(), backend_, groups_);
  clip_gradients(model_->params(), backend_, r.grad_norm, config_.train.grad_clip);
  optimizer_->step(r.lr);
  if (config_.moe.bias_update_rate > 0) model_->update_balance_bias(config_.moe.bias_update_rate);
  timeline.lap(&r.times.optimizer);
  timeline.resolve(r.times);
  r.times.hidden_allreduce = std::max(0.0, reducer_->take_sum_seconds() - r.times.allreduce);

  ++state_.step;
  state_.next_sequence += config_.train.batch_size;
  r.step = state_.step;

  double dropped = 0, assignments = 0;
  for (const RouterStats& l : r.stats.layers) {
    dropped += l.dropped;
    assignments += l.assignments;
    double mean = 0, mx = 0;
    for (double v : l.load) mean += v, mx = std::max(mx, v);
    mean /= std::max<size_t>(1, l.load.size());
    if (mean > 0) r.max_mean_load = std::max(r.max_mean_load, mx / mean);
  }
  r.dropped_frac = assignments > 0 ? dropped / assignments : 0;
  r.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  r.tokens_per_s = static_cast<double>(ctx.global_tokens) / std::max(r.wall_s, 1e-12);
  r.mfu = dense_rate_ > 0 ? r.tokens_per_s * size_.flops_per_token / dense_rate_ : 0.0;
  return r;
}

EvalResult Trainer::evaluate() {
  MOE_CHECK(val_ != nullptr, "evaluate() without data.val_path");
  return moe::evaluate(*model_, *val_, config_, state_.step);
}

std::string Trainer::metrics_line(const StepRecord& r) const {
  JsonWriter j;
  j.begin_object();
  j.field("step", r.step).field("loss", r.stats.loss).field("ce", r.stats.ce_loss);
  j.field("aux", r.stats.aux_loss).field("z", r.stats.z_loss).field("lr", r.lr).field("grad_norm", r.grad_norm);
  j.field("dropped_frac", r.dropped_frac).field("max_mean_load", r.max_mean_load);
  j.field("tokens_per_s", r.tokens_per_s).field("mfu", r.mfu);
  if (r.eval) {
    j.field("val_loss", r.eval->loss).field("val_bits_per_token", r.eval->bits_per_token);
    if (r.eval->byte_level) j.field("val_bpb", r.eval->bits_per_token);
  }
  const PhaseTimes& t = r.times;
  j.key("time_s").begin_object();
  j.field("attention", t.attention).field("dense", t.dense);
  j.field("router", t.router).field("dispatch", t.dispatch).field("experts", t.experts).field("combine", t.combine);
  j.field("shared", t.shared).field("backward", t.backward).field("optimizer", t.optimizer);
  j.field("allreduce", t.allreduce).field("other", t.other).field("total", t.total()).field("wall", r.wall_s);
  j.field("hidden_shared", t.hidden_shared).field("hidden_allreduce", t.hidden_allreduce);
  j.end_object();
  j.key("layers").begin_array();
  for (const RouterStats& l : r.stats.layers) {
    j.begin_object().field("aux", l.aux_loss).field("z", l.z_loss);
    j.field("dropped_frac", l.assignments > 0 ? l.dropped / l.assignments : 0.0);
    std::vector<int64_t> load, tokens;
    for (double v : l.load) load.push_back(static_cast<int64_t>(v));
    for (double v : l.tokens) tokens.push_back(static_cast<int64_t>(v));
    j.array("load", load).array("tokens_per_expert", tokens);
    j.end_object();
  }
  j.end_array();
  j.end_object();
  return j.str();
}

void Trainer::report(const StepRecord& r, double elapsed, int64_t first_step) {
  if (metrics_) {
    std::string line = metrics_line(r) + "\n";
    if (std::fputs(line.c_str(), metrics_) < 0 || std::fflush(metrics_) != 0) {
      throw InputError(config_.train.metrics_path, std::string("cannot write metrics: ") + std::strerror(errno),
                       "train.metrics_path");
    }
  }
  recent_step_times_.push_back(r.wall_s);
  if (recent_step_times_.size() > 20) recent_step_times_.erase(recent_step_times_.begin());
  if (r.eval) {
    char line[160];
    std::snprintf(line, sizeof(line), "eval step %lld | val loss %.4f | %.4f bits/%s", static_cast<long long>(r.step),
                  r.eval->loss, r.eval->bits_per_token, r.eval->byte_level ? "byte" : "token");
    log_info(line);
  }
  if (r.step % config_.train.log_every != 0 && r.step != config_.train.steps && r.step != first_step + 1) return;
  double avg = 0;
  for (double t : recent_step_times_) avg += t;
  avg /= static_cast<double>(recent_step_times_.size());
  char line[512];
  int width = static_cast<int>(std::to_string(config_.train.steps).size());
  std::snprintf(line, sizeof(line),
                "step %*lld/%lld | loss %.4f | aux %.4f | z %.4f | %8.0f tok/s | MFU %4.1f%% | drop %5.2f%% | "
                "load max/mean %.2f | lr %.2e | %s elapsed | ETA %s",
                width, static_cast<long long>(r.step), static_cast<long long>(config_.train.steps), r.stats.loss,
                r.stats.aux_loss, r.stats.z_loss, r.tokens_per_s, 100.0 * r.mfu, 100.0 * r.dropped_frac,
                r.max_mean_load, r.lr, format_duration(elapsed).c_str(),
                format_duration(avg * static_cast<double>(config_.train.steps - r.step)).c_str());
  log_info(line);
}

std::vector<StepRecord> Trainer::run() {
  Communicator& world = *groups_.world;
  std::string resume = resolve_resume(config_, world);
  if (!resume.empty()) {
    load(resume);
  } else if (config_.train.resume == "auto") {
    log_info("no checkpoint in " + config_.train.checkpoint_dir + "; starting from step 0");
  }
  if (world.rank() == 0 && !config_.train.metrics_path.empty()) {
    std::filesystem::path parent = std::filesystem::path(config_.train.metrics_path).parent_path();
    std::error_code ec;
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    if (ec) {
      throw InputError(parent.string(), "cannot create the metrics directory: " + ec.message(), "train.metrics_path");
    }
    metrics_ = std::fopen(config_.train.metrics_path.c_str(), state_.step > 0 ? "a" : "w");
    if (!metrics_) {
      throw InputError(config_.train.metrics_path, std::string("cannot open metrics file: ") + std::strerror(errno),
                       "train.metrics_path");
    }
  }
  if (config_.train.eval_every > 0 && state_.step < config_.train.steps) {
    const int64_t n = num_eval_sequences(config_, val_->num_tokens());
    char line[200];
    std::snprintf(line, sizeof(line), "validation: %lld tokens",
                  static_cast<long long>(n * config_.model.seq_len));
    std::string text = line;
    if (config_.data.source == DataSource::kFile) {  // n-gram baselines of the training file
      Baselines base;
      if (world.rank() == 0) base = ngram_baselines(*data_, *val_, config_);
      std::vector<double> b{base.unigram, base.bigram};
      world.broadcast(b.data(), 2, DType::kF64, 0);
      std::snprintf(line, sizeof(line), "; baselines (bits/%s): unigram %.4f, bigram %.4f",
                    config_.model.vocab_size <= 256 ? "byte" : "token", b[0] / std::log(2.0), b[1] / std::log(2.0));
      text += line;
    }
    log_info(text);
  }
  std::vector<StepRecord> records;
  const int64_t first = state_.step;
  auto t0 = std::chrono::steady_clock::now();
  while (state_.step < config_.train.steps) {
    set_comm_where("step " + std::to_string(state_.step + 1));
    StepRecord r = train_step();
    const bool last = state_.step == config_.train.steps;
    if (config_.train.eval_every > 0 && (last || state_.step % config_.train.eval_every == 0)) {
      set_comm_where("the evaluation after step " + std::to_string(state_.step));
      r.eval = evaluate();
    }
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    report(r, elapsed, first);
    records.push_back(std::move(r));
    bool periodic = config_.train.checkpoint_every > 0 && state_.step % config_.train.checkpoint_every == 0;
    if (!config_.train.checkpoint_dir.empty() && (last || periodic)) save(config_.train.checkpoint_dir);
  }
  if (config_.train.sample_tokens > 0) {
    if (!last_checkpoint_.empty()) {
      print_sample();
    } else if (!records.empty()) {
      log_info("no sample: it is drawn from the final checkpoint, and train.checkpoint_dir is empty");
    }
  }
  return records;
}

void Trainer::print_sample() {
  set_comm_where("the sample after training");
  // Rank 0 alone reads the final checkpoint into a one-rank model (every expert local) and samples; the
  // others wait.
  Communicator& world = *groups_.world;
  // The sample is a courtesy after a finished run: a failure (out of memory for the one-rank model, say)
  // is a warning, not a failed job.
  if (world.rank() == 0) {
    try {
      std::string text = sample_from_checkpoint(backend_, last_checkpoint_, config_.train.sample_prompt,
                                                config_.train.sample_tokens, 0.8, 0, config_.train.seed);
      log_info("sample (" + std::to_string(config_.train.sample_tokens) + " tokens, temperature 0.8, seed " +
               std::to_string(config_.train.seed) + "):\n" + config_.train.sample_prompt + text);
    } catch (const std::exception& e) {
      log_warn(std::string("no sample: ") + e.what());
    }
  }
  world.barrier();
}

void Trainer::save(const std::string& dir) {
  set_comm_where("the checkpoint of step " + std::to_string(state_.step));
  last_checkpoint_ = save_checkpoint(dir, state_, config_, *model_, *optimizer_, groups_);
  log_info("checkpoint: " + last_checkpoint_);
}

void Trainer::load(const std::string& step_dir) {
  state_ = load_checkpoint(step_dir, config_, *model_, optimizer_.get(), groups_);
}

}  // namespace moe
