// Tensors: a typed, shaped view into reference-counted storage on one device.
//
// Tensors are always contiguous and row-major. A view (rows(), reshape()) shares the storage of its
// parent. Storage is allocated by a Backend (runtime/backend.h) or, for host-only data, by host_tensor().
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"
#include "config/enums.h"

namespace moe {

size_t dtype_size(DType dtype);
// bfloat16 bits <-> float on the host (round to nearest even; NaN stays NaN).
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);
const char* dtype_name(DType dtype);  // "F32", "F64", "I32", "BF16": the safetensors names
const char* device_name(Device device);

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::kF64;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::kI32;
};

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);
int64_t shape_numel(const Shape& shape);

// Owned bytes on one device, released through the deleter of whoever allocated them.
struct Storage {
  void* ptr = nullptr;
  size_t nbytes = 0;
  Device device = Device::kCpu;
  std::function<void(void*)> deleter;
  Storage(void* p, size_t n, Device d, std::function<void(void*)> del)
      : ptr(p), nbytes(n), device(d), deleter(std::move(del)) {}
  ~Storage() {
    if (ptr && deleter) deleter(ptr);
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, size_t byte_offset, Shape shape, DType dtype);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the end
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device::kCpu; }

  void* raw() { return static_cast<char*>(storage_->ptr) + offset_; }
  const void* raw() const { return static_cast<const char*>(storage_->ptr) + offset_; }

  template <typename T>
  T* data() {
    check_dtype(DTypeOf<T>::value);
    return static_cast<T*>(raw());
  }
  template <typename T>
  const T* data() const {
    check_dtype(DTypeOf<T>::value);
    return static_cast<const T*>(raw());
  }

  // Rows [begin, end) of the leading dimension, sharing storage.
  Tensor rows(int64_t begin, int64_t end) const;
  // The same elements under another shape with the same element count.
  Tensor reshape(Shape shape) const;

  std::string str() const;  // "F32(4, 8)"

 private:
  void check_dtype(DType expected) const;

  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::kF32;
};

// A zero-filled host tensor (64-byte aligned). Freed blocks are cached for reuse (see tensor.cc).
Tensor host_tensor(const Shape& shape, DType dtype);
// The same with unspecified contents.
Tensor host_tensor_uninitialized(const Shape& shape, DType dtype);
// What the CPU backend's empty() returns: host_tensor_uninitialized, recorded as backend memory while
// tracking is on.
Tensor cpu_backend_tensor(const Shape& shape, DType dtype);

// Tracking of the CPU backend's tensor memory, for tests that check which communicator each buffer goes
// to (tests/test_util.h): on a GPU the backend's tensors are device memory and everything else is host
// memory, and the two go to different communicators. in_backend_memory is true for an address inside a
// live tensor the backend allocated while tracking was on.
void track_backend_memory(bool on);
bool in_backend_memory(const void* p);

// Throws InternalError naming `what` when t's shape differs from `shape`.
void check_shape(const Tensor& t, const Shape& shape, const char* what);

}  // namespace moe
