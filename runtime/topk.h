// The router's top-k: the insertion step of the CPU backend (and of the CUDA kernel for rows with NaN),
// and one lane's step of the CUDA kernel's warp rounds.
#pragma once

#include <climits>
#include <cmath>

#include "base/host_device.h"

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

// The order topk_insert gives values that are not NaN: the higher value first, the lower expert index
// among equal values (-0 equals +0).
template <typename T>
MOE_HOST_DEVICE inline bool ranks_before(T v, int e, T w, int f) {
  return v > w || (v == w && e < f);
}

// One lane's share of a round of the warp top-k (the CUDA router; one warp per token). Round j picks
// the expert that ranks first among those ranking after round j-1's pick (last_e < 0 in round 0): each
// lane scans experts lane, lane + lanes, ... and offers its best, the warp keeps the best offer. k
// rounds give topk_insert's list for rows without NaN, with no per-thread list. Expert e's selection
// value is p[e] + bias[e] (bias may be null), as the CPU router offers it. A lane with nothing to offer
// leaves (-inf, INT_MAX), which every expert ranks before.
template <typename T>
MOE_HOST_DEVICE inline void topk_lane_offer(const T* p, const T* bias, int e_count, int lane, int lanes, T last_v,
                                            int last_e, T* best_v, int* best_e) {
  T bv = -static_cast<T>(INFINITY);
  int be = INT_MAX;
  for (int e = lane; e < e_count; e += lanes) {
    const T v = p[e] + (bias ? bias[e] : T(0));
    if (last_e >= 0 && !ranks_before(last_v, last_e, v, e)) continue;
    if (ranks_before(v, e, bv, be)) bv = v, be = e;
  }
  *best_v = bv;
  *best_e = be;
}

}  // namespace moe
