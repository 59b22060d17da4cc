// moe_bench a2a's rows under mpirun: each rank verifies what the collectives delivered (and a corrupted
// delivery is counted), and one MoE layer's exchange with identity experts gives x times its gates.
#include <gtest/gtest.h>

#include "comm/mpi/mpi_communicator.h"
#include "base/json.h"
#include "perf/a2a_bench.h"
#include "perf/collectives.h"
#include "tests/test_util.h"

namespace moe {
namespace {

// Delivers what the wrapped communicator delivers, but the last rank's first received element is off.
class CorruptingComm : public Communicator {
 public:
  explicit CorruptingComm(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string name() const override { return inner_.name(); }
  void all_to_all(const void* send, void* recv, size_t count, DType dtype) override {
    inner_.all_to_all(send, recv, count, dtype);
    corrupt(recv);
  }
  void all_to_all_v(const void* send, const std::vector<size_t>& sc, const std::vector<size_t>& so, void* recv,
                    const std::vector<size_t>& rc, const std::vector<size_t>& ro, DType dtype) override {
    inner_.all_to_all_v(send, sc, so, recv, rc, ro, dtype);
    corrupt(recv);
  }
  void all_to_all_blocks(const void* send, const std::vector<Block>& sb, void* recv, const std::vector<Block>& rb,
                         DType dtype) override {
    inner_.all_to_all_blocks(send, sb, recv, rb, dtype);
    for (const Block& b : rb) {
      if (b.count != 0) return corrupt(static_cast<float*>(recv) + b.offset);
    }
  }
  void all_reduce_sum(const void* send, void* recv, size_t count, DType dtype) override {
    inner_.all_reduce_sum(send, recv, count, dtype);
  }
  void all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    inner_.all_gather(send, recv, count, dtype);
  }
  void broadcast(void* buf, size_t count, DType dtype, int root) override { inner_.broadcast(buf, count, dtype, root); }
  void barrier() override { inner_.barrier(); }
  std::unique_ptr<Communicator> split(int color, int key) override { return inner_.split(color, key); }

 private:
  void corrupt(void* recv) {
    if (rank() == size() - 1) static_cast<float*>(recv)[0] += 1.0f;
  }
  Communicator& inner_;
};

// One row of a benchmark measured on its own through the engine.
BenchOptions options(int iters, int warmup) {
  BenchOptions o;
  o.iters = iters;
  o.warmup = warmup;
  return o;
}

TEST(A2aBench, EveryRankVerifiesWhatItReceived) {
  ProcessGroups groups = test::world_groups(1);
  auto backend = make_cpu_backend({});
  BenchRun run(*backend, groups, options(2, 1));
  const int n = groups.world->size();
  const std::vector<size_t> sizes{4, 1000, 65536};
  for (Collective op : {Collective::kAllToAll, Collective::kAllToAllV, Collective::kAllReduce}) {
    CollectiveBench bench(op, *groups.world, sizes);
    for (size_t i = 0; i < sizes.size(); ++i) {
      SCOPED_TRACE(std::string(collective_name(op)) + " " + std::to_string(sizes[i]));
      EXPECT_EQ(run.measure(bench, i).wrong, 0);
      const CollectiveRow& r = bench.result(i);
      EXPECT_EQ(r.wrong, 0);
      EXPECT_GT(r.seconds, 0);
      const double factor = op == Collective::kAllReduce ? 2.0 * (n - 1) / n : (n - 1.0) / n;
      EXPECT_NEAR(r.busbw, r.algbw * factor, 1e-12);
      if (op == Collective::kAllToAll) {
        EXPECT_GE(r.count, n);  // at least one element per peer
        EXPECT_EQ(r.bytes, std::max<size_t>(1, sizes[i] / 4 / n) * n * 4);
      }
    }
  }
  CorruptingComm bad(*groups.world);
  for (Collective op : {Collective::kAllToAll, Collective::kAllToAllV}) {
    CollectiveBench bench(op, bad, {4096});
    EXPECT_EQ(run.measure(bench, 0).wrong, 1) << collective_name(op);
  }
}

TEST(A2aBench, MoeExchangeWithIdentityExpertsReturnsGatedInputs) {
  ProcessGroups groups = test::world_groups(mpi_world_size());
  auto backend = make_cpu_backend({});
  BenchRun run(*backend, groups, options(2, 1));
  const int n = groups.world->size();
  std::vector<Config> configs;
  for (const char* cf : {"1.25", "0", "0.5"}) {
    Config c = parse_config("", "", {"model.seq_len=48", "model.hidden=16", "moe.top_k=2",
                                     std::string("moe.capacity_factor=") + cf});
    c.moe.num_experts = 2 * n;
    c.parallel.ep = n;
    c.train.batch_size = n;
    validate_config(c, n);
    configs.push_back(c);
  }
  MoeExchangeBench bench(configs, {});
  for (size_t i = 0; i < configs.size(); ++i) {
    SCOPED_TRACE("capacity_factor " + format_double(configs[i].moe.capacity_factor));
    EXPECT_EQ(run.measure(bench, i).wrong, 0);
    const ExchangeRow& r = bench.result(i);
    EXPECT_EQ(r.wrong, 0);
    EXPECT_GT(r.bytes, 0);
    EXPECT_GT(r.ours_s, 0);
    EXPECT_GT(r.raw_s, 0);
  }
}

}  // namespace
}  // namespace moe
