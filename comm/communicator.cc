// Communicator helpers and the expert-parallel x data-parallel mesh.
#include "comm/communicator.h"

#include <algorithm>
#include <cstring>

#include "comm/mpi/mpi_communicator.h"
#include "base/error.h"

namespace moe {

namespace {
std::string& where_storage() {
  static std::string where = "start-up";
  return where;
}
}  // namespace

void set_comm_where(const std::string& where) { where_storage() = where; }
const std::string& comm_where() { return where_storage(); }

bool Communicator::past_deadline(double waited) const {
  if (timeout_s_ <= 0) return false;
  static const double stagger = 0.25 * std::min(mpi_world_rank(), 8);
  return waited > timeout_s_ + stagger;
}

void Communicator::fail_deadline(const char* op, double waited) const {
  throw CommError(detail::concat(name(), " ", op, " on the ", label_, " group (", size(), " ranks) waited ",
                                 static_cast<int>(waited), " s for its peers during ", comm_where(), " (rank ", rank(),
                                 " of the group): a rank is stuck or dead"),
                  "runtime.comm_timeout_s");
}

void check_all_to_all_v_layout(int ranks, const std::vector<size_t>& send_counts,
                               const std::vector<size_t>& send_offsets, const std::vector<size_t>& recv_counts,
                               const std::vector<size_t>& recv_offsets) {
  size_t n = static_cast<size_t>(ranks);
  MOE_CHECK(send_counts.size() == n && send_offsets.size() == n && recv_counts.size() == n &&
                recv_offsets.size() == n,
            "all_to_all_v needs one count and offset per rank");
}

void broadcast_string(Communicator& data, std::string& s, int root) {
  Communicator& comm = data.host();
  std::vector<double> len{static_cast<double>(s.size())};
  comm.broadcast(len.data(), 1, DType::kF64, root);
  std::vector<int32_t> buf((static_cast<size_t>(len[0]) + 3) / 4, 0);
  if (comm.rank() == root && !s.empty()) std::memcpy(buf.data(), s.data(), s.size());
  if (!buf.empty()) comm.broadcast(buf.data(), buf.size(), DType::kI32, root);
  s.assign(reinterpret_cast<const char*>(buf.data()), static_cast<size_t>(len[0]));
}

ProcessGroups make_process_groups(std::unique_ptr<Communicator> world, int ep) {
  int n = world->size();
  if (ep < 1 || n % ep != 0) {
    throw ConfigError("parallel.ep", detail::concat("must divide the number of ranks (", n, " ranks, ep = ", ep, ")"));
  }
  int r = world->rank();
  ProcessGroups groups;
  groups.ep = world->split(/*color=*/r / ep, /*key=*/r % ep);
  groups.dp = world->split(/*color=*/r % ep, /*key=*/r / ep);
  groups.world = std::move(world);
  groups.world->set_label("world");
  groups.ep->set_label("ep");
  groups.dp->set_label("dp");
  MOE_CHECK(groups.ep->size() == ep && groups.ep->rank() == r % ep, "ep group of rank ", r);
  MOE_CHECK(groups.dp->size() == n / ep && groups.dp->rank() == r / ep, "dp group of rank ", r);
  return groups;
}

}  // namespace moe
