// How an op is declared once and implemented per device.
//
// The ops of the runtime come in families (runtime/ops/<family>.h): gemm, elementwise, norm_loss,
// routing, permute, optimizer, attention. A family is one header here, one CPU file
// (runtime/cpu/<family>.cc, the reference), one CUDA file (runtime/cuda/<family>.cu) and one test table
// (tests/ops/<family>_test.cc). The Backend (runtime/backend.h) keeps what is not an op: memory,
// copies, streams, the side stream and timing marks.
//
// MOE_OP(ret, name, (Backend& b, params...), (b, args...)) declares the CPU implementation
// cpu::name, the CUDA implementation cuda::name, both with the op's own parameters, and defines
// name(), which calls the one of b's device. Adding an op is one MOE_OP line with its contract comment
// here, one function in the CPU file, one in the CUDA file, and a case in the test table.
//
//   // y (T, H) = x / rms(x) * w
//   MOE_OP(void, rmsnorm_forward, (Backend& b, const Tensor& x, ...), (b, x, ...))
//   ...
//   rmsnorm_forward(backend, x, w, eps, y, rstd);
#pragma once

#include "runtime/backend.h"

#if MOE_WITH_CUDA
#define MOE_OP_ON_DEVICE_(name, args) \
  if (b.device() == ::moe::Device::kCuda) return ::moe::cuda::name args;
#else
#define MOE_OP_ON_DEVICE_(name, args)  // a build without CUDA has CPU backends only
#endif

#define MOE_OP(ret, name, params, args) \
  namespace cpu {                       \
  ret name params;                      \
  }                                     \
  namespace cuda {                      \
  ret name params;                      \
  }                                     \
  inline ret name params {              \
    MOE_OP_ON_DEVICE_(name, args)       \
    return ::moe::cpu::name args;       \
  }
