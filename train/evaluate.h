// Evaluation: the validation loss of a model, the unigram and bigram baselines of the same tokens, and
// sampling text from a model.
//
// The evaluation set is sequences 0 .. n-1 of the validation file (never wrapping; train/data.h), n =
// train.eval_tokens / model.seq_len sequences (all that fit when 0), at least one. They are spread over
// the ranks in rounds of world x local sequences (local = train.batch_size / world, at least 1):
// sequence j goes to round j / (world * local), rank (j mod (world * local)) / local. The last round is
// padded with copies of sequence 0 whose tokens do not count. MoE layers route each sequence as its own
// capacity group (capacity moe_capacity(moe, S), config/config.h) and without noise, so the result depends
// neither on the number of ranks nor on the layout.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/transformer.h"
#include "train/data.h"

namespace moe {

struct EvalResult {
  double loss = 0;             // mean cross-entropy, nats per token
  int64_t tokens = 0;          // targets counted
  double bits_per_token = 0;   // loss / ln 2
  bool byte_level = false;     // tokens are bytes (model.vocab_size <= 256): bits per token = bits per byte
};

// Collective over the model's world. Nothing is kept for a backward.
EvalResult evaluate(Transformer& model, DataSet& val, const Config& config, int64_t step = 0);
// Sequences in the evaluation set of a validation file of val_tokens tokens (throws InputError naming
// data.val_path when not even one fits).
int64_t num_eval_sequences(const Config& config, int64_t val_tokens);

// Add-one (Laplace) smoothed n-gram models fitted on the training file, scored on the evaluation set's
// targets (the bigram's context is the token before each target):
//   unigram P(b) = (c(b) + 1) / (N + V),   bigram P(b | a) = (c(a, b) + 1) / (c(a) + V)
// where c counts the first N = min(file tokens, kBaselineTokens) tokens of the training file and their
// N - 1 adjacent pairs (c(a) as a context: every one of the N but the last).
constexpr int64_t kBaselineTokens = int64_t{1} << 26;
struct Baselines {
  double unigram = 0;  // nats per token
  double bigram = 0;
};
Baselines ngram_baselines(DataSet& train, DataSet& val, const Config& config);

// Generates `tokens` tokens after `prompt` (token ids, each below model.vocab_size: else ConfigError), one at a time from the logits of the last
// position over the last model.seq_len tokens (dropless routing, no noise): temperature <= 0 is greedy;
// top_k > 0 keeps the k most likely tokens. Draw i uses Philox (seed, kSample) at index i, so the same
// seed gives the same tokens. Collective over the model's world (every rank must pass the same prompt).
std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt, int64_t tokens,
                              double temperature, int top_k, uint64_t seed);

// Reads a checkpoint into a one-rank model on `backend` (every expert local; this process alone, no
// collective) and generates from the byte-level prompt; returns the generated text.
std::string sample_from_checkpoint(Backend& backend, const std::string& step_dir, const std::string& prompt,
                                   int64_t tokens, double temperature, int top_k, uint64_t seed);

// Byte-level text: bytes <-> token ids (the identity on 0..255).
std::vector<int32_t> bytes_to_tokens(const std::string& text);
std::string tokens_to_bytes(const std::vector<int32_t>& tokens);

}  // namespace moe
