// Rank-aware console output.
//
// Progress and start-up output come from rank 0 only (log_info); problems any rank sees go to stderr
// with the rank named (log_warn). Every line is flushed at once so mpirun interleaves whole lines.
#pragma once

#include <string>

namespace moe {

void log_set_rank(int rank, int world_size);
int log_rank();
void log_info(const std::string& line);  // rank 0, stdout
void log_warn(const std::string& line);  // any rank, stderr, "[rank r] warning: ..."

// "1h02m", "3m07s", "12.4s"
std::string format_duration(double seconds);

}  // namespace moe
