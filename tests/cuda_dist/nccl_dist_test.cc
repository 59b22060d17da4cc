// The NCCL communicator under mpirun: its collectives against the MPI ones, the MoE layer over NCCL on
// every (ep, dp) layout against one CPU process fed the same global batch, and a stuck peer turning into
// an error instead of a hang.
//
// Several ranks may share one GPU: run through tests/cuda_dist/rank_env.sh, which gives each rank its own
// NCCL_HOSTID and disables NCCL's P2P and shared-memory transports, so the ranks talk over sockets.
// Every test skips, printing why, when no CUDA device is usable (the same answer on every rank).
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "comm/mpi/mpi_communicator.h"
#include "comm/nccl/nccl_communicator.h"
#include "launch/main_common.h"
#include "tests/test_util.h"

namespace moe {
namespace {

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason();
    config.runtime.device = Device::kCuda;
    config.runtime.comm = CommKind::kNccl;
    config.runtime.comm_timeout_s = 60;
    backend = make_backend(config, *make_mpi_world());
  }
  Config config;
  std::unique_ptr<Backend> backend;
};

Tensor device_values(Backend& b, const std::vector<double>& v, DType dt) {
  Tensor host = host_tensor({static_cast<int64_t>(v.size())}, dt);
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == DType::kF32) host.data<float>()[i] = static_cast<float>(v[i]);
    else host.data<double>()[i] = v[i];
  }
  Tensor t = b.empty(host.shape(), dt);
  b.copy_from_host(host.raw(), t);
  return t;
}

TEST_F(Nccl, CollectivesMatchTheirDefinitions) {
  const int world = mpi_world_size(), rank = mpi_world_rank();
  auto comm = make_nccl_communicator(make_mpi_world(), backend->native_stream(), 60);
  EXPECT_EQ(comm->name(), "nccl");
  EXPECT_EQ(comm->size(), world);

  // all_reduce_sum, in place
  std::vector<double> v(37);
  for (size_t i = 0; i < v.size(); ++i) v[i] = rank * 100.0 + i;
  Tensor t = device_values(*backend, v, DType::kF32);
  comm->all_reduce_sum(t.raw(), t.raw(), v.size(), DType::kF32);
  std::vector<double> got = to_doubles(*backend, t);
  for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(got[i], 100.0 * world * (world - 1) / 2 + world * double(i));

  // all_to_all_v: rank r sends (r + 1) * (p + 1) values to peer p, valued 1000 r + p
  std::vector<size_t> sc(world), so(world), rc(world), ro(world);
  std::vector<double> send;
  for (int p = 0; p < world; ++p) {
    so[p] = send.size();
    sc[p] = static_cast<size_t>((rank + 1) * (p + 1));
    for (size_t i = 0; i < sc[p]; ++i) send.push_back(1000.0 * rank + p);
  }
  size_t total = 0;
  for (int p = 0; p < world; ++p) {
    ro[p] = total;
    rc[p] = static_cast<size_t>((p + 1) * (rank + 1));
    total += rc[p];
  }
  Tensor s = device_values(*backend, send, DType::kF64), r = backend->zeros({static_cast<int64_t>(total)}, DType::kF64);
  comm->all_to_all_v(s.raw(), sc, so, r.raw(), rc, ro, DType::kF64);
  std::vector<double> recv = to_doubles(*backend, r);
  for (int p = 0; p < world; ++p)
    for (size_t i = 0; i < rc[p]; ++i) EXPECT_EQ(recv[ro[p] + i], 1000.0 * p + rank) << "from " << p;

  // all_gather and broadcast
  Tensor mine = device_values(*backend, {double(rank), double(-rank)}, DType::kF32);
  Tensor all = backend->empty({2 * world}, DType::kF32);
  comm->all_gather(mine.raw(), all.raw(), 2, DType::kF32);
  std::vector<double> gathered = to_doubles(*backend, all);
  for (int p = 0; p < world; ++p) {
    EXPECT_EQ(gathered[2 * p], p);
    EXPECT_EQ(gathered[2 * p + 1], -p);
  }
  // broadcast from the last rank: every rank starts with its own values and ends with the root's
  Tensor cast = device_values(*backend, {double(rank) + 0.5, double(10 * rank)}, DType::kF32);
  comm->broadcast(cast.raw(), 2, DType::kF32, world - 1);
  EXPECT_EQ(to_doubles(*backend, cast), (std::vector<double>{world - 0.5, 10.0 * (world - 1)}));

  // host values go over host(), the MPI communicator of the same ranks
  EXPECT_EQ(comm->host().name(), "mpi");
  EXPECT_EQ(comm->host().size(), world);
  std::vector<double> host{1.0};
  comm->all_reduce_sum(host);
  EXPECT_EQ(host[0], world);
  double unit = 1, sum = 0;
  comm->host().all_reduce_sum(&unit, &sum, 1, DType::kF64);
  EXPECT_EQ(sum, world);

  // a split: even and odd ranks
  auto sub = comm->split(rank % 2, rank);
  Tensor one = device_values(*backend, {1.0}, DType::kF32);
  sub->all_reduce_sum(one.raw(), one.raw(), 1, DType::kF32);
  EXPECT_EQ(to_doubles(*backend, one)[0], sub->size());
}

TEST_F(Nccl, LayerOnEveryLayoutMatchesOneCpuProcess) {
  const int world = mpi_world_size(), rank = mpi_world_rank();
  const int experts = world % 3 == 0 ? 6 : 8;
  for (int ep = 1; ep <= world; ++ep) {
    if (world % ep != 0 || experts % ep != 0) continue;
    for (bool shared : {false, true}) {
      Config c = test::small_config(experts, 2, 16);
      c.moe.capacity_factor = 1.25;
      c.moe.num_shared_experts = shared ? 1 : 0;
      c.parallel.ep = ep;
      c.runtime = config.runtime;
      const int64_t local = 12, global = local * world, offset = local * rank, h = c.model.hidden;
      ProcessGroups groups = make_groups(c, *backend, make_mpi_world());
      test::LayerResult got = test::run_layer(c, *backend, groups, local, offset, global, true, 1);

      Config ref = c;
      ref.runtime = RuntimeConfig{};
      ref.runtime.dtype = DType::kF64;
      ref.parallel.ep = 1;
      ref.moe.group_size = static_cast<int>(local);
      auto cpu = make_cpu_backend({});
      ProcessGroups self = test::self_groups();
      test::LayerResult want = test::run_layer(ref, *cpu, self, global, 0, global, true, 1);
      std::vector<double> y(want.y.begin() + offset * h, want.y.begin() + (offset + local) * h);
      std::vector<double> dx(want.dx.begin() + offset * h, want.dx.begin() + (offset + local) * h);
      const std::string where = "ep=" + std::to_string(ep) + (shared ? " shared" : "");
      EXPECT_LT(test::rel_diff(got.y, y), 1e-5) << where;
      EXPECT_LT(test::rel_diff(got.dx, dx), 1e-5) << where;
      EXPECT_EQ(got.stats.load, want.stats.load) << where;
      for (const auto& [name, g] : got.grads) {
        EXPECT_LT(test::rel_diff(g, want.grads.at(name)), 1e-5) << where << ": gradient of " << name;
      }
    }
  }
}

TEST_F(Nccl, StuckPeerBecomesAnErrorNotAHang) {
  const int world = mpi_world_size(), rank = mpi_world_rank();
  if (world < 2) GTEST_SKIP() << "needs two ranks";
  auto comm = make_nccl_communicator(make_mpi_world(), backend->native_stream(), 3.0);
  Tensor t = backend->zeros({1024}, DType::kF32);
  bool threw = false;
  auto start = std::chrono::steady_clock::now();
  if (rank == 0) {
    // rank 1 never joins: the sum cannot finish (or, with lazy connection set-up, not even be enqueued),
    // and the wait must end with a CommError
    try {
      comm->all_reduce_sum(t.raw(), t.raw(), 1024, DType::kF32);
      backend->synchronize();
    } catch (const CommError& e) {
      threw = true;
      EXPECT_NE(std::string(e.what()).find("comm_timeout_s"), std::string::npos) << e.what();
    }
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_TRUE(threw);
    EXPECT_LT(waited, 30.0);
  }
  make_mpi_world()->barrier();  // every rank gets here: nobody was left waiting
}

}  // namespace
}  // namespace moe
