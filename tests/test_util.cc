// Shared test helpers.
#include "tests/test_util.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "comm/mpi/mpi_communicator.h"
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

ProcessGroups self_groups() { return make_process_groups(make_mpi_self(), 1); }
ProcessGroups world_groups(int ep) { return make_process_groups(make_mpi_world(), ep); }

Config small_config(int num_experts, int top_k, int hidden) {
  Config c;
  c.model.hidden = hidden;
  c.moe.num_experts = num_experts;
  c.moe.top_k = top_k;
  c.moe.ffn_hidden = 2 * hidden;
  c.moe.capacity_factor = 1.0;
  c.moe.min_capacity = 0;
  c.moe.aux_loss_coef = 0.05;
  c.moe.z_loss_coef = 0.01;
  c.model.init_std = 0.5;  // large enough that routing is far from uniform
  return c;
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
