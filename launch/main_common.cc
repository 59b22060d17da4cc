// MPI start-up, the single catch site, and configuration loading shared by the entry points.
#include "launch/main_common.h"

#include "base/exit_codes.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "comm/nccl/nccl_communicator.h"
#include "base/log.h"

namespace moe {

int run_job(int argc, char** argv, const char* program, const std::function<int()>& body) {
  try {
    mpi_init(&argc, &argv);
    int rank = mpi_world_rank();
    auto world = make_mpi_world();
    log_set_rank(rank, world->size());
    world.reset();
    int rc = body();
    mpi_finalize();
    return rc;
  } catch (const Error& e) {
    std::string line = std::string(program) + ": error: " + e.what();
    if (!e.key().empty() && e.kind() != ErrorKind::kConfig) line += " (config key " + e.key() + ")";
    if (e.kind() == ErrorKind::kResource) line += "; lower train.batch_size or the model's sizes";  // as bad_alloc
    if (e.collective()) {
      if (mpi_world_rank() == 0) std::fprintf(stderr, "%s\n", line.c_str());
      std::fflush(stderr);
      mpi_finalize();
      return exit_code(ExitCode::kInvalid);
    }
    const bool alone = !mpi_initialized() || mpi_world_size() == 1;
    std::fprintf(stderr, "%s%s\n", line.c_str(), alone ? "" : (" [rank " + std::to_string(mpi_world_rank()) + "]").c_str());
    std::fflush(stderr);
    const int code = exit_code(e.kind() == ErrorKind::kComm ? ExitCode::kPeerLost : ExitCode::kError);
    if (alone) {  // nobody to stop: a plain exit, without MPI_Abort's banner
      if (mpi_initialized()) mpi_finalize();
      return code;
    }
    mpi_abort(code);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: error: out of host memory [rank %d]; lower train.batch_size or the model's sizes\n",
                 program, mpi_world_rank());
    std::fflush(stderr);
    mpi_abort(exit_code(ExitCode::kError));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s [rank %d]\n", program, e.what(), mpi_world_rank());
    std::fflush(stderr);
    mpi_abort(exit_code(ExitCode::kError));
  }
}

CommandLine parse_command_line(int argc, char** argv, int first) {
  CommandLine cl;
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) == 0) {
      std::string body = a.substr(2);
      size_t eq = body.find('=');
      std::string name = body.substr(0, eq);
      if (name.find('.') != std::string::npos) {
        if (eq == std::string::npos) {
          if (i + 1 >= argc) {
            throw collective(ConfigError(name, "missing value after --" + name));  // every rank parses the same argv
          }
          body += "=" + std::string(argv[++i]);
        }
        cl.overrides.push_back(body);
      } else {
        cl.flags.push_back(body);
      }
    } else if (a == "-h") {
      cl.flags.push_back("help");
    } else if (cl.config_path.empty() && cl.positional.empty()) {
      cl.config_path = a;
    } else {
      cl.positional.push_back(a);
    }
  }
  return cl;
}

Config load_config(const CommandLine& cl, Communicator& world, ConfigSources* sources, bool validate) {
  try {
    // Rank 0 reads the file; its contents (or the failure) reach every rank.
    std::string text, failure;
    if (world.rank() == 0 && !cl.config_path.empty()) {
      std::error_code ec;
      std::ifstream in(cl.config_path);
      if (std::filesystem::is_directory(cl.config_path, ec)) {
        failure = cl.config_path + " is a directory, not a config file";
      } else if (!in) {
        failure = "cannot read config file " + cl.config_path;
      } else {
        std::ostringstream s;
        s << in.rdbuf();
        text = s.str();
      }
    }
    broadcast_string(world, failure, 0);
    if (!failure.empty()) throw ConfigError("", failure);
    broadcast_string(world, text, 0);
    Config c = parse_config(text, cl.config_path.empty() ? "(no file)" : cl.config_path, cl.overrides, sources);
    if (validate) validate_config(c, world.size());
    return c;
  } catch (Error& e) {
    e.mark_collective();
    throw;
  }
}

std::unique_ptr<Backend> make_backend(const Config& config, Communicator& world) {
  if (config.runtime.device == Device::kCpu) {
    CpuBackendOptions options;
    options.threads = config.runtime.threads;
    return make_cpu_backend(options);
  }
  // Every rank tries its device; the ranks then agree, so a missing GPU on any node is one error line
  // (from the lowest failing rank) and a clean stop everywhere.
  std::unique_ptr<Backend> backend;
  std::string failure;
  try {
    int local = mpi_local_rank();
    int count = cuda_device_count();
    if (count == 0) throw ConfigError("runtime.device", "cuda: " + cuda_unavailable_reason());
    CudaBackendOptions options;
    options.device = local % count;
    backend = make_cuda_backend(options);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  std::vector<double> failed(static_cast<size_t>(world.size()), 0.0), mine{failure.empty() ? 0.0 : 1.0};
  world.host().all_gather(mine.data(), failed.data(), 1, DType::kF64);
  for (int r = 0; r < world.size(); ++r) {
    if (failed[static_cast<size_t>(r)] == 0.0) continue;
    broadcast_string(world, failure, r);
    throw collective(ConfigError("", failure + (world.size() > 1 ? " (rank " + std::to_string(r) + ")" : "")));
  }
  return backend;
}

ProcessGroups make_groups(const Config& config, Backend& backend, std::unique_ptr<Communicator> world) {
  world->set_timeout(config.runtime.comm_timeout_s);  // the groups split from it inherit the deadline
  if (use_nccl(config)) {
    if (backend.device() != Device::kCuda) throw ConfigError("runtime.comm", "nccl needs runtime.device = cuda");
    world = make_nccl_communicator(std::move(world), backend.native_stream(), config.runtime.comm_timeout_s);
  } else if (backend.device() == Device::kCuda) {
    // The MPI communicator moves host buffers, outside the backend's stream order: the dispatcher's
    // all-to-all of device rows (and the gradient sums) would hand it device pointers, even on one rank.
    throw collective(ConfigError("runtime.comm", "mpi moves host buffers only; runtime.device = cuda needs nccl (or auto)"));  // every rank has the same configuration
  }
  return make_process_groups(std::move(world), config.parallel.ep);
}

bool print_usage_if_asked(int argc, char** argv, const char* usage) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("%s", usage);
      return true;
    }
  }
  return false;
}

std::string config_help() {
  std::ostringstream out;
  Config defaults;
  size_t w = 0;
  for (const auto& f : config_fields()) w = std::max(w, f.key.size() + f.type.size() + 3);
  for (const auto& f : config_fields()) {
    std::string head = f.key + " (" + f.type + ")";
    std::string def = f.get(defaults);
    out << "  --" << head << std::string(w - head.size() + 1, ' ') << "default " << (def.empty() ? "''" : def) << "\n";
  }
  return out.str();
}

}  // namespace moe
