// How an op is declared once, checked once and implemented per device.
//
// The ops of the runtime come in families (runtime/ops/<family>.h): gemm, elementwise, norm_loss,
// routing, permute, optimizer, attention. A family is one header here (the ops and their contracts in
// words), one contract file here (runtime/ops/<family>.cc: check_<op> for each op), one CPU file
// (runtime/cpu/<family>.cc, the reference), one CUDA file (runtime/cuda/<family>.cu) and one test table
// (tests/ops/<family>_test.cc). The Backend (runtime/backend.h) keeps what is not an op: memory,
// copies, streams, the side stream and timing marks.
//
// MOE_OP(ret, name, (Backend& b, params...), (b, args...)) declares the contract check_name, the CPU
// implementation cpu::name and the CUDA implementation cuda::name, all three with the op's own
// parameters, and defines name(), which runs the contract and then calls the implementation of b's
// device. The contract checks everything that needs no device memory (shapes, dtypes against the device
// table of runtime/ops/contract.h, scalar arguments), so an implementation keeps only its device's own
// limits. Adding an op is one MOE_OP line with its contract comment in the header, its check_name in the
// family's contract file, one function in the CPU file, one in the CUDA file, and a case in the table.
//
//   // y (T, H) = x / rms(x) * w
//   MOE_OP(void, rmsnorm_forward, (Backend& b, const Tensor& x, ...), (b, x, ...))
//   ...
//   rmsnorm_forward(backend, x, w, eps, y, rstd);  // check_rmsnorm_forward, then cpu:: or cuda::
#pragma once

#include "runtime/backend.h"

#if MOE_WITH_CUDA
#define MOE_OP_ON_DEVICE_(name, args) \
  if (b.device() == ::moe::Device::kCuda) return ::moe::cuda::name args;
#else
#define MOE_OP_ON_DEVICE_(name, args)  // a build without CUDA has CPU backends only
#endif

#define MOE_OP(ret, name, params, args) \
  void check_##name params;             \
  namespace cpu {                       \
  ret name params;                      \
  }                                     \
  namespace cuda {                      \
  ret name params;                      \
  }                                     \
  inline ret name params {              \
    check_##name args;                  \
    MOE_OP_ON_DEVICE_(name, args)       \
    return ::moe::cpu::name args;       \
  }
