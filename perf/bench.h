// One engine for every benchmark of moe_bench, as nccl-tests' testColl/testEngine and ggml's perf mode.
//
// A benchmark is a Bench: its rows (the points of a Sweep, or sizes), its columns, and per row a timed
// run() and a check() that counts wrong results. The engine owns the rest: the options every benchmark
// takes (--iters, --warmup, --format), warm-up and timed repetitions each started by every rank together
// after a barrier and ended by a device synchronisation, the median, the slowest rank, the table / JSON /
// CSV printers, and the exit code (1 when any row is wrong).
//
// Output, the same for every benchmark:
//   table  "# " comment lines, a header, one line per row with a #wrong column, and a last line
//          "# <summary>   all rows correct" (or "WRONG RESULTS");
//   json   one object per row: every column by its key, and "wrong";
//   csv    one header (the union of the benches' column keys, then "wrong") and one line per row.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "config/sweep.h"
#include "runtime/backend.h"

namespace moe {

enum class BenchFormat : uint8_t { kTable, kJson, kCsv };

struct BenchOptions {
  BenchFormat format = BenchFormat::kTable;
  int iters = 10, warmup = 2;        // timed repetitions per row, and untimed ones before them
  std::map<std::string, long> ints;  // the benchmark's own integer flags, with their defaults
  std::map<std::string, std::string> strings;  // its own text flags (calibrate's --out)
  Sweep sweep;                       // configuration keys; a row per combination where the bench sweeps
  long get(const std::string& name) const { return ints.at(name); }
};

// Parses a benchmark's options ("name=value", without the leading "--"): --format=table|json|csv, --iters,
// --warmup, the integer flags named in `ints` (name -> default, each >= its minimum in `minimums`), the
// text flags named in `strings`, and configuration keys given as section.key=value or by a short name
// (tokens, hidden, experts, top_k, shared, ffn_hidden, capacity_factor, expert_type, force_routing,
// threads, dtype, device, precision), after the `defaults` overrides. Throws ConfigError (collective).
struct BenchFlags {
  std::vector<std::string> defaults;  // configuration overrides applied first
  int iters = 10, warmup = 2;
  std::map<std::string, long> ints, minimums;
  std::map<std::string, std::string> strings;
};
BenchOptions parse_bench_options(const std::string& what, const std::vector<std::string>& options,
                                 const BenchFlags& flags);

// A column of a benchmark's rows.
struct Column {
  std::string key;     // its name in JSON and CSV ("time_ms")
  std::string header;  // its heading in the table ("time(ms)"); empty: JSON and CSV only
  int width = 8;       // table width, right-aligned
  int digits = 2;      // decimals of a number in the table
  double table_scale = 1;  // the table shows the number times this (100: a fraction as a percentage)
};

// A cell: a number (integer or not), or text.
struct Cell {
  Cell(double v) : number(v) {}
  Cell(int64_t v) : number(static_cast<double>(v)), integer(true) {}
  Cell(int v) : number(v), integer(true) {}
  Cell(std::string v) : text(std::move(v)), is_text(true) {}
  Cell(const char* v) : text(v), is_text(true) {}
  double number = 0;
  bool integer = false;
  std::string text;
  bool is_text = false;
};

class BenchRun;

class Bench {
 public:
  virtual ~Bench() = default;
  // Comment lines above its table (without "# "); called after setup(0).
  virtual std::vector<std::string> title(BenchRun& run) = 0;
  virtual std::vector<Column> columns() const = 0;
  virtual size_t num_rows() const = 0;
  // Builds row i's inputs (not timed). Collective.
  virtual void setup(BenchRun& run, size_t i) = 0;
  // Before each repetition, outside the timed window (zeroing gradients, say).
  virtual void prepare(BenchRun& run, size_t i) {}
  // One repetition of row i's timed work (warm-up or timed).
  virtual void run(BenchRun& run, size_t i) = 0;
  // After each repetition, outside the timed window; `timed` is false for the warm-up.
  virtual void after(BenchRun& run, size_t i, bool timed) {}
  // The slowest rank's median seconds of row i: by default the engine times run(); a bench whose work is
  // timed elsewhere (another process) overrides it. Collective.
  virtual double seconds(BenchRun& run, size_t i);
  // Results of row i's last repetition that are wrong, summed over every rank (-1: nothing to check, shown
  // as "-"). Collective.
  virtual int64_t check(BenchRun& run, size_t i) = 0;
  // Row i's cells in column order, given its seconds (collective: a row may time more through `run`).
  virtual std::vector<Cell> cells(BenchRun& run, size_t i, double seconds) = 0;
  // Releases row i's state.
  virtual void teardown(size_t i) {}
  // Printed before the verdict on the table's last line ("Avg ratio: 0.85"), or "".
  virtual std::string summary() const { return ""; }
};

// One row's result.
struct RowResult {
  std::vector<Cell> cells;
  double seconds = 0;
  int64_t wrong = 0;
};

class BenchRun {
 public:
  BenchRun(Backend& backend, ProcessGroups& groups, const BenchOptions& options);

  Backend& backend() { return backend_; }
  ProcessGroups& groups() { return groups_; }
  const BenchOptions& options() const { return options_; }

  // The slowest rank's median seconds of f over `iters` repetitions after `warmup` more, each started by
  // every rank together after a barrier and ended by a device synchronisation; `prepare` runs before each
  // repetition and `after(timed)` after it, both outside the timed window. iters/warmup < 0: the options'.
  // Collective over the world.
  double time(const std::function<void()>& f, int iters = -1, int warmup = -1,
              const std::function<void()>& prepare = {}, const std::function<void(bool)>& after = {});
  // The largest value over the world's ranks, and the sum. Collective.
  double slowest(double v);
  double sum(double v);

  // Row i of a bench, measured: setup, timing, check, cells, teardown. Collective.
  RowResult measure(Bench& bench, size_t i);
  // Every row of every bench, printed in the options' format on rank 0; returns the exit code (1 when a
  // row is wrong). Collective.
  int execute(const std::vector<Bench*>& benches);

 private:
  Backend& backend_;
  ProcessGroups& groups_;
  BenchOptions options_;
};

double median(std::vector<double> v);

// The swept keys of `sweep` that are not in `shown`: each gets a column of its own (swept_column: key the
// full key, heading the key's name after its section), so rows that differ only there tell apart.
std::vector<std::string> other_swept_keys(const Sweep& sweep, const std::vector<std::string>& shown);
Column swept_column(const std::string& key);

}  // namespace moe
