// Step timeline: phase times measured on the backend's streams.
#include "model/context.h"

#include <algorithm>

namespace moe {

const Phase* find_phase(const std::string& name) {
  for (const Phase& p : kPhases)
    if (name == p.name) return &p;
  return nullptr;
}

Timeline::Timeline(Backend& backend) : backend_(backend), start_(backend.mark()) {}

void Timeline::lap(double* phase) { laps_.push_back(Lap{backend_.mark(), phase}); }

int Timeline::begin_side(double* phase) {
  Side s;
  s.phase = phase;
  s.open_lap = laps_.size();
  backend_.begin_side();
  s.begin = backend_.mark();
  sides_.push_back(s);
  return static_cast<int>(sides_.size() - 1);
}

void Timeline::end_side(int handle) {
  sides_[static_cast<size_t>(handle)].end = backend_.mark();
  backend_.end_side();
}

void Timeline::join_side(int handle) {
  Side& s = sides_[static_cast<size_t>(handle)];
  s.wait_begin = backend_.mark();
  backend_.join_side();
  s.wait_end = backend_.mark();
}

void Timeline::resolve(PhaseTimes& times) {
  backend_.synchronize();
  std::vector<double> lap_s(laps_.size());
  int prev = start_;
  for (size_t i = 0; i < laps_.size(); ++i) {
    lap_s[i] = backend_.seconds_between(prev, laps_[i].mark);
    prev = laps_[i].mark;
  }
  for (const Side& s : sides_) {
    double side_s = backend_.seconds_between(s.begin, s.end);
    if (backend_.side_runs_inline()) {
      if (s.open_lap < lap_s.size()) lap_s[s.open_lap] -= side_s;
      *s.phase += side_s;
    } else {
      double wait_s = s.wait_begin >= 0 ? backend_.seconds_between(s.wait_begin, s.wait_end) : 0.0;
      times.hidden_shared += std::max(0.0, side_s - wait_s);
    }
  }
  for (size_t i = 0; i < laps_.size(); ++i) *laps_[i].phase += std::max(0.0, lap_s[i]);
  laps_.clear();
  sides_.clear();
  start_ = backend_.mark();
}

int side_begin(Backend& backend, const StepContext& ctx, double PhaseTimes::*phase) {
  if (ctx.timeline && ctx.times) return ctx.timeline->begin_side(&(ctx.times->*phase));
  backend.begin_side();
  return -1;
}

void side_end(Backend& backend, const StepContext& ctx, int handle) {
  if (handle >= 0) {
    ctx.timeline->end_side(handle);
  } else {
    backend.end_side();
  }
}

void side_join(Backend& backend, const StepContext& ctx, int handle) {
  if (handle >= 0) {
    ctx.timeline->join_side(handle);
  } else {
    backend.join_side();
  }
}

}  // namespace moe
