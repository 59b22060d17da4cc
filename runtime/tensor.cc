// Tensor views, dtype names, and host allocation.
#include "runtime/tensor.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <sstream>
#include <unordered_map>

namespace moe {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF64: return 8;
    case DType::kI32: return 4;
    case DType::kBF16: return 2;
  }
  return 0;
}

float bf16_to_float(uint16_t bits) {
  uint32_t u = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t float_to_bf16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kF64: return "F64";
    case DType::kI32: return "I32";
    case DType::kBF16: return "BF16";
  }
  return "?";
}

const char* device_name(Device device) {
  switch (device) {
    case Device::kCpu: return "cpu";
    case Device::kCuda: return "cuda";
  }
  return "?";
}

std::string shape_str(const Shape& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ")";
  return out.str();
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    MOE_CHECK(d >= 0, "negative dimension in shape ", shape_str(shape));
    n *= d;
  }
  return n;
}

Tensor::Tensor(std::shared_ptr<Storage> storage, size_t byte_offset, Shape shape, DType dtype)
    : storage_(std::move(storage)), offset_(byte_offset), shape_(std::move(shape)), dtype_(dtype) {
  numel_ = shape_numel(shape_);
  MOE_CHECK(offset_ + nbytes() <= storage_->nbytes, "view ", str(), " at byte ", offset_,
            " overruns storage of ", storage_->nbytes, " bytes");
}

int64_t Tensor::dim(int i) const {
  int r = rank();
  if (i < 0) i += r;
  MOE_CHECK(i >= 0 && i < r, "dim ", i, " out of range for ", str());
  return shape_[static_cast<size_t>(i)];
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  MOE_CHECK(rank() >= 1 && begin >= 0 && begin <= end && end <= shape_[0], "rows [", begin, ", ", end,
            ") of ", str());
  Shape s = shape_;
  s[0] = end - begin;
  int64_t row_elems = shape_[0] == 0 ? 0 : numel_ / shape_[0];
  return Tensor(storage_, offset_ + static_cast<size_t>(begin * row_elems) * dtype_size(dtype_), s, dtype_);
}

Tensor Tensor::reshape(Shape shape) const {
  MOE_CHECK(shape_numel(shape) == numel_, "reshape ", str(), " to ", shape_str(shape));
  return Tensor(storage_, offset_, std::move(shape), dtype_);
}

std::string Tensor::str() const { return std::string(dtype_name(dtype_)) + shape_str(shape_); }

void Tensor::check_dtype(DType expected) const {
  MOE_CHECK(defined(), "use of an undefined tensor");
  MOE_CHECK(dtype_ == expected, "tensor ", str(), " accessed as ", dtype_name(expected));
}

namespace {

// Freed host blocks kept for reuse. A training step allocates the same buffer sizes every step, and
// large blocks straight from the system come as fresh pages that the kernel must fault in and zero on
// first touch (measured: ~10% of a CPU layer step). Sizes are rounded up to one of four classes per
// power of two (at most 25% slack); at most kMaxCachedBytes are kept, beyond that blocks go back to
// the system.
class HostBlockCache {
 public:
  static constexpr size_t kMaxCachedBytes = size_t{2} << 30;

  static size_t size_class(size_t n) {
    if (n <= 4096) return ((n + 63) / 64) * 64;
    size_t p = size_t{1} << (63 - __builtin_clzll(n - 1));  // largest power of two below n
    size_t step = p / 4;
    return ((n + step - 1) / step) * step;
  }
  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void put(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= kMaxCachedBytes) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

// Never destroyed: tensors held by static objects may be freed after main returns.
HostBlockCache& block_cache() {
  static HostBlockCache* cache = new HostBlockCache();
  return *cache;
}

// The live blocks of the CPU backend's tensors (start -> bytes) while tracking is on.
struct BackendMemory {
  std::atomic<bool> on{false};
  std::mutex mu;
  std::map<uintptr_t, size_t> blocks;
};
BackendMemory& backend_memory() {
  static BackendMemory* m = new BackendMemory();  // never destroyed, like the block cache
  return *m;
}

Tensor allocate_host(const Shape& shape, DType dtype, bool zero, bool backend = false) {
  size_t nbytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  if (nbytes == 0) return Tensor(std::make_shared<Storage>(nullptr, 0, Device::kCpu, nullptr), 0, shape, dtype);
  size_t bytes = HostBlockCache::size_class(nbytes);
  void* p = block_cache().get(bytes);
  if (zero) std::memset(p, 0, nbytes);
  const bool tracked = backend && backend_memory().on.load();
  if (tracked) {
    std::lock_guard<std::mutex> lock(backend_memory().mu);
    backend_memory().blocks[reinterpret_cast<uintptr_t>(p)] = nbytes;
  }
  auto storage = std::make_shared<Storage>(p, nbytes, Device::kCpu, [bytes, tracked](void* q) {
    if (tracked) {
      std::lock_guard<std::mutex> lock(backend_memory().mu);
      backend_memory().blocks.erase(reinterpret_cast<uintptr_t>(q));
    }
    block_cache().put(q, bytes);
  });
  return Tensor(std::move(storage), 0, shape, dtype);
}

}  // namespace

Tensor host_tensor(const Shape& shape, DType dtype) { return allocate_host(shape, dtype, true); }
Tensor host_tensor_uninitialized(const Shape& shape, DType dtype) { return allocate_host(shape, dtype, false); }
Tensor cpu_backend_tensor(const Shape& shape, DType dtype) { return allocate_host(shape, dtype, false, true); }

void track_backend_memory(bool on) { backend_memory().on = on; }

bool in_backend_memory(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(backend_memory().mu);
  const auto& blocks = backend_memory().blocks;
  auto it = blocks.upper_bound(a);
  if (it == blocks.begin()) return false;
  --it;
  return a < it->first + it->second;
}

void check_shape(const Tensor& t, const Shape& shape, const char* what) {
  MOE_CHECK(t.defined() && t.shape() == shape, what, ": expected shape ", shape_str(shape), ", got ",
            t.defined() ? t.str() : std::string("undefined"));
}

}  // namespace moe
