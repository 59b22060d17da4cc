// JSON: a small streaming writer, and reading through yaml-cpp (JSON is YAML's flow style).
//
// Used for the metrics lines, the safetensors header and the checkpoint manifest.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace moe {

// The shortest decimal text that reads back as exactly `v` ("nan"/"inf" for non-finite values).
std::string format_double(double v);

class JsonWriter {
 public:
  JsonWriter& begin_object();
  JsonWriter& end_object();
  JsonWriter& begin_array();
  JsonWriter& end_array();
  JsonWriter& key(const std::string& k);
  JsonWriter& value(const std::string& v);
  JsonWriter& value(const char* v) { return value(std::string(v)); }
  JsonWriter& value(double v);  // non-finite values are written as null
  JsonWriter& value(int64_t v);
  JsonWriter& value(uint64_t v);
  JsonWriter& value(int v) { return value(static_cast<int64_t>(v)); }
  JsonWriter& value(bool v);
  template <typename T>
  JsonWriter& field(const std::string& k, const T& v) {
    key(k);
    return value(v);
  }
  template <typename T>
  JsonWriter& array(const std::string& k, const std::vector<T>& values) {
    key(k);
    begin_array();
    for (const T& v : values) value(v);
    return end_array();
  }
  const std::string& str() const { return out_; }

 private:
  void separate();
  std::string out_;
  std::vector<bool> first_;  // per open container: nothing written in it yet
  bool after_key_ = false;
};

std::string json_quote(const std::string& s);

// Parses JSON text; throws InputError naming `what` when it is malformed.
YAML::Node parse_json(const std::string& text, const std::string& what);

}  // namespace moe
