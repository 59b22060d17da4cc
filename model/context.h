// What a forward/backward pass needs to know about the step it belongs to, and where it books time.
#pragma once

#include <chrono>
#include <cstdint>

namespace moe {

// Wall time of one step, split by phase (seconds). The phases cover the whole step, so they add up to it.
struct PhaseTimes {
  double router = 0;     // router GEMM, scores, top-k/capacity, loss statistics (with their all-reduce)
  double dispatch = 0;   // permute, all-to-all to the experts, expert-major compaction
  double experts = 0;    // routed expert FFNs (forward)
  double combine = 0;    // un-compaction, all-to-all back, gate-weighted unpermute
  double shared = 0;     // shared expert FFNs (forward)
  double backward = 0;   // the whole backward pass
  double allreduce = 0;  // gradient reduction over world / dp groups
  double optimizer = 0;  // clipping, optimizer update, loss-free bias update
  double other = 0;      // data, embedding, norms, head and loss forward, metrics

  double total() const { return router + dispatch + experts + combine + shared + backward + allreduce + optimizer + other; }
};

// Adds the time since construction (or the last lap) to a phase counter.
class PhaseTimer {
 public:
  PhaseTimer() : start_(std::chrono::steady_clock::now()) {}
  void lap(double& into) {
    auto now = std::chrono::steady_clock::now();
    into += std::chrono::duration<double>(now - start_).count();
    start_ = now;
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

struct StepContext {
  int64_t step = 0;            // 0-based step index; keys the per-step random streams
  bool training = true;        // jitter and gumbel noise only in training
  int64_t token_offset = 0;    // global index of this rank's first token
  int64_t global_tokens = 0;   // tokens in the global batch: every loss is normalised by it
  PhaseTimes* times = nullptr; // where to book time; may be null
};

}  // namespace moe
