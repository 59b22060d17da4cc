// What every entry point shares: MPI start-up, the one place errors are caught, and config loading.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <memory>

#include "comm/communicator.h"
#include "runtime/backend.h"
#include "config/config.h"
#include "base/error.h"

namespace moe {

// Starts MPI, runs body, and is the only catch site: an error prints one line
//   <program>: error: <what> [(config key <key>)]
// and stops the job (exit codes: base/exit_codes.h): cleanly (kInvalid) when every rank raised it
// together (a collective config error), otherwise through MPI_Abort so no rank is left waiting
// (kPeerLost when a peer died or is stuck, a CommError; kError otherwise). body's own return value is the
// exit code otherwise (moe_train: kOk, or 128 + the signal that stopped it after a final checkpoint).
int run_job(int argc, char** argv, const char* program, const std::function<int()>& body);

struct CommandLine {
  std::string config_path;             // first positional argument, or ""
  std::vector<std::string> overrides;  // "section.key=value"
  std::vector<std::string> flags;      // other "--name" options, without "--"
  std::vector<std::string> positional; // positional arguments after the config path
};
// Splits argv: "--section.key=value" and "--section.key value" are overrides, other "--x" are flags.
CommandLine parse_command_line(int argc, char** argv, int first);

// Rank 0 reads the YAML file and broadcasts it; every rank parses and (unless told not to) validates the
// same text for a run on world.size() ranks, so a configuration error is raised by every rank together
// (marked collective).
Config load_config(const CommandLine& cl, Communicator& world, ConfigSources* sources, bool validate = true);

// The op backend of runtime.device: the CPU, or CUDA device (local rank mod visible devices). Collective
// over `world`: when any rank cannot get its device, every rank throws the same (collective) error.
std::unique_ptr<Backend> make_backend(const Config& config, Communicator& world);
// The ep x dp mesh over `world` (MPI), or over NCCL wrapping it when runtime.comm resolves to nccl.
ProcessGroups make_groups(const Config& config, Backend& backend, std::unique_ptr<Communicator> world);

// Prints `usage` and returns true when argv asks for --help (or -h); main() then returns 0.
bool print_usage_if_asked(int argc, char** argv, const char* usage);

// Usage text listing every configuration key, its type and default.
std::string config_help();

}  // namespace moe
