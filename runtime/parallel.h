// A parallel loop over host threads for work whose every element is a pure function of its index (the
// counter-based random draws of initialisation and test inputs), so the result is the same bit for bit
// whatever the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace moe {

// Calls f(begin, end) over [0, n) in contiguous chunks of at least min_chunk elements, on up to
// hardware_concurrency() threads (the calling thread takes the first chunk). Small n runs inline.
template <typename F>
void parallel_chunks(int64_t n, int64_t min_chunk, F f) {
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t chunks = std::max<int64_t>(1, std::min(hw, n / std::max<int64_t>(1, min_chunk)));
  if (chunks == 1) {
    f(int64_t{0}, n);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::thread> threads;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t begin = c * step, end = std::min(n, begin + step);
    if (begin < end) threads.emplace_back([=] { f(begin, end); });
  }
  f(int64_t{0}, std::min(n, step));
  for (std::thread& t : threads) t.join();
}

}  // namespace moe
