// The poller registry of device_wait.h.
#include "runtime/device_wait.h"

#include <mutex>
#include <utility>
#include <vector>

namespace moe {
namespace {

std::mutex g_mutex;
int g_next = 1;
std::vector<std::pair<int, WaitPoller>> g_pollers;

}  // namespace

int add_wait_poller(WaitPoller poller) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_pollers.emplace_back(g_next, std::move(poller));
  return g_next++;
}

void remove_wait_poller(int handle) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto it = g_pollers.begin(); it != g_pollers.end(); ++it) {
    if (it->first == handle) {
      g_pollers.erase(it);
      return;
    }
  }
}

void poll_waiters(double waited_seconds) {
  std::vector<WaitPoller> copy;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto& p : g_pollers) copy.push_back(p.second);
  }
  for (auto& p : copy) p(waited_seconds);
}

}  // namespace moe
