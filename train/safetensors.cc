// safetensors reading and writing.
#include "train/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

#include "base/json.h"

namespace moe {
namespace {

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[i] = c;
  }
  return t;
}

// Write all of buf to fd, updating crc. Throws InputError naming path.
void write_all(int fd, const void* buf, size_t n, const std::string& path, uint32_t* crc) {
  const char* p = static_cast<const char*>(buf);
  if (crc) *crc = crc32_update(*crc, p, n);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw InputError(path, std::string("write failed: ") + std::strerror(errno));
    p += w, n -= static_cast<size_t>(w);
  }
}

// Opens path.tmp.<pid> for writing, calls body(fd), fsyncs and renames it over path.
template <typename Body>
void atomic_write(const std::string& path, Body&& body) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw InputError(tmp, std::string("cannot create: ") + std::strerror(errno));
  try {
    body(fd, tmp);
    if (::fsync(fd) != 0) throw InputError(tmp, std::string("fsync failed: ") + std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw InputError(path, std::string("rename failed: ") + std::strerror(errno));
  }
  // Make the rename itself durable.
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace

uint32_t crc32_update(uint32_t crc, const void* data, size_t n) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  const unsigned char* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

WrittenFile write_safetensors(const std::string& path, const std::vector<TensorRecord>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  JsonWriter j;
  j.begin_object();
  j.key("__metadata__").begin_object();
  for (const auto& [k, v] : metadata) j.field(k, v);
  j.end_object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    j.key(t.name).begin_object();
    j.field("dtype", dtype_name(t.data.dtype()));
    j.key("shape").begin_array();
    for (int64_t d : t.data.shape()) j.value(d);
    j.end_array();
    j.key("data_offsets").begin_array().value(offset).value(offset + t.data.nbytes()).end_array();
    j.end_object();
    offset += t.data.nbytes();
  }
  j.end_object();
  std::string header = j.str();
  header.append((8 - header.size() % 8) % 8, ' ');
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(static_cast<uint64_t>(header.size()) >> (8 * i));

  WrittenFile out;
  atomic_write(path, [&](int fd, const std::string& tmp) {
    write_all(fd, len, 8, tmp, &out.crc32);
    write_all(fd, header.data(), header.size(), tmp, &out.crc32);
    for (const auto& t : tensors) write_all(fd, t.data.raw(), t.data.nbytes(), tmp, &out.crc32);
  });
  out.bytes = 8 + header.size() + offset;
  return out;
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  atomic_write(path, [&](int fd, const std::string& tmp) { write_all(fd, contents.data(), contents.size(), tmp, nullptr); });
}

std::string read_file(const std::string& path, const std::string& what) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path, "cannot open " + what + ": " + std::strerror(errno));
  std::string out;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      throw InputError(path, "cannot read " + what + ": " + std::strerror(errno));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

WrittenFile checksum_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path, std::string("cannot open: ") + std::strerror(errno));
  WrittenFile out;
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.crc32 = crc32_update(out.crc32, buf.data(), static_cast<size_t>(n));
    out.bytes += static_cast<uint64_t>(n);
  }
  ::close(fd);
  return out;
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path, std::string("cannot open checkpoint file: ") + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  unsigned char len[8];
  bool ok = ::pread(fd, len, 8, 0) == 8;
  uint64_t n = 0;
  for (int i = 0; ok && i < 8; ++i) n |= static_cast<uint64_t>(len[i]) << (8 * i);
  if (!ok || n == 0 || n > size - 8 || n > (uint64_t{100} << 20)) {
    ::close(fd);
    throw InputError(path, "not a safetensors file (bad header length)");
  }
  std::string header(n, '\0');
  ok = ::pread(fd, header.data(), n, 8) == static_cast<ssize_t>(n);
  ::close(fd);
  if (!ok) throw InputError(path, "cannot read safetensors header");
  data_start_ = 8 + n;
  YAML::Node root = parse_json(header, path);
  for (const auto& item : root) {
    std::string name = item.first.as<std::string>();
    if (name == "__metadata__") continue;
    try {
      Entry e;
      e.dtype = item.second["dtype"].as<std::string>();
      for (const auto& d : item.second["shape"]) e.shape.push_back(d.as<int64_t>());
      e.begin = item.second["data_offsets"][0].as<uint64_t>();
      e.end = item.second["data_offsets"][1].as<uint64_t>();
      if (e.end < e.begin || data_start_ + e.end > size) {
        throw InputError(path, "tensor " + name + " lies outside the file (truncated?)");
      }
      entries_[name] = e;
    } catch (const YAML::Exception&) {
      throw InputError(path, "malformed safetensors entry for " + name);
    }
  }
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::pair<uint64_t, std::string>> by_offset;
  for (const auto& [name, e] : entries_) by_offset.emplace_back(e.begin, name);
  std::sort(by_offset.begin(), by_offset.end());
  std::vector<std::string> out;
  for (auto& [offset, name] : by_offset) out.push_back(std::move(name));
  return out;
}

Tensor SafetensorsReader::read(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw InputError(path_, "checkpoint has no tensor " + name);
  for (DType d : {DType::kF32, DType::kF64, DType::kI32, DType::kBF16}) {
    if (it->second.dtype != dtype_name(d)) continue;
    // the header's shape must account for exactly its bytes before anything is allocated
    uint64_t numel = 1;
    for (int64_t dim : it->second.shape) {
      if (dim < 0 || (dim > 0 && numel > (it->second.end - it->second.begin) / static_cast<uint64_t>(dim))) {
        throw InputError(path_, "tensor " + name + " has a shape that does not fit its bytes");
      }
      numel *= static_cast<uint64_t>(dim);
    }
    if (numel * dtype_size(d) != it->second.end - it->second.begin) {
      throw InputError(path_, "tensor " + name + " has a shape that does not fit its bytes");
    }
    Tensor t = host_tensor_uninitialized(it->second.shape, d);
    read(name, t);
    return t;
  }
  throw InputError(path_, "tensor " + name + " has dtype " + it->second.dtype + ", which this runtime does not read");
}

void SafetensorsReader::read(const std::string& name, Tensor& dst) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw InputError(path_, "checkpoint has no tensor " + name);
  const Entry& e = it->second;
  if (e.dtype != dtype_name(dst.dtype()) || e.shape != dst.shape()) {
    throw InputError(path_, "tensor " + name + " is " + e.dtype + shape_str(e.shape) + ", expected " + dst.str());
  }
  if (e.end - e.begin != dst.nbytes()) throw InputError(path_, "tensor " + name + " has the wrong byte size");
  int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path_, std::string("cannot open: ") + std::strerror(errno));
  char* out = static_cast<char*>(dst.raw());
  uint64_t left = dst.nbytes(), off = data_start_ + e.begin;
  while (left > 0) {
    ssize_t n = ::pread(fd, out, left, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      throw InputError(path_, "cannot read tensor " + name);
    }
    out += n, left -= static_cast<uint64_t>(n), off += static_cast<uint64_t>(n);
  }
  ::close(fd);
}

}  // namespace moe
