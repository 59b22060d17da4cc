// Text in and out: corpus preparation (Brown tags stripped, text -> tokens -> text round trip, the
// deterministic split, an empty validation split refused), llm.c shards, the n-gram baselines against a
// hand-computed value, and sampling determinism.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "tests/test_util.h"
#include "train/corpus.h"
#include "train/data.h"
#include "train/evaluate.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

class TextTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("moe_text_test_" + std::to_string(::getpid()));
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }
  std::string path(const std::string& name) { return (dir / name).string(); }
  fs::path dir;
};

// Every token of a file, as bytes.
std::string decode(const std::string& path) {
  auto data = make_file_data(path, 256, 2);
  const int64_t n = data->num_tokens();
  std::vector<int32_t> in(static_cast<size_t>(n - 1)), tg(in.size());
  data->sequences(0, 1, static_cast<int>(n - 1), in.data(), tg.data());
  in.push_back(tg.back());
  std::string out;
  for (int32_t t : in) out.push_back(static_cast<char>(t));
  return out;
}

TEST(Corpus, BrownTagsAreStrippedAndPunctuationAttached) {
  const std::string tagged =
      "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc it's/pps+bez 1/2/cd (/( e.g./rb )/) "
      "./.\nIt/pps rained/vbd ./.\n\n\n\tNew/jj paragraph/nn !/.\n";
  EXPECT_EQ(brown_document_text(tagged),
            "The jury said \"no evidence\", and it's 1/2 (e.g.). It rained.\nNew paragraph!\n");
}

TEST_F(TextTest, TextToTokensToTextRoundTripAndSplit) {
  // 41 documents: 19 and 39 go to validation, the rest to training, in order.
  std::vector<std::string> docs;
  std::string text;
  for (int i = 0; i < 41; ++i) {
    docs.push_back("Document " + std::to_string(i) + " says caf\xc3\xa9.\nSecond line.\n");
    text += docs.back() + "\n\n";
  }
  EXPECT_EQ(text_documents(text), docs);
  CorpusSplit split = split_corpus(text_documents(text), "text");
  EXPECT_EQ(split.val_docs, 2);
  EXPECT_EQ(split.train_docs, 39);
  EXPECT_EQ(split.val, docs[19] + "\n" + docs[39]);
  write_corpus(split, path("out"));
  EXPECT_EQ(decode(path("out/train.bin")), split.train);
  EXPECT_EQ(decode(path("out/val.bin")), split.val);
  std::ifstream txt(path("out/val.txt"));
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(txt), {}), split.val);
  TokenFileInfo info = read_token_file_info(path("out/train.bin"));
  EXPECT_EQ(info.vocab_size, 256u);
  EXPECT_EQ(info.token_bytes, 1u);
}

TEST(Corpus, FewerThanTwentyDocumentsIsAnEmptyValidationSplit) {
  try {
    split_corpus(text_documents("one\n\ntwo\n\nthree\n"), "tiny.txt");
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("empty validation split"), std::string::npos) << e.what();
  }
}

TEST_F(TextTest, LlmcShardsAreReadAndCheckedAgainstTheVocabulary) {
  std::vector<uint32_t> tokens{50256, 3, 17, 40000, 50256, 9};
  write_llmc_file(path("shard.bin"), tokens);
  TokenFileInfo info = read_token_file_info(path("shard.bin"));
  EXPECT_EQ(info.format, TokenFormat::kLlmc);
  EXPECT_EQ(info.num_tokens, tokens.size());
  auto data = make_file_data(path("shard.bin"), 50257, 3);
  std::vector<int32_t> in(5), tg(5);
  data->sequences(0, 1, 5, in.data(), tg.data());
  EXPECT_EQ(in, (std::vector<int32_t>{50256, 3, 17, 40000, 50256}));
  EXPECT_EQ(tg.back(), 9);
  try {
    make_file_data(path("shard.bin"), 50000, 3);
    FAIL() << "a token above the vocabulary was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("token 50256 at position 0 is outside model.vocab_size = 50000"),
              std::string::npos)
        << e.what();
    EXPECT_EQ(e.key(), "data.path");
  }
}

TEST_F(TextTest, BigramBaselineMatchesTheHandComputedValue) {
  // Training tokens 0 1 0 1 2 (V = 3): unigram counts 2, 2, 1 of N = 5; pairs (0,1) x2, (1,0), (1,2);
  // contexts 0 x2, 1 x2. Validation 0 1 2, one sequence of 2: targets 1 after 0, 2 after 1.
  write_token_file(path("train.bin"), {0, 1, 0, 1, 2}, 3);
  write_token_file(path("val.bin"), {0, 1, 2}, 3);
  Config c;
  c.model.vocab_size = 3;
  c.model.seq_len = 2;
  c.train.eval_tokens = 0;
  c.data.val_path = path("val.bin");
  auto train = make_file_data(path("train.bin"), 3, 2), val = make_file_data(path("val.bin"), 3, 3);
  Baselines b = ngram_baselines(*train, *val, c);
  EXPECT_NEAR(b.unigram, -(std::log(3.0 / 8) + std::log(2.0 / 8)) / 2, 1e-15);
  EXPECT_NEAR(b.bigram, -(std::log(3.0 / 5) + std::log(2.0 / 5)) / 2, 1e-15);
}

TEST(Sampling, TheSameSeedGivesTheSameText) {
  Config c;
  c.model.hidden = 16;
  c.model.layers = 2;
  c.model.seq_len = 8;
  c.model.init_std = 0.5;  // a peaked distribution is still random at temperature 1
  c.moe.num_experts = 4;
  c.moe.first_dense_layers = 1;
  auto backend = make_cpu_backend({});
  ProcessGroups groups = test::self_groups();
  Transformer model(c, *backend, groups);
  const std::vector<int32_t> prompt = bytes_to_tokens("Hello");
  auto a = generate(model, prompt, 20, 1.0, 0, 7), b = generate(model, prompt, 20, 1.0, 0, 7);
  auto other = generate(model, prompt, 20, 1.0, 0, 8);
  ASSERT_EQ(a.size(), 20u);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, other);
  // Greedy decoding takes the most likely token, whatever the seed; top_k = 1 is greedy too.
  EXPECT_EQ(generate(model, prompt, 12, 0.0, 0, 1), generate(model, prompt, 12, 0.0, 0, 2));
  EXPECT_EQ(generate(model, prompt, 12, 0.0, 0, 1), generate(model, prompt, 12, 1.5, 1, 3));
  EXPECT_EQ(tokens_to_bytes(bytes_to_tokens("caf\xc3\xa9")), "caf\xc3\xa9");
}

}  // namespace
}  // namespace moe
