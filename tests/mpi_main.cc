// GoogleTest main for every test binary: starts MPI (a singleton when run without mpirun), and on
// ranks other than 0 replaces the default printer with one that reports only failures, tagged with the
// rank, so a dist test prints one report plus whatever went wrong elsewhere. Dist tests must reach every
// collective on every rank: use EXPECT_*, not ASSERT_*, before a collective.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "comm/mpi/mpi_communicator.h"
#include "base/log.h"

namespace {

class FailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?", r.line_number(),
                 r.summary());
  }
  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
    }
  }

 private:
  int rank_;
};

}  // namespace

// A test binary may name the tests it runs when given no filter (cuda_tests: its CUDA cases, so that run
// bare, as the GPU check runs it, it reports them skipped without a GPU instead of passing the CPU cases
// of the op tables it links). Defined by that binary; null (weak, undefined) in the others.
extern const char* moe_default_gtest_filter __attribute__((weak));

int main(int argc, char** argv) {
  // Before InitGoogleTest: a --gtest_filter on the command line (or GTEST_FILTER) still wins.
  if (&moe_default_gtest_filter != nullptr && std::getenv("GTEST_FILTER") == nullptr) {
    GTEST_FLAG_SET(filter, moe_default_gtest_filter);
  }
  testing::InitGoogleTest(&argc, argv);
  moe::mpi_init(&argc, &argv);
  int rank = moe::mpi_world_rank();
  moe::log_set_rank(rank, moe::mpi_world_size());  // progress lines from rank 0 only
  // An exception escaping a test on one rank would leave the others waiting in a collective: let it
  // terminate the process instead, which makes mpirun stop the whole job.
  if (moe::mpi_world_size() > 1) GTEST_FLAG_SET(catch_exceptions, false);
  if (rank != 0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter(rank));
  }
  int rc = RUN_ALL_TESTS();
  moe::mpi_finalize();
  return rc;
}
