// The cost model's constants: reading, writing, merging and the median of calibrations, and the GEMM
// model's interpolation on the calibrated grid.
#include "perf/cost_constants.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "base/error.h"
#include "base/json.h"
#include "train/safetensors.h"

namespace moe {

// ---------------------------------------------------------------------------------------------------
// constants

double GemmModel::time(double m, double n, double k) const {
  if (m <= 0 || n <= 0 || k <= 0) return 0.0;
  const double flops = 2.0 * m * n * k;
  const size_t g = dims.size();
  if (g < 2 || seconds.size() != g * g * g) return alpha_s + flops / flops_per_s;
  // Position of x on the grid in log space: cell index i and weight w of dims[i + 1].
  auto locate = [&](double x, size_t* i, double* w) {
    const double c = std::clamp(x, dims.front(), dims.back());
    size_t j = 0;
    while (j + 2 < g && c > dims[j + 1]) ++j;
    *i = j;
    *w = std::log(c / dims[j]) / std::log(dims[j + 1] / dims[j]);
  };
  size_t im, in, ik;
  double wm, wn, wk;
  locate(m, &im, &wm);
  locate(n, &in, &wn);
  locate(k, &ik, &wk);
  double log_t = 0;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b)
      for (int d = 0; d < 2; ++d) {
        const double w = (a ? wm : 1 - wm) * (b ? wn : 1 - wn) * (d ? wk : 1 - wk);
        if (w == 0) continue;
        log_t += w * std::log(seconds[((im + a) * g + in + b) * g + ik + d]);
      }
  // Outside the grid the time scales with the FLOPs beyond its edge (compute-bound above; below the
  // grid a GEMM costs what the smallest measured one does, its overhead).
  const double cm = std::clamp(m, dims.front(), dims.back()), cn = std::clamp(n, dims.front(), dims.back()),
               ck = std::clamp(k, dims.front(), dims.back());
  const double beyond = std::max(1.0, m / cm) * std::max(1.0, n / cn) * std::max(1.0, k / ck);
  return std::exp(log_t) * beyond;
}

const NodeConstants& CostConstants::node(int ranks) const {
  if (nodes.empty()) throw InputError("cost constants", "no calibrated rank count (run launch/moe calibrate)");
  for (const NodeConstants& n : nodes)
    if (n.ranks >= ranks) return n;
  return nodes.back();
}

namespace {

void write_gemm(JsonWriter& j, const std::string& name, const GemmModel& g) {
  j.key(name).begin_object();
  j.field("alpha_s", g.alpha_s).field("flops_per_s", g.flops_per_s);
  if (!g.dims.empty()) j.array("dims", g.dims).array("seconds", g.seconds);
  j.end_object();
}

void write_ab(JsonWriter& j, const std::string& name, const AlphaBeta& ab) {
  j.key(name).begin_object().field("alpha_s", ab.alpha_s).field("bytes_per_s", ab.bytes_per_s).end_object();
}

void write_node(JsonWriter& j, const NodeConstants& n) {
  j.begin_object().field("ranks", n.ranks);
  write_gemm(j, "gemm", n.gemm);
  if (n.gemm_bf16.flops_per_s > 0 || !n.gemm_bf16.dims.empty()) write_gemm(j, "gemm_bf16", n.gemm_bf16);
  j.field("stream_bytes_per_s", n.stream_bytes_per_s).field("softmax_elems_per_s", n.softmax_elems_per_s);
  j.field("swiglu_elems_per_s", n.swiglu_elems_per_s).field("adamw_params_per_s", n.adamw_params_per_s);
  j.field("op_alpha_s", n.op_alpha_s).field("sync_s", n.sync_s).field("step_efficiency", n.step_efficiency);
  write_ab(j, "all_to_all", n.all_to_all);
  write_ab(j, "all_reduce", n.all_reduce);
  j.end_object();
}

// Field readers that name the file and the field when something is missing or not a number.
struct Reader {
  std::string path;
  double num(const YAML::Node& n, const std::string& field, bool required = true) const {
    const YAML::Node v = n[field];
    if (!v) {
      if (required) throw InputError(path, "missing field '" + field + "'");
      return 0.0;
    }
    try {
      return v.as<double>();
    } catch (const YAML::Exception&) {
      throw InputError(path, "field '" + field + "' is not a number");
    }
  }
  std::vector<double> list(const YAML::Node& n, const std::string& field) const {
    std::vector<double> out;
    const YAML::Node v = n[field];
    if (!v) return out;
    if (!v.IsSequence()) throw InputError(path, "field '" + field + "' is not a list");
    for (const YAML::Node& x : v) out.push_back(x.as<double>());
    return out;
  }
  GemmModel gemm(const YAML::Node& n, const std::string& field) const {
    GemmModel g;
    const YAML::Node v = n[field];
    if (!v) return g;
    g.alpha_s = num(v, "alpha_s", false);
    g.flops_per_s = num(v, "flops_per_s", false);
    g.dims = list(v, "dims");
    g.seconds = list(v, "seconds");
    const size_t d = g.dims.size();
    if (d > 0 && g.seconds.size() != d * d * d)
      throw InputError(path, "'" + field + "': " + std::to_string(g.seconds.size()) + " times for a grid of " +
                                 std::to_string(d) + "^3 shapes");
    if (d == 0 && g.flops_per_s <= 0) throw InputError(path, "'" + field + "' has neither a grid nor flops_per_s");
    return g;
  }
  AlphaBeta ab(const YAML::Node& n, const std::string& field, bool required = true) const {
    AlphaBeta a;
    const YAML::Node v = n[field];
    if (!v) {
      if (required) throw InputError(path, "missing field '" + field + "'");
      return a;
    }
    a.alpha_s = num(v, "alpha_s");
    a.bytes_per_s = num(v, "bytes_per_s");
    if (a.bytes_per_s <= 0) throw InputError(path, "'" + field + ".bytes_per_s' must be > 0");
    return a;
  }
};

CostConstants constants_from_json(const std::string& text, const std::string& path) {
  const YAML::Node j = parse_json(text, path);
  const Reader r{path};
  CostConstants c;
  c.device = j["device"] ? j["device"].as<std::string>() : "cpu";
  c.description = j["description"] ? j["description"].as<std::string>() : "";
  c.overlap = j["overlap"] ? j["overlap"].as<bool>() : false;
  c.inter_all_to_all = r.ab(j, "inter_all_to_all", false);
  c.inter_all_reduce = r.ab(j, "inter_all_reduce", false);
  if (!j["nodes"] || !j["nodes"].IsSequence() || j["nodes"].size() == 0)
    throw InputError(path, "no 'nodes' entries (run launch/moe calibrate)");
  for (const YAML::Node& n : j["nodes"]) {
    NodeConstants e;
    e.ranks = static_cast<int>(r.num(n, "ranks"));
    if (e.ranks < 1) throw InputError(path, "a node entry has ranks < 1");
    e.gemm = r.gemm(n, "gemm");
    if (e.gemm.dims.empty() && e.gemm.flops_per_s <= 0) throw InputError(path, "missing field 'gemm'");
    e.gemm_bf16 = r.gemm(n, "gemm_bf16");
    e.stream_bytes_per_s = r.num(n, "stream_bytes_per_s");
    e.softmax_elems_per_s = r.num(n, "softmax_elems_per_s");
    e.swiglu_elems_per_s = r.num(n, "swiglu_elems_per_s");
    e.adamw_params_per_s = r.num(n, "adamw_params_per_s");
    e.op_alpha_s = r.num(n, "op_alpha_s", false);
    e.sync_s = r.num(n, "sync_s", false);
    e.step_efficiency = n["step_efficiency"] ? r.num(n, "step_efficiency") : 1.0;
    if (e.step_efficiency <= 0) throw InputError(path, "step_efficiency must be > 0");
    if (e.stream_bytes_per_s <= 0 || e.softmax_elems_per_s <= 0 || e.swiglu_elems_per_s <= 0 ||
        e.adamw_params_per_s <= 0)
      throw InputError(path, "node entry for " + std::to_string(e.ranks) + " ranks has a rate <= 0");
    e.all_to_all = r.ab(n, "all_to_all");
    e.all_reduce = r.ab(n, "all_reduce");
    c.nodes.push_back(e);
  }
  std::sort(c.nodes.begin(), c.nodes.end(), [](const NodeConstants& a, const NodeConstants& b) { return a.ranks < b.ranks; });
  return c;
}

}  // namespace

std::string constants_to_json(const CostConstants& c) {
  JsonWriter j;
  j.begin_object().field("format", "moe-cost-constants/1").field("device", c.device);
  j.field("description", c.description).field("overlap", c.overlap);
  if (c.inter_all_to_all.bytes_per_s > 0) write_ab(j, "inter_all_to_all", c.inter_all_to_all);
  if (c.inter_all_reduce.bytes_per_s > 0) write_ab(j, "inter_all_reduce", c.inter_all_reduce);
  j.key("nodes").begin_array();
  for (const NodeConstants& n : c.nodes) write_node(j, n);
  j.end_array().end_object();
  return j.str() + "\n";
}

CostConstants median_constants(const std::vector<CostConstants>& runs) {
  if (runs.empty()) throw InputError("median_constants", "no calibration to take the median of");
  auto med = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  CostConstants out = runs.front();
  for (const CostConstants& r : runs)
    if (r.device != out.device) throw InputError("median_constants", "calibrations of different devices");
  for (NodeConstants& e : out.nodes) {
    std::vector<const NodeConstants*> same;
    for (const CostConstants& r : runs)
      for (const NodeConstants& n : r.nodes)
        if (n.ranks == e.ranks) same.push_back(&n);
    auto field = [&](auto member) {
      std::vector<double> v;
      for (const NodeConstants* n : same) v.push_back(member(*n));
      return med(v);
    };
    for (GemmModel NodeConstants::*g : {&NodeConstants::gemm, &NodeConstants::gemm_bf16}) {
      for (size_t i = 0; i < (e.*g).seconds.size(); ++i) {
        std::vector<double> v;
        for (const NodeConstants* n : same) {
          if ((n->*g).dims != (e.*g).dims) throw InputError("median_constants", "calibrations with different GEMM grids");
          v.push_back((n->*g).seconds[i]);
        }
        (e.*g).seconds[i] = med(v);
      }
      (e.*g).alpha_s = field([&](const NodeConstants& n) { return (n.*g).alpha_s; });
      (e.*g).flops_per_s = field([&](const NodeConstants& n) { return (n.*g).flops_per_s; });
    }
    e.stream_bytes_per_s = field([](const NodeConstants& n) { return n.stream_bytes_per_s; });
    e.softmax_elems_per_s = field([](const NodeConstants& n) { return n.softmax_elems_per_s; });
    e.swiglu_elems_per_s = field([](const NodeConstants& n) { return n.swiglu_elems_per_s; });
    e.adamw_params_per_s = field([](const NodeConstants& n) { return n.adamw_params_per_s; });
    e.op_alpha_s = field([](const NodeConstants& n) { return n.op_alpha_s; });
    e.sync_s = field([](const NodeConstants& n) { return n.sync_s; });
    e.step_efficiency = field([](const NodeConstants& n) { return n.step_efficiency; });
    e.all_to_all.alpha_s = field([](const NodeConstants& n) { return n.all_to_all.alpha_s; });
    e.all_to_all.bytes_per_s = field([](const NodeConstants& n) { return n.all_to_all.bytes_per_s; });
    e.all_reduce.alpha_s = field([](const NodeConstants& n) { return n.all_reduce.alpha_s; });
    e.all_reduce.bytes_per_s = field([](const NodeConstants& n) { return n.all_reduce.bytes_per_s; });
  }
  out.description += " (element-wise median of " + std::to_string(runs.size()) + " calibrations)";
  return out;
}

CostConstants read_constants(const std::string& path) {
  return constants_from_json(read_file(path, "cost constants"), path);
}

void merge_constants_file(const std::string& path, const CostConstants& c) {
  CostConstants merged = c;
  if (std::filesystem::exists(path)) {
    CostConstants old = read_constants(path);
    if (old.device == c.device) {
      for (const NodeConstants& n : old.nodes) {
        bool replaced = false;
        for (const NodeConstants& m : c.nodes) replaced = replaced || m.ranks == n.ranks;
        if (!replaced) merged.nodes.push_back(n);
      }
    }
  }
  std::sort(merged.nodes.begin(), merged.nodes.end(),
            [](const NodeConstants& a, const NodeConstants& b) { return a.ranks < b.ranks; });
  write_file_atomic(path, constants_to_json(merged));
}

}  // namespace moe
