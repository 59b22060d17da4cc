// Shared test helpers.
#include "tests/test_util.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <initializer_list>
#include <memory>

#include "comm/mpi/mpi_communicator.h"
#include "base/error.h"
#include "train/grad_reduce.h"

namespace moe::test {

Tensor random_tensor(Backend& backend, const Shape& shape, DType dtype, uint64_t stream, int64_t offset, double scale) {
  return normal_tensor(backend, shape, dtype, RngStream{99, rng_stream(RngPurpose::kTest, stream)}, offset, scale);
}

double rel_diff(const std::vector<double>& a, const std::vector<double>& b, double floor) {
  if (a.size() != b.size()) return INFINITY;
  double diff = 0, scale = floor;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

namespace {

// Forwards every collective to `inner` after checking that each non-empty buffer is backend memory
// (kBackend) or is not (host values).
template <bool kBackend>
class KindChecked : public Communicator {
 public:
  explicit KindChecked(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string name() const override { return inner_.name(); }
  void all_to_all(const void* send, void* recv, size_t count, DType dtype) override {
    check("all_to_all", count, {send, recv});
    inner_.all_to_all(send, recv, count, dtype);
  }
  void all_to_all_v(const void* send, const std::vector<size_t>& sc, const std::vector<size_t>& so, void* recv,
                    const std::vector<size_t>& rc, const std::vector<size_t>& ro, DType dtype) override {
    check("all_to_all_v", total(sc) + total(rc), {send, recv});
    inner_.all_to_all_v(send, sc, so, recv, rc, ro, dtype);
  }
  void all_to_all_blocks(const void* send, const std::vector<Block>& sb, void* recv, const std::vector<Block>& rb,
                         DType dtype) override {
    size_t n = 0;
    for (const auto* list : {&sb, &rb})
      for (const Block& b : *list) n += b.count;
    check("all_to_all_blocks", n, {send, recv});
    inner_.all_to_all_blocks(send, sb, recv, rb, dtype);
  }
  void all_reduce_sum(const void* send, void* recv, size_t count, DType dtype) override {
    check("all_reduce_sum", count, {send, recv});
    inner_.all_reduce_sum(send, recv, count, dtype);
  }
  void all_reduce_sum_start(void* buf, size_t count, DType dtype) override {
    check("all_reduce_sum_start", count, {buf});
    inner_.all_reduce_sum_start(buf, count, dtype);
  }
  void all_gather(const void* send, void* recv, size_t count, DType dtype) override {
    check("all_gather", count, {send, recv});
    inner_.all_gather(send, recv, count, dtype);
  }
  void broadcast(void* buf, size_t count, DType dtype, int root) override {
    check("broadcast", count, {buf});
    inner_.broadcast(buf, count, dtype, root);
  }
  void wait_pending() override { inner_.wait_pending(); }
  double take_started_seconds() override { return inner_.take_started_seconds(); }
  void barrier() override { inner_.barrier(); }
  void set_timeout(double seconds) override {
    Communicator::set_timeout(seconds);
    inner_.set_timeout(seconds);
  }

 protected:
  static size_t total(const std::vector<size_t>& v) {
    size_t n = 0;
    for (size_t x : v) n += x;
    return n;
  }
  void check(const char* op, size_t count, std::initializer_list<const void*> buffers) const {
    if (count == 0) return;
    for (const void* p : buffers) {
      if (p != nullptr && in_backend_memory(p) != kBackend) {
        throw InternalError(detail::concat(op, " on the ", label(), " group: ",
                                           kBackend ? "a host value given to the tensor communicator (use host())"
                                                    : "a backend tensor given to host()"));
      }
    }
  }
  Communicator& inner_;
};

class HostChecked final : public KindChecked<false> {
 public:
  explicit HostChecked(Communicator& inner) : KindChecked<false>(inner) {}
  std::unique_ptr<Communicator> split(int color, int key) override { return inner_.split(color, key); }
};

class TensorChecked final : public KindChecked<true> {
 public:
  explicit TensorChecked(std::unique_ptr<Communicator> inner)
      : KindChecked<true>(*inner), owned_(std::move(inner)), host_(owned_->host()) {
    timeout_s_ = owned_->timeout();
  }
  Communicator& host() override { return host_; }
  std::unique_ptr<Communicator> split(int color, int key) override { return kind_checked(owned_->split(color, key)); }

 private:
  std::unique_ptr<Communicator> owned_;
  HostChecked host_;
};

}  // namespace

std::unique_ptr<Communicator> kind_checked(std::unique_ptr<Communicator> inner) {
  track_backend_memory(true);
  return std::make_unique<TensorChecked>(std::move(inner));
}

ProcessGroups self_groups() { return make_process_groups(kind_checked(make_mpi_self()), 1); }
ProcessGroups world_groups(int ep) { return make_process_groups(kind_checked(make_mpi_world()), ep); }

Config config(const std::vector<std::string>& overrides) { return parse_config("", "test", overrides); }

Config config(const Config& base, const std::vector<std::string>& overrides) {
  const Config defaults;
  std::vector<std::string> all;
  for (const ConfigField& f : config_fields()) {
    const std::string value = f.get(base);
    if (value != f.get(defaults)) all.push_back(f.key + "=" + value);
  }
  all.insert(all.end(), overrides.begin(), overrides.end());
  return config(all);
}

Config small_config(int num_experts, int top_k, int hidden) {
  return config({"model.hidden=" + std::to_string(hidden), "moe.num_experts=" + std::to_string(num_experts),
                 "moe.top_k=" + std::to_string(top_k), "moe.ffn_hidden=" + std::to_string(2 * hidden),
                 "moe.capacity_factor=1.0", "moe.min_capacity=0", "moe.aux_loss_coef=0.05", "moe.z_loss_coef=0.01",
                 "model.init_std=0.5"});  // init_std large enough that routing is far from uniform
}

LayerResult run_layer(const Config& config, Backend& backend, ProcessGroups& groups, int64_t tokens,
                      int64_t token_offset, int64_t global_tokens, bool reduce, int64_t step,
                      double r_scale) {
  const DType dt = config.runtime.dtype;
  const int64_t h = config.model.hidden;
  ParamSet params;
  MoeLayer layer(params, "moe", config, 0, groups.ep_size(), groups.ep->rank());
  params.allocate(backend, dt, config.train.seed);
  Tensor x = random_tensor(backend, {tokens, h}, dt, 11, token_offset * h);
  Tensor r = random_tensor(backend, {tokens, h}, dt, 12, token_offset * h, r_scale);
  StepContext ctx;
  ctx.step = step;
  ctx.token_offset = token_offset;
  ctx.global_tokens = global_tokens;
  LayerResult out;
  Tensor y = layer.forward(backend, groups, x, ctx);
  Tensor dx = layer.backward(backend, groups, r);
  out.stats = layer.read_stats(backend);
  if (reduce) reduce_gradients(params, groups);
  out.y = to_doubles(backend, y);
  out.dx = to_doubles(backend, dx);
  out.aux = out.stats.aux_loss;
  out.z = out.stats.z_loss;
  std::vector<double> dot{0};
  std::vector<double> rv = to_doubles(backend, r);
  for (size_t i = 0; i < rv.size(); ++i) dot[0] += rv[i] * out.y[i];
  groups.world->all_reduce_sum(dot);
  out.objective = dot[0] + out.aux + out.z;
  for (Param* p : params.trainable()) {
    std::vector<double> g = to_doubles(backend, p->grad);
    if (p->scope == ParamScope::kExpert) {
      size_t per = g.size() / static_cast<size_t>(p->shape[0]);
      for (int64_t l = 0; l < p->shape[0]; ++l) {
        out.grads[p->name + "." + std::to_string(p->expert_offset + l)] =
            std::vector<double>(g.begin() + l * per, g.begin() + (l + 1) * per);
      }
    } else {
      out.grads[p->name] = g;
    }
  }
  return out;
}

SharedDir::SharedDir(Communicator& world, const std::string& tag) : world_(world) {
  if (world.rank() == 0) {
    path_ = (std::filesystem::temp_directory_path() / (tag + "_" + std::to_string(::getpid()))).string();
    std::filesystem::create_directories(path_);
  }
  broadcast_string(world, path_, 0);
}

SharedDir::~SharedDir() {
  world_.barrier();
  if (world_.rank() == 0) std::filesystem::remove_all(path_);
}

}  // namespace moe::test
