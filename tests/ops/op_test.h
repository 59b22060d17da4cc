// The harness of the op test tables (tests/ops/<family>_test.cc), in the style of ggml's test-backend-ops.
//
// Each family's table has CPU cases (suites without the Cuda prefix: the reference against loops,
// formulas or finite differences, in F32 and F64) and CUDA cases (suites named Cuda*): each builds its
// inputs on a backend from the same random streams, runs the op, and returns its outputs; compare() runs
// it on both backends and checks every output with a per-op bound. ctest runs the table twice: label unit
// runs the CPU cases, label cuda the CUDA ones, which skip with the reason when no device is usable.
// The op contracts' refusals (runtime/ops/<family>.cc) have their own table, tests/ops/contract_test.cc.
//
// Bounds. F32: 1e-5 relative (max |gpu - cpu| / max |cpu|) for every op; index outputs must match
// exactly. BF16 GEMMs against the F32 CPU product: operands rounded to 8 mantissa bits carry a relative
// error of 2^-9 each, the product of two 2^-8, and a K-term fp32 sum of such products with random signs
// keeps it near 2^-8 of the row norm: the bound is 1e-2 of the largest output.
#pragma once

#include <gtest/gtest.h>

#include <cctype>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/ops/contract.h"
#include "tests/test_util.h"

namespace moe::test {

// A CPU case in one of the CPU's floats (the parameter: F32 and F64), with the tolerance of each.
class CpuOps : public ::testing::TestWithParam<DType> {
 protected:
  std::unique_ptr<Backend> backend = make_cpu_backend({});
  DType dt() const { return GetParam(); }
  double tol() const { return dt() == DType::kF64 ? 1e-13 : 1e-5; }
  Tensor rnd(const Shape& s, uint64_t stream, double scale = 1.0) {
    return random_tensor(*backend, s, dt(), stream, 0, scale);
  }
};

inline std::string dtype_param_name(const ::testing::TestParamInfo<DType>& info) {
  std::string name = dtype_name(info.param);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

// A CPU suite runs once per float dtype of the CPU's row of the device table (runtime/ops/contract.h).
#define MOE_CPU_OPS_DTYPES(suite)                                                                             \
  INSTANTIATE_TEST_SUITE_P(DTypes, suite, ::testing::ValuesIn(::moe::device_dtypes(::moe::Device::kCpu).floats), \
                           ::moe::test::dtype_param_name)

// One op case: builds inputs on `b`, runs the op, returns the outputs to compare.
using OpCase = std::function<std::vector<Tensor>(Backend& b)>;

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda_unavailable_reason();
    gpu = make_cuda_backend({});
  }

  // Runs `op` on both backends; every output must agree to `tol` (0 for I32: exactly).
  void compare(const char* what, const OpCase& op, double tol = 1e-5) {
    std::vector<Tensor> want = op(*cpu), got = op(*gpu);
    ASSERT_EQ(want.size(), got.size()) << what;
    for (size_t i = 0; i < want.size(); ++i) {
      SCOPED_TRACE(std::string(what) + ", output " + std::to_string(i));
      ASSERT_EQ(want[i].shape(), got[i].shape());
      std::vector<double> w = to_doubles(*cpu, want[i]), g = to_doubles(*gpu, got[i]);
      if (want[i].dtype() == DType::kI32) {
        EXPECT_EQ(w, g);
      } else {
        EXPECT_LE(rel_diff(g, w), tol);
      }
    }
  }

  std::unique_ptr<Backend> cpu = make_cpu_backend({});
  std::unique_ptr<Backend> gpu;
};

// F32 random values from test stream `stream`, the same on every backend.
inline Tensor rnd(Backend& b, const Shape& s, uint64_t stream, double scale = 1.0) {
  return random_tensor(b, s, DType::kF32, stream, 0, scale);
}

inline Tensor ints(Backend& b, const Shape& s, const std::vector<int32_t>& v) {
  Tensor t = b.empty(s, DType::kI32);
  b.copy_from_host(v.data(), t);
  return t;
}

// Deterministic pseudo-random ids in [0, n).
inline std::vector<int32_t> ids(int64_t count, int32_t n, uint32_t salt) {
  std::vector<int32_t> v(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) v[i] = static_cast<int32_t>((i * 2654435761u + salt) % n);
  return v;
}

}  // namespace moe::test

namespace moe {
// The tables use the harness unqualified.
using test::CpuOps;
using test::CudaOps;
using test::ids;
using test::ints;
using test::random_tensor;
using test::rel_diff;
using test::rnd;
}  // namespace moe
