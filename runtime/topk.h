// The top-k insertion step of the router, shared by the CPU backend and the CUDA top-k kernel.
#pragma once

#include "runtime/host_device.h"

namespace moe {

// Offers value v of expert e to a running top-k: key[0..n) / idx[0..n) in descending order of key,
// n < k while filling. v enters only when strictly greater than the current k-th, so among equal
// values the lower expert index (offered first) ranks higher; NaN never enters a full list.
template <typename T, typename I>
MOE_HOST_DEVICE inline void topk_insert(T* key, I* idx, int& n, int k, T v, int e) {
  if (n == k && !(v > key[k - 1])) return;
  int pos = n < k ? n++ : k - 1;
  while (pos > 0 && v > key[pos - 1]) {
    key[pos] = key[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  key[pos] = v;
  idx[pos] = static_cast<I>(e);
}

}  // namespace moe
