// Parameter allocation, initialisation and gradient reduction.
#include "model/params.h"

#include <cmath>

#include "runtime/ops/elementwise.h"
#include "runtime/rng.h"

namespace moe {

Param* ParamSet::add(Param spec) {
  MOE_CHECK(!values_[0].defined() && !values_[1].defined(), "parameter ", spec.name, " declared after allocate()");
  MOE_CHECK(find(spec.name) == nullptr, "duplicate parameter ", spec.name);
  spec.index = static_cast<int>(params_.size());
  params_.push_back(std::move(spec));
  return &params_.back();
}

void ParamSet::allocate(Backend& backend, DType dtype, uint64_t seed) {
  for (int s = 0; s < 2; ++s) {
    ParamScope scope = static_cast<ParamScope>(s);
    int64_t total = 0, total_grad = 0;
    for (const Param& p : params_) {
      if (p.scope != scope) continue;
      total += shape_numel(p.shape);
      if (p.trainable) total_grad += shape_numel(p.shape);
    }
    values_[s] = backend.zeros({total}, dtype);
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
    int64_t n = shape_numel(p.shape);
    std::vector<double> host(static_cast<size_t>(n), 0.0);
    if (p.init == ParamInit::kOnes) {
      std::fill(host.begin(), host.end(), 1.0);
    } else if (p.init == ParamInit::kNormal) {
      RngStream rng{seed, rng_stream(RngPurpose::kInit, name_hash(p.name.c_str()))};
      int64_t base = 0;
      if (p.scope == ParamScope::kExpert) base = p.expert_offset * (n / p.shape[0]);
      for (int64_t i = 0; i < n; ++i) host[i] = p.init_std * rng.normal(static_cast<uint64_t>(base + i));
    }
    Tensor staged = host_tensor(p.shape, dtype);
    if (dtype == DType::kF64) {
      std::copy(host.begin(), host.end(), staged.data<double>());
    } else {
      std::copy(host.begin(), host.end(), staged.data<float>());
    }
    backend.copy_from_host(staged.raw(), p.value);
  }
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

GradReducer::GradReducer(ParamSet& params, ProcessGroups& groups, size_t bucket_bytes) {
  for (ParamScope scope : {ParamScope::kReplicated, ParamScope::kExpert}) {
    Communicator* comm = scope == ParamScope::kReplicated ? groups.world.get() : groups.dp.get();
    if (comm->size() == 1 || params.grads(scope).numel() == 0) continue;
    comms_.push_back(comm);
    // Trainable parameters of the scope, by offset in the flat buffer (declaration order), cut into
    // buckets of at least bucket_bytes at parameter boundaries.
    std::vector<Param*> ps;
    for (Param* p : params.trainable())
      if (p->scope == scope) ps.push_back(p);
    const Tensor& flat = params.grads(scope);
    const char* base = static_cast<const char*>(flat.raw());
    const size_t elem = dtype_size(flat.dtype());
    size_t i = 0;
    while (i < ps.size()) {
      int64_t begin = (static_cast<const char*>(ps[i]->grad.raw()) - base) / static_cast<int64_t>(elem);
      int64_t end = begin;
      int first = ps[i]->index;
      for (; i < ps.size(); ++i) {
        int64_t off = (static_cast<const char*>(ps[i]->grad.raw()) - base) / static_cast<int64_t>(elem);
        if (off != end) break;  // a gap (buffer) ends the bucket
        end = off + ps[i]->grad.numel();
        first = std::min(first, ps[i]->index);
        if (static_cast<size_t>(end - begin) * elem >= bucket_bytes) {
          ++i;
          break;
        }
      }
      Tensor view = flat.reshape({flat.numel()}).rows(begin, end);
      buckets_.push_back(Bucket{comm, view, first, false});
    }
  }
}

void GradReducer::ready_from(const Param* first) {
  for (Bucket& b : buckets_) {
    if (b.started || b.first_index < first->index) continue;
    b.comm->all_reduce_sum_start(b.grads.raw(), static_cast<size_t>(b.grads.numel()), b.grads.dtype());
    b.started = true;
  }
}

void GradReducer::finish() {
  for (Bucket& b : buckets_) {
    if (!b.started) b.comm->all_reduce_sum_start(b.grads.raw(), static_cast<size_t>(b.grads.numel()), b.grads.dtype());
    b.started = false;  // ready for the next step
  }
  for (Communicator* c : comms_) c->wait_pending();
}

double GradReducer::take_sum_seconds() {
  double total = 0;
  for (Communicator* c : comms_) total += c->take_started_seconds();
  return total;
}

void reduce_gradients(ParamSet& params, ProcessGroups& groups) {
  Tensor& rep = params.grads(ParamScope::kReplicated);
  if (rep.numel() && groups.world->size() > 1) groups.world->all_reduce_sum(rep);
  Tensor& exp = params.grads(ParamScope::kExpert);
  if (exp.numel() && groups.dp->size() > 1) groups.dp->all_reduce_sum(exp);
}

double global_grad_norm(ParamSet& params, Backend& backend, ProcessGroups& groups) {
  // Replicated gradients are identical everywhere after the reduction; each EP group holds every
  // expert exactly once, so expert squares are summed over the EP group only.
  std::vector<double> expert_sq{sum_squares(backend, params.grads(ParamScope::kExpert))};
  if (groups.ep->size() > 1) groups.ep->all_reduce_sum(expert_sq);
  return std::sqrt(sum_squares(backend, params.grads(ParamScope::kReplicated)) + expert_sq[0]);
}

}  // namespace moe
