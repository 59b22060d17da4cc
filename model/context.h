// What a forward/backward pass needs to know about the step it belongs to, and where it books time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/backend.h"

namespace moe {

// Time of one step, split by phase (seconds). The phases are consecutive stretches of the main stream,
// so they add up to the step. Work on the side stream (shared experts) is booked where the main stream
// had to wait for it; the part that ran beside other work is reported in `hidden_shared`, outside the sum,
// and likewise for the gradient sums started during the backward (`hidden_allreduce`).
struct PhaseTimes {
  double attention = 0;  // attention sublayers (norm, projections, rotary, scores, softmax, output) forward
  double dense = 0;      // dense FFN sublayers (norm and FFN) forward
  double router = 0;     // MoE norm, router GEMM, scores, top-k/capacity, loss statistics (with their all-reduce)
  double dispatch = 0;   // the dispatch plan (fill counts) and the permutation into the send buffer
  double exchange = 0;   // the forward token exchanges, to the experts and back (waiting for peers included)
  double experts = 0;    // routed expert FFNs (forward)
  double combine = 0;    // gate-weighted unpermute
  double shared = 0;     // shared expert FFNs (forward): the part the main stream waited for
  double backward = 0;   // the whole backward pass
  double allreduce = 0;  // gradient reduction over world / dp groups: the part not hidden behind the backward
  double optimizer = 0;  // clipping, optimizer update, loss-free bias update
  double other = 0;      // data, embedding, final norm, head and loss forward, metrics

  double hidden_shared = 0;     // shared expert time (forward and backward) that overlapped other work
  double hidden_allreduce = 0;  // gradient-sum time that overlapped the backward (stream-ordered comm)

  // The sum of the phases (kPhases, in its order): the step.
  double total() const;
};

// One phase of a step: its name (the metrics file's time_s key, the report and prediction columns), its
// field, and its colour in the study plots.
struct Phase {
  const char* name;
  double PhaseTimes::*field;
  const char* colour;  // "#rrggbb", one distinct colour per phase
};

// Every phase, in the order the metrics line, the tables, the plots and the cost model show them. The one
// list of phases: adding one is a field above and a row here.
inline constexpr Phase kPhases[] = {
    {"attention", &PhaseTimes::attention, "#332288"}, {"dense", &PhaseTimes::dense, "#117733"},
    {"router", &PhaseTimes::router, "#88ccee"},       {"dispatch", &PhaseTimes::dispatch, "#ddcc77"},
    {"exchange", &PhaseTimes::exchange, "#cc6677"},   {"experts", &PhaseTimes::experts, "#aa4499"},
    {"combine", &PhaseTimes::combine, "#44aa99"},     {"shared", &PhaseTimes::shared, "#999933"},
    {"backward", &PhaseTimes::backward, "#882255"},   {"allreduce", &PhaseTimes::allreduce, "#ee8866"},
    {"optimizer", &PhaseTimes::optimizer, "#6699cc"}, {"other", &PhaseTimes::other, "#bbbbbb"},
};

inline double PhaseTimes::total() const {
  double sum = 0;
  for (const Phase& p : kPhases) sum += this->*p.field;
  return sum;
}

// The phase called `name`, or null.
const Phase* find_phase(const std::string& name);

// Books the time between consecutive laps to phases, measured on the backend's streams (device events
// on a GPU, the clock on the CPU), so asynchronous work is timed where it runs. resolve() waits for the
// device and adds the times to the phases.
class Timeline {
 public:
  explicit Timeline(Backend& backend);
  // The main-stream time since the previous lap (or construction) goes to *phase.
  void lap(double* phase);
  // Side-stream work (backend.begin_side() ... end_side(), joined later with join_side()), timed.
  // On a backend whose side stream runs inline (CPU) its time goes to *phase and out of the lap it ran
  // in; otherwise only the main stream's wait at the join is on the clock (in whichever lap holds the
  // join), and the rest of the side time is reported as hidden.
  int begin_side(double* phase);
  void end_side(int handle);
  void join_side(int handle);
  void resolve(PhaseTimes& times);

 private:
  struct Lap {
    int mark;
    double* phase;
  };
  struct Side {
    int begin = -1, end = -1, wait_begin = -1, wait_end = -1;
    double* phase = nullptr;
    size_t open_lap = 0;  // the lap that was open while the side work was issued
  };
  Backend& backend_;
  int start_;
  std::vector<Lap> laps_;
  std::vector<Side> sides_;
};

struct StepContext {
  int64_t step = 0;            // 0-based step index; keys the per-step random streams
  bool training = true;        // a backward follows: keep activations; noise (jitter, gumbel, random
                               // routing, dropout) only in training
  bool dropless = false;       // route without capacity, all local tokens in one group (sampling)
  int64_t group_size = -1;     // tokens per capacity group: -1 moe.group_size, 0 all local tokens, > 0 this
                               // many (evaluation routes each sequence as its own group)
  int64_t seq_len = 0;         // tokens per sequence (the local tokens are whole sequences)
  int64_t token_offset = 0;    // global index of this rank's first token
  int64_t global_tokens = 0;   // tokens in the global batch: every loss is normalised by it
  Timeline* timeline = nullptr;  // where to book time; may be null
  PhaseTimes* times = nullptr;   // the phases the timeline books to

  // Books the main-stream time since the last lap to `phase` (nothing without a timeline).
  void lap(double PhaseTimes::*phase) const {
    if (timeline && times) timeline->lap(&(times->*phase));
  }
};

// Runs side-stream work with or without a timeline: side_begin() ... side_end(), then side_join()
// where the main stream needs the result.
int side_begin(Backend& backend, const StepContext& ctx, double PhaseTimes::*phase);
void side_end(Backend& backend, const StepContext& ctx, int handle);
void side_join(Backend& backend, const StepContext& ctx, int handle);

}  // namespace moe
