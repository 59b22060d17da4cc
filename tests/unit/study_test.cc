// Studies: the table writers, the metrics summary (warm-up skipped, resumed steps replaced, torn lines
// ignored), the run grid of a study file with its checks, and the report with efficiencies by hand.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "perf/study_plan.h"
#include "perf/study_report.h"
#include "perf/table.h"
#include "train/metrics.h"
#include "base/error.h"
#include "train/safetensors.h"
#include "train/trainer.h"

namespace moe {
namespace {
namespace fs = std::filesystem;

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/moe_study_test_XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& name, const std::string& text) const {
    fs::create_directories((path / name).parent_path());
    std::ofstream(path / name) << text;
    return (path / name).string();
  }
};

TEST(StudyTable, MarkdownEscapesBarsAndCsvQuotes) {
  Table t;
  t.columns = {"run", "note"};
  t.rows = {{"a|b", "x"}, {"c", "1,5 \"q\""}};
  EXPECT_EQ(t.markdown(),
            "| run  | note    |\n"
            "|------|---------|\n"
            "| a\\|b | x       |\n"
            "| c    | 1,5 \"q\" |\n");
  EXPECT_EQ(t.csv(), "run,note\na|b,x\nc,\"1,5 \"\"q\"\"\"\n");
}

// One metrics line of a step: every phase 1 ms but experts (step ms), tokens/s 100 * step.
std::string step_line(int step, double val = -1) {
  std::string s = "{\"step\":" + std::to_string(step) + ",\"loss\":3,\"dropped_frac\":" + std::to_string(step * 0.01) +
                  ",\"max_mean_load\":2,\"tokens_per_s\":" + std::to_string(100 * step) + ",\"mfu\":0.5";
  if (val >= 0) s += ",\"val_loss\":" + std::to_string(val) + ",\"val_bits_per_token\":1.5,\"val_bpb\":1.5";
  s += ",\"time_s\":{\"attention\":0.001,\"dense\":0,\"router\":0.001,\"dispatch\":0.001,\"experts\":" +
       std::to_string(step * 0.001) +
       ",\"combine\":0.001,\"shared\":0,\"backward\":0.001,\"optimizer\":0.001,\"allreduce\":0,\"other\":0.001,"
       "\"total\":0.01,\"wall\":0.5,\"hidden_shared\":0,\"hidden_allreduce\":0}";
  s += ",\"layers\":[{\"aux\":0,\"z\":0,\"dropped_frac\":0,\"load\":[3,1],\"tokens_per_expert\":[3,1]}]}\n";
  return s;
}

std::string start_line() {
  return "{\"event\":\"start\",\"ranks\":2,\"ep\":2,\"params_total\":3000000,\"params_active\":1000000,"
         "\"flops_per_token\":7,\"tokens_per_step\":64,\"dense_gflops_per_rank\":1,\"routing\":\"zipf:1.2\"}\n";
}

TEST(StudyMetrics, SummarySkipsWarmUpReplacesResumedStepsAndIgnoresTornLines) {
  std::string m = start_line();
  for (int s = 1; s <= 12; ++s) m += step_line(s, s == 10 ? 2.5 : -1);
  // killed after step 12, resumed from step 10: steps 11 and 12 run again, then 13..20
  m += "{\"event\":\"resume\",\"step\":10,\"lost_steps\":2}\n";
  for (int s = 11; s <= 20; ++s) m += step_line(s, s == 20 ? 2.0 : -1);
  m += "{\"step\":21,\"loss\":";  // torn
  RunSummary r = summarize_metrics(m, "test");
  EXPECT_TRUE(r.started);
  EXPECT_EQ(r.steps, 20);
  EXPECT_EQ(r.last_step, 20);
  EXPECT_EQ(r.params_active, 1000000);
  EXPECT_EQ(r.routing, "zipf:1.2");
  // steps 3..20 are measured (the first tenth, 2 steps, is warm-up): median tokens/s of 300..2000
  EXPECT_DOUBLE_EQ(r.tokens_per_s, 1200);
  EXPECT_NEAR(r.times.experts, 0.001 * (3 + 20) / 2, 1e-12);
  EXPECT_NEAR(r.times.attention, 0.001, 1e-12);
  EXPECT_NEAR(r.dropped_frac, 0.01 * (3 + 20) / 2, 1e-12);
  ASSERT_EQ(r.evals.size(), 2u);
  EXPECT_EQ(r.evals[0].step, 10);
  EXPECT_DOUBLE_EQ(r.evals[0].tokens, 640);
  EXPECT_DOUBLE_EQ(r.evals[0].wall_s, 5.0);  // ten steps of 0.5 s
  EXPECT_DOUBLE_EQ(r.evals[1].wall_s, 10.0);
  EXPECT_DOUBLE_EQ(r.evals[1].loss, 2.0);
  ASSERT_EQ(r.load.size(), 1u);
  ASSERT_EQ(r.load[0].size(), 20u);
  EXPECT_DOUBLE_EQ(r.load[0][5][0], 1.5);  // 3 over the mean 2
  EXPECT_DOUBLE_EQ(r.load[0][5][1], 0.5);
}

// A run as moe_train writes it: the start and resume events in metrics.events.jsonl beside a metrics
// file of step lines only.
TEST(StudyMetrics, TheEventsFileBesideTheMetricsFileIsRead) {
  TempDir d;
  const std::string dir = d.path.string(), metrics = dir + "/metrics.jsonl";
  EXPECT_EQ(metrics_events_path(metrics), dir + "/metrics.events.jsonl");
  EXPECT_EQ(metrics_events_path(dir + "/log"), dir + "/log.events.jsonl");
  std::string steps;
  for (int s = 1; s <= 10; ++s) steps += step_line(s);
  std::ofstream(metrics) << steps;
  EXPECT_FALSE(summarize_metrics_file(metrics).started) << "no events file";
  std::ofstream(metrics_events_path(metrics)) << start_line();
  RunSummary r = summarize_metrics_file(metrics);
  EXPECT_TRUE(r.started);
  EXPECT_EQ(r.ranks, 2);
  EXPECT_EQ(r.routing, "zipf:1.2");
  EXPECT_EQ(r.steps, 10);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(StudyPlan, CompareAndScaleGridsAreValidatedBeforeAnyRun) {
  TempDir d;
  const std::string model = d.file("m.yaml", "parallel: {ep: 4}\nmodel: {hidden: 16, layers: 1, heads: 2, seq_len: 8}\n"
                                             "moe: {num_experts: 4, top_k: 2}\ntrain: {batch_size: 8}\n");
  const std::string compare = d.file("c.yaml", "kind: compare\nranks: 4\nmodels:\n  a: {config: " + model +
                                                   "}\n  b: {config: " + model +
                                                   ", set: {moe.top_k: 1}}\nset: {train.steps: 3}\n"
                                                   "sweep: {moe.capacity_factor: [1.0, 2.0]}\n");
  StudyOptions o;
  o.kind = "compare";
  o.out = (d.path / "out").string();
  std::vector<StudyRun> runs = plan_study(compare, o);
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_EQ(runs[0].name, "a-capacity_factor1.0");
  EXPECT_EQ(runs[3].name, "b-capacity_factor2.0");
  EXPECT_EQ(runs[3].label, "moe.capacity_factor=2.0");
  EXPECT_EQ(runs[3].ranks, 4);
  auto has = [](const StudyRun& r, const std::string& o) {
    return std::find(r.args.begin(), r.args.end(), o) != r.args.end();
  };
  EXPECT_TRUE(has(runs[3], "moe.top_k=1"));
  EXPECT_TRUE(has(runs[3], "train.steps=3"));
  EXPECT_TRUE(has(runs[3], "parallel.ep=4"));
  EXPECT_TRUE(has(runs[3], "train.metrics_path=" + o.out + "/b-capacity_factor2.0/metrics.jsonl"));
  EXPECT_TRUE(has(runs[3], "train.resume=auto"));
  // 2 ranks: ep 4 does not divide them, so the experts spread over 2; 3 ranks cannot split the batch
  o.ranks = {2};
  EXPECT_TRUE(has(plan_study(compare, o)[0], "parallel.ep=2"));
  o.ranks = {3};
  EXPECT_NE(error_of([&] { plan_study(compare, o); }).find("run a-capacity_factor1.0 on 3 ranks"), std::string::npos);
  o.ranks = {};
  o.overrides = {"moe.top_kk=1"};
  EXPECT_NE(error_of([&] { plan_study(compare, o); }).find("did you mean moe.top_k"), std::string::npos);
  o.overrides = {};
  o.kind = "scale";
  EXPECT_NE(error_of([&] { plan_study(compare, o); }).find("not a scale study"), std::string::npos);

  const std::string scale = d.file("s.yaml", "kind: scale\nranks: [4, 1, 2]\nbatch_per_rank: 2\nglobal_batch: 8\n"
                                             "models:\n  a: {config: " + model + "}\n");
  std::vector<StudyRun> s = plan_study(scale, o);
  ASSERT_EQ(s.size(), 6u);  // weak and strong on 1, 2, 4 ranks, rank counts sorted
  EXPECT_EQ(s[0].name, "a-weak-r1");
  EXPECT_EQ(s[5].name, "a-strong-r4");
  EXPECT_TRUE(has(s[1], "train.batch_size=4"));   // weak on 2 ranks: 2 per rank
  EXPECT_TRUE(has(s[4], "train.batch_size=8"));   // strong: the global batch
  EXPECT_TRUE(has(s[0], "parallel.ep=1"));
  EXPECT_TRUE(has(s[2], "parallel.ep=4"));
  o.repeats = 2;  // each run twice, in directories of their own
  s = plan_study(scale, o);
  ASSERT_EQ(s.size(), 12u);
  EXPECT_EQ(s[0].name, "a-weak-r1-rep1");
  EXPECT_EQ(s[6].name, "a-weak-r1-rep2") << "all first repeats, then the second ones";
  EXPECT_EQ(s[6].repeat, 2);
  EXPECT_EQ(s[6].index, 6);
  EXPECT_TRUE(has(s[6], "train.metrics_path=" + o.out + "/a-weak-r1-rep2/metrics.jsonl"));
  EXPECT_TRUE(has(s[6], "train.checkpoint_dir=" + o.out + "/a-weak-r1-rep2/checkpoints"));
  o.repeats = 0;
  o.ranks = {3};
  EXPECT_NE(error_of([&] { plan_study(scale, o); }).find("3 ranks cannot split evenly"), std::string::npos);
  const std::string bad = d.file("b.yaml", "kind: scale\nrank: 2\nmodels: {a: {config: " + model + "}}\n");
  EXPECT_NE(error_of([&] { plan_study(bad, o); }).find("unknown study key 'rank'"), std::string::npos);
}

TEST(StudyReport, TablesEfficienciesAndPlotScripts) {
  TempDir d;
  auto run = [&](int index, const std::string& name, int ranks, double tokens_per_s) {
    d.file(name + "/run.json", "{\"index\":" + std::to_string(index) + ",\"name\":\"" + name +
                                   "\",\"model\":\"m\",\"mode\":\"weak\",\"label\":\"\",\"kind\":\"scale\",\"ranks\":" +
                                   std::to_string(ranks) + ",\"args\":[]}\n");
    std::string m = start_line();
    for (int s = 1; s <= 10; ++s) {
      std::string line = step_line(s);
      line.replace(line.find("\"tokens_per_s\":"), line.find(",\"mfu\"") - line.find("\"tokens_per_s\":"),
                   "\"tokens_per_s\":" + std::to_string(tokens_per_s));
      m += line;
    }
    d.file(name + "/metrics.jsonl", m);
    d.file(name + "/done", "");
  };
  run(1, "m-weak-r4", 4, 300);
  run(0, "m-weak-r1", 1, 100);
  d.file("m-weak-r8/run.json", "{\"index\":2,\"name\":\"m-weak-r8\",\"model\":\"m\",\"mode\":\"weak\",\"label\":\"\","
                               "\"kind\":\"scale\",\"ranks\":8,\"args\":[]}\n");
  std::string note;
  const std::string md = report_study(d.path.string(), &note);
  // r4: 300 / 4 per rank against 100 / 1: efficiency 0.75; r8 never ran
  const size_t r1 = md.find("| m-weak-r1"), r4 = md.find("| m-weak-r4"), r8 = md.find("| m-weak-r8");
  ASSERT_NE(r1, std::string::npos);
  ASSERT_NE(r4, std::string::npos);
  ASSERT_NE(r8, std::string::npos);
  EXPECT_LT(r1, r4);
  EXPECT_NE(md.substr(r4, md.find('\n', r4) - r4).find("| 0.750 "), std::string::npos) << md;
  EXPECT_NE(md.substr(r8, md.find('\n', r8) - r8).find("not run"), std::string::npos) << md;
  const std::string csv = read_file((d.path / "summary.csv").string(), "csv");
  EXPECT_EQ(csv.substr(0, csv.find(',')), "run");
  EXPECT_NE(csv.find("m-weak-r4,done,4,2,forced zipf:1.2,weak,-,64,0.750,"), std::string::npos) << csv;
  EXPECT_TRUE(fs::exists(d.path / "plots" / "scale_efficiency.gp"));
  EXPECT_NE(read_file((d.path / "plots" / "scale.dat").string(), "data").find("4 300.0 0.7500"), std::string::npos);
  EXPECT_FALSE(note.empty());
  EXPECT_NE(error_of([&] { report_study((d.path / "none").string(), nullptr); }).find("no such study directory"),
            std::string::npos);
}

}  // namespace
}  // namespace moe
