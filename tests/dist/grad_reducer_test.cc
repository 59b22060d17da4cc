// Bucketed gradient reduction: any bucket size and any order of ready_from() calls give exactly what one
// reduction of the whole buffers gives, and finish() leaves the reducer ready for the next step.
#include <gtest/gtest.h>

#include "comm/mpi/mpi_communicator.h"
#include "tests/test_util.h"
#include "train/grad_reduce.h"

namespace moe {
namespace {

void declare(ParamSet& params) {
  const char* names[] = {"embedding", "layer0.norm", "layer0.router", "layer0.experts", "layer1.norm", "head"};
  for (const char* n : names) {
    Param p;
    p.name = n;
    p.shape = {3, 5};
    p.scope = std::string(n).find("experts") != std::string::npos ? ParamScope::kExpert : ParamScope::kReplicated;
    params.add(p);
  }
  Param buffer;
  buffer.name = "layer0.bias";
  buffer.shape = {4};
  buffer.trainable = false;
  params.add(buffer);
}

// Gradient values of one parameter that differ by rank, parameter and element.
void fill_grad(Param* p, Backend& backend, int rank) {
  Tensor host = host_tensor(p->shape, DType::kF64);
  for (int64_t i = 0; i < host.numel(); ++i) host.data<double>()[i] = 0.25 * rank + 0.001 * i + p->index;
  backend.copy_from_host(host.raw(), p->grad);
}

TEST(GradReducer, BucketsGiveTheWholeBufferReduction) {
  const int world = mpi_world_size(), rank = mpi_world_rank();
  auto backend = make_cpu_backend({});
  for (int ep : {1, world}) {
    ProcessGroups groups = test::world_groups(ep);
    ParamSet want_set, got_set;
    declare(want_set);
    declare(got_set);
    want_set.allocate(*backend, DType::kF64, 1);
    got_set.allocate(*backend, DType::kF64, 1);
    for (Param* p : want_set.trainable()) fill_grad(p, *backend, rank);
    reduce_gradients(want_set, groups);
    for (size_t bucket_bytes : {size_t{1}, size_t{130}, size_t{1} << 20}) {
      GradReducer reducer(got_set, groups, bucket_bytes);
      for (int step = 0; step < 2; ++step) {  // the reducer is reusable
        // The backward's order: each block writes its gradients, then says they are final. A bucket
        // reduced before its gradients were written would miss the other ranks' values.
        got_set.zero_grads(*backend);
        auto write = [&](std::initializer_list<const char*> names) {
          for (const char* n : names) fill_grad(got_set.find(n), *backend, rank);
        };
        write({"head"});
        reducer.ready_from(got_set.find("head"));
        write({"layer1.norm"});
        reducer.ready_from(got_set.find("layer1.norm"));
        write({"layer0.norm", "layer0.router", "layer0.experts"});
        reducer.ready_from(got_set.find("layer0.norm"));
        write({"embedding"});
        reducer.finish();
        for (Param* p : want_set.trainable()) {
          EXPECT_EQ(to_doubles(*backend, got_set.find(p->name)->grad), to_doubles(*backend, p->grad))
              << p->name << " bucket_bytes=" << bucket_bytes << " ep=" << ep << " step " << step;
        }
      }
      if (world > 1 && bucket_bytes == 1) {
        EXPECT_GE(reducer.num_buckets(), 5u);
      }
    }
  }
}

}  // namespace
}  // namespace moe
