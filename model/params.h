// Parameters: declared by the modules, then allocated together in flat per-scope buffers.
//
// Each scope (replicated, expert) has one flat value buffer and one flat gradient buffer, and every
// parameter is a view into them, so the gradient reduction of a scope is one collective over one buffer:
// replicated gradients over the world, expert gradients over the expert-data-parallel group.
#pragma once

#include <deque>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "runtime/backend.h"

namespace moe {

enum class ParamScope : uint8_t {
  kReplicated,  // the same on every rank: embeddings, norms, router, shared experts, head
  kExpert,      // this rank's shard of the routed experts; replicated over its dp group
};

enum class ParamInit : uint8_t { kNormal, kOnes, kZeros };

struct Param {
  std::string name;      // "layers.0.moe.experts.w_gate"
  Shape shape;           // for expert params the leading dimension is the local expert count
  ParamScope scope = ParamScope::kReplicated;
  ParamInit init = ParamInit::kNormal;
  double init_std = 0.0;
  bool trainable = true;  // false: a buffer (no gradient, no optimizer), still checkpointed
  bool decay = true;      // weight decay applies
  int64_t expert_offset = 0;  // expert params: global index of local expert 0
  int index = 0;              // declaration order, set by ParamSet::add

  Tensor value;
  Tensor grad;  // undefined for buffers
};

class ParamSet {
 public:
  // Declares a parameter; the returned pointer stays valid for the life of the set. Storage comes with
  // allocate().
  Param* add(Param spec);
  // Allocates the flat buffers and initialises every value from (seed, name, global element index), so
  // a parameter's values do not depend on the number of ranks or on how experts are sharded.
  void allocate(Backend& backend, DType dtype, uint64_t seed);

  std::vector<Param*> all();
  std::vector<Param*> trainable();
  Param* find(const std::string& name);

  // Flat gradient buffer of a scope (may be empty).
  Tensor& grads(ParamScope scope) { return grads_[static_cast<int>(scope)]; }
  void zero_grads(Backend& backend);
  int64_t numel(ParamScope scope) const;

 private:
  std::deque<Param> params_;
  Tensor values_[2];
  Tensor grads_[2];
};

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
