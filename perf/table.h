// Tables as the study reports and the cost model print them (Markdown aligned for a terminal, or CSV), and
// the number formats they share.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe {

// A table written as Markdown (aligned for reading in a terminal too) or as CSV (RFC 4180 quoting).
struct Table {
  std::vector<std::string> columns;
  std::vector<std::vector<std::string>> rows;
  std::string markdown() const;
  std::string csv() const;
};

// v with `digits` decimals ("12.35").
std::string fixed(double v, int digits);
// A parameter count in millions ("3.456M"), "-" for none.
std::string millions(int64_t n);
// A shell word: single-quoted.
std::string sh_quote(const std::string& s);

}  // namespace moe
