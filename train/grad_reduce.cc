// Gradient reduction over the ranks that share each parameter, and the global gradient norm.
#include "train/grad_reduce.h"

#include <algorithm>
#include <cmath>

#include "runtime/ops/elementwise.h"

namespace moe {

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
