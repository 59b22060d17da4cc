// Parameters: declared by the modules, then allocated together in flat per-scope buffers.
//
// Each scope (replicated, expert) has one flat value buffer and one flat gradient buffer, and every
// parameter is a view into them, so the gradient reduction of a scope (train/grad_reduce.h) is one
// collective over one buffer: replicated gradients over the world, expert gradients over the
// expert-data-parallel group.
#pragma once

#include <deque>
#include <string>
#include <vector>

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

  bool bf16_shadow = false;  // keep a BF16 copy of the value (the bf16 experts' weights; see ParamSet)

  Tensor value;
  Tensor grad;    // undefined for buffers
  Tensor shadow;  // BF16 copy of value when bf16_shadow; read through ParamSet::bf16_value
  uint64_t shadow_version = 0;  // the ParamSet values version the shadow holds (0: none yet)
};

class ParamSet {
 public:
  // Declares a parameter; the returned pointer stays valid for the life of the set. Storage comes with
  // allocate().
  Param* add(Param spec);
  // Allocates the flat buffers and initialises every value from (seed, name, global element index), so
  // a parameter's values do not depend on the number of ranks or on how experts are sharded. `same`: a
  // set allocated on the same backend whose parameter of the same name, seed, dtype, shape, scope,
  // initialisation and expert offset would draw the same values: they are copied from it instead (the
  // layer benchmark's rows of one shape; drawing 10^8 normal numbers takes tens of seconds on a host).
  void allocate(Backend& backend, DType dtype, uint64_t seed, const ParamSet* same = nullptr);

  std::vector<Param*> all();
  std::vector<Param*> trainable();
  Param* find(const std::string& name);

  // BF16 shadows. The bf16 experts compute with BF16 weights; converting the fp32 masters on every
  // forward costs a pass over all expert weights, so a parameter with bf16_shadow keeps a BF16 copy. The
  // optimizer writes it in its update pass (values and shadows written together); any other write of
  // values (allocate, a checkpoint load) calls values_changed(), and the next bf16_value() converts
  // again. A write that skips values_changed() leaves the experts computing with stale weights.
  const Tensor& bf16_value(Backend& backend, Param* p);
  void values_changed() { ++version_; }
  uint64_t version() const { return version_; }

  // Flat gradient buffer of a scope (may be empty).
  Tensor& grads(ParamScope scope) { return grads_[static_cast<int>(scope)]; }
  void zero_grads(Backend& backend);
  int64_t numel(ParamScope scope) const;

 private:
  // The parameter of `other` that holds exactly the values `p` would draw with `seed`, or null.
  const Param* same_values(const Param& p, uint64_t seed, DType dtype) const;

  std::deque<Param> params_;
  uint64_t seed_ = 0;
  uint64_t version_ = 0;  // of the values, for the BF16 shadows
  Tensor values_[2];
  Tensor grads_[2];
};

}  // namespace moe
