// Communicator over NCCL for device buffers, forwarding host buffers to the MPI communicator it wraps.
//
// Collectives take device (or managed) memory; host values go to host(), the MPI communicator of the
// same ranks that this one wraps. Callers say which at every call (comm/communicator.h).
//
// The NCCL communicator is non-blocking (config.blocking = 0), so no NCCL call can hang the host: an
// init, a split or a group launch may return ncclInProgress and finish on a background thread, and we
// poll ncclCommGetAsyncError (bounded by the timeout) before touching the stream again. Collectives run
// on our own comm stream, fenced against the compute stream with events. Hangs show up later, where the
// host waits on a stream: a WaitPoller turns an asynchronous NCCL error, or a wait past
// runtime.comm_timeout_s while our work is still in flight, into ncclCommAbort plus a CommError, so
// main() can abort the job instead of every rank hanging.
#include "comm/nccl/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/mpi/mpi_communicator.h"
#include "runtime/cuda/cuda_common.h"
#include "runtime/device_wait.h"
#include "base/error.h"

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Between polls: spin briefly, then sleep, so ranks sharing CPUs do not starve each other.
void pause_poll(double waited) {
  if (waited < 1e-3) return std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::microseconds(100));
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kF32: return ncclFloat32;
    case DType::kF64: return ncclFloat64;
    case DType::kI32: return ncclInt32;
    case DType::kBF16: return ncclBfloat16;
  }
  throw InternalError("no NCCL datatype for dtype");
}

// Debug builds check that a collective's buffers are device (or managed) memory: host values go to
// host(), and a host pointer handed to NCCL is a caller's mistake, named here instead of faulting on the
// device. Release builds look at no pointer.
void check_device(const void* a, const void* b, const char* op) {
#ifndef NDEBUG
  for (const void* p : {a, b}) {
    if (p == nullptr) continue;
    cudaPointerAttributes attr{};
    cudaError_t err = cudaPointerGetAttributes(&attr, p);
    if (err == cudaErrorInvalidValue) (void)cudaGetLastError();  // pre-CUDA-11 answer for host memory
    else MOE_CUDA_CHECK(err);
    if (err != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
      throw InternalError(detail::concat("nccl ", op, ": a host buffer; host values go through host()"));
    }
  }
#else
  (void)a, (void)b, (void)op;
#endif
}

// ncclSuccess, and ncclInProgress (non-blocking mode), are fine; anything else throws.
#define MOE_NCCL_CHECK(stmt)                                                              \
  do {                                                                                    \
    ncclResult_t moe_nccl_rc_ = (stmt);                                                   \
    if (moe_nccl_rc_ != ncclSuccess && moe_nccl_rc_ != ncclInProgress) {                  \
      throw_call_error(moe_nccl_rc_, #stmt, __FILE__, __LINE__);                          \
    }                                                                                     \
  } while (0)

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `host`: creates the NCCL communicator of the same ranks.
  NcclCommunicator(std::unique_ptr<Communicator> host, cudaStream_t compute, double timeout_s)
      : host_(std::move(host)), compute_(compute), rank_(host_->rank()), size_(host_->size()) {
    set_timeout(timeout_s);
    label_ = host_->label();
    ncclUniqueId id{};
    if (rank_ == 0) MOE_NCCL_CHECK(ncclGetUniqueId(&id));
    static_assert(sizeof(id) % sizeof(int32_t) == 0, "ncclUniqueId is sent as int32 words");
    host_->broadcast(&id, sizeof(id) / sizeof(int32_t), DType::kI32, 0);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    MOE_NCCL_CHECK(ncclCommInitRankConfig(&comm_, size_, id, rank_, &config));
    finish_init("ncclCommInitRankConfig");
  }

  // Adopts `comm`, made by ncclCommSplit of a parent whose split job has completed.
  NcclCommunicator(std::unique_ptr<Communicator> host, ncclComm_t comm, cudaStream_t compute, double timeout_s)
      : host_(std::move(host)), compute_(compute), rank_(host_->rank()), size_(host_->size()), comm_(comm) {
    set_timeout(timeout_s);
    label_ = host_->label();
    finish_init("ncclCommSplit");
  }

  ~NcclCommunicator() override {
    try {
      if (poller_ != 0) remove_wait_poller(poller_);
      if (comm_ != nullptr && !aborted_) {
        // The documented teardown of a non-blocking communicator: finalize (flushes outstanding work),
        // poll until quiescent, destroy. Bounded, since a dead peer may keep it from quiescing.
        const double limit = timeout_s_ > 0 ? std::min(timeout_s_, kFinalizeLimitS) : kFinalizeLimitS;
        ncclResult_t state = ncclCommFinalize(comm_);
        auto t0 = Clock::now();
        while (state == ncclInProgress && seconds_since(t0) < limit) {
          pause_poll(seconds_since(t0));
          state = comm_state();
        }
        (void)(state == ncclSuccess ? ncclCommDestroy(comm_) : ncclCommAbort(comm_));
      }
      if (ready_ != nullptr) (void)cudaEventDestroy(ready_);
      if (done_ != nullptr) (void)cudaEventDestroy(done_);
      for (Timing& t : timings_) {
        (void)cudaEventDestroy(t.start);
        (void)cudaEventDestroy(t.stop);
      }
      if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    } catch (...) {
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }
  Communicator& host() override { return *host_; }
  void set_timeout(double seconds) override {
    Communicator::set_timeout(seconds);
    if (host_) host_->set_timeout(seconds);  // host values (counts, losses) go over MPI with the same deadline
  }

  void all_to_all(const void* send, void* recv, size_t count, DType dtype) override {
    if (count == 0) return;  // the same count on every rank: nothing moves anywhere
    check_device(send, recv, "all_to_all");
    size_t bytes = count * dtype_size(dtype);
    auto* s = static_cast<const char*>(send);
    auto* r = static_cast<char*>(recv);
    begin("all_to_all");
    grouped([&] {
      for (int p = 0; p < size_; ++p) {
        MOE_NCCL_CHECK(ncclSend(s + p * bytes, count, nccl_type(dtype), p, comm_, stream_));
        MOE_NCCL_CHECK(ncclRecv(r + p * bytes, count, nccl_type(dtype), p, comm_, stream_));
      }
    });
    end(true);
  }

  // A rank whose buffers are both null (it sends and receives nothing) takes the NCCL path, where it has
  // nothing to post; the ranks around it are then expected to be on device buffers too.
  void all_to_all_v(const void* send, const std::vector<size_t>& send_counts, const std::vector<size_t>& send_offsets,
                    void* recv, const std::vector<size_t>& recv_counts, const std::vector<size_t>& recv_offsets,
                    DType dtype) override {
    size_t n = static_cast<size_t>(size_);
    check_all_to_all_v_layout(size_, send_counts, send_offsets, recv_counts, recv_offsets);
    check_device(send, recv, "all_to_all_v");
    size_t elem = dtype_size(dtype);
    auto* s = static_cast<const char*>(send);
    auto* r = static_cast<char*>(recv);
    // Checked before the group opens: a throw inside it would still launch the calls already posted,
    // leaving the peers waiting for the rest.
    for (size_t p = 0; p < n; ++p) {
      MOE_CHECK((send_counts[p] == 0 || s != nullptr) && (recv_counts[p] == 0 || r != nullptr),
                "all_to_all_v: null buffer with a count");
    }
    begin("all_to_all_v");
    grouped([&] {
      for (size_t p = 0; p < n; ++p) {
        int peer = static_cast<int>(p);
        size_t sc = send_counts[p], rc = recv_counts[p];
        if (sc != 0) MOE_NCCL_CHECK(ncclSend(s + send_offsets[p] * elem, sc, nccl_type(dtype), peer, comm_, stream_));
        if (rc != 0) MOE_NCCL_CHECK(ncclRecv(r + recv_offsets[p] * elem, rc, nccl_type(dtype), peer, comm_, stream_));
      }
    });
    end(true);
  }

  // One send or receive per block, all in one group: NCCL pairs a rank's sends to a peer with the peer's
  // receives in posting order, which the pairing of the lists guarantees.
  void all_to_all_blocks(const void* send, const std::vector<Block>& send_blocks, void* recv,
                         const std::vector<Block>& recv_blocks, DType dtype) override {
    check_device(send, recv, "all_to_all_blocks");
    const size_t elem = dtype_size(dtype);
    auto* s = static_cast<const char*>(send);
    auto* r = static_cast<char*>(recv);
    // Checked before the group opens (see all_to_all_v).
    for (const auto* list : {&send_blocks, &recv_blocks}) {
      for (const Block& b : *list) {
        MOE_CHECK(b.peer >= 0 && b.peer < size_, "all_to_all_blocks: block for peer ", b.peer, " in a group of ",
                  size_);
        MOE_CHECK(b.count == 0 || (list == &send_blocks ? s != nullptr : r != nullptr),
                  "all_to_all_blocks: null buffer with a count");
      }
    }
    begin("all_to_all_blocks");
    grouped([&] {
      for (const Block& b : send_blocks) {
        if (b.count != 0) MOE_NCCL_CHECK(ncclSend(s + b.offset * elem, b.count, nccl_type(dtype), b.peer, comm_, stream_));
      }
      for (const Block& b : recv_blocks) {
        if (b.count != 0) MOE_NCCL_CHECK(ncclRecv(r + b.offset * elem, b.count, nccl_type(dtype), b.peer, comm_, stream_));
      }
    });
    end(true);
  }

  void all_reduce_sum(const void* send, void* recv, size_t count, DType dtype) override {
    if (count == 0) return;
    check_device(send, recv, "all_reduce_sum");
    begin("all_reduce_sum");
    MOE_NCCL_CHECK(ncclAllReduce(send, recv, count, nccl_type(dtype), ncclSum, comm_, stream_));
    end(true);
  }

  void all_reduce_sum_start(void* buf, size_t count, DType dtype) override {
    if (count == 0) return;
    check_device(buf, buf, "all_reduce_sum_start");
    begin("all_reduce_sum_start");
    Timing& t = next_timing();
    MOE_CUDA_CHECK(cudaEventRecord(t.start, stream_));
    MOE_NCCL_CHECK(ncclAllReduce(buf, buf, count, nccl_type(dtype), ncclSum, comm_, stream_));
    end(false);  // the compute stream runs on; wait_pending() joins it
    MOE_CUDA_CHECK(cudaEventRecord(t.stop, stream_));
    pending_ = true;
  }

  double take_started_seconds() override {
    double total = 0;
    for (size_t i = 0; i < timings_used_; ++i) {
      float ms = 0;
      MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, timings_[i].start, timings_[i].stop));
      total += ms / 1000.0;
    }
    timings_used_ = 0;
    return total;
  }

  void wait_pending() override {
    if (!pending_) return;
    MOE_CUDA_CHECK(cudaEventRecord(done_, stream_));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
    pending_ = false;
  }

  void all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    if (count == 0) return;
    check_device(send, recv, "all_gather");
    begin("all_gather");
    MOE_NCCL_CHECK(ncclAllGather(send, recv, count, nccl_type(dtype), comm_, stream_));
    end(true);
  }

  void broadcast(void* buf, size_t count, DType dtype, int root) override {
    if (count == 0) return;
    check_device(buf, buf, "broadcast");
    begin("broadcast");
    MOE_NCCL_CHECK(ncclBroadcast(buf, buf, count, nccl_type(dtype), root, comm_, stream_));
    end(true);
  }

  // Finishes this communicator's device work (polling, so a hang becomes an error), then meets the others.
  void barrier() override {
    cuda::wait_stream(stream_);
    host_->barrier();
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MOE_CHECK(color >= 0, "nccl split: color must be >= 0, got ", color);
    check_usable("ncclCommSplit");
    std::unique_ptr<Communicator> sub_host = host_->split(color, key);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t sub = nullptr;
    last_op_ = "ncclCommSplit";
    MOE_NCCL_CHECK(ncclCommSplit(comm_, color, key, &sub, &config));
    // The split runs as a job of the parent: the parent's state says when it is done, and only then
    // is `sub` written.
    wait_ready("ncclCommSplit");
    if (sub == nullptr) {
      throw CommError(detail::concat("NCCL ncclCommSplit returned no communicator on rank ", where()));
    }
    return std::make_unique<NcclCommunicator>(std::move(sub_host), sub, compute_, timeout_s_);
  }

 private:
  static constexpr double kFinalizeLimitS = 10.0;

  std::string where() const {
    return detail::concat(rank_, " of ", size_, " (world rank ", mpi_world_rank(), ")");
  }

  [[noreturn]] void throw_call_error(ncclResult_t rc, const char* stmt, const char* file, int line) const {
    throw CommError(detail::concat("NCCL call failed on rank ", where(), ": ", stmt, " at ", file, ":", line, ": ",
                                   ncclGetErrorString(rc), " (", ncclGetLastError(comm_), ")"));
  }

  // The communicator's asynchronous state: ncclSuccess, ncclInProgress or an error.
  ncclResult_t comm_state() const {
    ncclResult_t state = ncclInProgress;
    ncclResult_t rc = ncclCommGetAsyncError(comm_, &state);
    return rc != ncclSuccess ? rc : state;
  }

  void abort_comm() {
    if (aborted_) return;
    aborted_ = true;
    (void)ncclCommAbort(comm_);
  }

  [[noreturn]] void fail_state(ncclResult_t state, const char* what) {
    std::string last = ncclGetLastError(comm_);  // copied before the abort frees anything
    abort_comm();
    throw CommError(detail::concat("NCCL ", what, ": ", ncclGetErrorString(state), " (", last, ") on rank ", where(),
                                   "; a peer may have died"));
  }

  [[noreturn]] void fail_timeout() {
    abort_comm();
    fail_deadline(last_op_, timeout_s_);
  }

  // Polls until the last NCCL call has finished on the host side (non-blocking mode may run an init,
  // a split or a group launch on a background thread; the streams must not be touched before).
  void wait_ready(const char* what) {
    auto t0 = Clock::now();
    for (;;) {
      ncclResult_t state = comm_state();
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) fail_state(state, what);
      double waited = seconds_since(t0);
      if (past_deadline(waited)) fail_timeout();
      pause_poll(waited);
    }
  }

  // Whether work issued on our stream has not finished yet.
  bool in_flight() const {
    cudaError_t err = cudaEventQuery(done_);
    if (err == cudaErrorNotReady) return true;
    MOE_CUDA_CHECK(err);
    return false;
  }

  // Called while the host waits on any stream. Only a communicator with work still in flight is blamed
  // for a long wait.
  void poll(double waited) {
    if (aborted_) return;
    ncclResult_t state = comm_state();
    if (state != ncclSuccess && state != ncclInProgress) fail_state(state, last_op_);
    if (past_deadline(waited) && in_flight()) fail_timeout();
  }

  void finish_init(const char* what) {
    last_op_ = what;
    wait_ready(what);
    try {
      MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      MOE_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
      MOE_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    } catch (...) {
      abort_comm();
      if (ready_ != nullptr) (void)cudaEventDestroy(ready_);
      if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
      throw;
    }
    poller_ = add_wait_poller([this](double waited) { poll(waited); });
  }

  // After an abort, comm_ is freed: any further NCCL call on it would be a use after free.
  void check_usable(const char* op) const {
    if (aborted_) {
      throw CommError(detail::concat("NCCL ", op, " on rank ", where(), ": the communicator was aborted after an "
                                     "earlier error"));
    }
  }

  // A device collective runs on our stream after the compute work issued so far...
  void begin(const char* op) {
    check_usable(op);
    last_op_ = op;
    MOE_CUDA_CHECK(cudaEventRecord(ready_, compute_));
    MOE_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
  }

  // ...and, once NCCL has put its kernels on the stream, later compute work waits for it.
  void end(bool compute_waits) {
    wait_ready(last_op_);
    MOE_CUDA_CHECK(cudaEventRecord(done_, stream_));
    if (compute_waits) MOE_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
  }

  // Timing events around started sums, reused from step to step.
  struct Timing {
    cudaEvent_t start = nullptr, stop = nullptr;
  };
  Timing& next_timing() {
    if (timings_used_ == timings_.size()) {
      Timing t;
      MOE_CUDA_CHECK(cudaEventCreate(&t.start));
      MOE_CUDA_CHECK(cudaEventCreate(&t.stop));
      timings_.push_back(t);
    }
    return timings_[timings_used_++];
  }

  // Point-to-point calls fused into one launch; the group is closed even when a call throws.
  template <typename Issue>
  void grouped(Issue&& issue) {
    MOE_NCCL_CHECK(ncclGroupStart());
    try {
      issue();
    } catch (...) {
      (void)ncclGroupEnd();
      throw;
    }
    MOE_NCCL_CHECK(ncclGroupEnd());
  }

  std::unique_ptr<Communicator> host_;
  cudaStream_t compute_ = nullptr;
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;  // the comm stream
  cudaEvent_t ready_ = nullptr;    // compute work before a collective
  cudaEvent_t done_ = nullptr;     // the last collective issued on stream_
  const char* last_op_ = "init";
  bool aborted_ = false;
  bool pending_ = false;  // all_reduce_sum_start issued since the last wait_pending
  std::vector<Timing> timings_;  // [0, timings_used_): the sums started since take_started_seconds()
  size_t timings_used_ = 0;
  int poller_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> host, void* compute_stream,
                                                     double timeout_s) {
  MOE_CHECK(host != nullptr, "make_nccl_communicator needs a host communicator");
  // Communicators that run at the same time (the ep all-to-alls beside the world/dp gradient buckets)
  // need an order between them: NCCL then launches their kernels in the host's issue order, which is the
  // same on every rank. A user's own setting wins.
  ::setenv("NCCL_LAUNCH_ORDER_IMPLICIT", "1", /*overwrite=*/0);
  return std::make_unique<NcclCommunicator>(std::move(host), static_cast<cudaStream_t>(compute_stream), timeout_s);
}

}  // namespace moe
