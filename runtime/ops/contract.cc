// The device dtype table and the dtype checks of the op contracts (runtime/ops/contract.h).
#include "runtime/ops/contract.h"

#include <algorithm>
#include <string>

namespace moe {
namespace {

const DeviceDTypes kDeviceDTypes[] = {
    {Device::kCpu, {DType::kF32, DType::kF64}, FloatMix::kOneDtypePerCall},
    {Device::kCuda, {DType::kF32, DType::kBF16}, FloatMix::kPerTensor},
};

std::string dtype_list(const std::vector<DType>& dtypes) {
  std::string s;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    s += i == 0 ? "" : i + 1 == dtypes.size() ? " or " : ", ";
    s += dtype_name(dtypes[i]);
  }
  return s;
}

std::string shown(const Tensor& t) { return t.defined() ? t.str() : std::string("undefined"); }

}  // namespace

const DeviceDTypes& device_dtypes(Device device) {
  for (const DeviceDTypes& row : kDeviceDTypes) {
    if (row.device == device) return row;
  }
  throw InternalError(detail::concat("no dtype table for device ", device_name(device)));
}

std::vector<DType> allowed_floats(Device device, FloatRule rule) {
  std::vector<DType> floats = device_dtypes(device).floats;
  if (rule == FloatRule::kF32OnCuda && device == Device::kCuda) return {DType::kF32};
  if (rule == FloatRule::kCopy && std::find(floats.begin(), floats.end(), DType::kBF16) == floats.end()) {
    floats.push_back(DType::kBF16);
  }
  return floats;
}

void check_floats(const Backend& b, const char* op, std::initializer_list<FloatArg> args) {
  const Device device = b.device();
  const FloatArg* first = nullptr;
  for (const FloatArg& a : args) {
    if (a.presence == Presence::kOptional && !a.t.defined()) continue;
    const std::vector<DType> allowed = allowed_floats(device, a.rule);
    if (!a.t.defined() || std::find(allowed.begin(), allowed.end(), a.t.dtype()) == allowed.end()) {
      throw InternalError(detail::concat(op, ": the ", device_name(device), " backend takes ", a.what, " as ",
                                         dtype_list(allowed), ", got ", shown(a.t)));
    }
    if (!first) first = &a;
  }
  if (device_dtypes(device).mix == FloatMix::kPerTensor || !first) return;
  for (const FloatArg& a : args) {
    if (!a.t.defined() || a.t.dtype() == first->t.dtype()) continue;
    throw InternalError(detail::concat(op, ": the ", device_name(device), " backend runs a call in one dtype, got ",
                                       first->what, " ", first->t.str(), " and ", a.what, " ", a.t.str()));
  }
}

void check_dtype(const char* op, const Tensor& t, DType dtype, const char* what) {
  if (t.defined() && t.dtype() == dtype) return;
  throw InternalError(detail::concat(op, ": ", what, " must be ", dtype_name(dtype), ", got ", shown(t)));
}

void check_same_dtype(const char* op, const Tensor& a, const char* a_what, const Tensor& b, const char* b_what) {
  if (a.dtype() == b.dtype()) return;
  throw InternalError(detail::concat(op, ": ", a_what, " ", a.str(), " and ", b_what, " ", b.str(),
                                     " must have one dtype"));
}

}  // namespace moe
