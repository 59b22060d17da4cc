// The benchmark engine (perf/bench.h): the printers, the exit code on a wrong row, and the timing.
#include <gtest/gtest.h>

#include <sstream>

#include "perf/bench.h"
#include "tests/test_util.h"

namespace moe {
namespace {

// Rows with a value i and a name; row `wrong_row` reports one wrong result, rows past `checked` none
// checked (-1). run() counts its calls.
class FakeBench : public Bench {
 public:
  FakeBench(size_t rows, int wrong_row, size_t checked, std::string extra_key)
      : rows_(rows), wrong_row_(wrong_row), checked_(checked), extra_key_(std::move(extra_key)) {}
  std::vector<std::string> title(BenchRun& run) override { return {"fake bench"}; }
  std::vector<Column> columns() const override {
    return {{"name", "name", 5, 0}, {"value", "value", 6, 2}, {"frac", "pct", 5, 1, 100}, {extra_key_, "", 0, 0}};
  }
  size_t num_rows() const override { return rows_; }
  void setup(BenchRun& run, size_t i) override { ++setups; }
  void prepare(BenchRun& run, size_t i) override { ++prepares; }
  void run(BenchRun& run, size_t i) override { ++runs; }
  void after(BenchRun& run, size_t i, bool timed) override { timed_afters += timed; }
  int64_t check(BenchRun& run, size_t i) override {
    if (i >= checked_) return -1;
    return static_cast<int>(i) == wrong_row_ ? 1 : 0;
  }
  std::vector<Cell> cells(BenchRun& run, size_t i, double seconds) override {
    return {"row" + std::to_string(i), static_cast<double>(i) + 0.25, 0.5, int64_t{7}};
  }
  std::string summary() const override { return "fake summary"; }
  int setups = 0, prepares = 0, runs = 0, timed_afters = 0;

 private:
  size_t rows_;
  int wrong_row_;
  size_t checked_;
  std::string extra_key_;
};

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

struct Printed {
  int rc;
  std::vector<std::string> lines;
};

Printed execute(BenchFormat format, std::vector<Bench*> benches) {
  ProcessGroups groups = test::self_groups();
  auto backend = make_cpu_backend({});
  BenchOptions o;
  o.format = format;
  o.iters = 3;
  o.warmup = 2;
  BenchRun run(*backend, groups, o);
  testing::internal::CaptureStdout();
  const int rc = run.execute(benches);
  return {rc, lines_of(testing::internal::GetCapturedStdout())};
}

TEST(BenchEngine, RepetitionsAreWarmUpPlusTimedWithPrepareAndAfterAroundEach) {
  FakeBench b(2, -1, 2, "extra");
  const Printed p = execute(BenchFormat::kTable, {&b});
  EXPECT_EQ(p.rc, 0);
  EXPECT_EQ(b.setups, 2);
  EXPECT_EQ(b.runs, 2 * (3 + 2));
  EXPECT_EQ(b.prepares, b.runs);
  EXPECT_EQ(b.timed_afters, 2 * 3);
}

TEST(BenchEngine, TablePrintsTitleHeaderRowsAndTheVerdict) {
  FakeBench b(3, -1, 2, "extra");
  const Printed p = execute(BenchFormat::kTable, {&b});
  ASSERT_EQ(p.lines.size(), 6u);
  EXPECT_EQ(p.lines[0], "# fake bench");
  EXPECT_EQ(p.lines[1], "#  name   value    pct  #wrong");
  EXPECT_EQ(p.lines[2], "   row0    0.25   50.0       0");  // pct: the fraction times 100
  EXPECT_EQ(p.lines[4], "   row2    2.25   50.0       -");  // nothing checked
  EXPECT_EQ(p.lines[5], "# fake summary   all rows correct");
  EXPECT_EQ(p.rc, 0) << "an unchecked row is not a wrong one";
}

TEST(BenchEngine, AWrongRowMakesTheExitCodeOneAndTheVerdictSaysSo) {
  FakeBench b(3, 1, 3, "extra");
  const Printed p = execute(BenchFormat::kTable, {&b});
  EXPECT_EQ(p.rc, 1);
  EXPECT_EQ(p.lines[3], "   row1    1.25   50.0       1");
  EXPECT_EQ(p.lines.back(), "# fake summary   WRONG RESULTS");
}

TEST(BenchEngine, JsonHasEveryColumnByKeyAndCsvOneHeaderForEveryBench) {
  FakeBench b(1, 0, 1, "extra");
  const Printed json = execute(BenchFormat::kJson, {&b});
  ASSERT_EQ(json.lines.size(), 1u);
  EXPECT_EQ(json.lines[0], R"({"name":"row0","value":0.25,"frac":0.5,"extra":7,"wrong":1})");
  EXPECT_EQ(json.rc, 1);
  FakeBench first(1, -1, 1, "extra"), second(1, -1, 1, "other");
  const Printed csv = execute(BenchFormat::kCsv, {&first, &second});
  ASSERT_EQ(csv.lines.size(), 3u);
  EXPECT_EQ(csv.lines[0], "name,value,frac,extra,other,wrong");
  EXPECT_EQ(csv.lines[1], "row0,0.25,0.5,7,,0");
  EXPECT_EQ(csv.lines[2], "row0,0.25,0.5,,7,0");
}

TEST(BenchEngine, OptionsTakeTheEngineFlagsTheBenchFlagsAndConfigurationKeys) {
  BenchFlags f;
  f.defaults = {"moe.top_k=2"};
  f.ints = {{"moe", 1}};
  f.minimums = {{"moe", 0}};
  f.strings = {{"out", ""}};
  const BenchOptions o =
      parse_bench_options("x", {"iters=4", "warmup=0", "format=csv", "moe=0", "out=k.json", "experts=4,8"}, f);
  EXPECT_EQ(o.iters, 4);
  EXPECT_EQ(o.warmup, 0);
  EXPECT_EQ(o.format, BenchFormat::kCsv);
  EXPECT_EQ(o.get("moe"), 0);
  EXPECT_EQ(o.strings.at("out"), "k.json");
  EXPECT_EQ(o.sweep.size(), 2u);
  EXPECT_THROW(parse_bench_options("x", {"iters=0"}, f), ConfigError);
  EXPECT_THROW(parse_bench_options("x", {"format=xml"}, f), ConfigError);
  EXPECT_THROW(parse_bench_options("x", {"bogus=1"}, f), ConfigError);
  EXPECT_THROW(parse_bench_options("x", {"dtype=float32,float64"}, f), ConfigError);  // one value per run
}

}  // namespace
}  // namespace moe
