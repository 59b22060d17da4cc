// The communicator interface: the collectives the runtime needs, over one group of ranks.
//
// Buffers are raw pointers plus element counts and a dtype. A communicator moves one kind of memory: the
// backend's tensors (host memory over MPI on the CPU, device memory over NCCL on a GPU), and host()
// gives the communicator of the same ranks for host values (counts, loss sums, timings, strings), MPI
// always. Which one a caller uses is explicit at every call: nothing looks at a pointer to find out
// where it lives. The host-vector conveniences below go to host() themselves. Every call is collective
// over the group: all its ranks must make the same calls in the same order. Failures throw CommError naming the call, file:line and the rank.
// Every collective has a deadline (runtime.comm_timeout_s): a rank that waits longer for its peers gives
// up with a CommError naming the operation, the group and what the job was doing (comm_where()), so a
// dead or stuck peer stops the job instead of hanging it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace moe {

// Seconds a collective waits for its peers before giving up, until the configuration says otherwise.
constexpr double kDefaultCommTimeout = 300;

// What the job is doing, for the error line of a collective that times out ("step 12", "checkpoint of
// step 12"); set by the trainer, "start-up" before.
void set_comm_where(const std::string& where);
const std::string& comm_where();

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "mpi", "nccl"

  // The communicator of the same ranks for host memory: this one for a host communicator, the MPI
  // communicator a device communicator wraps.
  virtual Communicator& host() { return *this; }

  // send holds size() chunks of `count` elements; chunk r goes to rank r; recv gets chunk i from rank i.
  virtual void all_to_all(const void* send, void* recv, size_t count, DType dtype) = 0;
  // Variable counts and offsets (elements), one per rank.
  virtual void all_to_all_v(const void* send, const std::vector<size_t>& send_counts,
                            const std::vector<size_t>& send_offsets, void* recv,
                            const std::vector<size_t>& recv_counts, const std::vector<size_t>& recv_offsets,
                            DType dtype) = 0;
  // One piece of an all_to_all_blocks: `count` elements at element `offset` of the buffer, to or from `peer`.
  struct Block {
    int peer = 0;
    size_t offset = 0;
    size_t count = 0;
  };
  // Moves blocks between scattered places, with no packing pass: each block goes from where it lies in
  // `send` to where it belongs in `recv`. The blocks this rank sends to peer q pair up, in list order, with
  // the blocks q receives from this rank, in its list order, one to one with equal counts (zero-count
  // blocks included, or left out on both sides). Blocks of one buffer must not overlap.
  virtual void all_to_all_blocks(const void* send, const std::vector<Block>& send_blocks, void* recv,
                                 const std::vector<Block>& recv_blocks, DType dtype) = 0;
  // Elementwise sum over ranks; send == recv is allowed (in place).
  virtual void all_reduce_sum(const void* send, void* recv, size_t count, DType dtype) = 0;
  // Starts an in-place sum without making later work wait for it: a stream-ordered communicator (NCCL)
  // runs it on its own stream beside the compute that follows. wait_pending() makes later work wait for
  // every started sum. Host communicators finish it before returning.
  virtual void all_reduce_sum_start(void* buf, size_t count, DType dtype) { all_reduce_sum(buf, buf, count, dtype); }
  virtual void wait_pending() {}
  // Seconds the sums started since the last call ran on the device (valid once the device has been
  // synchronised), then resets; 0 for host communicators, whose sums block where they are called.
  virtual double take_started_seconds() { return 0; }
  // recv holds size() chunks of `count`; chunk i comes from rank i.
  virtual void all_gather(const void* send, void* recv, size_t count, DType dtype) = 0;
  virtual void broadcast(void* buf, size_t count, DType dtype, int root) = 0;
  virtual void barrier() = 0;

  // A sub-communicator of the ranks passing the same color, ordered by key; it inherits the timeout.
  // Collective.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // The group's name in error lines ("world", "ep", "dp"), set by make_process_groups.
  void set_label(std::string label) { label_ = std::move(label); }
  const std::string& label() const { return label_; }
  // The deadline of every collective, in seconds; 0 waits forever.
  virtual void set_timeout(double seconds) { timeout_s_ = seconds; }
  double timeout() const { return timeout_s_; }

  // ---- typed conveniences: host vectors go over host(), tensors of the backend over this communicator
  void all_reduce_sum(std::vector<double>& values) {
    host().all_reduce_sum(values.data(), values.data(), values.size(), DType::kF64);
  }
  void all_reduce_sum(Tensor& t) { all_reduce_sum(t.raw(), t.raw(), static_cast<size_t>(t.numel()), t.dtype()); }

 protected:
  // Whether a collective that has waited `waited` seconds is past the deadline. Ranks give up in world
  // rank order, 0.25 s apart (up to 2 s), so that the first one's MPI_Abort usually stops the others
  // before they print: one error line.
  bool past_deadline(double waited) const;
  // The CommError of a collective `op` that has waited `waited` seconds past the deadline.
  [[noreturn]] void fail_deadline(const char* op, double waited) const;

  std::string label_ = "world";
  double timeout_s_ = kDefaultCommTimeout;
};

// The 2-D mesh of ranks, created once at start-up and passed to whoever communicates.
//
// world = ep * dp. Rank r has ep_rank = r % ep and dp_rank = r / ep, so an expert-parallel group is
// `ep` consecutive ranks (one node, in the reference shape) and holds every routed expert once. The
// data-parallel group of a rank is the ranks with the same ep_rank: the replicas of its expert shard,
// over which expert gradients are reduced. Replicated parameters are reduced over the world.
struct ProcessGroups {
  std::unique_ptr<Communicator> world;
  std::unique_ptr<Communicator> ep;  // size ep: tokens cross it in dispatch/combine
  std::unique_ptr<Communicator> dp;  // size world/ep: expert-data-parallel group

  int ep_size() const { return ep->size(); }
  int dp_size() const { return dp->size(); }
};

// Throws InternalError unless all_to_all_v got one count and one offset per rank of a group of `ranks`.
void check_all_to_all_v_layout(int ranks, const std::vector<size_t>& send_counts,
                               const std::vector<size_t>& send_offsets, const std::vector<size_t>& recv_counts,
                               const std::vector<size_t>& recv_offsets);

// Sends root's string to every rank of the group (length, then bytes, over comm.host()). Collective.
void broadcast_string(Communicator& comm, std::string& s, int root);

// Splits `world` into the mesh (labelled "world", "ep", "dp"). Throws ConfigError (key parallel.ep) when ep
// does not divide the world.
ProcessGroups make_process_groups(std::unique_ptr<Communicator> world, int ep);

}  // namespace moe
