// Sweeps: configuration keys with lists of values, expanded into their combinations.
#include "config/sweep.h"

#include <yaml-cpp/yaml.h>

#include "config/config.h"
#include "base/error.h"

namespace moe {

std::vector<std::string> split_list(const std::string& key, const std::string& text) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (true) {
    size_t comma = text.find(',', begin);
    std::string item = text.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
    if (item.empty()) throw ConfigError(key, "empty item in the list '" + text + "'");
    out.push_back(item);
    if (comma == std::string::npos) return out;
    begin = comma + 1;
  }
}

void Sweep::add(const std::string& key, const std::vector<std::string>& values) {
  const ConfigField& f = config_field(key);
  if (values.empty()) throw ConfigError(key, "needs at least one value");
  if (values.size() > 1 && !f.sweep) throw ConfigError(key, "cannot be swept (one value per run)");
  Config probe;
  for (const std::string& v : values) f.set(probe, v);  // a malformed value fails here, not in run 37
  for (SweepAxis& a : axes_) {
    if (a.key == key) {
      a.values = values;
      return;
    }
  }
  axes_.push_back(SweepAxis{key, values});
}

void Sweep::add_overrides(const std::vector<std::string>& overrides) {
  for (const std::string& o : overrides) {
    const size_t eq = o.find('=');
    if (eq == std::string::npos) throw ConfigError(o, "override needs the form --section.key=value");
    const std::string key = o.substr(0, eq), value = o.substr(eq + 1);
    add(key, config_field(key).sweep ? split_list(key, value) : std::vector<std::string>{value});
  }
}

void Sweep::add_yaml(const YAML::Node& map, const std::string& where) {
  if (!map || map.IsNull()) return;
  if (!map.IsMap()) throw ConfigError("", where + ": expected a mapping of section.key: value or [values]");
  for (const auto& item : map) {
    const std::string key = item.first.as<std::string>();
    std::vector<std::string> values;
    if (item.second.IsScalar()) {
      values.push_back(item.second.Scalar());
    } else if (item.second.IsSequence()) {
      for (const auto& v : item.second) {
        if (!v.IsScalar()) throw ConfigError(key, where + ": a list of plain values expected");
        values.push_back(v.Scalar());
      }
    } else {
      throw ConfigError(key, where + ": expected a value or a list of values");
    }
    add(key, values);
  }
}

size_t Sweep::size() const {
  size_t n = 1;
  for (const SweepAxis& a : axes_) n *= a.values.size();
  return n;
}

std::vector<std::string> Sweep::point(size_t i) const {
  std::vector<std::string> out(axes_.size());
  for (size_t a = axes_.size(); a-- > 0;) {  // the last axis varies fastest
    const size_t n = axes_[a].values.size();
    out[a] = axes_[a].key + "=" + axes_[a].values[i % n];
    i /= n;
  }
  return out;
}

std::string Sweep::label(size_t i) const {
  std::vector<std::string> p = point(i);
  std::string out;
  for (size_t a = 0; a < axes_.size(); ++a) {
    if (axes_[a].values.size() < 2) continue;
    out += (out.empty() ? "" : " ") + p[a];
  }
  return out;
}

std::vector<std::string> Sweep::swept_keys() const {
  std::vector<std::string> out;
  for (const SweepAxis& a : axes_)
    if (a.values.size() > 1) out.push_back(a.key);
  return out;
}

}  // namespace moe
