// Stop-request signal handlers.
#include "runtime/signals.h"

#include <csignal>
#include <cstring>
#include <initializer_list>

namespace moe {
namespace {

volatile std::sig_atomic_t first_signal = 0;

extern "C" void on_stop_signal(int signo) {
  if (first_signal == 0) {
    first_signal = signo;
    return;
  }
  std::signal(signo, SIG_DFL);  // the second one: the default action, now
  std::raise(signo);
}

}  // namespace

void install_stop_handlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int s : {SIGTERM, SIGINT, SIGUSR1}) sigaction(s, &sa, nullptr);
}

int stop_signal() { return first_signal; }

const char* signal_name(int signo) {
  switch (signo) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGUSR1: return "SIGUSR1";
    case SIGKILL: return "SIGKILL";
    default: return "a signal";
  }
}

}  // namespace moe
