// Names of the error kinds.
#include "base/error.h"

namespace moe {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kConfig: return "config";
    case ErrorKind::kInput: return "input";
    case ErrorKind::kComm: return "comm";
    case ErrorKind::kResource: return "resource";
    case ErrorKind::kInternal: return "internal";
  }
  return "unknown";
}

}  // namespace moe
