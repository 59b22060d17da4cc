// Parameter allocation, initialisation and gradient reduction.
#include "model/params.h"

#include <cmath>

#include "runtime/parallel.h"
#include "runtime/rng.h"

namespace moe {

Param* ParamSet::add(Param spec) {
  MOE_CHECK(!values_[0].defined() && !values_[1].defined(), "parameter ", spec.name, " declared after allocate()");
  MOE_CHECK(find(spec.name) == nullptr, "duplicate parameter ", spec.name);
  spec.index = static_cast<int>(params_.size());
  params_.push_back(std::move(spec));
  return &params_.back();
}

const Param* ParamSet::same_values(const Param& p, uint64_t seed, DType dtype) const {
  for (const Param& q : params_) {
    if (q.name != p.name) continue;
    const bool same = seed_ == seed && q.value.defined() && q.value.dtype() == dtype && q.shape == p.shape &&
                      q.scope == p.scope && q.init == p.init && q.init_std == p.init_std &&
                      q.expert_offset == p.expert_offset;
    return same ? &q : nullptr;
  }
  return nullptr;
}

void ParamSet::allocate(Backend& backend, DType dtype, uint64_t seed, const ParamSet* same) {
  seed_ = seed;
  for (int s = 0; s < 2; ++s) {
    ParamScope scope = static_cast<ParamScope>(s);
    int64_t total = 0, total_grad = 0;
    for (const Param& p : params_) {
      if (p.scope != scope) continue;
      total += shape_numel(p.shape);
      if (p.trainable) total_grad += shape_numel(p.shape);
    }
    values_[s] = backend.empty({total}, dtype);  // every element is written below (drawn or copied)
    grads_[s] = backend.zeros({total_grad}, dtype);
    int64_t off = 0, goff = 0;
    for (Param& p : params_) {
      if (p.scope != scope) continue;
      int64_t n = shape_numel(p.shape);
      p.value = values_[s].rows(off, off + n).reshape(p.shape);
      off += n;
      if (p.trainable) {
        p.grad = grads_[s].rows(goff, goff + n).reshape(p.shape);
        goff += n;
      }
    }
  }
  // Initialise on the host, then copy: element i of local expert l is element
  // (expert_offset + l) * per_expert + i of the global tensor.
  for (Param& p : params_) {
    if (const Param* q = same ? same->same_values(p, seed, dtype) : nullptr) {
      backend.copy(q->value, p.value);
      continue;
    }
    const int64_t n = shape_numel(p.shape);
    // Written straight into the staging tensor, every element (no zeroing pass over large buffers).
    Tensor staged = host_tensor_uninitialized(p.shape, dtype);
    const RngStream rng{seed, rng_stream(RngPurpose::kInit, name_hash(p.name.c_str()))};
    const int64_t base = p.scope == ParamScope::kExpert ? p.expert_offset * (n / p.shape[0]) : 0;
    parallel_chunks(n, int64_t{1} << 18, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const double v = p.init == ParamInit::kOnes     ? 1.0
                         : p.init == ParamInit::kNormal ? p.init_std * rng.normal(static_cast<uint64_t>(base + i))
                                                        : 0.0;
        if (dtype == DType::kF64) {
          staged.data<double>()[i] = v;
        } else {
          staged.data<float>()[i] = static_cast<float>(v);
        }
      }
    });
    backend.copy_from_host(staged.raw(), p.value);
  }
  for (Param& p : params_)
    if (p.bf16_shadow) p.shadow = backend.empty(p.shape, DType::kBF16);
  values_changed();
}

const Tensor& ParamSet::bf16_value(Backend& backend, Param* p) {
  MOE_CHECK(p->bf16_shadow && p->shadow.defined(), "parameter ", p->name, " has no BF16 shadow");
  if (p->shadow_version != version_) {
    backend.convert(p->value, p->shadow);
    p->shadow_version = version_;
  }
  return p->shadow;
}

std::vector<Param*> ParamSet::all() {
  std::vector<Param*> out;
  for (Param& p : params_) out.push_back(&p);
  return out;
}

std::vector<Param*> ParamSet::trainable() {
  std::vector<Param*> out;
  for (Param& p : params_)
    if (p.trainable) out.push_back(&p);
  return out;
}

Param* ParamSet::find(const std::string& name) {
  for (Param& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

void ParamSet::zero_grads(Backend& backend) {
  for (Tensor& g : grads_)
    if (g.defined()) backend.fill(g, 0.0);
}

int64_t ParamSet::numel(ParamScope scope) const {
  const Tensor& v = values_[static_cast<int>(scope)];
  return v.defined() ? v.numel() : 0;
}

}  // namespace moe
