// CPU BLAS setup (runtime/cpu/blas.h).
#include "runtime/cpu/blas.h"

#include <cblas.h>

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <mutex>

#ifdef MOE_BLAS_BLIS
extern "C" {
const char* bli_info_get_version_str(void);
int bli_arch_query_id(void);
const char* bli_arch_string(int id);
void bli_thread_set_num_threads(long long n);
}
#else
#include <dlfcn.h>
extern "C" {
char* openblas_get_corename(void);
char* openblas_get_config(void);
}
#endif

namespace moe {
namespace {

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

double cpu_mhz() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("cpu MHz", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return std::atof(line.c_str() + colon + 1);
    }
  }
  return 0;
}

void detect_features(BlasInfo& info) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    info.features = "AVX-512", info.fma_lanes = 16;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    info.features = "AVX2+FMA", info.fma_lanes = 8;
  } else {
    info.features = "SSE/AVX", info.fma_lanes = 4;
  }
#else
  info.features = "not x86-64", info.fma_lanes = 4;
#endif
  info.mhz = cpu_mhz();
}

BlasInfo setup(int threads) {
  BlasInfo info;
  detect_features(info);
#ifdef MOE_BLAS_BLIS
  bli_thread_set_num_threads(threads);
  info.library = std::string("BLIS ") + bli_info_get_version_str();
  info.kernel = bli_arch_string(bli_arch_query_id());
  if (info.kernel == "generic" && info.fma_lanes >= 8) {
    info.warning = "BLIS runs its generic kernel on this CPU with " + info.features +
                   " (it does not recognise the CPU): build with MOE_BLAS=openblas (docs/PERFORMANCE.md)";
  }
#else
  openblas_set_num_threads(threads);
  const std::string config = openblas_get_config();  // "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ..."
  const size_t version_end = config.find(' ', config.find(' ') + 1);
  info.library = config.substr(0, version_end);
  info.kernel = openblas_get_corename();
  const std::string better = wider_openblas_kernel(info.kernel, info.fma_lanes);
  if (const char* forced = std::getenv("OPENBLAS_CORETYPE")) {  // the user's choice stands; say what it costs
    info.note = "set by OPENBLAS_CORETYPE";
    if (!better.empty()) {
      info.warning = std::string("OPENBLAS_CORETYPE=") + forced + " keeps OpenBLAS on a kernel narrower than this CPU's " +
                     info.features + " (on an AVX-512 AMD EPYC its own choice was 1.9x faster, docs/PERFORMANCE.md): "
                     "unset it to let OpenBLAS choose, or set it to " + better;
    }
    return info;
  }
  // The kernel selection can be re-run in DYNAMIC_ARCH builds only (found at run time: absent otherwise).
  using Fn = void (*)();
  auto dynamic_init = reinterpret_cast<Fn>(::dlsym(RTLD_DEFAULT, "gotoblas_dynamic_init"));
  auto dynamic_quit = reinterpret_cast<Fn>(::dlsym(RTLD_DEFAULT, "gotoblas_dynamic_quit"));
  if (!better.empty() && !(dynamic_init && dynamic_quit)) {
    info.warning = "OpenBLAS chose its " + info.kernel + " kernel, narrower than this CPU's " + info.features +
                   ", and cannot change it (not a DYNAMIC_ARCH build): use another OpenBLAS or MOE_BLAS=blis";
  }
  if (!better.empty() && dynamic_init && dynamic_quit) {
    // The documented OPENBLAS_CORETYPE override, applied by re-running the kernel selection; the
    // variable does not outlive it, so child processes choose for themselves.
    ::setenv("OPENBLAS_CORETYPE", better.c_str(), 1);
    dynamic_quit();
    dynamic_init();
    ::unsetenv("OPENBLAS_CORETYPE");
    info.note = "OpenBLAS chose " + info.kernel + "; the CPU has " + info.features;
    info.kernel = openblas_get_corename();
    openblas_set_num_threads(threads);
  }
#endif
  return info;
}

}  // namespace

std::string BlasInfo::str() const { return library + ", kernel " + kernel + (note.empty() ? "" : " (" + note + ")"); }

std::string wider_openblas_kernel(const std::string& core, int fma_lanes) {
  const std::string c = lower(core);
  const bool avx512_kernel = c == "skylakex" || c == "cooperlake" || c == "sapphirerapids";
  const bool avx2_kernel = avx512_kernel || c == "haswell" || c == "zen";
  if (fma_lanes >= 16 && !avx512_kernel) return "SKYLAKEX";
  if (fma_lanes == 8 && !avx2_kernel) return "HASWELL";
  return "";
}

const BlasInfo& blas_setup(int threads) {
  static std::once_flag once;
  static BlasInfo info;
  std::call_once(once, [&] { info = setup(threads); });
#ifdef MOE_BLAS_BLIS
  bli_thread_set_num_threads(threads);
#else
  openblas_set_num_threads(threads);
#endif
  return info;
}

double blas_rate_floor(const BlasInfo& info, bool f64) {
  const double lanes = f64 ? info.fma_lanes / 2.0 : info.fma_lanes;
  return 0.5 * 2.0 * lanes * info.mhz * 1e6;  // half of one FMA (2 FLOPs per lane) per cycle
}

}  // namespace moe
