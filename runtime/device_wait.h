// Host waits on device work, made interruptible.
//
// Wherever the host blocks on a device (copying a result back, synchronising a stream), it polls
// instead of blocking and calls every registered poller between polls. A stream-ordered communicator
// registers one that checks its asynchronous errors and its timeout, so a dead or stuck peer becomes a
// CommError on this rank (and main() then aborts the job) instead of a hang.
#pragma once

#include <functional>

namespace moe {

// Called with the seconds this wait has lasted so far; throws to give up.
using WaitPoller = std::function<void(double waited_seconds)>;

int add_wait_poller(WaitPoller poller);  // returns a handle for remove_wait_poller
void remove_wait_poller(int handle);
// Calls every poller (in registration order).
void poll_waiters(double waited_seconds);

}  // namespace moe
