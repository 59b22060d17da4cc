// The CPU BLAS: which library and kernel run our GEMMs, chosen once per process.
//
// OpenBLAS (the default build; MOE_BLAS=blis builds against BLIS instead) picks its kernel from the CPU
// model it recognises. Debian's 0.3.21 does not know recent CPUs and falls back to an older kernel:
// its generic kernel on recent Intel Xeons (about 5x slower than the right one, reported). So the setup
// compares OpenBLAS's choice with the CPU's vector features and, when the CPU has wider ones than the
// kernel uses, switches to the kernel that uses them: SkylakeX for AVX-512 (F, BW, DQ, VL), Haswell for
// AVX2 with FMA. OPENBLAS_CORETYPE, when set, is respected; when it names a narrower kernel than the CPU
// could run (this project's machines set Haswell on an AVX-512 AMD EPYC, where OpenBLAS's own choice,
// Cooperlake, runs our GEMMs 1.9x faster), the setup says so in one warning.
#pragma once

#include <string>

namespace moe {

struct BlasInfo {
  std::string library;   // "OpenBLAS 0.3.21" / "BLIS 0.9.0"
  std::string kernel;    // the kernel (OpenBLAS core, BLIS arch) that runs
  std::string note;      // how the kernel was chosen when not by the library alone ("set by OPENBLAS_CORETYPE")
  std::string warning;   // one line when the kernel is narrower than the CPU's features and stays so; else ""
  std::string features;  // the CPU's widest FP32 vector features: "AVX-512", "AVX2+FMA", "SSE/AVX"
  int fma_lanes = 4;     // FP32 lanes of one FMA instruction of those features: 16, 8, 4
  double mhz = 0;        // the clock /proc/cpuinfo reports (0: unknown)
  std::string str() const;  // "OpenBLAS 0.3.21, kernel SkylakeX (OpenBLAS chose Haswell; the CPU has AVX-512)"
};

// Chooses (OpenBLAS) the kernel the first time, and sets the library's threads per process every time.
// Call before any GEMM.
const BlasInfo& blas_setup(int threads);

// The OpenBLAS kernel (OPENBLAS_CORETYPE name) that uses FMA instructions of fma_lanes FP32 lanes (16:
// AVX-512, 8: AVX2) when `core` (openblas_get_corename) does not; "" when it does.
std::string wider_openblas_kernel(const std::string& core, int fma_lanes);

// A dense FP32 GEMM rate per core below this (FLOP/s) means the kernel does not use what the CPU has:
// half of one FMA instruction per cycle at the reported clock (a floor: most cores issue two). F64
// halves it. 0 when the clock is unknown.
double blas_rate_floor(const BlasInfo& info, bool f64);

}  // namespace moe
