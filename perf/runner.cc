// The runners: jobs under launch/moe, each in a process group of its own, for studies and calibration.
#include "perf/runner.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "base/error.h"
#include "base/exit_codes.h"
#include "perf/cost_constants.h"
#include "perf/study_report.h"
#include "train/safetensors.h"

namespace moe {
namespace fs = std::filesystem;
namespace {

volatile sig_atomic_t g_child_group = 0;  // the running job's process group, to pass signals on to
volatile sig_atomic_t g_signal = 0;       // the last signal this process got

void pass_on(int signal) {
  g_signal = signal;
  if (g_child_group > 0) ::kill(-g_child_group, signal);
}

void say(const std::string& line) { std::cerr << "moe_study: " << line << std::endl; }

// The job of one run: launch/moe run (training) or launch/moe bench layer (a layer comparison).
std::vector<std::string> job_argv(const StudyRun& r, const std::string& launcher) {
  std::vector<std::string> argv{launcher};
  if (r.mode == "layer") {
    argv.insert(argv.end(), {"bench", "layer", "-n", std::to_string(r.ranks)});
    argv.insert(argv.end(), r.args.begin(), r.args.end());
  } else {
    argv.insert(argv.end(), {"run", r.config, "-n", std::to_string(r.ranks)});
    for (const std::string& a : r.args) argv.push_back("--" + a);
  }
  return argv;
}

// Runs argv in a process group of its own with stdout to `out_fd` and stderr to `err_fd`, or, when
// `tee` is set, both through a pipe to `tee` and to this process's stdout. Returns the exit code
// (128 + the signal when a signal ended it).
int run_job(const std::vector<std::string>& argv, int out_fd, int err_fd, std::ofstream* tee) {
  int pipe_fds[2] = {-1, -1};
  if (tee && ::pipe(pipe_fds) != 0) throw InputError("moe_study", std::string("pipe: ") + std::strerror(errno));
  const pid_t pid = ::fork();
  if (pid < 0) throw InputError("moe_study", std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    ::setpgid(0, 0);
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    if (tee) {
      ::dup2(pipe_fds[1], 1);
      ::dup2(pipe_fds[1], 2);
      ::close(pipe_fds[0]);
      ::close(pipe_fds[1]);
    } else {
      ::dup2(out_fd, 1);
      ::dup2(err_fd, 2);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "moe_study: cannot run %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // both sides, so that a signal passed on right away finds the group
  g_child_group = pid;
  if (tee) {
    ::close(pipe_fds[1]);
    char buf[4096];
    for (;;) {
      const ssize_t n = ::read(pipe_fds[0], buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      tee->write(buf, n);
      tee->flush();
      std::fwrite(buf, 1, static_cast<size_t>(n), stdout);
      std::fflush(stdout);
    }
    ::close(pipe_fds[0]);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  g_child_group = 0;
  if (WIFSIGNALED(status)) return exit_code_for_signal(WTERMSIG(status));
  return WEXITSTATUS(status);
}

// One run: its job, logged in <run>/log.txt (training: also shown as it goes; layer: the rows in
// <run>/bench.csv). Returns the exit code.
int run_one(const StudyRun& r, const fs::path& dir, const std::string& launcher) {
  const std::string log = (dir / "log.txt").string();
  if (r.mode == "layer") {
    const int out = ::open((dir / "bench.csv").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0 || err < 0) throw InputError(dir.string(), std::string("cannot write the run's files: ") + std::strerror(errno));
    const int rc = run_job(job_argv(r, launcher), out, err, nullptr);
    ::close(out);
    ::close(err);
    return rc;
  }
  std::ofstream tee(log, std::ios::trunc);
  if (!tee) throw InputError(log, "cannot write the run's log");
  return run_job(job_argv(r, launcher), -1, -1, &tee);
}

// The signals this process gets are passed on to the running job.
void pass_signals_on() {
  struct sigaction sa {};
  sa.sa_handler = pass_on;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

}  // namespace

int run_study(const StudyRunnerOptions& options) {
  const std::string& out = options.plan.out;
  if (options.fresh) fs::remove_all(out);
  const std::vector<StudyRun> runs = plan_study(options.study, options.plan);
  write_plan(options.study, options.plan, runs);
  pass_signals_on();
  int failed = 0;
  const size_t total = runs.size();
  for (size_t i = 0; i < total; ++i) {
    const StudyRun& r = runs[i];
    const fs::path dir = fs::path(out) / r.name;
    const std::string of = std::to_string(i + 1) + "/" + std::to_string(total) + " " + r.name;
    if (fs::exists(dir / kStudyDoneMark)) {
      say("study: " + of + " finished before, kept (--fresh runs it again)");
      continue;
    }
    say("study: " + of + " on " + std::to_string(r.ranks) + " ranks (log: " + (dir / "log.txt").string() + ")");
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = run_one(r, dir, options.launcher);
    if (rc == exit_code(ExitCode::kOk)) {
      std::ofstream(dir / kStudyDoneMark).flush();
      const auto s = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - t0).count();
      say("study: " + r.name + " done in " + std::to_string(s) + " s");
    } else if (g_signal != 0 || rc == exit_code(ExitCode::kInterrupted) || rc == exit_code(ExitCode::kTerminated)) {
      say("study: stopped during " + r.name + "; run the same command again to continue");
      std::string note;
      report_study(out, &note);
      return rc;
    } else {
      ++failed;
      say("study: " + r.name + " failed (exit code " + std::to_string(rc) + "), see " + (dir / "log.txt").string() +
          "; going on with the other runs");
    }
  }
  std::string note;
  std::cout << report_study(out, &note);
  say(note);
  say("study: tables in " + (fs::path(out) / "summary.md").string() + " and " + (fs::path(out) / "summary.csv").string());
  if (failed > 0) {
    std::cerr << "moe_study: error: " << failed << " of " << total << " study runs failed" << std::endl;
    return exit_code(ExitCode::kError);
  }
  return exit_code(ExitCode::kOk);
}

int run_calibration(const CalibrationOptions& options) {
  pass_signals_on();
  const fs::path parent = fs::path(options.out).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  std::vector<std::string> files;
  for (int pass = 1; pass <= options.repeats; ++pass) {
    std::string file = options.out;
    if (options.repeats > 1) {
      file += ".rep" + std::to_string(pass);
      fs::remove(file);
      files.push_back(file);
    }
    for (int n : options.ranks) {
      say("calibrate: " + std::to_string(n) + " rank(s)" +
          (options.repeats > 1 ? ", pass " + std::to_string(pass) + " of " + std::to_string(options.repeats) : ""));
      std::vector<std::string> argv{options.launcher, "bench", "calibrate", "-n", std::to_string(n), "--out=" + file};
      argv.insert(argv.end(), options.bench_args.begin(), options.bench_args.end());
      const int rc = run_job(argv, 1, 2, nullptr);
      if (rc != exit_code(ExitCode::kOk)) return rc;
    }
  }
  if (options.repeats > 1) {
    std::vector<CostConstants> passes;
    for (const std::string& f : files) passes.push_back(read_constants(f));
    write_file_atomic(options.out, constants_to_json(median_constants(passes)));
  }
  say("calibrate: constants in " + options.out);
  return exit_code(ExitCode::kOk);
}

}  // namespace moe
