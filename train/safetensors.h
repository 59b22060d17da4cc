// safetensors files: write (atomically) and read, with a CRC-32 of the whole file.
//
// Layout: 8-byte little-endian header length N, then N bytes of JSON
//   {"__metadata__": {...}, "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
// padded with spaces to a multiple of 8, then the tensor bytes (offsets relative to their start).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace moe {

struct TensorRecord {
  std::string name;
  Tensor data;  // host tensor
};

struct WrittenFile {
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
};

uint32_t crc32_update(uint32_t crc, const void* data, size_t n);

// Writes to `path.tmp.<pid>`, fsyncs, renames over `path`. Throws InputError on I/O failure.
WrittenFile write_safetensors(const std::string& path, const std::vector<TensorRecord>& tensors,
                              const std::map<std::string, std::string>& metadata);

// Writes a small text file atomically (temporary file, fsync, rename).
void write_file_atomic(const std::string& path, const std::string& contents);
// Reads a whole file; throws InputError naming `what` when it cannot.
std::string read_file(const std::string& path, const std::string& what);
// Size and CRC-32 of a file, read in full.
WrittenFile checksum_file(const std::string& path);

class SafetensorsReader {
 public:
  // Opens and parses the header; throws InputError when the file is missing or malformed, or when a
  // tensor's offsets do not fit the file.
  explicit SafetensorsReader(const std::string& path);
  bool has(const std::string& name) const { return entries_.count(name) > 0; }
  // Every tensor's name, in the order of their bytes in the file.
  std::vector<std::string> names() const;
  // Tensor `name` as stored (its dtype and shape) in a new host tensor; throws InputError when it is
  // missing or of a dtype this runtime does not know.
  Tensor read(const std::string& name) const;
  // Copies tensor `name` into dst (host memory of dst's dtype and shape); throws InputError on a
  // missing tensor or a dtype/shape mismatch.
  void read(const std::string& name, Tensor& dst) const;

 private:
  struct Entry {
    std::string dtype;
    Shape shape;
    uint64_t begin = 0, end = 0;
  };
  std::string path_;
  std::map<std::string, Entry> entries_;
  uint64_t data_start_ = 0;
};

}  // namespace moe
