// Markdown and CSV tables, and the number formats of the reports.
#include "perf/table.h"

#include <algorithm>
#include <cstdio>

namespace moe {

std::string Table::markdown() const {
  auto cell = [](std::string s) {
    for (size_t p = 0; (p = s.find('|', p)) != std::string::npos; p += 2) s.replace(p, 1, "\\|");
    return s;
  };
  std::vector<size_t> width(columns.size(), 3);
  for (size_t c = 0; c < columns.size(); ++c) width[c] = std::max(width[c], cell(columns[c]).size());
  for (const auto& row : rows)
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) width[c] = std::max(width[c], cell(row[c]).size());
  auto line = [&](const std::vector<std::string>& values) {
    std::string out = "|";
    for (size_t c = 0; c < columns.size(); ++c) {
      std::string v = c < values.size() ? cell(values[c]) : "";
      out += " " + v + std::string(width[c] - v.size(), ' ') + " |";
    }
    return out + "\n";
  };
  std::string out = line(columns) + "|";
  for (size_t w : width) out += std::string(w + 2, '-') + "|";
  out += "\n";
  for (const auto& row : rows) out += line(row);
  return out;
}

std::string Table::csv() const {
  auto cell = [](const std::string& s) {
    if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
    std::string q = "\"";
    for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
    return q + "\"";
  };
  auto line = [&](const std::vector<std::string>& values) {
    std::string out;
    for (size_t c = 0; c < columns.size(); ++c) out += (c ? "," : "") + cell(c < values.size() ? values[c] : "");
    return out + "\n";
  };
  std::string out = line(columns);
  for (const auto& row : rows) out += line(row);
  return out;
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

std::string millions(int64_t n) { return n > 0 ? fixed(static_cast<double>(n) * 1e-6, 3) + "M" : "-"; }

std::string sh_quote(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

}  // namespace moe
