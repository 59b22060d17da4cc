// Training and validation data: token files (two formats) and a deterministic synthetic generator.
//
// Token files, little-endian:
//   MOETOK01 (ours, written by moe_data):
//     bytes  0..7   magic "MOETOK01"
//     bytes  8..11  uint32 header size in bytes (32)
//     bytes 12..15  uint32 bytes per token (1 or 2)
//     bytes 16..23  uint64 number of tokens N
//     bytes 24..27  uint32 vocabulary size (every token is below it)
//     bytes 28..31  uint32 reserved, 0
//     bytes 32..    N tokens
//   llm.c shards (tokenized elsewhere, e.g. GPT-2 tokens):
//     256 x int32 header: [0] = 20240520 (magic), [1] = 1 (version), [2] = N; then N uint16 tokens.
// The format is told by the first bytes. Every token must be below model.vocab_size (checked when the
// file is opened, before step 1).
//
// Sequence j of a file is the seq_len + 1 tokens starting at (j * seq_len) mod (N - seq_len): inputs are
// its first seq_len tokens, targets the last seq_len. Training step s reads global sequences
// [s * B, (s + 1) * B) (B = train.batch_size), rank r taking the r-th of `world` equal slices, so the
// data a sequence sees is a function of j alone, never of the number of ranks. Evaluation reads
// sequences 0, 1, 2, ... of the validation file, which never wrap (j * seq_len + seq_len < N).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"

namespace moe {

enum class TokenFormat : uint8_t { kMoe, kLlmc };

struct TokenFileInfo {
  std::string path;
  TokenFormat format = TokenFormat::kMoe;
  uint32_t token_bytes = 1;
  uint64_t num_tokens = 0;
  uint32_t vocab_size = 0;  // from the header (MOETOK01); 0 for llm.c files, which do not record it
  uint64_t header_bytes = 0;
};

constexpr uint32_t kTokenFileHeaderBytes = 32;
constexpr int32_t kLlmcMagic = 20240520;
constexpr uint64_t kLlmcHeaderBytes = 256 * 4;

// Reads and checks the header and the file size. Throws InputError naming `key` when the file is
// missing, not a token file of either format, or truncated.
TokenFileInfo read_token_file_info(const std::string& path, const std::string& key = "data.path");
// Writes tokens (each < vocab_size) atomically as MOETOK01: a temporary file, then rename.
void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size);
// Writes an llm.c shard (version 1, uint16 tokens) atomically.
void write_llmc_file(const std::string& path, const std::vector<uint32_t>& tokens);

class DataSet {
 public:
  virtual ~DataSet() = default;
  // inputs and targets each (count * seq_len): sequence j's tokens 0..L-1 and 1..L, j = first..first+count-1.
  virtual void sequences(int64_t first, int64_t count, int seq_len, int32_t* inputs, int32_t* targets) = 0;
  // Tokens in the file (0 for the synthetic source, which is endless).
  virtual int64_t num_tokens() const = 0;
  // out (count) = tokens [first, first + count) of the file (first + count <= num_tokens()).
  virtual void tokens(int64_t first, int64_t count, int32_t* out) = 0;
};

// A Markov chain over the vocabulary: each token has four likely successors (weights 8:4:2:1) plus a
// small uniform background, all keyed by the seed.
std::unique_ptr<DataSet> make_synthetic_data(uint64_t seed, int vocab_size);
// Opens a token file, checks it against the model (header, every token below vocab_size, at least
// min_tokens tokens) and maps it read-only. Throws InputError naming `key`.
std::unique_ptr<DataSet> make_file_data(const std::string& path, int vocab_size, int64_t min_tokens,
                                        const std::string& key = "data.path");

// The training data of a configuration (data.source).
std::unique_ptr<DataSet> make_train_data(const Config& config);
// The validation data (data.val_path), which must hold at least one sequence (model.seq_len + 1 tokens).
std::unique_ptr<DataSet> make_val_data(const Config& config);

}  // namespace moe
