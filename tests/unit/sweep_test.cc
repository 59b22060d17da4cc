// Sweeps: comma lists of sweepable keys become axes, the grid is their product, study YAML adds
// values and lists, and everything is checked before the first run. moe.force_routing parsing.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include "config/config.h"
#include "base/error.h"
#include "config/sweep.h"

namespace moe {
namespace {

std::string error_key(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.key();
  }
  return "(no error)";
}

TEST(Sweep, GridIsTheProductWithTheFirstAxisSlowest) {
  Sweep s;
  s.add_overrides({"moe.num_experts=8,16,32", "moe.top_k=1,2", "train.steps=5"});
  ASSERT_EQ(s.size(), 6u);
  EXPECT_EQ(s.point(0), (std::vector<std::string>{"moe.num_experts=8", "moe.top_k=1", "train.steps=5"}));
  EXPECT_EQ(s.point(1), (std::vector<std::string>{"moe.num_experts=8", "moe.top_k=2", "train.steps=5"}));
  EXPECT_EQ(s.point(5), (std::vector<std::string>{"moe.num_experts=32", "moe.top_k=2", "train.steps=5"}));
  EXPECT_EQ(s.label(3), "moe.num_experts=16 moe.top_k=2");
  EXPECT_EQ(s.swept_keys(), (std::vector<std::string>{"moe.num_experts", "moe.top_k"}));
  Config c = parse_config("", "", s.point(4));
  EXPECT_EQ(c.moe.num_experts, 32);
  EXPECT_EQ(c.moe.top_k, 1);
  EXPECT_EQ(c.train.steps, 5);
}

TEST(Sweep, LaterValuesReplaceEarlierOnesAndYamlListsAreAxes) {
  YAML::Node study = YAML::Load("{moe.capacity_factor: [1.0, 1.25, 2.0], moe.force_routing: [off, 'zipf:1.2'], "
                                "train.steps: 20}");
  Sweep s;
  s.add_yaml(study, "study.yaml");
  EXPECT_EQ(s.size(), 6u);
  s.add_overrides({"moe.capacity_factor=1.5"});  // the command line after the study file
  EXPECT_EQ(s.size(), 2u);
  EXPECT_EQ(s.point(1), (std::vector<std::string>{"moe.capacity_factor=1.5", "moe.force_routing=zipf:1.2",
                                                  "train.steps=20"}));
  EXPECT_EQ(parse_config("", "", s.point(1)).moe.force_routing, (ForcedRouting{ForcedKind::kZipf, 1.2}));
}

TEST(Sweep, StringsAreNeverSplitAndBadInputNamesTheKey) {
  Sweep s;
  s.add_overrides({"train.sample_prompt=a,b", "data.path=x,y.bin"});
  EXPECT_EQ(s.size(), 1u);
  EXPECT_EQ(parse_config("", "", s.point(0)).train.sample_prompt, "a,b");
  EXPECT_EQ(error_key([] { Sweep().add_overrides({"moe.top_k=1,x"}); }), "moe.top_k");
  EXPECT_EQ(error_key([] { Sweep().add_overrides({"moe.top_k=1,,2"}); }), "moe.top_k");
  EXPECT_EQ(error_key([] { Sweep().add_overrides({"moe.topk=1,2"}); }), "moe.topk");
  EXPECT_EQ(error_key([] { Sweep().add_overrides({"moe.top_k"}); }), "moe.top_k");
  EXPECT_EQ(error_key([] { Sweep().add("train.resume", {"a", "b"}); }), "train.resume");
  EXPECT_EQ(error_key([] { Sweep().add_yaml(YAML::Load("{moe.top_k: {a: 1}}"), "s.yaml"); }), "moe.top_k");
}

TEST(Sweep, OnlyStringKeysAreNotSweepable) {
  for (const ConfigField& f : config_fields()) {
    EXPECT_EQ(f.sweep, f.type != "string") << f.key;
  }
}

TEST(ForcedRoutingConfig, ParsesPrintsAndRejects) {
  for (const char* text : {"off", "uniform", "zipf:1.2", "zipf:0", "hot:0.5"}) {
    EXPECT_EQ(forced_routing_name(parse_forced_routing(text)), text);
  }
  for (const char* bad : {"", "zipf", "zipf:-1", "zipf:nan", "hot:1", "hot:0", "hot:x", "cold:0.5", "Uniform"}) {
    EXPECT_EQ(error_key([&] { parse_forced_routing(bad); }), "moe.force_routing") << bad;
  }
}

}  // namespace
}  // namespace moe
