// The loops that run jobs under launch/moe (which runs each under mpirun and forwards signals to it):
// a study (its plan, every run not finished before, done marks, failures, the report) and a calibration
// (moe_bench calibrate per rank count and pass, then the element-wise median). They were bash in
// launch/moe; now they sit with the rest of the study and calibration code.
#pragma once

#include <string>
#include <vector>

#include "perf/study_plan.h"

namespace moe {

struct StudyRunnerOptions {
  StudyOptions plan;         // what to run (its `out` the output directory)
  std::string study;         // the study file
  std::string launcher;      // launch/moe, which runs each job under mpirun and forwards signals to it
  bool fresh = false;        // start over: remove the output directory first
};

// Runs every run of the plan not marked done (each in its own process group: a SIGINT or SIGTERM to this
// process is passed on once, so the job stops at its next step boundary after a checkpoint, and a second
// one stops it at once), keeps going past a failed run, and writes the report. Returns the exit code: 0,
// the stopped job's code (130, 143) when a signal stopped the study, or kError when a run failed.
int run_study(const StudyRunnerOptions& options);

struct CalibrationOptions {
  std::vector<int> ranks{1, 2, 4, 8};  // one `moe_bench calibrate` per rank count and pass
  int repeats = 1;                     // passes over the rank counts; the constants are their median
  std::string out;                     // the constants file
  std::vector<std::string> bench_args; // more moe_bench calibrate options (--iters=, --device=, ...)
  std::string launcher;
};

// Each pass runs every rank count (so that repeats fall in different periods of a shared machine's speed),
// each adding its entry to one file per pass; with several passes the constants are their element-wise
// median. Signals as for a study. Returns the exit code (the first failing job's).
int run_calibration(const CalibrationOptions& options);

}  // namespace moe
