// Training data: token files and a deterministic synthetic generator.
//
// Token file layout (little-endian), written by moe_data:
//   bytes  0..7   magic "MOETOK01"
//   bytes  8..11  uint32 header size in bytes (32)
//   bytes 12..15  uint32 bytes per token (1 or 2)
//   bytes 16..23  uint64 number of tokens N
//   bytes 24..27  uint32 vocabulary size (every token is below it)
//   bytes 28..31  uint32 reserved, 0
//   bytes 32..    N tokens
//
// A step reads global sequences [step * B, (step + 1) * B); rank r takes the r-th of `world` equal
// slices. Sequence j of a file is the seq_len + 1 tokens from (j * seq_len) mod (N - seq_len), so the
// data a sequence sees is a function of j alone, never of the number of ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/config.h"

namespace moe {

struct TokenFileInfo {
  std::string path;
  uint32_t token_bytes = 1;
  uint64_t num_tokens = 0;
  uint32_t vocab_size = 0;
};

constexpr uint32_t kTokenFileHeaderBytes = 32;

// Reads and checks the header and the file size. Throws InputError (key data.path) when the file is
// missing, not a token file, or truncated.
TokenFileInfo read_token_file_info(const std::string& path);
// Writes tokens (each < vocab_size) atomically: a temporary file, then rename.
void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size);

class DataSet {
 public:
  virtual ~DataSet() = default;
  // inputs and targets each (count * seq_len): sequence j's tokens 0..L-1 and 1..L.
  virtual void sequences(int64_t first, int64_t count, int seq_len, int32_t* inputs, int32_t* targets) = 0;
};

// A Markov chain over the vocabulary: each token has four likely successors (weights 8:4:2:1) plus a
// small uniform background, all keyed by the seed. A model without attention can learn it exactly, so
// the loss falls towards the chain's entropy.
std::unique_ptr<DataSet> make_synthetic_data(uint64_t seed, int vocab_size);
// Checks the file against the model (vocabulary, length) and opens it. Throws InputError.
std::unique_ptr<DataSet> make_file_data(const std::string& path, int vocab_size, int seq_len);

std::unique_ptr<DataSet> make_data(const Config& config);

}  // namespace moe
