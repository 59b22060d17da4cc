// Communicator over MPI for host buffers.
//
// Every communicator is a duplicate of its parent with MPI_ERRORS_RETURN, so a failed call comes back
// as a CommError (statement, file:line, rank) instead of MPI's default abort without context.
// Collectives are the non-blocking MPI-3 ones, completed by a test loop that yields the core between
// tests (ranks may outnumber cores), polls the device watchdogs, and gives up at the deadline.
#include "comm/mpi/mpi_communicator.h"

#include <mpi.h>

#include <sched.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include "runtime/device_wait.h"
#include "base/error.h"

namespace moe {
namespace {

[[noreturn]] void throw_mpi_error(int code, const char* stmt, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  throw CommError(detail::concat("MPI call failed on rank ", mpi_world_rank(), ": ", stmt, " at ", file, ":", line,
                                 ": ", std::string(text, static_cast<size_t>(len))));
}

#define MOE_MPI_CHECK(stmt)                                               \
  do {                                                                    \
    int moe_rc_ = (stmt);                                                 \
    if (moe_rc_ != MPI_SUCCESS) throw_mpi_error(moe_rc_, #stmt, __FILE__, __LINE__); \
  } while (0)

MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kF64: return MPI_DOUBLE;
    case DType::kI32: return MPI_INT32_T;
    case DType::kBF16: return MPI_UINT16_T;  // moved, never summed (all_reduce_sum rejects it)
  }
  throw InternalError("no MPI datatype for dtype");
}

int to_int(size_t n, const char* what) {
  if (n > static_cast<size_t>(INT_MAX)) {
    throw CommError(detail::concat(what, ": ", n, " elements exceed the 2^31-1 count limit of MPI"));
  }
  return static_cast<int>(n);
}

std::vector<int> to_ints(const std::vector<size_t>& v, const char* what) {
  std::vector<int> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_int(v[i], what);
  return out;
}

// The blocks of one side of an all_to_all_blocks as one datatype per peer (count 1, or 0 without blocks):
// byte displacements from the buffer's start, adjacent blocks merged. Freed with the object.
struct PeerTypes {
  std::vector<MPI_Datatype> types;
  std::vector<int> counts;

  PeerTypes(int peers, const std::vector<Communicator::Block>& blocks, DType dtype, const char* op)
      : types(static_cast<size_t>(peers), MPI_BYTE), counts(static_cast<size_t>(peers), 0) {
    const size_t elem = dtype_size(dtype);
    std::vector<std::vector<int>> lengths(static_cast<size_t>(peers));
    std::vector<std::vector<MPI_Aint>> displs(static_cast<size_t>(peers));
    std::vector<size_t> ends(static_cast<size_t>(peers), SIZE_MAX);
    for (const Communicator::Block& b : blocks) {
      if (b.peer < 0 || b.peer >= peers) {
        throw InternalError(detail::concat(op, ": block for peer ", b.peer, " in a group of ", peers));
      }
      if (b.count == 0) continue;
      const size_t p = static_cast<size_t>(b.peer);
      if (ends[p] == b.offset) {  // continues the previous block of this peer
        lengths[p].back() = to_int(static_cast<size_t>(lengths[p].back()) + b.count, op);
      } else {
        lengths[p].push_back(to_int(b.count, op));
        displs[p].push_back(static_cast<MPI_Aint>(b.offset * elem));
      }
      ends[p] = b.offset + b.count;
    }
    try {
      for (size_t p = 0; p < types.size(); ++p) {
        if (lengths[p].empty()) continue;
        MOE_MPI_CHECK(MPI_Type_create_hindexed(static_cast<int>(lengths[p].size()), lengths[p].data(),
                                               displs[p].data(), mpi_type(dtype), &types[p]));
        counts[p] = 1;
        MOE_MPI_CHECK(MPI_Type_commit(&types[p]));
      }
    } catch (...) {
      release();
      throw;
    }
  }
  ~PeerTypes() { release(); }
  PeerTypes(const PeerTypes&) = delete;
  PeerTypes& operator=(const PeerTypes&) = delete;

 private:
  void release() {
    for (size_t p = 0; p < types.size(); ++p) {
      if (types[p] != MPI_BYTE) MPI_Type_free(&types[p]);
      types[p] = MPI_BYTE;
      counts[p] = 0;
    }
  }
};

// Reductions and broadcasts of more than INT_MAX elements go in pieces.
constexpr size_t kChunk = size_t{1} << 30;

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm parent) {
    MOE_MPI_CHECK(MPI_Comm_dup(parent, &comm_));
    MOE_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    MOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MOE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  MpiCommunicator(MPI_Comm owned, bool /*adopt*/) : comm_(owned) {
    MOE_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    MOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MOE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  void all_to_all(const void* send, void* recv, size_t count, DType dtype) override {
    to_int(count * static_cast<size_t>(size_), "all_to_all");
    MPI_Request req;
    MOE_MPI_CHECK(MPI_Ialltoall(send, static_cast<int>(count), mpi_type(dtype), recv, static_cast<int>(count),
                                mpi_type(dtype), comm_, &req));
    wait(req, "all_to_all");
  }

  void all_to_all_v(const void* send, const std::vector<size_t>& send_counts, const std::vector<size_t>& send_offsets,
                    void* recv, const std::vector<size_t>& recv_counts, const std::vector<size_t>& recv_offsets,
                    DType dtype) override {
    check_all_to_all_v_layout(size_, send_counts, send_offsets, recv_counts, recv_offsets);
    auto sc = to_ints(send_counts, "all_to_all_v"), so = to_ints(send_offsets, "all_to_all_v");
    auto rc = to_ints(recv_counts, "all_to_all_v"), ro = to_ints(recv_offsets, "all_to_all_v");
    MPI_Request req;
    MOE_MPI_CHECK(MPI_Ialltoallv(send, sc.data(), so.data(), mpi_type(dtype), recv, rc.data(), ro.data(),
                                 mpi_type(dtype), comm_, &req));
    wait(req, "all_to_all_v");
  }

  // One derived datatype per peer and side (the peer's blocks, adjacent ones merged), so MPI moves every
  // block straight between its places: one MPI_Ialltoallw.
  void all_to_all_blocks(const void* send, const std::vector<Block>& send_blocks, void* recv,
                         const std::vector<Block>& recv_blocks, DType dtype) override {
    PeerTypes st(size_, send_blocks, dtype, "all_to_all_blocks"), rt(size_, recv_blocks, dtype, "all_to_all_blocks");
    std::vector<int> zero(static_cast<size_t>(size_), 0);
    MPI_Request req;
    MOE_MPI_CHECK(MPI_Ialltoallw(send, st.counts.data(), zero.data(), st.types.data(), recv, rt.counts.data(),
                                 zero.data(), rt.types.data(), comm_, &req));
    wait(req, "all_to_all_blocks");
  }

  void all_reduce_sum(const void* send, void* recv, size_t count, DType dtype) override {
    if (dtype == DType::kBF16) throw CommError("mpi all_reduce_sum: BF16 sums are not supported on the host");
    size_t elem = dtype_size(dtype);
    for (size_t done = 0; done < count; done += kChunk) {
      int n = static_cast<int>(std::min(kChunk, count - done));
      const void* s = send == recv ? MPI_IN_PLACE : static_cast<const char*>(send) + done * elem;
      MPI_Request req;
      MOE_MPI_CHECK(
          MPI_Iallreduce(s, static_cast<char*>(recv) + done * elem, n, mpi_type(dtype), MPI_SUM, comm_, &req));
      wait(req, "all_reduce_sum");
    }
  }

  void all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    to_int(count * static_cast<size_t>(size_), "all_gather");
    MPI_Request req;
    MOE_MPI_CHECK(MPI_Iallgather(send, static_cast<int>(count), mpi_type(dtype), recv, static_cast<int>(count),
                                 mpi_type(dtype), comm_, &req));
    wait(req, "all_gather");
  }

  void broadcast(void* buf, size_t count, DType dtype, int root) override {
    size_t elem = dtype_size(dtype);
    for (size_t done = 0; done < count; done += kChunk) {
      int n = static_cast<int>(std::min(kChunk, count - done));
      MPI_Request req;
      MOE_MPI_CHECK(MPI_Ibcast(static_cast<char*>(buf) + done * elem, n, mpi_type(dtype), root, comm_, &req));
      wait(req, "broadcast");
    }
  }

  void barrier() override {
    MPI_Request req;
    MOE_MPI_CHECK(MPI_Ibarrier(comm_, &req));
    wait(req, "barrier");
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub = MPI_COMM_NULL;
    MOE_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
    auto child = std::make_unique<MpiCommunicator>(sub, true);
    child->set_timeout(timeout_s_);
    return child;
  }

 private:
  // Completes a non-blocking collective: tests it, yielding the core in between, until it is done or
  // the deadline passes.
  void wait(MPI_Request& req, const char* op) {
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      int done = 0;
      MOE_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
      if (done) return;
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      poll_waiters(waited);
      if (past_deadline(waited)) fail_deadline(op, waited);
      sched_yield();
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace

namespace {
// This process's rank in, and the size of, the ranks sharing its node: computed once (a collective over
// the world), in mpi_init, so that later calls are local and any rank may ask alone.
std::pair<int, int> compute_node_rank_and_size() {
  MPI_Comm node;
  MOE_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
  int r = 0, n = 1;
  MPI_Comm_rank(node, &r);
  MPI_Comm_size(node, &n);
  MPI_Comm_free(&node);
  return {r, n};
}
std::pair<int, int> g_node{-1, -1};

std::pair<int, int> node_rank_and_size() {
  if (!mpi_initialized()) return {0, 1};
  if (g_node.first < 0) g_node = compute_node_rank_and_size();  // MPI started elsewhere: first call collective
  return g_node;
}
}  // namespace

void mpi_init(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return;
  int provided = 0;
  MOE_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  g_node = compute_node_rank_and_size();
}

void mpi_finalize() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (mpi_initialized() && !finalized) MPI_Finalize();
}

void mpi_abort(int code) {
  if (mpi_initialized()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

bool mpi_initialized() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

int mpi_world_rank() {
  if (!mpi_initialized()) return 0;
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int mpi_world_size() {
  if (!mpi_initialized()) return 1;
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

int mpi_local_rank() { return node_rank_and_size().first; }

int mpi_local_size() { return node_rank_and_size().second; }

std::unique_ptr<Communicator> make_mpi_world() { return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD); }
std::unique_ptr<Communicator> make_mpi_self() { return std::make_unique<MpiCommunicator>(MPI_COMM_SELF); }

}  // namespace moe
