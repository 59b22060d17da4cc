// GoogleTest main for every test binary: starts MPI (a singleton when run without mpirun), and on
// ranks other than 0 replaces the default printer with one that reports only failures, tagged with the
// rank, so a dist test prints one report plus whatever went wrong elsewhere. Dist tests must reach every
// collective on every rank: use EXPECT_*, not ASSERT_*, before a collective.
//
// --all_skipped_exit_code=N (ctest's cuda entries pass 77, their SKIP_RETURN_CODE): exit with N when every
// case that ran, on every rank, skipped and none failed, so ctest reports the binary skipped only then; a
// failure beside skips still fails. Without the option an all-skipped run exits 0, as gtest does, which is
// what the GPU check (shared/gpu-check/check.sh) expects when it runs cuda_tests bare on a machine
// without a GPU.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

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

namespace {

// Takes --all_skipped_exit_code=N out of argv; 0 when absent.
int take_all_skipped_exit_code(int* argc, char** argv) {
  const char* flag = "--all_skipped_exit_code=";
  int code = 0, kept = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::strncmp(argv[i], flag, std::strlen(flag)) == 0) {
      code = std::atoi(argv[i] + std::strlen(flag));
    } else {
      argv[kept++] = argv[i];
    }
  }
  *argc = kept;
  argv[kept] = nullptr;
  return code;
}

// True when, over every rank, no case failed, none passed and at least one skipped.
bool every_case_skipped(int rc) {
  const testing::UnitTest& unit = *testing::UnitTest::GetInstance();
  int local[3] = {rc != 0 || unit.failed_test_count() > 0, unit.successful_test_count() > 0,
                  unit.skipped_test_count() > 0};
  int world[3] = {0, 0, 0};
  MPI_Allreduce(local, world, 3, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return world[0] == 0 && world[1] == 0 && world[2] == 1;
}

}  // namespace

int main(int argc, char** argv) {
  // Before InitGoogleTest: a --gtest_filter on the command line (or GTEST_FILTER) still wins.
  if (&moe_default_gtest_filter != nullptr && std::getenv("GTEST_FILTER") == nullptr) {
    GTEST_FLAG_SET(filter, moe_default_gtest_filter);
  }
  testing::InitGoogleTest(&argc, argv);
  const int all_skipped_exit_code = take_all_skipped_exit_code(&argc, argv);
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
  if (all_skipped_exit_code != 0 && every_case_skipped(rc)) rc = all_skipped_exit_code;
  moe::mpi_finalize();
  return rc;
}
