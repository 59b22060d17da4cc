// Forced routing (moe.force_routing): expert choices drawn from a seeded distribution instead of the
// router's top-k, for benchmarks and imbalance studies that must not depend on what a model learned.
// Shared by the CPU backend and the CUDA top-k kernel, so both draw the very same experts.
//
// Every kind is a weight per expert; a token's k experts are drawn one after another without
// replacement, each draw picking among the experts not yet chosen with probability proportional to
// their weights (so a token's 1st choice follows the weights exactly):
//   uniform   w_i = 1
//   zipf:S    w_i = (i + 1)^-S                       (S >= 0; expert 0 the most popular)
//   hot:F     w_0 = F (E - 1) / (1 - F), w_i = 1     (0 < F < 1: expert 0 gets a fraction F of 1st choices)
// Draw j of global token t uses uniform number (t * k + j) of the stream.
#pragma once

#include <cmath>
#include <cstdint>

#include "base/host_device.h"
#include "config/enums.h"
#include "runtime/rng.h"

namespace moe {

// Weight of expert i among e_count (not normalised).
MOE_HOST_DEVICE inline double forced_weight(const ForcedRouting& f, int i, int e_count) {
  switch (f.kind) {
    case ForcedKind::kZipf: return pow(static_cast<double>(i + 1), -f.param);
    case ForcedKind::kHot: return i == 0 ? f.param * (e_count - 1) / (1.0 - f.param) : 1.0;
    default: return 1.0;
  }
}

// Fills idx[0..k) with the experts of global token `token`, distinct, in draw order.
template <typename I>
MOE_HOST_DEVICE inline void forced_choice(const ForcedRouting& f, int e_count, int k, const RngStream& rng,
                                          uint64_t token, I* idx) {
  for (int j = 0; j < k; ++j) {
    auto taken = [&](int e) {
      for (int i = 0; i < j; ++i)
        if (idx[i] == static_cast<I>(e)) return true;
      return false;
    };
    double total = 0;
    for (int e = 0; e < e_count; ++e)
      if (!taken(e)) total += forced_weight(f, e, e_count);
    double u = rng.uniform(token * static_cast<uint64_t>(k) + static_cast<uint64_t>(j)) * total, acc = 0;
    int pick = -1;
    for (int e = 0; e < e_count; ++e) {
      if (taken(e)) continue;
      pick = e;  // the last free expert if rounding leaves u at the very top
      acc += forced_weight(f, e, e_count);
      if (u < acc) break;
    }
    idx[j] = static_cast<I>(pick);
  }
}

}  // namespace moe
