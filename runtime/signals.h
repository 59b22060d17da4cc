// Stopping cleanly on a signal.
//
// After install_stop_handlers(), the first SIGTERM, SIGINT or SIGUSR1 only records a stop request;
// the trainer agrees with every rank at the next step boundary (in a collective it runs anyway), writes
// a final checkpoint and exits with 128 + the signal's number. A second signal restores the default
// action and re-raises it: the process stops at once. launch/moe turns a SIGTERM or Ctrl-C of its own into
// a SIGUSR1 to mpirun, which forwards SIGUSR1 to every rank without killing the job.
#pragma once

namespace moe {

void install_stop_handlers();
// The first stop signal received (SIGTERM, SIGINT, SIGUSR1), or 0.
int stop_signal();
// Name of a signal number ("SIGTERM").
const char* signal_name(int signo);

}  // namespace moe
