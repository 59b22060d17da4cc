// Counter-based random numbers: Philox4x32-10 keyed by (seed, stream, index).
//
// Every random draw in the runtime is a pure function of (seed, purpose, step/layer/..., global index).
// Nothing carries state from one draw to the next, so a value never depends on how many ranks there
// are, which rank draws it, or in what order: token t of the global batch gets the same jitter, gumbel
// noise and random-routing coin on 1 rank and on 1024. The same generator is what cuRAND implements,
// so a device kernel can reproduce the CPU stream.
#pragma once

#include <cmath>
#include <cstdint>

#include "base/host_device.h"

// The generator and uniform() also compile as device code, so kernels draw the very same numbers.
namespace moe {

// What a random stream is used for: keeps streams of different purposes disjoint.
enum class RngPurpose : uint8_t {
  kInit = 1,           // parameter initialisation; a = parameter-name hash
  kJitter = 2,         // router input jitter; a = step, b = layer
  kGumbel = 3,         // gumbel noise on router logits; a = step, b = layer
  kRandomRouting = 4,  // GShard random routing of the 2nd expert; a = step, b = layer
  kSynthetic = 5,      // synthetic data tokens; a = sequence index
  kSyntheticTable = 6, // synthetic data transition table
  kTest = 7,           // test inputs
  kAttnDropout = 8,    // attention-probability dropout; a = step, b = layer
  kSample = 9,         // token sampling; a = 0
  kForcedRouting = 10, // moe.force_routing expert draws; a = step, b = layer
  kUpcycleNoise = 11,  // launch/moe upcycle --noise; a = parameter-name hash
};

// Packs (purpose, a, b) into a 64-bit stream id: 8 bits purpose, 40 bits a, 16 bits b.
inline uint64_t rng_stream(RngPurpose purpose, uint64_t a, uint64_t b = 0) {
  return (static_cast<uint64_t>(purpose) << 56) | ((a & 0xFFFFFFFFFFull) << 16) | (b & 0xFFFFull);
}

struct PhiloxBlock {
  uint32_t v[4];
  MOE_HOST_DEVICE uint32_t operator[](int i) const { return v[i]; }
};

MOE_HOST_DEVICE inline PhiloxBlock philox4x32_10(uint64_t key, uint64_t counter_hi, uint64_t counter_lo) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = static_cast<uint32_t>(p1);
    uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += kW0, k1 += kW1;
  }
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// A stream of the counter-based generator; draws are indexed, not sequential.
struct RngStream {
  uint64_t seed = 0;
  uint64_t stream = 0;

  // Uniform in [0, 1) with 53 random bits.
  MOE_HOST_DEVICE double uniform(uint64_t index) const {
    auto r = philox4x32_10(seed, stream, index);
    uint64_t bits = (static_cast<uint64_t>(r[0]) << 32 | r[1]) >> 11;
    return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
  }
  // Standard normal (Box-Muller on the four lanes of one block).
  double normal(uint64_t index) const {
    auto r = philox4x32_10(seed, stream, index);
    double u1 = static_cast<double>((static_cast<uint64_t>(r[0]) << 32 | r[1]) >> 11) * (1.0 / 9007199254740992.0);
    double u2 = static_cast<double>((static_cast<uint64_t>(r[2]) << 32 | r[3]) >> 11) * (1.0 / 9007199254740992.0);
    return std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(6.283185307179586 * u2);
  }
  // Standard Gumbel(0, 1): -log(-log(u)), with u kept away from 0 and 1.
  double gumbel(uint64_t index) const {
    double u = uniform(index);
    u = u < 1e-20 ? 1e-20 : u;
    return -std::log(-std::log(u));
  }
};

// A stable 64-bit hash of a name, used to key parameter-initialisation streams. FNV-style but not FNV-1a:
// FNV's prime, with the offset basis 1469598103934665603 (FNV-1a's is 14695981039346656037). Every
// initialisation and checkpoint depends on this constant; docs/ARCHITECTURE.md states it.
inline uint64_t name_hash(const char* s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 1099511628211ull;
  return h;
}

}  // namespace moe
