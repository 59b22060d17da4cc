// make_nccl_communicator of a build without NCCL: says so.
#include "comm/nccl/nccl_communicator.h"
#include "base/error.h"

namespace moe {

std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator>, void*, double) {
  throw ConfigError("runtime.comm", "nccl: this build has no NCCL (not found at configure time)");
}

}  // namespace moe
