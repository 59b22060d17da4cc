// The exit codes of every executable, in one table. launch/moe reads it too (`moe_train --exit-codes`
// prints it as shell assignments), so the launcher's restart and signal rules use these names, not numbers.
#pragma once

namespace moe {

enum class ExitCode : int {
  kOk = 0,
  kError = 1,         // an error on one rank, or a benchmark row with a wrong result: the job was aborted
  kInvalid = 2,       // the configuration, the arguments or an input every rank read is wrong: a clean stop
  kPeerLost = 3,      // a peer died or is stuck (a communicator error): launch/moe --max-restarts relaunches
  kSignalBase = 128,  // 128 + the signal that stopped the job (a shell's convention)
  kInterrupted = 130, // SIGINT: stopped at a step boundary after a final checkpoint
  kStopRequest = 138, // SIGUSR1, launch/moe's stop request to mpirun: the launcher reports the signal it got
  kTerminated = 143,  // SIGTERM: stopped at a step boundary after a final checkpoint
};

struct ExitCodeInfo {
  ExitCode code;
  const char* name;     // EXIT_<name> in launch/moe
  const char* meaning;
};

inline constexpr ExitCodeInfo kExitCodes[] = {
    {ExitCode::kOk, "OK", "finished"},
    {ExitCode::kError, "ERROR", "an error on one rank (the job was aborted), or a wrong benchmark result"},
    {ExitCode::kInvalid, "INVALID", "a configuration, argument or input error every rank saw: a clean stop"},
    {ExitCode::kPeerLost, "PEER_LOST", "a peer died or is stuck: --max-restarts relaunches"},
    {ExitCode::kSignalBase, "SIGNAL_BASE", "128 + the signal that stopped a process"},
    {ExitCode::kInterrupted, "INTERRUPTED", "SIGINT: stopped after a final checkpoint"},
    {ExitCode::kStopRequest, "STOP_REQUEST", "SIGUSR1 (launch/moe's stop request): reported as 130 or 143"},
    {ExitCode::kTerminated, "TERMINATED", "SIGTERM: stopped after a final checkpoint"},
};

constexpr int exit_code(ExitCode c) { return static_cast<int>(c); }
// 128 + the signal: how a process stopped by `signal` (after its final checkpoint) exits.
constexpr int exit_code_for_signal(int signal) { return exit_code(ExitCode::kSignalBase) + signal; }

}  // namespace moe
