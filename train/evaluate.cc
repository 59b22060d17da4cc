// Validation loss, n-gram baselines and sampling.
#include "train/evaluate.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "comm/mpi/mpi_communicator.h"
#include "runtime/ops/norm_loss.h"
#include "runtime/rng.h"
#include "train/checkpoint.h"

namespace moe {

int64_t num_eval_sequences(const Config& config, int64_t val_tokens) {
  const int64_t s = config.model.seq_len;
  const int64_t fit = val_tokens > s ? (val_tokens - 1) / s : 0;
  const int64_t want = config.train.eval_tokens > 0 ? std::max<int64_t>(1, config.train.eval_tokens / s) : fit;
  const int64_t n = std::min(want, fit);
  if (n < 1) {
    throw InputError(config.data.val_path, "empty validation split: " + std::to_string(val_tokens) +
                                               " tokens, one sequence needs model.seq_len + 1 = " +
                                               std::to_string(s + 1), "data.val_path");
  }
  return n;
}

EvalResult evaluate(Transformer& model, DataSet& val, const Config& config, int64_t step) {
  Backend& backend = *model.backend();
  Communicator& world = *model.groups().world;
  const int ranks = world.size(), rank = world.rank();
  const int64_t s = config.model.seq_len, n = num_eval_sequences(config, val.num_tokens());
  const int64_t local = std::max<int64_t>(1, config.train.batch_size / ranks), per_round = local * ranks;
  double sum = 0;
  std::vector<int32_t> in(static_cast<size_t>(local * s)), tg(static_cast<size_t>(local * s));
  for (int64_t first = 0; first < n; first += per_round) {
    // This rank's sequences of the round: [mine, mine + real) are real, the rest pad with sequence 0.
    const int64_t mine = first + rank * local;
    const int64_t real = std::clamp<int64_t>(n - mine, 0, local);
    if (real > 0) val.sequences(mine, real, static_cast<int>(s), in.data(), tg.data());
    for (int64_t p = real; p < local; ++p) val.sequences(0, 1, static_cast<int>(s), &in[p * s], &tg[p * s]);
    Tensor inputs = backend.empty({local * s}, DType::kI32), targets = backend.empty({local * s}, DType::kI32);
    backend.copy_from_host(in.data(), inputs);
    backend.copy_from_host(tg.data(), targets);
    StepContext ctx;
    ctx.step = step;
    ctx.training = false;
    ctx.seq_len = s;
    ctx.group_size = s;  // every sequence its own capacity group
    ctx.token_offset = (first + rank * local) * s;
    ctx.global_tokens = per_round * s;
    Tensor logits = model.logits(inputs, ctx);
    if (real > 0) {
      Tensor none;
      sum += cross_entropy(backend, logits.rows(0, real * s), targets.rows(0, real * s), 1.0, none);
    }
  }
  std::vector<double> total{sum};
  world.all_reduce_sum(total);
  EvalResult r;
  r.tokens = n * s;
  r.loss = total[0] / static_cast<double>(r.tokens);
  r.bits_per_token = r.loss / std::log(2.0);
  r.byte_level = config.model.vocab_size <= 256;
  return r;
}

Baselines ngram_baselines(DataSet& train, DataSet& val, const Config& config) {
  const int64_t v = config.model.vocab_size, s = config.model.seq_len;
  const int64_t n_train = std::min<int64_t>(train.num_tokens(), kBaselineTokens);
  MOE_CHECK(n_train >= 2, "baselines need a training file of at least 2 tokens");
  // Counts over the (first kBaselineTokens) training tokens: unigrams, and bigrams in a dense V x V table
  // for small vocabularies or a hash map of the pairs seen otherwise.
  std::vector<double> uni(static_cast<size_t>(v), 0.0);
  const bool dense = v <= 1024;
  std::vector<uint32_t> bi_dense(dense ? static_cast<size_t>(v * v) : 0, 0);
  std::unordered_map<uint64_t, uint32_t> bi;
  constexpr int64_t kChunk = int64_t{1} << 16;
  std::vector<int32_t> buf(static_cast<size_t>(kChunk + 1));
  for (int64_t first = 0; first < n_train; first += kChunk) {
    const int64_t count = std::min(kChunk + 1, n_train - first);  // one token of overlap: the last pair
    train.tokens(first, count, buf.data());
    for (int64_t i = 0; i < std::min(kChunk, count); ++i) uni[buf[i]] += 1;
    for (int64_t i = 0; i + 1 < count; ++i) {
      if (dense) {
        ++bi_dense[static_cast<size_t>(buf[i]) * v + buf[i + 1]];
      } else {
        ++bi[static_cast<uint64_t>(buf[i]) * static_cast<uint64_t>(v) + buf[i + 1]];
      }
    }
  }
  std::vector<double> ctx_count(uni);  // c(a) as a context: every counted token but the last
  int32_t last = 0;
  train.tokens(n_train - 1, 1, &last);
  ctx_count[last] -= 1;
  const int64_t n = num_eval_sequences(config, val.num_tokens());
  std::vector<int32_t> in(static_cast<size_t>(s)), tg(static_cast<size_t>(s));
  double uni_nll = 0, bi_nll = 0;
  for (int64_t j = 0; j < n; ++j) {
    val.sequences(j, 1, static_cast<int>(s), in.data(), tg.data());
    for (int64_t i = 0; i < s; ++i) {
      const int32_t prev = in[i], t = tg[i];
      uni_nll -= std::log((uni[t] + 1.0) / (static_cast<double>(n_train) + v));
      double c_ab = 0;
      if (dense) {
        c_ab = bi_dense[static_cast<size_t>(prev) * v + t];
      } else {
        auto it = bi.find(static_cast<uint64_t>(prev) * static_cast<uint64_t>(v) + t);
        c_ab = it == bi.end() ? 0.0 : it->second;
      }
      bi_nll -= std::log((c_ab + 1.0) / (ctx_count[prev] + v));
    }
  }
  const double count = static_cast<double>(n * s);
  return Baselines{uni_nll / count, bi_nll / count};
}

std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt, int64_t tokens,
                              double temperature, int top_k, uint64_t seed) {
  Backend& backend = *model.backend();
  const Config& config = model.config();
  const int64_t max_len = config.model.seq_len, v = config.model.vocab_size;
  if (prompt.empty()) throw ConfigError("", "the prompt is empty; give at least one token");
  for (int32_t t : prompt) {
    if (t < 0 || t >= v) {
      throw ConfigError("model.vocab_size", "prompt token " + std::to_string(t) + " is outside the vocabulary of " +
                                                std::to_string(v));
    }
  }
  RngStream rng{seed, rng_stream(RngPurpose::kSample, 0)};
  std::vector<int32_t> text = prompt, out;
  for (int64_t i = 0; i < tokens; ++i) {
    const int64_t len = std::min<int64_t>(max_len, static_cast<int64_t>(text.size()));
    std::vector<int32_t> window(text.end() - len, text.end());
    Tensor inputs = backend.empty({len}, DType::kI32);
    backend.copy_from_host(window.data(), inputs);
    StepContext ctx;
    ctx.training = false;
    ctx.dropless = true;
    ctx.seq_len = len;
    ctx.global_tokens = len;
    std::vector<double> logits = to_doubles(backend, model.logits(inputs, ctx).rows(len - 1, len));
    // Sampling distribution: the top_k largest logits (all when 0), softmax at the temperature.
    std::vector<int32_t> order(static_cast<size_t>(v));
    for (int32_t t = 0; t < v; ++t) order[t] = t;
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    int32_t next = order[0];
    if (temperature > 0) {
      const int64_t keep = top_k > 0 ? std::min<int64_t>(top_k, v) : v;
      std::vector<double> p(static_cast<size_t>(keep));
      double total = 0;
      for (int64_t r = 0; r < keep; ++r) total += (p[r] = std::exp((logits[order[r]] - logits[order[0]]) / temperature));
      double u = rng.uniform(static_cast<uint64_t>(i)) * total, acc = 0;
      next = order[keep - 1];
      for (int64_t r = 0; r < keep; ++r) {
        acc += p[r];
        if (u < acc) {
          next = order[r];
          break;
        }
      }
    }
    text.push_back(next);
    out.push_back(next);
  }
  return out;
}

std::string sample_from_checkpoint(Backend& backend, const std::string& step_dir, const std::string& prompt,
                                   int64_t tokens, double temperature, int top_k, uint64_t seed) {
  ProcessGroups self = make_process_groups(make_mpi_self(), 1);
  Config config = checkpoint_config(step_dir, {"parallel.ep=1"}, *self.world);
  if (config.model.vocab_size > 256) {
    throw ConfigError("model.vocab_size", "text samples need a byte-level model (vocab_size <= 256), this one has " +
                                              std::to_string(config.model.vocab_size));
  }
  Transformer model(config, backend, self);
  load_checkpoint(step_dir, config, model, nullptr, self);
  return tokens_to_bytes(generate(model, bytes_to_tokens(prompt), tokens, temperature, top_k, seed));
}

std::vector<int32_t> bytes_to_tokens(const std::string& text) {
  std::vector<int32_t> out;
  for (unsigned char c : text) out.push_back(c);
  return out;
}

std::string tokens_to_bytes(const std::vector<int32_t>& tokens) {
  std::string out;
  for (int32_t t : tokens) out.push_back(static_cast<char>(static_cast<unsigned char>(t)));
  return out;
}

}  // namespace moe
