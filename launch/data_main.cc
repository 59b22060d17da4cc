// moe_data: makes and inspects token files (the format is in train/data.h).
//
//   moe_data encode INPUT OUTPUT          bytes of any file -> byte tokens (vocabulary 256)
//   moe_data synthetic OUTPUT TOKENS [SEED] [VOCAB]   the synthetic Markov chain, written out
//   moe_data info FILE                    header and size check
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "launch/main_common.h"
#include "runtime/log.h"
#include "train/data.h"

using namespace moe;

namespace {

const char* kUsage =
    "usage: moe_data encode INPUT OUTPUT\n"
    "       moe_data synthetic OUTPUT NUM_TOKENS [SEED] [VOCAB]\n"
    "       moe_data info FILE\n";

uint64_t parse_count(const std::string& s, const char* what) {
  char* end = nullptr;
  unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0') throw ConfigError("", std::string(what) + ": expected a number, got '" + s + "'");
  return v;
}

int data_main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() == 3 && args[0] == "encode") {
    std::ifstream in(args[1], std::ios::binary);
    if (!in) throw InputError(args[1], "cannot read input");
    std::vector<uint32_t> tokens;
    for (std::istreambuf_iterator<char> it(in), end; it != end; ++it) tokens.push_back(static_cast<unsigned char>(*it));
    write_token_file(args[2], tokens, 256);
    std::printf("%s: %zu byte tokens (vocabulary 256)\n", args[2].c_str(), tokens.size());
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
    TokenFileInfo info = read_token_file_info(args[1]);
    std::printf("%s: %llu tokens, %u byte(s) each, vocabulary %u\n", args[1].c_str(),
                static_cast<unsigned long long>(info.num_tokens), info.token_bytes, info.vocab_size);
    return 0;
  }
  std::fputs(kUsage, stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  return run_job(argc, argv, "moe_data", [&] { return data_main(argc, argv); });
}
