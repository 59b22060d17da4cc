// The vocabulary of the configuration: every enum a configuration key takes, and the forced-routing
// description. They live here, below the runtime, so that the configuration depends on nothing above
// it: the tensors, the op families and the backends include this header, not the other way round.
#pragma once

#include <cstdint>

#include "base/host_device.h"

namespace moe {

// Element types. BF16 exists for device GEMM operands and activations only (the CPU backend computes in
// F32/F64). runtime.dtype takes F32 or F64.
enum class DType : uint8_t { kF32, kF64, kI32, kBF16 };
enum class Device : uint8_t { kCpu, kCuda };

// runtime.precision: fp32, or bf16 expert GEMMs on bf16 copies of fp32 master weights.
enum class Precision : uint8_t { kFp32, kBf16 };
// runtime.comm: the communicator of the device (auto), or one named.
enum class CommKind : uint8_t { kAuto, kNccl, kMpi };
// runtime.dispatch_layout: which rows reach the experts (model/dispatcher.h).
enum class DispatchLayout : uint8_t { kAuto, kCompact, kPadded };
// runtime.expert_gemm: how the CUDA backend runs the groups of grouped_gemm / grouped_gemm_tn:
//   kGrouped  one cublasGemmGroupedBatchedEx call per 2730 non-empty groups;
//   kStreams  one cublasGemmEx per non-empty group, round-robin over the context's GEMM streams (forked
//             from its stream and joined back). cublasGemmEx also takes BF16 operands with an F32 result.
// The CPU runs the groups one after another either way.
enum class GroupedGemmPath : uint8_t { kGrouped, kStreams };

// moe.expert_type: swiglu, or the plain two-layer FFN with gelu or relu.
enum class ExpertType : uint8_t { kSwiGLU, kGelu, kRelu };
// moe.score: the router's scores from its logits.
enum class ScoreFn : uint8_t { kSoftmax, kSigmoid };
// moe.priority: the order in which a group's tokens claim expert slots within one choice rank.
enum class Priority : uint8_t { kToken, kBatch };
// moe.router_grad: how the router gets its gradient.
enum class RouterGrad : uint8_t { kExact, kStraightThrough, kGumbel };

// train.optimizer, data.source.
enum class OptimizerType : uint8_t { kAdamW, kSgd };
enum class DataSource : uint8_t { kSynthetic, kFile };

// moe.force_routing: expert choices drawn from a seeded distribution instead of the router's top-k
// (runtime/forced_routing.h draws them).
enum class ForcedKind : uint8_t { kOff, kUniform, kZipf, kHot };
struct ForcedRouting {
  ForcedKind kind = ForcedKind::kOff;
  double param = 0;  // zipf: the exponent S; hot: the fraction F
  MOE_HOST_DEVICE bool on() const { return kind != ForcedKind::kOff; }
  bool operator==(const ForcedRouting& o) const { return kind == o.kind && param == o.param; }
};

}  // namespace moe
