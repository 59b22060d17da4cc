// CUDA routing family (runtime/ops/routing.h).
//
// Router rows are short (E experts, tens to hundreds), so the row-wise ops give one thread a whole row
// and keep the CPU backend's arithmetic order (top-k, a selection, takes a warp per row); column sums
// and the z-loss total reduce in double.
//
// route() runs in three kernels and never waits for the host (except dropless, for the row count):
//   1. top-k: one warp per token. k rounds over probs + bias, each the best expert ranking after the
//      previous round's pick (ties to the lower expert index, as the CPU's insertion top-k); scores,
//      gates, top-k choice counts, GShard random-routing coins.
//   2. slots (assign_slots): every assignment gets a key (group, expert) at its position in priority
//      order (every 1st choice before any 2nd; within a choice rank token order, or top-1 score order for
//      batch priority: a stable radix sort on (group, descending top-1 score) keys, which unlike a
//      segmented sort never waits for the host). A stable radix sort of those keys keeps each segment in
//      priority order, so an assignment's slot is its offset in its segment (exclusive scan of the
//      per-segment counts): the CPU's sequential slot counter, exactly.
//   3. rows: slot -> row of the expert-major send buffer.
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/routing.h"

#include "runtime/topk.h"

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

namespace moe::cuda {
namespace {

constexpr int kMaxTopK = 16;
constexpr int kWarp = 32;
constexpr int kSkipped = -2;  // slot marker of a 2nd choice dropped by random routing

__device__ inline float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// softmax of in[0..n) scaled by inv_tau into out (may alias in), as softmax_row on the CPU
__device__ void softmax_row(const float* in, float* out, int n, float inv_tau) {
  float mx = in[0] * inv_tau;
  for (int i = 1; i < n; ++i) mx = fmaxf(mx, in[i] * inv_tau);
  float sum = 0;
  for (int i = 0; i < n; ++i) sum += (out[i] = expf(in[i] * inv_tau - mx));
  float inv = 1.0f / sum;
  for (int i = 0; i < n; ++i) out[i] *= inv;
}

__device__ float logsumexp_row(const float* in, int n) {
  float mx = in[0];
  for (int i = 1; i < n; ++i) mx = fmaxf(mx, in[i]);
  float sum = 0;
  for (int i = 0; i < n; ++i) sum += expf(in[i] - mx);
  return mx + logf(sum);
}

// Sum of one double per thread of the block into *out (atomic; out zeroed beforehand).
__device__ void block_add(double v, double* out) {
  __shared__ double partial[kBlock / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += partial[w];
    atomicAdd(out, s);
  }
}

__global__ void jitter_kernel(const float* x, float* out, int64_t n, int64_t h, double eps, RngStream rng,
                              int64_t token_offset) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    int64_t t = i / h, j = i % h;
    double m = 1.0 - eps + 2.0 * eps * rng.uniform(static_cast<uint64_t>((token_offset + t) * h + j));
    out[i] = static_cast<float>(x[i] * m);
  }
}

__global__ void probs_kernel(ScoreFn fn, const float* logits, float* probs, int64_t rows, int e) {
  int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  const float* pl = logits + t * e;
  float* pp = probs + t * e;
  if (fn == ScoreFn::kSoftmax) {
    softmax_row(pl, pp, e, 1.0f);
  } else {
    for (int j = 0; j < e; ++j) pp[j] = sigmoid_f(pl[j]);
  }
}

__global__ void gumbel_kernel(const float* logits, float* probs, int64_t rows, int e, float inv_tau, RngStream rng,
                              int64_t token_offset) {
  int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  float* pp = probs + t * e;
  for (int j = 0; j < e; ++j) {
    double u = rng.uniform(static_cast<uint64_t>((token_offset + t) * e + j));
    u = u < 1e-20 ? 1e-20 : u;
    pp[j] = logits[t * e + j] + static_cast<float>(-log(-log(u)));
  }
  softmax_row(pp, pp, e, inv_tau);
}

__global__ void probs_backward_kernel(ScoreFn fn, const float* dprobs, const float* probs, float s, float* dlogits,
                                      int64_t rows, int e) {
  int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  const float* pp = probs + t * e;
  const float* pd = dprobs + t * e;
  float* pl = dlogits + t * e;
  if (fn == ScoreFn::kSoftmax) {
    float dot = 0;
    for (int j = 0; j < e; ++j) dot += pd[j] * pp[j];
    for (int j = 0; j < e; ++j) pl[j] += s * pp[j] * (pd[j] - dot);
  } else {
    for (int j = 0; j < e; ++j) pl[j] += s * pd[j] * pp[j] * (1.0f - pp[j]);
  }
}

__global__ void z_loss_kernel(const float* logits, float* dlogits, int64_t rows, int e, double coef, double* sum) {
  int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  double sq = 0;
  if (t < rows) {
    const float* pl = logits + t * e;
    float lse = logsumexp_row(pl, e);
    sq = static_cast<double>(lse) * lse;
    float mx = pl[0];
    for (int j = 1; j < e; ++j) mx = fmaxf(mx, pl[j]);
    float total = 0;
    for (int j = 0; j < e; ++j) total += expf(pl[j] - mx);
    float c = static_cast<float>(2.0 * coef) * lse, inv = 1.0f / total;
    for (int j = 0; j < e; ++j) dlogits[t * e + j] += c * (expf(pl[j] - mx) * inv);
  }
  block_add(sq, sum);
}

// stats: choices, processed (fill over groups), dropped; score sums zeroed for column_sums_kernel.
__global__ void stats_counts_kernel(const int* choices, const int* fill, const int* counts, int e, int groups,
                                    double* stats) {
  for (int j = threadIdx.x; j < e; j += blockDim.x) {
    stats[j] = choices[j];
    stats[e + j] = 0;
    double processed = 0;
    for (int g = 0; g < groups; ++g) processed += fill[j * groups + g];
    stats[2 * e + j] = processed;
  }
  if (threadIdx.x == 0) stats[3 * e] = counts[0];
}

// Column sums of probs (rows, e): each block sums a slab of rows per column and adds it atomically.
__global__ void column_sums_kernel(const float* probs, int64_t rows, int e, int64_t slab, double* sums) {
  int64_t r0 = blockIdx.x * slab, r1 = min(rows, r0 + slab);
  for (int j = threadIdx.x; j < e; j += blockDim.x) {
    double s = 0;
    for (int64_t r = r0; r < r1; ++r) s += probs[r * e + j];
    atomicAdd(&sums[j], s);
  }
}

__global__ void add_row_vector_kernel(float* x, int64_t n, int e, const double* v, double scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += static_cast<float>(scale * v[i % e]);
  }
}

struct TopKArgs {
  const float* probs;
  const float* bias;  // may be null
  int64_t tokens;
  int e, k;
  bool normalize, hard, random_routing;
  RngStream rng;
  int64_t token_offset;
  ForcedRouting forced;
  RngStream forced_rng;
  int* eidx;
  float* score;
  float* gate;
  int64_t group_tokens;
  unsigned long long* sort_key;  // (T) batch-priority sort key, or null: (group, descending top-1 score)
  int* slot;    // (T, k): -1, or kSkipped for a random-routing drop
  int* choices;
  int* counts;
};

// One warp per token. The lanes pick the k experts in k rounds of topk_lane_offer and a butterfly
// reduction (coalesced reads of the row, no per-thread list: lane 0 writes each pick to expert_idx); a
// row with a NaN, which only a diverged step has, is walked by lane 0 with topk_insert, so every row
// gets the CPU's list exactly. Lane 0 then writes the token's other outputs. Launched with whole warps
// per block.
__global__ void topk_kernel(TopKArgs a) {
  const int64_t t = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (t >= a.tokens) return;  // the whole warp: its lanes share t
  const int k = a.k;
  const float* p = a.probs + t * a.e;
  int* eidx = a.eidx + t * k;  // the token's picks, written by lane 0
  // Forced routing and rows with a NaN (only a diverged step has them): lane 0 alone, with a list.
  bool alone = a.forced.on();  // the same on every lane
  if (!alone) {
    bool nan = false;
    for (int e = lane; e < a.e; e += kWarp) nan |= isnan(p[e] + (a.bias ? a.bias[e] : 0.0f));
    alone = __any_sync(kFullMask, nan);
  }
  if (alone) {
    if (lane == 0) {
      int idx[kMaxTopK];
      if (a.forced.on()) {
        forced_choice(a.forced, a.e, k, a.forced_rng, static_cast<uint64_t>(a.token_offset + t), idx);
      } else {
        float key[kMaxTopK];
        int n = 0;
        for (int e = 0; e < a.e; ++e) topk_insert(key, idx, n, k, p[e] + (a.bias ? a.bias[e] : 0.0f), e);
      }
      for (int j = 0; j < k; ++j) eidx[j] = idx[j];
    }
  } else {
    float last_v = 0.0f;
    int last_e = -1;
    for (int j = 0; j < k; ++j) {
      float bv;
      int be;
      topk_lane_offer(p, a.bias, a.e, lane, kWarp, last_v, last_e, &bv, &be);
      for (int o = kWarp / 2; o > 0; o /= 2) {
        const float ov = __shfl_xor_sync(kFullMask, bv, o);
        const int oe = __shfl_xor_sync(kFullMask, be, o);
        if (ranks_before(ov, oe, bv, be)) bv = ov, be = oe;
      }
      if (lane == 0) eidx[j] = be;  // the same on every lane: the order is total
      last_v = bv;
      last_e = be;
    }
  }
  if (lane != 0) return;
  float sum = 0;
  for (int j = 0; j < k; ++j) {
    const int e = eidx[j];
    const float s = p[e];
    a.score[t * k + j] = s;
    a.slot[t * k + j] = -1;
    sum += s;
    atomicAdd(&a.choices[e], 1);
  }
  for (int j = 0; j < k; ++j) {
    float s = a.score[t * k + j];
    float g = a.hard ? (a.normalize ? 1.0f / static_cast<float>(k) : 1.0f)
                     : (a.normalize ? (sum > 0.0f ? s / sum : 0.0f) : s);
    a.gate[t * k + j] = g;
  }
  if (a.sort_key) {
    // Ascending order of this key is group ascending, then top-1 score descending; the radix sort is
    // stable, so ties stay in token order (std::stable_sort on the CPU). -0 counts as +0, as `>` has it.
    float s = a.score[t * k];
    unsigned u = __float_as_uint(s == 0.0f ? 0.0f : s);
    unsigned ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotone in s
    a.sort_key[t] = (static_cast<unsigned long long>(t / a.group_tokens) << 32) | (~ordered);
  }
  if (a.random_routing) {
    float s1 = a.score[t * k], s2 = a.score[t * k + 1];
    double g2 = s1 + s2 > 0.0f ? static_cast<double>(s2) / static_cast<double>(s1 + s2) : 0.0;
    double u = a.rng.uniform(static_cast<uint64_t>(a.token_offset + t));
    if (!(2.0 * g2 > u)) {
      a.slot[t * k + 1] = kSkipped;
      atomicAdd(&a.counts[1], 1);
    }
  }
}

// Capacity slots, in parallel. Assignment position p of group g in priority order is (j, i): every
// token's j-th choice before any (j+1)-th, tokens in order i (token order, or the batch-priority order).
// A stable sort of the positions by (group, expert) puts each expert's assignments of a group in
// priority order, so the slot of an assignment is its index in the sorted array minus the start of its
// (group, expert) segment: the CPU's sequential slot counter, computed without a serial walk.
struct SlotKeys {
  const int* eidx;
  const int* slot;   // kSkipped marks a random-routing drop (no key, no slot)
  const int* order;  // (T) tokens of each group in priority order, or null for token order
  int64_t group_tokens;
  int k, e_count, groups;
  int* keys;      // (T k) group * E + expert, or groups * E for a skipped assignment (sorts last)
  int* values;    // (T k) assignment index t * k + j
  int* attempts;  // (groups * E) assignments per (group, expert) before capacity
};

__global__ void slot_keys_kernel(SlotKeys s) {
  const int64_t per_group = s.group_tokens * s.k, n = per_group * s.groups;
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < n; p += int64_t{gridDim.x} * blockDim.x) {
    int64_t g = p / per_group, r = p % per_group, j = r / s.group_tokens, i = r % s.group_tokens;
    int64_t t = s.order ? s.order[g * s.group_tokens + i] : g * s.group_tokens + i;
    int64_t a = t * s.k + j;
    bool live = s.slot[a] != kSkipped;
    int key = live ? static_cast<int>(g * s.e_count + s.eidx[a]) : s.groups * s.e_count;
    s.keys[p] = key;
    s.values[p] = static_cast<int>(a);
    if (live) atomicAdd(&s.attempts[key], 1);
  }
}

// slot = position in the sorted segment; kept while below the capacity (0: dropless).
__global__ void slots_from_sorted_kernel(const int* keys, const int* values, const int* segment_begin, int64_t n,
                                         int dead_key, int64_t capacity, int* slot, int* counts) {
  int dropped = 0;
  for (int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; q < n; q += int64_t{gridDim.x} * blockDim.x) {
    int key = keys[q];
    if (key == dead_key) continue;
    int64_t s = q - segment_begin[key];
    bool kept = capacity == 0 || s < capacity;
    slot[values[q]] = kept ? static_cast<int>(s) : -1;
    dropped += kept ? 0 : 1;
  }
  for (int o = 16; o > 0; o /= 2) dropped += __shfl_down_sync(0xffffffffu, dropped, o);
  if (threadIdx.x % 32 == 0 && dropped) atomicAdd(&counts[0], dropped);
}

// fill (E, G) = attempts (G, E) capped at the capacity
__global__ void fill_kernel(const int* attempts, int e_count, int groups, int64_t capacity, int* fill) {
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < int64_t{e_count} * groups;
       b += int64_t{gridDim.x} * blockDim.x) {
    int64_t g = b / e_count, e = b % e_count;
    int c = attempts[b];
    fill[e * groups + g] = capacity > 0 && c > capacity ? static_cast<int>(capacity) : c;
  }
}

__global__ void rows_kernel(const int* eidx, const int* slot, const int* block_begin, int64_t n, int k,
                            int64_t group_tokens, int groups, int64_t capacity, int* rows) {
  for (int64_t a = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; a < n; a += int64_t{gridDim.x} * blockDim.x) {
    int s = slot[a];
    if (s < 0) {
      rows[a] = -1;
      continue;
    }
    int64_t b = int64_t{eidx[a]} * groups + (a / k) / group_tokens;
    int64_t begin = capacity > 0 ? b * capacity : block_begin[b];
    rows[a] = static_cast<int>(begin + s);
  }
}

__global__ void iota_kernel(int* v, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    v[i] = static_cast<int>(i);
  }
}

__global__ void route_backward_kernel(const int* eidx, const float* score, const float* dgate, float* dsel,
                                      int64_t tokens, int k, int e, bool normalize) {
  int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= tokens) return;
  const float* s = score + t * k;
  const float* d = dgate + t * k;
  float* out = dsel + t * e;
  if (!normalize) {
    for (int j = 0; j < k; ++j) out[eidx[t * k + j]] += d[j];
    return;
  }
  float sum = 0;
  for (int j = 0; j < k; ++j) sum += s[j];
  if (!(sum > 0.0f)) return;
  float dot = 0;
  for (int j = 0; j < k; ++j) dot += d[j] * s[j] / sum;
  for (int j = 0; j < k; ++j) out[eidx[t * k + j]] += (d[j] - dot) / sum;
}

unsigned row_grid(int64_t rows) { return static_cast<unsigned>((rows + kBlock - 1) / kBlock > 0 ? (rows + kBlock - 1) / kBlock : 1); }


// Slots and fill from the top-k choices (see slot_keys_kernel): keys, one stable radix sort, a scan of
// the per-(group, expert) counts, then every assignment reads its slot off its sorted position.
void assign_slots(Context& ctx, RouteState& out, int* slot, const int* order, int64_t group_tokens, int k,
                  int e_count, int g_count, int64_t capacity) {
  const int64_t n = group_tokens * g_count * k;
  const int segments = e_count * g_count;
  MOE_CHECK(n < (int64_t{1} << 31) && segments < (1 << 30), "route: ", n, " assignments overflow 32-bit indices");
  Scratch keys(ctx.stream, sizeof(int) * static_cast<size_t>(n)), values(ctx.stream, sizeof(int) * static_cast<size_t>(n));
  Scratch keys_sorted(ctx.stream, sizeof(int) * static_cast<size_t>(n)), values_sorted(ctx.stream, sizeof(int) * static_cast<size_t>(n));
  Scratch attempts(ctx.stream, sizeof(int) * static_cast<size_t>(segments + 1)), begin(ctx.stream, sizeof(int) * static_cast<size_t>(segments + 1));
  MOE_CUDA_CHECK(cudaMemsetAsync(attempts.ptr(), 0, sizeof(int) * static_cast<size_t>(segments + 1), ctx.stream));
  SlotKeys sk{out.expert_idx.data<int32_t>(), slot, order, group_tokens, k, e_count, g_count,
              keys.as<int>(), values.as<int>(), attempts.as<int>()};
  slot_keys_kernel<<<grid_for(n), kBlock, 0, ctx.stream>>>(sk);
  MOE_CUDA_LAUNCH_CHECK();

  int end_bit = 1;
  while (end_bit < 31 && (int64_t{1} << end_bit) <= segments) ++end_bit;  // keys go up to `segments`
  size_t temp_bytes = 0;
  MOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys.as<int>(), keys_sorted.as<int>(),
                                                 values.as<int>(), values_sorted.as<int>(), static_cast<int>(n), 0,
                                                 end_bit, ctx.stream));
  Scratch sort_temp(ctx.stream, std::max<size_t>(temp_bytes, 1));
  MOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_temp.ptr(), temp_bytes, keys.as<int>(), keys_sorted.as<int>(),
                                                 values.as<int>(), values_sorted.as<int>(), static_cast<int>(n), 0,
                                                 end_bit, ctx.stream));
  temp_bytes = 0;
  MOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, attempts.as<int>(), begin.as<int>(),
                                               segments + 1, ctx.stream));
  Scratch scan_temp(ctx.stream, std::max<size_t>(temp_bytes, 1));
  MOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(scan_temp.ptr(), temp_bytes, attempts.as<int>(), begin.as<int>(),
                                               segments + 1, ctx.stream));
  slots_from_sorted_kernel<<<grid_for(n), kBlock, 0, ctx.stream>>>(keys_sorted.as<int>(), values_sorted.as<int>(),
                                                                   begin.as<int>(), n, segments, capacity, slot,
                                                                   out.counts.data<int32_t>());
  fill_kernel<<<grid_for(segments), kBlock, 0, ctx.stream>>>(attempts.as<int>(), e_count, g_count, capacity,
                                                            out.fill.data<int32_t>());
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace

void jitter(Backend& backend, const Tensor& x, double eps, const RngStream& rng, int64_t token_offset, Tensor& out) {
  Context& ctx = context(backend);
  int64_t n = x.numel();
  if (n == 0) return;
  jitter_kernel<<<grid_for(n), kBlock, 0, ctx.stream>>>(x.data<float>(), out.data<float>(), n, x.dim(1), eps, rng,
                                                       token_offset);
  MOE_CUDA_LAUNCH_CHECK();
}

void router_probs(Backend& backend, ScoreFn fn, const Tensor& logits, Tensor& probs) {
  Context& ctx = context(backend);
  int64_t rows = logits.dim(0);
  if (rows == 0) return;
  probs_kernel<<<row_grid(rows), kBlock, 0, ctx.stream>>>(fn, logits.data<float>(), probs.data<float>(), rows,
                                                         static_cast<int>(logits.dim(1)));
  MOE_CUDA_LAUNCH_CHECK();
}

void gumbel_probs(Backend& backend, const Tensor& logits, double tau, const RngStream& rng, int64_t token_offset,
                  Tensor& probs) {
  Context& ctx = context(backend);
  int64_t rows = logits.dim(0);
  if (rows == 0) return;
  gumbel_kernel<<<row_grid(rows), kBlock, 0, ctx.stream>>>(logits.data<float>(), probs.data<float>(), rows,
                                                          static_cast<int>(logits.dim(1)),
                                                          static_cast<float>(1.0 / tau), rng, token_offset);
  MOE_CUDA_LAUNCH_CHECK();
}

void router_probs_backward(Backend& backend, ScoreFn fn, const Tensor& dprobs, const Tensor& probs, double scale,
                           Tensor& dlogits) {
  Context& ctx = context(backend);
  int64_t rows = probs.dim(0);
  if (rows == 0) return;
  probs_backward_kernel<<<row_grid(rows), kBlock, 0, ctx.stream>>>(fn, dprobs.data<float>(), probs.data<float>(),
                                                                  static_cast<float>(scale), dlogits.data<float>(),
                                                                  rows, static_cast<int>(probs.dim(1)));
  MOE_CUDA_LAUNCH_CHECK();
}

void z_loss(Backend& backend, const Tensor& logits, double coef, Tensor& dlogits, Tensor& sum) {
  Context& ctx = context(backend);
  MOE_CUDA_CHECK(cudaMemsetAsync(sum.raw(), 0, sizeof(double), ctx.stream));
  int64_t rows = logits.dim(0);
  if (rows == 0) return;
  z_loss_kernel<<<row_grid(rows), kBlock, 0, ctx.stream>>>(logits.data<float>(), dlogits.data<float>(), rows,
                                                          static_cast<int>(logits.dim(1)), coef,
                                                          sum.data<double>());
  MOE_CUDA_LAUNCH_CHECK();
}

void router_stats(Backend& backend, const RouteState& state, const Tensor& probs, Tensor& stats) {
  Context& ctx = context(backend);
  const int e = static_cast<int>(probs.dim(1));
  RouterStatsLayout layout{e};
  stats_counts_kernel<<<1, kBlock, 0, ctx.stream>>>(state.choices.data<int32_t>(), state.fill.data<int32_t>(),
                                                   state.counts.data<int32_t>(), e,
                                                   static_cast<int>(state.fill.dim(1)), stats.data<double>());
  MOE_CUDA_LAUNCH_CHECK();
  const int64_t rows = probs.dim(0), slab = 128;
  if (rows == 0) return;
  column_sums_kernel<<<static_cast<unsigned>((rows + slab - 1) / slab), std::min(e, 1024), 0, ctx.stream>>>(
      probs.data<float>(), rows, e, slab, stats.data<double>() + layout.score_sums());
  MOE_CUDA_LAUNCH_CHECK();
}

void add_row_vector(Backend& backend, Tensor& x, const Tensor& v, double scale) {
  Context& ctx = context(backend);
  int64_t n = x.numel();
  if (n == 0) return;
  add_row_vector_kernel<<<grid_for(n), kBlock, 0, ctx.stream>>>(x.data<float>(), n, static_cast<int>(x.dim(1)),
                                                               v.data<double>(), scale);
  MOE_CUDA_LAUNCH_CHECK();
}

void route(Backend& backend, const RouteArgs& args, const Tensor& sel_probs, const Tensor& bias, RouteState& out) {
  Context& ctx = context(backend);
  const int64_t t_count = sel_probs.dim(0);
  const int e_count = args.num_experts, k = args.top_k, g_count = args.num_groups;
  if (k > kMaxTopK) throw ConfigError("moe.top_k", detail::concat("the CUDA backend supports top_k <= ", kMaxTopK));
  const int64_t group_tokens = t_count / g_count, n = t_count * k;
  out.args = args;

  out.expert_idx = backend.empty({t_count, k}, DType::kI32);
  out.score = backend.empty({t_count, k}, DType::kF32);
  out.gate = backend.empty({t_count, k}, DType::kF32);
  out.row_idx = backend.empty({t_count, k}, DType::kI32);
  out.fill = backend.empty({e_count, g_count}, DType::kI32);
  out.choices = backend.empty({e_count}, DType::kI32);
  out.counts = backend.empty({2}, DType::kI32);
  MOE_CUDA_CHECK(cudaMemsetAsync(out.choices.raw(), 0, out.choices.nbytes(), ctx.stream));
  MOE_CUDA_CHECK(cudaMemsetAsync(out.counts.raw(), 0, out.counts.nbytes(), ctx.stream));
  if (t_count == 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(out.fill.raw(), 0, out.fill.nbytes(), ctx.stream));
    out.num_rows = args.capacity ? int64_t{e_count} * g_count * args.capacity : 0;
    return;
  }
  const bool batch = args.priority == Priority::kBatch;
  Scratch slot(ctx.stream, sizeof(int) * static_cast<size_t>(n));
  Scratch sort_key(ctx.stream, batch ? sizeof(unsigned long long) * static_cast<size_t>(t_count) : 0);

  TopKArgs a;
  a.probs = sel_probs.data<float>();
  a.bias = bias.defined() ? bias.data<float>() : nullptr;
  a.tokens = t_count;
  a.e = e_count;
  a.k = k;
  a.normalize = args.normalize;
  a.hard = args.gate_mode == GateMode::kHard;
  a.random_routing = args.random_routing;
  a.rng = args.rng;
  a.token_offset = args.token_offset;
  a.forced = args.forced;
  a.forced_rng = args.forced_rng;
  a.eidx = out.expert_idx.data<int32_t>();
  a.score = out.score.data<float>();
  a.gate = out.gate.data<float>();
  a.group_tokens = group_tokens;
  a.sort_key = sort_key.as<unsigned long long>();
  a.slot = slot.as<int>();
  a.choices = out.choices.data<int32_t>();
  a.counts = out.counts.data<int32_t>();
  // A warp per token, every token its own warp (no grid-stride loop, so no cap on the grid).
  static_assert(kBlock % kWarp == 0, "whole warps per block");
  const int64_t topk_blocks = (t_count + kBlock / kWarp - 1) / (kBlock / kWarp);
  topk_kernel<<<static_cast<unsigned>(topk_blocks), kBlock, 0, ctx.stream>>>(a);
  MOE_CUDA_LAUNCH_CHECK();

  // Batch priority: each group's tokens by descending top-1 score, ties in token order (stable).
  // One radix sort over all groups (the group is the key's high word). cub::DeviceSegmentedSort would
  // copy segment counts to the host and synchronise the stream once there are more than a few hundred
  // groups.
  Scratch order(ctx.stream, batch ? sizeof(int) * static_cast<size_t>(t_count) : 0);
  if (batch) {
    Scratch keys_out(ctx.stream, sizeof(unsigned long long) * static_cast<size_t>(t_count));
    Scratch iota(ctx.stream, sizeof(int) * static_cast<size_t>(t_count));
    iota_kernel<<<grid_for(t_count), kBlock, 0, ctx.stream>>>(iota.as<int>(), t_count);
    MOE_CUDA_LAUNCH_CHECK();
    int end_bit = 32;
    while (end_bit < 64 && (int64_t{1} << (end_bit - 32)) < g_count) ++end_bit;
    size_t temp_bytes = 0;
    MOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, sort_key.as<unsigned long long>(),
                                                   keys_out.as<unsigned long long>(), iota.as<int>(),
                                                   order.as<int>(), static_cast<int>(t_count), 0, end_bit,
                                                   ctx.stream));
    Scratch temp(ctx.stream, std::max<size_t>(temp_bytes, 1));  // a null buffer would make the call a size query
    MOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.ptr(), temp_bytes, sort_key.as<unsigned long long>(),
                                                   keys_out.as<unsigned long long>(), iota.as<int>(),
                                                   order.as<int>(), static_cast<int>(t_count), 0, end_bit,
                                                   ctx.stream));
  }

  assign_slots(ctx, out, slot.as<int>(), batch ? order.as<int>() : nullptr, group_tokens, k, e_count, g_count,
               args.capacity);

  // Rows: with a capacity every block has `capacity` rows; dropless, blocks follow the fill prefix sum.
  const int64_t blocks = int64_t{e_count} * g_count;
  Scratch begin(ctx.stream, args.capacity ? 0 : sizeof(int) * static_cast<size_t>(blocks + 1));
  if (args.capacity) {
    out.num_rows = blocks * args.capacity;
  } else {
    // exclusive sum over blocks + 1 entries (a zero appended) gives the total in the last entry
    Scratch fill_ext(ctx.stream, sizeof(int) * static_cast<size_t>(blocks + 1));
    MOE_CUDA_CHECK(cudaMemsetAsync(fill_ext.ptr(), 0, sizeof(int) * static_cast<size_t>(blocks + 1), ctx.stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(fill_ext.ptr(), out.fill.raw(), out.fill.nbytes(), cudaMemcpyDeviceToDevice,
                                   ctx.stream));
    size_t temp_bytes = 0;
    MOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, fill_ext.as<int>(), begin.as<int>(),
                                                 static_cast<int>(blocks + 1), ctx.stream));
    Scratch temp(ctx.stream, std::max<size_t>(temp_bytes, 1));
    MOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.ptr(), temp_bytes, fill_ext.as<int>(), begin.as<int>(),
                                                 static_cast<int>(blocks + 1), ctx.stream));
    out.num_rows = read_back_int(ctx, begin.as<int>() + blocks);  // the one host wait of dropless routing
  }
  MOE_CHECK(out.num_rows < (int64_t{1} << 31), "route: ", out.num_rows, " send rows overflow 32-bit indices");
  rows_kernel<<<grid_for(n), kBlock, 0, ctx.stream>>>(out.expert_idx.data<int32_t>(), slot.as<int>(),
                                                     args.capacity ? nullptr : begin.as<int>(), n, k, group_tokens,
                                                     g_count, args.capacity, out.row_idx.data<int32_t>());
  MOE_CUDA_LAUNCH_CHECK();
}

void route_backward(Backend& backend, const Tensor& sel_probs, const RouteState& state, const Tensor& dgate,
                    Tensor& dsel_probs) {
  Context& ctx = context(backend);
  const RouteArgs& args = state.args;
  const int64_t t_count = dsel_probs.dim(0);
  const int e_count = args.num_experts, k = args.top_k;
  MOE_CUDA_CHECK(cudaMemsetAsync(dsel_probs.raw(), 0, dsel_probs.nbytes(), ctx.stream));
  if (t_count == 0) return;
  route_backward_kernel<<<row_grid(t_count), kBlock, 0, ctx.stream>>>(
      state.expert_idx.data<int32_t>(), state.score.data<float>(), dgate.data<float>(), dsel_probs.data<float>(),
      t_count, k, e_count, args.normalize);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace moe::cuda
