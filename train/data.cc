// Token files and the synthetic Markov-chain data.
#include "train/data.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

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

// Reads exactly n bytes at offset, or throws.
void read_at(int fd, void* dst, size_t n, uint64_t offset, const std::string& path) {
  char* out = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t got = ::pread(fd, out, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) throw InputError(path, got == 0 ? "unexpected end of file" : std::strerror(errno), "data.path");
    out += got, n -= static_cast<size_t>(got), offset += static_cast<uint64_t>(got);
  }
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

 private:
  uint64_t seed_;
  int vocab_;
  std::vector<int32_t> next_;
};

class FileData final : public DataSet {
 public:
  FileData(TokenFileInfo info, int vocab_size) : info_(std::move(info)), vocab_(vocab_size) {
    fd_ = ::open(info_.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw InputError(info_.path, std::strerror(errno), "data.path");
  }
  ~FileData() override {
    if (fd_ >= 0) ::close(fd_);
  }

  void sequences(int64_t first, int64_t count, int seq_len, int32_t* inputs, int32_t* targets) override {
    const uint64_t span = info_.num_tokens - static_cast<uint64_t>(seq_len);
    std::vector<unsigned char> raw((static_cast<size_t>(seq_len) + 1) * info_.token_bytes);
    for (int64_t s = 0; s < count; ++s) {
      uint64_t start = (static_cast<uint64_t>(first + s) * static_cast<uint64_t>(seq_len)) % span;
      read_at(fd_, raw.data(), raw.size(), kTokenFileHeaderBytes + start * info_.token_bytes, info_.path);
      for (int i = 0; i <= seq_len; ++i) {
        int32_t tok = info_.token_bytes == 1 ? raw[i] : load_le<uint16_t>(&raw[static_cast<size_t>(i) * 2]);
        if (tok >= vocab_) {
          throw InputError(info_.path, "token " + std::to_string(tok) + " at position " + std::to_string(start + i) +
                                           " is outside model.vocab_size = " + std::to_string(vocab_), "data.path");
        }
        if (i < seq_len) inputs[s * seq_len + i] = tok;
        if (i > 0) targets[s * seq_len + i - 1] = tok;
      }
    }
  }

 private:
  TokenFileInfo info_;
  int vocab_;
  int fd_ = -1;
};

}  // namespace

TokenFileInfo read_token_file_info(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path, std::string("cannot open data file: ") + std::strerror(errno), "data.path");
  struct stat st {};
  ::fstat(fd, &st);
  unsigned char header[kTokenFileHeaderBytes];
  ssize_t got = ::pread(fd, header, sizeof(header), 0);
  ::close(fd);
  if (got != static_cast<ssize_t>(sizeof(header)) || std::memcmp(header, kMagic, 8) != 0) {
    throw InputError(path, "not a token file (no MOETOK01 header); make one with moe_data", "data.path");
  }
  TokenFileInfo info;
  info.path = path;
  uint32_t header_bytes = load_le<uint32_t>(header + 8);
  info.token_bytes = load_le<uint32_t>(header + 12);
  info.num_tokens = load_le<uint64_t>(header + 16);
  info.vocab_size = load_le<uint32_t>(header + 24);
  if (header_bytes != kTokenFileHeaderBytes || (info.token_bytes != 1 && info.token_bytes != 2)) {
    throw InputError(path, "unsupported token file header (header size " + std::to_string(header_bytes) +
                               ", bytes per token " + std::to_string(info.token_bytes) + ")",
                     "data.path");
  }
  uint64_t expected = kTokenFileHeaderBytes + info.num_tokens * info.token_bytes;
  if (static_cast<uint64_t>(st.st_size) < expected) {
    throw InputError(path,
                     "truncated: the header promises " + std::to_string(info.num_tokens) + " tokens (" +
                         std::to_string(expected) + " bytes) but the file has " + std::to_string(st.st_size) +
                         " bytes",
                     "data.path");
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
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw InputError(tmp, std::strerror(errno));
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::write(fd, out.data() + done, out.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      ::unlink(tmp.c_str());
      throw InputError(tmp, std::strerror(errno));
    }
    done += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw InputError(path, std::strerror(errno));
  }
}

std::unique_ptr<DataSet> make_synthetic_data(uint64_t seed, int vocab_size) {
  return std::make_unique<SyntheticData>(seed, vocab_size);
}

std::unique_ptr<DataSet> make_file_data(const std::string& path, int vocab_size, int seq_len) {
  TokenFileInfo info = read_token_file_info(path);
  if (info.vocab_size > static_cast<uint32_t>(vocab_size)) {
    throw InputError(path, "token file vocabulary is " + std::to_string(info.vocab_size) +
                               ", larger than model.vocab_size = " + std::to_string(vocab_size), "data.path");
  }
  if (info.num_tokens < static_cast<uint64_t>(seq_len) + 1) {
    throw InputError(path, "has " + std::to_string(info.num_tokens) + " tokens; one sequence needs model.seq_len + 1 = " +
                               std::to_string(seq_len + 1), "data.path");
  }
  return std::make_unique<FileData>(std::move(info), vocab_size);
}

std::unique_ptr<DataSet> make_data(const Config& config) {
  if (config.data.source == DataSource::kFile) {
    return make_file_data(config.data.path, config.model.vocab_size, config.model.seq_len);
  }
  return make_synthetic_data(config.train.seed, config.model.vocab_size);
}

}  // namespace moe
