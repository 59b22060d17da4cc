// What an op's contract is written with: the dtypes each device computes in, and the checks of check_<op>.
//
// Every op has one contract, check_<op> in runtime/ops/<family>.cc, with the op's own parameters.
// MOE_OP's dispatching inline (runtime/ops/op.h) runs it before it picks the device, so the CPU and the
// CUDA implementation receive arguments that already hold: ranks, shapes, dtypes, scalar arguments,
// anything that can be checked without reading device memory. The implementations keep only what their
// device cannot do (cuBLAS's 32-bit sizes, alignment, CUDA's top-k bound) and what needs the data (the
// CPU's index ranges). The configuration is validated before any op runs, so a failed contract is a bug
// of the caller: an InternalError of one line that names the op, and for a dtype, the device as well.
#pragma once

#include <initializer_list>
#include <vector>

#include "runtime/backend.h"

namespace moe {

// Whether one call may mix float dtypes.
enum class FloatMix : uint8_t {
  kOneDtypePerCall,  // every float tensor of a call has the same dtype (the CPU runs a call in one type)
  kPerTensor,        // each float tensor has its own (CUDA reads and writes each as float)
};

// The float dtypes a device's kernels compute in.
struct DeviceDTypes {
  Device device;
  std::vector<DType> floats;
  FloatMix mix;
};

// The table, one row per device:
//   cpu   F32, F64    one dtype per call   F64 is the reference the tests hold the others to
//   cuda  F32, BF16   per tensor           BF16 read and written as float; no F64 kernels
// Family headers name the ops that take less (CUDA routing, attention, optimizer: F32 only).
const DeviceDTypes& device_dtypes(Device device);

// What one float tensor of an op may be, given the device's row of the table.
enum class FloatRule : uint8_t {
  kDevice,     // the device's floats
  kF32OnCuda,  // the device's floats on the CPU, F32 only on CUDA (the op's CUDA kernel takes F32)
  kCopy,       // rows moved as bytes, not computed on: the device's floats and BF16
};

enum class Presence : uint8_t { kRequired, kOptional };  // kOptional: an undefined tensor is not checked

struct FloatArg {
  const Tensor& t;
  const char* what;  // the parameter's name, as in the op's declaration
  FloatRule rule = FloatRule::kDevice;
  Presence presence = Presence::kRequired;
};

// The dtypes `rule` allows on `device`, in the table's order.
std::vector<DType> allowed_floats(Device device, FloatRule rule);

// Each tensor has a dtype its rule allows on b's device ("<op>: the cuda backend takes <what> as F32, got
// F64(4, 8)"), and on a device that runs a call in one dtype, all of them have the same one.
void check_floats(const Backend& b, const char* op, std::initializer_list<FloatArg> args);

// t has the fixed dtype of its role (I32 indices, F64 statistics, a BF16 shadow), on every device.
void check_dtype(const char* op, const Tensor& t, DType dtype, const char* what);

// a and b have one dtype (a copy's source and destination, a GEMM's two operands), on every device.
void check_same_dtype(const char* op, const Tensor& a, const char* a_what, const Tensor& b, const char* b_what);

}  // namespace moe
