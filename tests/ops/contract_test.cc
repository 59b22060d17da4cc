// The op contracts (runtime/ops/<family>.cc) and the device dtype table (runtime/ops/contract.h), on the
// CPU: a wrong shape or dtype is refused before any implementation runs, with one line naming the op
// (and for a dtype, the device and the dtype). CUDA's row of the table is checked through a backend that
// claims the CUDA device but holds host memory: its calls must be refused by the contract, before any
// CUDA code could run (cuda::context() refuses that backend with another message, which would fail here).
// On a GPU (CudaOps): an allocation the device cannot make is a ResourceError.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>

#include "runtime/ops/attention.h"
#include "runtime/ops/contract.h"
#include "tests/ops/op_test.h"

namespace moe {
namespace {

// Host tensors behind a backend that says it is a CUDA device.
class ClaimsCudaBackend : public Backend {
 public:
  std::string name() const override { return "claims-cuda (host memory)"; }
  Device device() const override { return Device::kCuda; }
  Tensor empty(const Shape& shape, DType dtype) override { return host_tensor(shape, dtype); }
  void fill(Tensor&, double) override { ADD_FAILURE() << "fill on the claims-cuda backend"; }
  void copy(const Tensor&, Tensor&) override { ADD_FAILURE() << "copy on the claims-cuda backend"; }
  void copy_to_host(const Tensor&, void*) override { ADD_FAILURE() << "copy_to_host on the claims-cuda backend"; }
  void copy_from_host(const void*, Tensor&) override { ADD_FAILURE() << "copy_from_host on the claims-cuda backend"; }
  double memory_available() const override { return 0; }
};

// Runs `call`, which must throw an InternalError of one line containing every one of `parts`.
void expect_refused(const std::function<void()>& call, std::initializer_list<std::string> parts) {
  try {
    call();
    ADD_FAILURE() << "not refused; expected an error with '" << *parts.begin() << "'";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::kInternal) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    for (const std::string& part : parts) {
      EXPECT_NE(what.find(part), std::string::npos) << "'" << part << "' in: " << what;
    }
  }
}

class OpContracts : public ::testing::Test {
 protected:
  Tensor t(const Shape& shape, DType dtype = DType::kF32) { return host_tensor(shape, dtype); }  // zeros
  std::unique_ptr<Backend> cpu = make_cpu_backend({});
  ClaimsCudaBackend gpu;
};

// The drifted checks, each now written once: the embedding table's rank (CUDA only before), rope's
// arguments (written per device), the group sizes of the grouped GEMM, and what no device checked.
TEST_F(OpContracts, WrongShapesAreRefusedNamingTheOp) {
  Tensor ids = ints(*cpu, {3}, {0, 1, 2}), out = t({3, 4});
  expect_refused([&] { embedding_forward(*cpu, ids, t({12}), out); }, {"embedding_forward", "table must be 2-D"});
  Tensor x = t({6, 8}), cos = t({4, 2}), sin = t({4, 2}), xr = t({6, 8});
  expect_refused([&] { rope(*cpu, x, cos, sin, 4, false, xr); }, {"rope", "6 tokens in sequences of 4"});
  expect_refused([&] { rope(*cpu, x, cos, t({4, 3}), 2, false, xr); }, {"rope shapes"});
  Tensor a = t({5, 4}), w = t({2, 3, 4}), c = t({5, 3});
  expect_refused([&] { grouped_gemm(*cpu, a, w, Trans::kT, c, {2, 2}, 1.0, 0.0, GroupedGemmPath::kGrouped); },
                 {"grouped_gemm", "group rows sum to 4, a has 5"});
  expect_refused([&] { gemm(*cpu, a, Trans::kN, t({5, 3}), Trans::kN, c, 1.0, 0.0); }, {"gemm shapes"});
  Tensor y = t({6, 8}), rstd = t({6});
  expect_refused([&] { rmsnorm_forward(*cpu, x, t({7}), 1e-5, y, rstd); }, {"rmsnorm_forward", "weight"});
  Tensor row_idx = ints(*cpu, {6, 2}, std::vector<int32_t>(12, -1)), rows = t({4, 8});
  expect_refused([&] { unpermute(*cpu, rows, row_idx, t({6, 3}), y); }, {"unpermute gate"});
  expect_refused([&] { dropout(*cpu, x, 1.0, RngStream{}, 0, y); }, {"dropout", "outside [0, 1)"});
  RouteArgs args;
  args.num_experts = 4;
  args.top_k = 5;
  RouteState state;
  expect_refused([&] { route(*cpu, args, t({6, 4}), Tensor{}, state); }, {"route", "top_k 5 of 4"});
}

TEST_F(OpContracts, DtypesOutsideTheCpuRowAreRefusedNamingOpDeviceAndDtype) {
  Tensor x = t({5}), y = t({5}), y64 = t({5}, DType::kF64);
  expect_refused([&] { axpy(*cpu, 1.0, t({5}, DType::kBF16), y); }, {"axpy", "cpu", "x", "BF16(5)"});
  expect_refused([&] { axpy(*cpu, 1.0, x, y64); }, {"axpy", "cpu", "one dtype", "F64(5)"});
  // Before the contracts the CPU's swiglu read a BF16 tensor as F64 until the tensor's own access check.
  Tensor h = t({5}, DType::kBF16);
  expect_refused([&] { swiglu_forward(*cpu, x, y, h); }, {"swiglu_forward", "cpu", "h", "BF16(5)"});
  Tensor logits = t({2, 3}), dl = t({2, 3});
  expect_refused([&] { cross_entropy(*cpu, logits, t({2}), 1.0, dl); }, {"cross_entropy", "targets must be I32"});
  Tensor idx = ints(*cpu, {2, 1}, {0, 1}), out = t({2, 4}, DType::kI32);
  expect_refused([&] { permute(*cpu, t({2, 4}, DType::kI32), idx, out); }, {"permute", "cpu", "I32(2, 4)"});
}

// Every dtype: the CPU takes exactly the floats of its row of the table.
TEST_F(OpContracts, TheCpuTakesExactlyTheFloatsOfItsRow) {
  const std::vector<DType> floats = device_dtypes(Device::kCpu).floats;
  for (DType dt : {DType::kF32, DType::kF64, DType::kI32, DType::kBF16}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = t({3}, dt), y = t({3}, dt);
    if (std::find(floats.begin(), floats.end(), dt) != floats.end()) {
      EXPECT_NO_THROW(axpy(*cpu, 2.0, x, y));
    } else {
      expect_refused([&] { axpy(*cpu, 2.0, x, y); }, {"axpy", "cpu", dtype_name(dt)});
    }
  }
}

// The GPU device's row, without a GPU: what the row and the family headers exclude is refused by the
// contract, naming the device.
TEST_F(OpContracts, TheGpuRowAndItsPerOpExceptionsAreRefusedBeforeAnyKernel) {
  const std::vector<DType> floats = device_dtypes(Device::kCuda).floats;
  for (DType dt : {DType::kF32, DType::kF64, DType::kI32, DType::kBF16}) {
    if (std::find(floats.begin(), floats.end(), dt) != floats.end()) continue;
    Tensor x = t({3}, dt), y = t({3}, dt);
    expect_refused([&] { axpy(gpu, 2.0, x, y); },
                   {"axpy", "the cuda backend takes x as F32 or BF16", dtype_name(dt)});
  }
  RouteArgs args;
  args.num_experts = 4;
  args.top_k = 2;
  RouteState state;
  expect_refused([&] { route(gpu, args, t({6, 4}, DType::kBF16), Tensor{}, state); },
                 {"route", "the cuda backend takes sel_probs as F32, got BF16(6, 4)"});
  Tensor x = t({6, 8}, DType::kBF16), y = t({6, 8}, DType::kBF16), w = t({8}, DType::kBF16), rstd = t({6});
  expect_refused([&] { rmsnorm_forward(gpu, x, w, 1e-5, y, rstd); }, {"rmsnorm_forward", "cuda", "w as F32"});
  Tensor a = t({4, 8}, DType::kBF16), ww = t({2, 3, 8}, DType::kBF16), c = t({4, 3});
  expect_refused([&] { grouped_gemm(gpu, a, ww, Trans::kT, c, {2, 2}, 1.0, 0.0, GroupedGemmPath::kGrouped); },
                 {"grouped_gemm", "cuda", "c as BF16", "F32(4, 3)"});
}

// An allocation the GPU cannot make is a ResourceError of one line: the bytes requested, the device's
// free and total memory (not an internal error: smaller sizes fit).
TEST_F(CudaOps, OutOfMemoryIsAResourceErrorNamingRequestedFreeAndTotal) {
  const int64_t elements = int64_t{1} << 48;  // 1 PiB of F32
  try {
    gpu->empty({elements}, DType::kF32);
    ADD_FAILURE() << "a 1 PiB tensor was allocated";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::kResource) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    EXPECT_NE(what.find("requested " + std::to_string(elements * 4) + " bytes"), std::string::npos) << what;
    EXPECT_NE(what.find("MiB free of"), std::string::npos) << what;
  }
  Tensor small = gpu->zeros({4}, DType::kF32);  // the device still works after the refusal
  EXPECT_EQ(to_doubles(*gpu, small), std::vector<double>(4, 0.0));
}

}  // namespace
}  // namespace moe
