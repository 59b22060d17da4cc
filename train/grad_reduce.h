// Data-parallel gradient reduction: which ranks sum which gradients, in buckets that start while the
// backward runs, and the global gradient norm.
#pragma once

#include <cstddef>
#include <vector>

#include "comm/communicator.h"
#include "model/params.h"

namespace moe {

// Bytes per gradient bucket: large enough to reach NCCL's bandwidth, small enough that the first
// buckets start early in the backward.
constexpr size_t kGradBucketBytes = size_t{16} << 20;

// Sums gradients over the ranks that hold the same parameter: replicated over the world, expert
// shards over the dp group. With losses normalised by the global token count this gives the gradient
// of the global loss, whatever (ep, dp).
void reduce_gradients(ParamSet& params, ProcessGroups& groups);

// Reduces the gradient buffers in buckets while the backward pass runs. The backward finishes
// parameters in reverse declaration order, so after each block it names the first parameter whose
// gradient (and every later one's) is final; every bucket made only of such parameters starts its sum
// at once. On a stream-ordered communicator the sums run beside the rest of the backward; finish()
// starts what is left and makes later work wait for all of them. The result equals reduce_gradients().
class GradReducer {
 public:
  GradReducer(ParamSet& params, ProcessGroups& groups, size_t bucket_bytes);
  void ready_from(const Param* first);  // every trainable parameter with index >= first->index is final
  void finish();
  // Device seconds the started sums ran since the last call (after the device is synchronised); on a
  // stream-ordered communicator most of it overlapped the backward. 0 over MPI.
  double take_sum_seconds();
  size_t num_buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    Communicator* comm;
    Tensor grads;       // view of a scope's flat gradient buffer
    int first_index;    // smallest declaration index among its parameters
    bool started = false;
  };
  std::vector<Bucket> buckets_;
  std::vector<Communicator*> comms_;
};

// sqrt of the sum of squares of every gradient of the model (each expert counted once).
double global_grad_norm(ParamSet& params, Backend& backend, ProcessGroups& groups);

}  // namespace moe
