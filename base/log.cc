// Rank-aware console output.
#include "base/log.h"

#include <cstdio>

namespace moe {
namespace {
int g_rank = 0;
int g_world = 1;
}  // namespace

void log_set_rank(int rank, int world_size) {
  g_rank = rank;
  g_world = world_size;
}

int log_rank() { return g_rank; }

void log_info(const std::string& line) {
  if (g_rank != 0) return;
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

void log_warn(const std::string& line) {
  if (g_world > 1) {
    std::fprintf(stderr, "[rank %d] warning: %s\n", g_rank, line.c_str());
  } else {
    std::fprintf(stderr, "warning: %s\n", line.c_str());
  }
  std::fflush(stderr);
}

std::string format_duration(double s) {
  char buf[32];
  if (s < 0) s = 0;
  if (s < 60) {
    std::snprintf(buf, sizeof(buf), "%.1fs", s);
  } else if (s < 3600) {
    std::snprintf(buf, sizeof(buf), "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  } else {
    std::snprintf(buf, sizeof(buf), "%dh%02dm", static_cast<int>(s) / 3600, static_cast<int>(s) % 3600 / 60);
  }
  return buf;
}

}  // namespace moe
