// Shared test helpers: inputs derived from (stream, global index), tensor comparison, a layer harness.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "config/config.h"
#include "model/moe_layer.h"
#include "runtime/backend.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/gemm.h"
#include "runtime/ops/norm_loss.h"
#include "runtime/ops/optimizer.h"
#include "runtime/ops/permute.h"
#include "runtime/ops/routing.h"

namespace moe::test {

// normal_tensor on the test streams: element i is drawn at (stream, offset + i), so every rank can build
// its slice of a global tensor, and a single process the whole of it, from the same numbers.
Tensor random_tensor(Backend& backend, const Shape& shape, DType dtype, uint64_t stream, int64_t offset = 0,
                     double scale = 1.0);
// max |a - b| / max(max |b|, floor): a per-tensor relative error that ignores tiny entries.
double rel_diff(const std::vector<double>& a, const std::vector<double>& b, double floor = 1e-12);

// A directory every rank of `world` agrees on (rank 0 creates it under the temporary directory, named
// with `tag` and its pid), removed at the end of the scope.
class SharedDir {
 public:
  explicit SharedDir(Communicator& world, const std::string& tag = "moe_test");
  ~SharedDir();
  SharedDir(const SharedDir&) = delete;
  SharedDir& operator=(const SharedDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  Communicator& world_;
  std::string path_;
};

// ProcessGroups of one rank (MPI_COMM_SELF).
ProcessGroups self_groups();
// ProcessGroups over the whole MPI world with the given ep.
ProcessGroups world_groups(int ep);
// Both give communicators that check the kind of every buffer (tracking the CPU backend's memory): the
// collectives take tensors of the backend, host() takes anything else, as on a GPU where the two are
// device and host memory and a mix-up would hand NCCL a host pointer. A wrong buffer throws InternalError.
std::unique_ptr<Communicator> kind_checked(std::unique_ptr<Communicator> inner);

// A configuration from `key=value` overrides of the defaults, read by the parser (parse_config) as the
// command line's are: the same table, types and errors, so a test's configuration is one list.
Config config(const std::vector<std::string>& overrides);
// `base` with more overrides: the keys where base differs from the defaults first, then `overrides`.
Config config(const Config& base, const std::vector<std::string>& overrides);

// A small layer configuration used across tests.
Config small_config(int num_experts = 4, int top_k = 2, int hidden = 8);

// One MoE layer forward+backward with L = <y, r> + aux + z: what the layer computed.
struct LayerResult {
  std::vector<double> y, dx;
  double aux = 0, z = 0, objective = 0;  // objective = <y, r> summed over the world + aux + z
  std::map<std::string, std::vector<double>> grads;  // per parameter; expert params per global expert
  RouterStats stats;
};

// Runs a layer on `groups` over this rank's tokens [token_offset, token_offset + tokens) of a global
// batch of global_tokens, inputs drawn from streams (x: 11, r: 12). Expert gradients are reported per
// global expert index ("name.<e>"). When `reduce` is set the gradients are reduced as in training.
// r_scale = 0 makes dy = 0, leaving only the aux and z losses.
LayerResult run_layer(const Config& config, Backend& backend, ProcessGroups& groups, int64_t tokens,
                      int64_t token_offset, int64_t global_tokens, bool reduce = true, int64_t step = 0,
                      double r_scale = 1.0);

// Central differences of a scalar function of one tensor's elements: d f / d x_i for every i, F64.
inline std::vector<double> numeric_gradient(Backend& b, Tensor& x, const std::function<double()>& f,
                                            double eps = 1e-6) {
  std::vector<double> v = to_doubles(b, x), grad(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    double keep = v[i];
    v[i] = keep + eps;
    b.copy_from_host(v.data(), x);
    double plus = f();
    v[i] = keep - eps;
    b.copy_from_host(v.data(), x);
    double minus = f();
    v[i] = keep;
    b.copy_from_host(v.data(), x);
    grad[i] = (plus - minus) / (2 * eps);
  }
  return grad;
}

// <a, b> over every element.
inline double dot(Backend& backend, const Tensor& a, const Tensor& b) {
  std::vector<double> av = to_doubles(backend, a), bv = to_doubles(backend, b);
  double s = 0;
  for (size_t i = 0; i < av.size(); ++i) s += av[i] * bv[i];
  return s;
}

}  // namespace moe::test
