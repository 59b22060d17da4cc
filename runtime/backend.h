// The op backend interface: every op of the MoE layer and of the training step.
//
// The model (model/) composes these ops and never touches tensor memory itself, so a device backend
// only has to implement this interface. The CPU backend (runtime/cpu/) is the reference for every op and
// the one that runs tests; it supports F32 and F64 (F64 for finite-difference gradient checks).
//
// Conventions: tensors are row-major and contiguous; shapes are given in comments as (rows, cols);
// "accumulate" outputs are added to, every other output is overwritten. Index tensors are I32.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace moe {

enum class Trans : uint8_t { kN, kT };
enum class ScoreFn : uint8_t { kSoftmax, kSigmoid };
enum class Activation : uint8_t { kGelu, kRelu };
// Which values the combine multiplies expert outputs by. kSoft: the (normalised) router scores. kHard: 1
// per selected expert (1/k when normalised), while the backward still differentiates the soft scores:
// the straight-through estimator, and hard Gumbel-softmax.
enum class GateMode : uint8_t { kSoft, kHard };
// Order in which a group's tokens claim expert slots within one choice rank.
enum class Priority : uint8_t { kToken, kBatch };

// Arguments of the routing op (top-k + gates + capacity slots) for one layer and step.
struct RouteArgs {
  int num_experts = 0;
  int top_k = 0;
  int num_groups = 1;         // capacity groups among the local tokens (tokens % num_groups == 0)
  int64_t capacity = 0;       // slots per expert per group; 0: dropless
  bool normalize = true;      // renormalise the selected scores to sum to 1
  GateMode gate_mode = GateMode::kSoft;
  Priority priority = Priority::kToken;
  bool random_routing = false;  // GShard: keep the 2nd choice only if 2*g2/(g1+g2) > U(0,1); needs top_k == 2
  RngStream rng;                // random-routing coins, indexed by global token index
  int64_t token_offset = 0;     // global index of local token 0
};

// Outputs of the routing op. T local tokens, k = top_k, E experts, G groups.
// The send buffer is expert-major: expert e owns rows [row_begin(e), row_begin(e+1)); within it, group g
// owns a block whose first fill(e,g) rows are real tokens in slot order. With a capacity, every block
// has `capacity` rows (padding zero); dropless, a block has exactly fill(e,g) rows.
struct RouteState {
  Tensor expert_idx;    // (T, k) I32: chosen experts, best first
  Tensor score;         // (T, k): router scores of the chosen experts (before normalisation, no bias)
  Tensor gate;          // (T, k): combine weights used in the forward
  Tensor row_idx;       // (T, k) I32: row in the send buffer, -1 when not sent (capacity drop or random routing)
  Tensor fill;          // (E, G) I32: rows used per (expert, group)
  Tensor choices;       // (E) I32: top-k choices per expert before capacity (for the load-balance loss)
  Tensor counts;        // (2) I32: [assignments dropped because their expert was full, 2nd choices not sent
                        //           because of random routing]
  int64_t num_rows = 0; // rows of the send buffer (host value: E * G * capacity, or, dropless, the sum of
                        // fill, which a device backend reads back: dropless routing synchronises)
};

// Layout of the router statistics vector (F64) that router_stats() fills and the world sums.
struct RouterStatsLayout {
  int num_experts = 0;
  int64_t choices() const { return 0; }                   // (E) top-k choices per expert
  int64_t score_sums() const { return num_experts; }      // (E) sum over tokens of the router scores
  int64_t processed() const { return 2 * num_experts; }   // (E) assignments kept, over groups
  int64_t dropped() const { return 3 * num_experts; }     // (1) assignments dropped for capacity
  int64_t z_sum() const { return 3 * num_experts + 1; }   // (1) sum over tokens of logsumexp^2
  int64_t size() const { return 3 * num_experts + 2; }
};

struct AdamArgs {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;  // 1-based, for bias correction
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;

  // ---- memory
  virtual Tensor empty(const Shape& shape, DType dtype) = 0;  // contents unspecified
  Tensor zeros(const Shape& shape, DType dtype) {
    Tensor t = empty(shape, dtype);
    fill(t, 0.0);
    return t;
  }
  virtual void fill(Tensor& t, double value) = 0;
  virtual void copy(const Tensor& src, Tensor& dst) = 0;  // same dtype and element count
  virtual void copy_to_host(const Tensor& src, void* dst) = 0;
  virtual void copy_from_host(const void* src, Tensor& dst) = 0;

  // ---- dense algebra
  // c (M, N) = alpha * op(a) op(b) + beta * c, with op(a) (M, K) and op(b) (K, N).
  virtual void gemm(const Tensor& a, Trans ta, const Tensor& b, Trans tb, Tensor& c, double alpha,
                    double beta) = 0;
  // One GEMM per group of consecutive rows: for g, c[rows_g] (m_g, N) = alpha * a[rows_g] (m_g, K) op(b[g]) + beta * c[rows_g].
  // b is (G, N, K) with tb = kT, or (G, K, N) with tb = kN. group_rows lives on the host.
  virtual void grouped_gemm(const Tensor& a, const Tensor& b, Trans tb, Tensor& c,
                            const std::vector<int64_t>& group_rows, double alpha, double beta) = 0;
  // Weight gradients of grouped_gemm: c[g] (P, Q) = alpha * a[rows_g]^T (P, m_g) b[rows_g] (m_g, Q) + beta * c[g].
  virtual void grouped_gemm_tn(const Tensor& a, const Tensor& b, Tensor& c, const std::vector<int64_t>& group_rows,
                               double alpha, double beta) = 0;
  virtual void axpy(double alpha, const Tensor& x, Tensor& y) = 0;  // y += alpha * x
  virtual void scale(Tensor& x, double alpha) = 0;
  virtual double sum_squares(const Tensor& x) = 0;

  // ---- activations
  virtual void swiglu_forward(const Tensor& a, const Tensor& b, Tensor& h) = 0;  // h = silu(a) * b
  virtual void swiglu_backward(const Tensor& dh, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db) = 0;
  virtual void activation_forward(Activation act, const Tensor& a, Tensor& h) = 0;
  virtual void activation_backward(Activation act, const Tensor& dh, const Tensor& a, Tensor& da) = 0;

  // ---- embedding, norm, loss
  // out (T, H) = table[ids] ; ids (T) I32, table (V, H)
  virtual void embedding_forward(const Tensor& ids, const Tensor& table, Tensor& out) = 0;
  virtual void embedding_backward(const Tensor& ids, const Tensor& dout, Tensor& dtable) = 0;  // accumulate
  // y = x / rms(x) * w, rstd (T) saved for the backward
  virtual void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) = 0;
  virtual void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                                Tensor& dx, Tensor& dw) = 0;  // dx overwritten, dw accumulated
  // Returns the sum over rows of -log softmax(logits)[target]; dlogits = grad_scale * (softmax - onehot).
  virtual double cross_entropy(const Tensor& logits, const Tensor& targets, double grad_scale, Tensor& dlogits) = 0;

  // ---- router
  // x_out = x * m, m ~ U(1-eps, 1+eps) per element, drawn from rng at (token_offset + t) * H + j.
  // Applying it to a gradient gives the jitter's backward.
  virtual void jitter(const Tensor& x, double eps, const RngStream& rng, int64_t token_offset, Tensor& out) = 0;
  // probs (T, E) = softmax or sigmoid of logits, row-wise
  virtual void router_probs(ScoreFn fn, const Tensor& logits, Tensor& probs) = 0;
  // probs (T, E) = softmax((logits + g) / tau), g ~ Gumbel(0,1) from rng at (token_offset + t) * E + e
  virtual void gumbel_probs(const Tensor& logits, double tau, const RngStream& rng, int64_t token_offset,
                            Tensor& probs) = 0;
  // dlogits += scale * J^T dprobs, J the Jacobian of router_probs (softmax or sigmoid)
  virtual void router_probs_backward(ScoreFn fn, const Tensor& dprobs, const Tensor& probs, double scale,
                                     Tensor& dlogits) = 0;
  // sum (1) F64 = sum_t lse_t^2 (overwritten); adds coef * 2 * lse_t * softmax(logits_t) to dlogits (the
  // z-loss gradient).
  virtual void z_loss(const Tensor& logits, double coef, Tensor& dlogits, Tensor& sum) = 0;
  // Fills stats (RouterStatsLayout, F64) from a route and the scores probs (T, E): every entry but z_sum.
  virtual void router_stats(const RouteState& state, const Tensor& probs, Tensor& stats) = 0;
  // x[t, :] += scale * v for every row; v (E) F64 has one value per column
  virtual void add_row_vector(Tensor& x, const Tensor& v, double scale) = 0;
  // Top-k over (sel_probs + bias), gates, random routing and capacity slots; see RouteArgs/RouteState.
  // bias (E) may be undefined.
  virtual void route(const RouteArgs& args, const Tensor& sel_probs, const Tensor& bias, RouteState& out) = 0;
  // dsel_probs (T, E) = gradient of the soft gates (normalised or not) given dgate (T, k); overwritten.
  virtual void route_backward(const RouteArgs& args, const Tensor& sel_probs, const RouteState& state,
                              const Tensor& dgate, Tensor& dsel_probs) = 0;

  // ---- token permutation
  // out (R, H): rows row_idx[t, j] = x[t]; every other row zero.
  virtual void permute(const Tensor& x, const Tensor& row_idx, Tensor& out) = 0;
  // dx (T, H) += sum_j dout[row_idx[t, j]]
  virtual void permute_backward(const Tensor& dout, const Tensor& row_idx, Tensor& dx) = 0;
  // y (T, H) += sum_j gate[t, j] * rows[row_idx[t, j]]
  virtual void unpermute(const Tensor& rows, const Tensor& row_idx, const Tensor& gate, Tensor& y) = 0;
  // drows[row_idx[t, j]] = gate[t, j] * dy[t] (other rows zero); dgate[t, j] = <dy[t], rows[row_idx[t, j]]> (0 when unsent)
  virtual void unpermute_backward(const Tensor& dy, const Tensor& rows, const Tensor& row_idx, const Tensor& gate,
                                  Tensor& drows, Tensor& dgate) = 0;
  // dst[i] = src[idx[i]]
  virtual void gather_rows(const Tensor& src, const Tensor& idx, Tensor& dst) = 0;
  // dst[idx[i]] = src[i]; rows of dst not named in idx are left as they are
  virtual void scatter_rows(const Tensor& src, const Tensor& idx, Tensor& dst) = 0;

  // ---- optimizer
  virtual void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamArgs& args) = 0;
  virtual void sgd_step(Tensor& param, const Tensor& grad, double lr, double weight_decay) = 0;

  // ---- precision
  // dst = src with dtype conversion (F32 <-> BF16 on devices that have BF16; same dtype: a copy)
  virtual void convert(const Tensor& src, Tensor& dst);

  // ---- streams and timing
  // A device backend issues ops in order on a main stream. Between begin_side() and end_side(), ops go
  // to a side stream that starts after everything issued so far; join_side() makes later main-stream
  // ops wait for all side work. The CPU backend runs everything inline, in issue order.
  virtual void begin_side() {}
  virtual void end_side() {}
  virtual void join_side() {}
  virtual bool side_runs_inline() const { return true; }
  // Blocks the host until every issued op has finished.
  virtual void synchronize() {}
  // Records a point on the stream ops are issued to and returns its id; seconds_between(a, b) is
  // valid once synchronize() has returned. Ids are recycled after 4096 marks.
  virtual int mark();
  virtual double seconds_between(int a, int b);
  // The native handle of the main stream (cudaStream_t), or null on the CPU.
  virtual void* native_stream() { return nullptr; }

 private:
  std::vector<double> host_marks_;  // seconds since an arbitrary origin, for the default mark()
  size_t next_mark_ = 0;
};

// Host-side helpers over any backend.
// A tensor of N(0, scale^2) values, element i drawn from rng at offset + i (so ranks can build slices of
// one global tensor from the same numbers).
Tensor normal_tensor(Backend& backend, const Shape& shape, DType dtype, const RngStream& rng, int64_t offset,
                     double scale = 1.0);
// Every element of t, copied to the host as double.
std::vector<double> to_doubles(Backend& backend, const Tensor& t);

struct CpuBackendOptions {
  int threads = 1;  // BLAS threads per rank
};
std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options);

// The CUDA backend on device `device` (of this process's visible devices). Throws ConfigError
// (key runtime.device) when this build has no CUDA support or no device is present.
struct CudaBackendOptions {
  int device = 0;
};
std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options);
// Number of CUDA devices this process sees; 0 without a driver or without CUDA support in the build.
int cuda_device_count();
// Why cuda_device_count() is 0 ("no CUDA driver", "built without CUDA", ...), or "".
std::string cuda_unavailable_reason();

}  // namespace moe
