// Token files and safetensors: round trips, and every kind of damage reported as an InputError.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "base/error.h"
#include "train/data.h"
#include "train/safetensors.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

class IoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("moe_io_test_" + std::to_string(::getpid()));
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }
  std::string path(const std::string& name) { return (dir / name).string(); }
  fs::path dir;
};

template <typename F>
std::string input_error(F fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST_F(IoTest, TokenFileRoundTrip) {
  std::vector<uint32_t> tokens;
  for (uint32_t i = 0; i < 100; ++i) tokens.push_back((i * 7) % 300);
  write_token_file(path("t.bin"), tokens, 300);
  TokenFileInfo info = read_token_file_info(path("t.bin"));
  EXPECT_EQ(info.num_tokens, 100u);
  EXPECT_EQ(info.token_bytes, 2u);
  EXPECT_EQ(info.vocab_size, 300u);
  auto data = make_file_data(path("t.bin"), 300, 8);
  std::vector<int32_t> in(16), tg(16);
  data->sequences(1, 2, 8, in.data(), tg.data());
  for (int j = 0; j < 2; ++j) {
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(in[j * 8 + i], static_cast<int32_t>(tokens[(1 + j) * 8 + i]));
      EXPECT_EQ(tg[j * 8 + i], static_cast<int32_t>(tokens[(1 + j) * 8 + i + 1]));
    }
  }
}

TEST_F(IoTest, DamagedTokenFilesAreInputErrors) {
  EXPECT_NE(input_error([&] { read_token_file_info(path("missing.bin")); }), "");
  std::vector<uint32_t> tokens(64, 3);
  write_token_file(path("t.bin"), tokens, 256);
  fs::resize_file(path("t.bin"), kTokenFileHeaderBytes + 40);
  EXPECT_NE(input_error([&] { read_token_file_info(path("t.bin")); }).find("truncated"), std::string::npos);
  std::ofstream(path("junk.bin")) << "not a token file at all, not at all";
  EXPECT_NE(input_error([&] { read_token_file_info(path("junk.bin")); }), "");
  write_token_file(path("big.bin"), tokens, 256);
  EXPECT_NE(input_error([&] { make_file_data(path("big.bin"), 128, 8); }), "");  // vocabulary too small
}

TEST_F(IoTest, SafetensorsRoundTripAndCrc) {
  Tensor a = host_tensor({2, 3}, DType::kF32);
  for (int i = 0; i < 6; ++i) a.data<float>()[i] = 0.5f * i;
  Tensor b = host_tensor({4}, DType::kF64);
  for (int i = 0; i < 4; ++i) b.data<double>()[i] = -1.0 * i;
  WrittenFile w = write_safetensors(path("x.safetensors"), {{"a", a}, {"b", b}}, {{"step", "3"}});
  WrittenFile c = checksum_file(path("x.safetensors"));
  EXPECT_EQ(w.bytes, c.bytes);
  EXPECT_EQ(w.crc32, c.crc32);
  SafetensorsReader r(path("x.safetensors"));
  Tensor a2 = host_tensor({2, 3}, DType::kF32), b2 = host_tensor({4}, DType::kF64);
  r.read("a", a2);
  r.read("b", b2);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a2.data<float>()[i], a.data<float>()[i]);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(b2.data<double>()[i], b.data<double>()[i]);
  Tensor wrong = host_tensor({3, 2}, DType::kF32);
  EXPECT_NE(input_error([&] { r.read("a", wrong); }), "");
  EXPECT_NE(input_error([&] { r.read("c", a2); }), "");
  for (const auto& e : fs::directory_iterator(dir)) {
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << "temporary file left behind";
  }
}

TEST_F(IoTest, TruncatedSafetensorsIsAnInputError) {
  Tensor a = host_tensor({64}, DType::kF32);
  write_safetensors(path("x.safetensors"), {{"a", a}}, {});
  fs::resize_file(path("x.safetensors"), fs::file_size(path("x.safetensors")) - 16);
  EXPECT_NE(input_error([&] { SafetensorsReader r(path("x.safetensors")); }), "");
  std::ofstream(path("y.safetensors")) << "garbage";
  EXPECT_NE(input_error([&] { SafetensorsReader r(path("y.safetensors")); }), "");
}

}  // namespace
}  // namespace moe
