// JSON writer and reader.
#include "base/json.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "base/error.h"

namespace moe {

std::string format_double(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

void JsonWriter::separate() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (!first_.empty()) {
    if (!first_.back()) out_ += ",";
    first_.back() = false;
  }
}

JsonWriter& JsonWriter::begin_object() {
  separate();
  out_ += "{";
  first_.push_back(true);
  return *this;
}
JsonWriter& JsonWriter::end_object() {
  MOE_CHECK(!first_.empty(), "unbalanced JSON object");
  first_.pop_back();
  out_ += "}";
  return *this;
}
JsonWriter& JsonWriter::begin_array() {
  separate();
  out_ += "[";
  first_.push_back(true);
  return *this;
}
JsonWriter& JsonWriter::end_array() {
  MOE_CHECK(!first_.empty(), "unbalanced JSON array");
  first_.pop_back();
  out_ += "]";
  return *this;
}
JsonWriter& JsonWriter::key(const std::string& k) {
  separate();
  out_ += json_quote(k) + ":";
  after_key_ = true;
  return *this;
}
JsonWriter& JsonWriter::value(const std::string& v) {
  separate();
  out_ += json_quote(v);
  return *this;
}
JsonWriter& JsonWriter::value(double v) {
  separate();
  out_ += std::isfinite(v) ? format_double(v) : "null";
  return *this;
}
JsonWriter& JsonWriter::value(int64_t v) {
  separate();
  out_ += std::to_string(v);
  return *this;
}
JsonWriter& JsonWriter::value(uint64_t v) {
  separate();
  out_ += std::to_string(v);
  return *this;
}
JsonWriter& JsonWriter::value(bool v) {
  separate();
  out_ += v ? "true" : "false";
  return *this;
}

YAML::Node parse_json(const std::string& text, const std::string& what) {
  try {
    YAML::Node n = YAML::Load(text);
    if (!n.IsMap()) throw InputError(what, "expected a JSON object");
    return n;
  } catch (const YAML::Exception& e) {
    throw InputError(what, "malformed JSON: " + e.msg);
  }
}

}  // namespace moe
