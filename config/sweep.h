// Sweeps: a configuration key given a list of values (`--moe.top_k=1,2` on the command line, a YAML list
// in a study file) is an axis, and the runs are every combination of the axes. Only keys the field
// table marks as sweepable (ConfigField::sweep) split on commas; other values are taken whole.
#pragma once

#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace moe {

struct SweepAxis {
  std::string key;
  std::vector<std::string> values;
};

class Sweep {
 public:
  // Adds `key=value` overrides (no leading "--"). A sweepable key's comma list becomes an axis; a key
  // given again replaces its earlier values (the command line after a study file). Unknown keys,
  // malformed values (each value is parsed) and empty list items throw ConfigError naming the key.
  void add_overrides(const std::vector<std::string>& overrides);
  // Adds a YAML mapping of key -> scalar or list (a study's `set:` or `sweep:` section).
  void add_yaml(const YAML::Node& map, const std::string& where);
  void add(const std::string& key, const std::vector<std::string>& values);

  size_t size() const;  // runs: the product of the axis lengths (1 with no axis)
  // Run i as overrides, axes in the order first given, the first axis varying slowest.
  std::vector<std::string> point(size_t i) const;
  // The swept part of run i only: "moe.num_experts=8 moe.top_k=1" ("" with no axis).
  std::string label(size_t i) const;
  const std::vector<SweepAxis>& axes() const { return axes_; }  // keys with one value included
  std::vector<std::string> swept_keys() const;                   // keys with more than one value

 private:
  std::vector<SweepAxis> axes_;
};

// Splits "a,b,c" at commas (no trimming); throws ConfigError(key) on an empty item.
std::vector<std::string> split_list(const std::string& key, const std::string& text);

}  // namespace moe
