// moe_bench a2a under mpirun: each rank verifies what the collectives delivered (and a corrupted
// delivery is counted), and one MoE layer's exchange with identity experts gives x times its gates.
#include <gtest/gtest.h>

#include "comm/mpi/mpi_communicator.h"
#include "launch/a2a_bench.h"
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

TEST(A2aBench, EveryRankVerifiesWhatItReceived) {
  ProcessGroups groups = test::world_groups(1);
  auto backend = make_cpu_backend({});
  const int n = groups.world->size();
  for (bool vary : {false, true}) {
    for (size_t bytes : {size_t{4}, size_t{1000}, size_t{65536}}) {
      SCOPED_TRACE(std::string(vary ? "all_to_all_v " : "all_to_all ") + std::to_string(bytes));
      RawRow r = a2a_row(*backend, *groups.world, *groups.world, vary, bytes, 2, 1);
      EXPECT_EQ(r.wrong, 0);
      EXPECT_GE(r.count, n);  // at least one element per peer
      EXPECT_GT(r.time_us, 0);
      EXPECT_NEAR(r.busbw, r.algbw * (n - 1) / n, 1e-12);
      if (!vary) {
        EXPECT_EQ(r.bytes, std::max<size_t>(1, bytes / 4 / n) * n * 4);
      }
    }
  }
  CorruptingComm bad(*groups.world);
  for (bool vary : {false, true}) {
    EXPECT_EQ(a2a_row(*backend, bad, *groups.world, vary, 4096, 1, 0).wrong, 1) << "vary " << vary;
  }
}

TEST(A2aBench, MoeExchangeWithIdentityExpertsReturnsGatedInputs) {
  ProcessGroups groups = test::world_groups(mpi_world_size());
  auto backend = make_cpu_backend({});
  const int n = groups.world->size();
  for (const char* cf : {"1.25", "0", "0.5"}) {
    SCOPED_TRACE(std::string("capacity_factor ") + cf);
    Config c = parse_config("", "", {"model.seq_len=48", "model.hidden=16", "moe.top_k=2",
                                     std::string("moe.capacity_factor=") + cf});
    c.moe.num_experts = 2 * n;
    c.parallel.ep = n;
    c.train.batch_size = n;
    validate_config(c, n);
    MoeRow r = moe_exchange_row(*backend, groups, c, 2, 1);
    EXPECT_EQ(r.wrong, 0);
    EXPECT_GT(r.bytes, 0);
    EXPECT_GT(r.ours_us, 0);
    EXPECT_GT(r.raw_us, 0);
  }
}

}  // namespace
}  // namespace moe
