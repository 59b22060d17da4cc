// The training loop.
#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <limits>
#include <thread>

#include "comm/mpi/mpi_communicator.h"
#include "runtime/cpu/blas.h"
#include "runtime/gemm_timer.h"
#include "runtime/signals.h"
#include "train/safetensors.h"
#include "base/json.h"
#include "base/log.h"

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
  const int64_t n = GemmTimer::probe_size(backend);
  GemmTimer probe(backend, dtype == DType::kF64 ? DType::kF64 : DType::kF32, {GemmShape{n, n, n, Trans::kN, Trans::kN}});
  auto slowest = [&](double seconds) {
    std::vector<double> all(static_cast<size_t>(world.size()));
    world.host().all_gather(&seconds, all.data(), 1, DType::kF64);
    return *std::max_element(all.begin(), all.end());
  };
  world.barrier();
  const double three = slowest(probe.seconds(3));  // calibration
  const int reps = std::max(3, static_cast<int>(0.3 / std::max(three / 3, 1e-6)));
  world.barrier();
  const double seconds = slowest(probe.seconds(reps));
  return static_cast<double>(world.size()) * reps * probe.flops() / seconds;
}

// The CPU BLAS at start-up: the library and kernel, and one warning line when the measured dense rate per
// core is below what the CPU's vector features promise (runtime/cpu/blas.h), e.g. a kernel that does not
// know the CPU. Cores used per node: the node's ranks times their BLAS threads, at most its cores.
void report_blas(const Config& config, double dense_rate, Communicator& world) {
  const BlasInfo& blas = blas_setup(config.runtime.threads);
  const int local = mpi_local_size();  // collective: before rank 0 goes its own way
  if (world.rank() != 0) return;
  log_info("BLAS: " + blas.str() + ", " + std::to_string(config.runtime.threads) + " thread(s) per rank");
  if (!blas.warning.empty()) log_warn(blas.warning);
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  const double per_core = dense_rate / world.size() * local / std::min(local * config.runtime.threads, cores);
  const double floor = blas_rate_floor(blas, config.runtime.dtype == DType::kF64);
  if (floor > 0 && per_core < floor) {
    log_warn("the dense GEMM rate, " + count_str(per_core) + "FLOP/s per core, is below half of what this CPU's " +
             blas.features + " promises at " + std::to_string(static_cast<int>(blas.mhz)) + " MHz (" +
             count_str(2 * floor) + "FLOP/s): the BLAS kernel (" + blas.kernel +
             ") may not suit this CPU (docs/PERFORMANCE.md, \"The CPU BLAS\")");
  }
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / double(1 << 30));
  return buf;
}

// Refuses, before anything is allocated, a run whose estimated memory per rank exceeds 90% of what each
// rank can have: the device's available memory shared by the ranks that use it. Collective: every rank
// sees the smallest share, and the error names the key of the largest part.
void check_memory(const Config& config, Backend& backend, Communicator& world) {
  const MemoryEstimate m = estimate_memory(config, world.size());
  const int local = mpi_local_size();
  const int sharers = backend.device() == Device::kCuda
                          ? std::max(1, (local + std::max(1, cuda_device_count()) - 1) / std::max(1, cuda_device_count()))
                          : local;
  double share = backend.memory_available() / sharers;
  if (share <= 0) share = std::numeric_limits<double>::infinity();  // unknown: nothing to check against
  std::vector<double> all(static_cast<size_t>(world.size()));
  world.host().all_gather(&share, all.data(), 1, DType::kF64);
  share = *std::min_element(all.begin(), all.end());
  if (m.total() <= 0.9 * share) return;
  const double weights = m.parameters + m.optimizer;
  std::string key = m.activations >= weights && m.activations >= m.exchange ? "train.batch_size"
                    : weights >= m.exchange                                  ? "model.hidden"
                                                                             : "moe.capacity_factor";
  throw collective(ConfigError(
      key, "the run needs about " + gib(m.total()) + " per rank (parameters and gradients " + gib(m.parameters) +
               ", optimizer state " + gib(m.optimizer) + ", activations " + gib(m.activations) + ", token exchange " +
               gib(m.exchange) + ") but a rank has " + gib(share) + " (" +
               (backend.device() == Device::kCuda ? "free GPU memory" : "MemAvailable") + " shared by " +
               std::to_string(sharers) + " rank(s)); lower " + key + " or the model's sizes, or use more ranks"));
}

}  // namespace

Trainer::Trainer(const Config& config, Backend& backend, ProcessGroups& groups)
    : config_(config), backend_(backend), groups_(groups) {
  Communicator& world = *groups.world;
  validate_config(config_, world.size());
  check_memory(config_, backend, world);
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
  if (backend.device() == Device::kCpu) report_blas(config_, dense_rate_, world);
}

Trainer::~Trainer() = default;

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
  // A stop request (a signal on any rank) rides on the loss's all-reduce: every rank learns it at once.
  double vote = stop_signal() != 0 ? 1.0 : 0.0;
  const double ce = model_->forward(d_inputs, d_targets, ctx, &vote);
  r.stop_requested = vote > 0;
  model_->backward([this](const Param* first) { reducer_->ready_from(first); });
  reducer_->finish();
  timeline.lap(&r.times.allreduce);
  r.stats = model_->read_stats();
  r.stats.ce_loss = ce;
  r.stats.loss = ce + r.stats.aux_loss + r.stats.z_loss;
  timeline.lap(&r.times.other);

  // ---- gradients (reduced): clip, update. A diverged step (non-finite loss or gradient norm, both global)
  // stops every rank before the update, so no checkpoint ever holds it.
  r.lr = learning_rate(config_.train, state_.step);
  r.grad_norm = global_grad_norm(model_->params(), backend_, groups_);
  if (!std::isfinite(r.stats.loss) || !std::isfinite(r.grad_norm)) diverged(r);
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

void Trainer::report(const StepRecord& r, double elapsed, int64_t first_step) {
  if (metrics_) metrics_->write(r, config_.moe.force_routing);
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
  set_comm_where("start-up");
  checkpoint_dir_ = claim_checkpoint_dir(config_, world);
  std::string resume = resolve_resume(config_, world);
  if (!resume.empty()) {
    load(resume);
  } else if (config_.train.resume == "auto") {
    log_info("no checkpoint in " + config_.train.checkpoint_dir + "; starting from step 0");
  }
  open_metrics();
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
      world.host().broadcast(b.data(), 2, DType::kF64, 0);
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
    const bool stop = records.back().stop_requested && !last;
    bool periodic = config_.train.checkpoint_every > 0 && state_.step % config_.train.checkpoint_every == 0;
    if (!config_.train.checkpoint_dir.empty() && (last || periodic || stop)) save(config_.train.checkpoint_dir);
    if (stop) {
      stopped_by_ = stop_signal() != 0 ? stop_signal() : SIGTERM;  // a rank that only saw the others' vote
      log_info(std::string("stopped by a signal (") + signal_name(stopped_by_) + ") after step " +
               std::to_string(state_.step) + ": " +
               (config_.train.checkpoint_dir.empty() ? "no train.checkpoint_dir, nothing saved"
                                                     : "final checkpoint " + last_checkpoint_));
      return records;
    }
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

void Trainer::diverged(const StepRecord& r) {
  // The first non-finite tensor, in declaration order, over every rank (each expert shard scans its own).
  std::vector<Param*> params = model_->params().all();
  double first = static_cast<double>(2 * params.size());  // 2 i: value of params[i], 2 i + 1: its gradient
  for (size_t i = 0; i < params.size() && first == 2.0 * params.size(); ++i) {
    for (int g = 0; g < 2; ++g) {
      const Tensor& t = g ? params[i]->grad : params[i]->value;
      if (!t.defined()) continue;
      for (double v : to_doubles(backend_, t)) {
        if (!std::isfinite(v)) {
          first = 2.0 * static_cast<double>(i) + g;
          break;
        }
      }
      if (first < 2.0 * params.size()) break;
    }
  }
  std::vector<double> all(static_cast<size_t>(groups_.world->size()));
  groups_.world->host().all_gather(&first, all.data(), 1, DType::kF64);
  const size_t worst = static_cast<size_t>(*std::min_element(all.begin(), all.end()));
  std::string where = worst < 2 * params.size()
                          ? std::string(worst % 2 ? "the gradient of " : "") + params[worst / 2]->name
                          : "none (every parameter and gradient is finite)";
  // The keys that plausibly caused it, most likely first.
  const TrainConfig& t = config_.train;
  std::vector<std::pair<std::string, std::string>> causes{{"train.lr", "train.lr = " + format_double(t.lr)}};
  if (t.grad_clip <= 0) causes.emplace_back("train.grad_clip", "train.grad_clip = 0 (clipping off)");
  if (t.warmup_steps < 10) causes.emplace_back("train.warmup_steps", "train.warmup_steps = " + std::to_string(t.warmup_steps));
  if (config_.model.init_std > 0.1) {
    causes.emplace_back("model.init_std", "model.init_std = " + format_double(config_.model.init_std));
  }
  if (where.find(".router.") != std::string::npos && config_.moe.z_loss_coef <= 0) {
    causes.emplace_back("moe.z_loss_coef", "moe.z_loss_coef = 0 (router logits unbounded)");
  }
  if (config_.runtime.precision == Precision::kBf16) causes.emplace_back("runtime.precision", "runtime.precision = bf16");
  std::string list;
  for (size_t i = 0; i < causes.size(); ++i) list += (i ? ", " : "") + causes[i].second;
  // every rank sees the same global loss and norm
  throw collective(Error(ErrorKind::kInput,
                         "training diverged at step " + std::to_string(state_.step + 1) + ": loss " +
                             format_double(r.stats.loss) + ", gradient norm " + format_double(r.grad_norm) +
                             "; first non-finite tensor: " + where + "; nothing of this step was saved. Plausible causes: " + list,
                         causes.front().first));
}

void Trainer::open_metrics() {
  Communicator& world = *groups_.world;
  std::string failure;
  if (world.rank() == 0 && !config_.train.metrics_path.empty()) {
    RunStart start;
    start.ranks = world.size();
    start.ep = config_.parallel.ep;
    start.params_total = size_.total_params;
    start.params_active = size_.active_params;
    start.flops_per_token = size_.flops_per_token;
    start.tokens_per_step = static_cast<int64_t>(config_.train.batch_size) * config_.model.seq_len;
    start.dense_gflops_per_rank = dense_rate_ / world.size() * 1e-9;
    start.routing = config_.moe.force_routing;
    try {
      metrics_ = std::make_unique<MetricsLog>(config_.train.metrics_path, state_.step, start);
    } catch (const Error& e) {
      failure = e.what();
    }
  }
  broadcast_string(world, failure, 0);
  if (!failure.empty()) {
    throw collective(Error(ErrorKind::kInput, failure, "train.metrics_path"));
  }
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
