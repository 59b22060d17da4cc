// Token files and the synthetic Markov-chain data.
#include "train/data.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/error.h"

#include <cerrno>
#include <cmath>
#include <cstring>

#include "runtime/rng.h"

namespace moe {
namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'T', 'O', 'K', '0', '1'};

template <typename T>
T load_le(const unsigned char* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(p[i]) << (8 * i);
  return v;
}

template <typename T>
void store_le(unsigned char* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

class SyntheticData final : public DataSet {
 public:
  SyntheticData(uint64_t seed, int vocab) : seed_(seed), vocab_(vocab), next_(static_cast<size_t>(vocab) * 4) {
    RngStream table{seed, rng_stream(RngPurpose::kSyntheticTable, 0)};
    for (int a = 0; a < vocab; ++a)
      for (int i = 0; i < 4; ++i)
        next_[static_cast<size_t>(a) * 4 + i] =
            static_cast<int32_t>(table.uniform(static_cast<uint64_t>(a) * 4 + i) * vocab) % vocab;
  }

  void sequences(int64_t first, int64_t count, int seq_len, int32_t* inputs, int32_t* targets) override {
    // Cumulative weights of the four successors (8:4:2:1) after a 5% uniform background.
    constexpr double kBackground = 0.05;
    constexpr double kCum[4] = {8.0 / 15, 12.0 / 15, 14.0 / 15, 1.0};
    std::vector<int32_t> seq(static_cast<size_t>(seq_len) + 1);
    for (int64_t s = 0; s < count; ++s) {
      RngStream rng{seed_, rng_stream(RngPurpose::kSynthetic, static_cast<uint64_t>(first + s))};
      seq[0] = static_cast<int32_t>(rng.uniform(0) * vocab_) % vocab_;
      for (int i = 1; i <= seq_len; ++i) {
        double u = rng.uniform(static_cast<uint64_t>(i));
        if (u < kBackground) {
          seq[i] = static_cast<int32_t>(u / kBackground * vocab_) % vocab_;
          continue;
        }
        double v = (u - kBackground) / (1.0 - kBackground);
        int pick = 0;
        while (pick < 3 && v >= kCum[pick]) ++pick;
        seq[i] = next_[static_cast<size_t>(seq[i - 1]) * 4 + pick];
      }
      std::copy(seq.begin(), seq.end() - 1, inputs + s * seq_len);
      std::copy(seq.begin() + 1, seq.end(), targets + s * seq_len);
    }
  }
  int64_t num_tokens() const override { return 0; }
  void tokens(int64_t, int64_t, int32_t*) override { MOE_CHECK(false, "the synthetic data has no token file"); }

 private:
  uint64_t seed_;
  int vocab_;
  std::vector<int32_t> next_;
};

// A token file mapped read-only (ranks on one node share the page cache).
class FileData final : public DataSet {
 public:
  FileData(TokenFileInfo info, const std::string& key) : info_(std::move(info)) {
    int fd = ::open(info_.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw InputError(info_.path, std::strerror(errno), key);
    bytes_ = info_.header_bytes + info_.num_tokens * info_.token_bytes;
    void* p = ::mmap(nullptr, bytes_, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    ::close(fd);
    if (p == MAP_FAILED) throw InputError(info_.path, std::string("cannot map: ") + std::strerror(err), key);
    base_ = static_cast<const unsigned char*>(p);
  }
  ~FileData() override { ::munmap(const_cast<unsigned char*>(base_), bytes_); }

  int32_t token(uint64_t i) const {
    const unsigned char* p = base_ + info_.header_bytes + i * info_.token_bytes;
    return info_.token_bytes == 1 ? p[0] : load_le<uint16_t>(p);
  }
  // The first token at or above vocab, as (position, value), or position N when there is none.
  std::pair<uint64_t, int32_t> first_token_at_least(int32_t vocab) const {
    for (uint64_t i = 0; i < info_.num_tokens; ++i) {
      int32_t t = token(i);
      if (t >= vocab) return {i, t};
    }
    return {info_.num_tokens, 0};
  }

  void sequences(int64_t first, int64_t count, int seq_len, int32_t* inputs, int32_t* targets) override {
    const uint64_t span = info_.num_tokens - static_cast<uint64_t>(seq_len);
    for (int64_t s = 0; s < count; ++s) {
      const uint64_t start = (static_cast<uint64_t>(first + s) * static_cast<uint64_t>(seq_len)) % span;
      for (int i = 0; i <= seq_len; ++i) {
        const int32_t tok = token(start + static_cast<uint64_t>(i));
        if (i < seq_len) inputs[s * seq_len + i] = tok;
        if (i > 0) targets[s * seq_len + i - 1] = tok;
      }
    }
  }
  int64_t num_tokens() const override { return static_cast<int64_t>(info_.num_tokens); }
  void tokens(int64_t first, int64_t count, int32_t* out) override {
    MOE_CHECK(first >= 0 && count >= 0 && static_cast<uint64_t>(first + count) <= info_.num_tokens, "tokens [",
              first, ", ", first + count, ") of ", info_.num_tokens);
    for (int64_t i = 0; i < count; ++i) out[i] = token(static_cast<uint64_t>(first + i));
  }

 private:
  TokenFileInfo info_;
  const unsigned char* base_ = nullptr;
  size_t bytes_ = 0;
};

void write_atomic(const std::string& path, const std::vector<unsigned char>& out) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw InputError(tmp, std::strerror(errno));
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::write(fd, out.data() + done, out.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw InputError(tmp, std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw InputError(tmp, std::strerror(errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw InputError(path, std::strerror(err));
  }
}

}  // namespace

TokenFileInfo read_token_file_info(const std::string& path, const std::string& key) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path, std::string("cannot open token file: ") + std::strerror(errno), key);
  struct stat st {};
  ::fstat(fd, &st);
  unsigned char header[kLlmcHeaderBytes] = {};
  ssize_t got = ::pread(fd, header, sizeof(header), 0);
  ::close(fd);
  if (got < 0) got = 0;
  TokenFileInfo info;
  info.path = path;
  if (got >= static_cast<ssize_t>(kTokenFileHeaderBytes) && std::memcmp(header, kMagic, 8) == 0) {
    info.format = TokenFormat::kMoe;
    uint32_t header_bytes = load_le<uint32_t>(header + 8);
    info.token_bytes = load_le<uint32_t>(header + 12);
    info.num_tokens = load_le<uint64_t>(header + 16);
    info.vocab_size = load_le<uint32_t>(header + 24);
    info.header_bytes = kTokenFileHeaderBytes;
    if (header_bytes != kTokenFileHeaderBytes || (info.token_bytes != 1 && info.token_bytes != 2)) {
      throw InputError(path, "unsupported MOETOK01 header (header size " + std::to_string(header_bytes) +
                                 ", bytes per token " + std::to_string(info.token_bytes) + ")", key);
    }
  } else if (got >= 12 && static_cast<int32_t>(load_le<uint32_t>(header)) == kLlmcMagic) {
    if (got < static_cast<ssize_t>(kLlmcHeaderBytes)) {
      throw InputError(path, "truncated llm.c header (" + std::to_string(got) + " of 1024 bytes)", key);
    }
    int32_t version = static_cast<int32_t>(load_le<uint32_t>(header + 4));
    if (version != 1) {
      throw InputError(path, "llm.c token file version " + std::to_string(version) +
                                 " is not supported (version 1: uint16 tokens)", key);
    }
    info.format = TokenFormat::kLlmc;
    info.token_bytes = 2;
    info.num_tokens = load_le<uint32_t>(header + 8);
    info.header_bytes = kLlmcHeaderBytes;
  } else {
    throw InputError(path, "not a token file (neither a MOETOK01 header nor the llm.c magic 20240520); make one "
                           "with launch/moe data", key);
  }
  const uint64_t expected = info.header_bytes + info.num_tokens * info.token_bytes;
  if (static_cast<uint64_t>(st.st_size) < expected) {
    throw InputError(path,
                     "truncated: the header promises " + std::to_string(info.num_tokens) + " tokens (" +
                         std::to_string(expected) + " bytes) but the file has " + std::to_string(st.st_size) +
                         " bytes",
                     key);
  }
  return info;
}

void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size) {
  uint32_t token_bytes = vocab_size <= 256 ? 1 : 2;
  std::vector<unsigned char> out(kTokenFileHeaderBytes + tokens.size() * token_bytes, 0);
  std::memcpy(out.data(), kMagic, 8);
  store_le<uint32_t>(&out[8], kTokenFileHeaderBytes);
  store_le<uint32_t>(&out[12], token_bytes);
  store_le<uint64_t>(&out[16], tokens.size());
  store_le<uint32_t>(&out[24], vocab_size);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] >= vocab_size) {
      throw InputError(path, "token " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                                 " is outside the vocabulary of " + std::to_string(vocab_size));
    }
    unsigned char* p = &out[kTokenFileHeaderBytes + i * token_bytes];
    if (token_bytes == 1) {
      *p = static_cast<unsigned char>(tokens[i]);
    } else {
      store_le<uint16_t>(p, static_cast<uint16_t>(tokens[i]));
    }
  }
  write_atomic(path, out);
}

void write_llmc_file(const std::string& path, const std::vector<uint32_t>& tokens) {
  std::vector<unsigned char> out(kLlmcHeaderBytes + tokens.size() * 2, 0);
  store_le<uint32_t>(&out[0], static_cast<uint32_t>(kLlmcMagic));
  store_le<uint32_t>(&out[4], 1);
  store_le<uint32_t>(&out[8], static_cast<uint32_t>(tokens.size()));
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] > 0xFFFF) throw InputError(path, "token " + std::to_string(tokens[i]) + " does not fit uint16");
    store_le<uint16_t>(&out[kLlmcHeaderBytes + i * 2], static_cast<uint16_t>(tokens[i]));
  }
  write_atomic(path, out);
}

std::unique_ptr<DataSet> make_synthetic_data(uint64_t seed, int vocab_size) {
  return std::make_unique<SyntheticData>(seed, vocab_size);
}

std::unique_ptr<DataSet> make_file_data(const std::string& path, int vocab_size, int64_t min_tokens,
                                        const std::string& key) {
  TokenFileInfo info = read_token_file_info(path, key);
  if (info.vocab_size > static_cast<uint32_t>(vocab_size)) {
    throw InputError(path, "token file vocabulary is " + std::to_string(info.vocab_size) +
                               ", larger than model.vocab_size = " + std::to_string(vocab_size), key);
  }
  if (info.num_tokens < static_cast<uint64_t>(min_tokens)) {
    throw InputError(path, std::string(key == "data.val_path" ? "empty validation split: " : "") + "has " +
                               std::to_string(info.num_tokens) + " tokens, fewer than the " +
                               std::to_string(min_tokens) + " it needs (" +
                               (key == "data.val_path" ? "one sequence: model.seq_len + 1"
                                                       : "one global batch: train.batch_size * model.seq_len + 1") +
                               ")", key);
  }
  auto data = std::make_unique<FileData>(std::move(info), key);
  auto [pos, value] = data->first_token_at_least(vocab_size);
  if (pos < static_cast<uint64_t>(data->num_tokens())) {
    throw InputError(path, "token " + std::to_string(value) + " at position " + std::to_string(pos) +
                               " is outside model.vocab_size = " + std::to_string(vocab_size), key);
  }
  return data;
}

std::unique_ptr<DataSet> make_train_data(const Config& config) {
  if (config.data.source == DataSource::kFile) {
    return make_file_data(config.data.path, config.model.vocab_size,
                          int64_t{config.train.batch_size} * config.model.seq_len + 1, "data.path");
  }
  return make_synthetic_data(config.train.seed, config.model.vocab_size);
}

std::unique_ptr<DataSet> make_val_data(const Config& config) {
  if (config.data.val_path.empty()) {
    throw ConfigError("data.val_path", "no validation split: set data.val_path to a token file");
  }
  return make_file_data(config.data.val_path, config.model.vocab_size, int64_t{config.model.seq_len} + 1,
                        "data.val_path");
}

}  // namespace moe
