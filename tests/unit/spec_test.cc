// The specification's known answers (docs/ARCHITECTURE.md, "Random numbers and initialisation"), read
// from the document itself and computed through the code: the name hash from the constants the document
// states, the Philox words and the normal draw of its example, and the first embedding values of a model
// built from the configuration it names. Doc and code cannot drift apart without this test failing.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <regex>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "model/transformer.h"
#include "runtime/rng.h"
#include "tests/test_util.h"

namespace moe {
namespace {

// The paragraph that holds the known answers, with runs of white space made one space and the typeset
// minus sign made ASCII, so that a reflowed paragraph still matches.
std::string random_numbers_section() {
  std::ifstream in(std::string(MOE_SOURCE_DIR) + "/docs/ARCHITECTURE.md");
  std::stringstream text;
  text << in.rdbuf();
  std::string doc = text.str();
  const size_t begin = doc.find("### Random numbers and initialisation");
  const size_t end = doc.find("\n### ", begin + 1);
  EXPECT_NE(begin, std::string::npos) << "docs/ARCHITECTURE.md has no section \"Random numbers and initialisation\"";
  if (begin == std::string::npos) return "";
  doc = doc.substr(begin, end - begin);
  for (size_t at; (at = doc.find("\xe2\x88\x92")) != std::string::npos;) doc.replace(at, 3, "-");  // U+2212
  return std::regex_replace(doc, std::regex("\\s+"), " ");
}

// The capture groups of `pattern`'s first match in `text`; fails the test naming `what` when none.
std::vector<std::string> doc_match(const std::string& text, const std::string& pattern, const std::string& what) {
  std::smatch m;
  if (!std::regex_search(text, m, std::regex(pattern))) {
    ADD_FAILURE() << "docs/ARCHITECTURE.md no longer states " << what << " (pattern " << pattern << ")";
    return {};
  }
  std::vector<std::string> groups;
  for (size_t i = 1; i < m.size(); ++i) groups.push_back(m[i].str());
  return groups;
}

uint64_t hex(const std::string& s) { return std::stoull(s, nullptr, 16); }

TEST(Spec, TheNameHashIsTheOneTheDocumentDefines) {
  const std::string doc = random_numbers_section();
  const auto basis = doc_match(doc, "h = ([0-9]+) \\(offset basis\\)", "the name hash's offset basis");
  const auto prime = doc_match(doc, "\\(h XOR c\\)\xc2\xb7([0-9]+) \\(prime\\)", "the name hash's prime");
  ASSERT_EQ(basis.size(), 1u);
  ASSERT_EQ(prime.size(), 1u);
  for (const char* name : {"embedding", "layers.0.moe.experts.w_up", "head", ""}) {
    uint64_t h = std::stoull(basis[0]);
    for (const char* c = name; *c; ++c) h = (h ^ static_cast<unsigned char>(*c)) * std::stoull(prime[0]);
    EXPECT_EQ(name_hash(name), h) << name;
  }
}

TEST(Spec, PhiloxWordsAndNormalDrawOfTheKnownAnswer) {
  const std::string doc = random_numbers_section();
  const auto seed = doc_match(doc, "Known answer: seed ([0-9]+)", "the known answer's seed");
  const auto stream = doc_match(doc, "stream \\(kInit, name_hash\\(\"embedding\"\\) = 0x([0-9a-f]+)\\) = 0x([0-9a-f]+)",
                           "the known answer's name hash and stream");
  const auto words = doc_match(doc, "r = \\(0x([0-9a-f]+), 0x([0-9a-f]+), 0x([0-9a-f]+), 0x([0-9a-f]+)\\)",
                          "the known answer's Philox words");
  const auto normal = doc_match(doc, "a normal draw of (-?[0-9.]+)", "the known answer's normal draw");
  ASSERT_EQ(seed.size(), 1u);
  ASSERT_EQ(stream.size(), 2u);
  ASSERT_EQ(words.size(), 4u);
  ASSERT_EQ(normal.size(), 1u);
  EXPECT_EQ(name_hash("embedding"), hex(stream[0]));
  const uint64_t s = rng_stream(RngPurpose::kInit, name_hash("embedding"));
  EXPECT_EQ(s, hex(stream[1]));
  const PhiloxBlock r = philox4x32_10(std::stoull(seed[0]), s, 0);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(r[i], hex(words[i])) << "word " << i;
  // The document prints 16 significant digits: within half a unit of the last one.
  const RngStream rng{std::stoull(seed[0]), s};
  EXPECT_NEAR(rng.normal(0), std::stod(normal[0]), 5e-16 + 1e-16);
}

TEST(Spec, FirstEmbeddingValuesOfAModelOfTheDocumentedConfiguration) {
  const std::string doc = random_numbers_section();
  const auto config = doc_match(doc, "with `train.seed` ([0-9]+) and init_std ([0-9.]+)", "the example's configuration");
  const std::string num = "(-?[0-9]+\\.([0-9]+))";
  const auto values = doc_match(doc, "embedding\\[0, 0\\.\\.3\\] start at " + num + ", " + num + ", " + num + ", " + num,
                           "the first embedding values");
  ASSERT_EQ(config.size(), 2u);
  ASSERT_EQ(values.size(), 8u);
  // The model the document's sentence describes, every other key at its default; float64 so that the
  // only difference from the printed digits is their rounding.
  const Config c = test::config(
      {"train.seed=" + config[0], "model.init_std=" + config[1], "runtime.dtype=float64"});
  auto backend = make_cpu_backend({});
  ProcessGroups groups = test::self_groups();
  Transformer model(c, *backend, groups);
  const Param* embedding = model.params().find("embedding");
  ASSERT_NE(embedding, nullptr);
  const std::vector<double> got = to_doubles(*backend, embedding->value);
  for (int i = 0; i < 4; ++i) {
    const double printed = std::stod(values[2 * i]);
    const double half_unit = 0.5 * std::pow(10.0, -static_cast<double>(values[2 * i + 1].size()));
    EXPECT_NEAR(got[static_cast<size_t>(i)], printed, half_unit * (1 + 1e-9)) << "embedding[0, " << i << "]";
  }
}

}  // namespace
}  // namespace moe
