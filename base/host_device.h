// MOE_HOST_DEVICE marks small inline functions that host code and CUDA kernels share, so both
// backends run the very same arithmetic (the RNG, the top-k insertion).
#pragma once

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif
