// A study's report: the runs of a study directory read back (run.json, then metrics.jsonl or bench.csv of
// each) and written as summary.md, summary.csv and plots/ (docs/STUDIES.md).
#pragma once

#include <string>

namespace moe {

// The mark the runner leaves in a run's directory when the run finished (exit code 0).
inline constexpr const char* kStudyDoneMark = "done";

// Reads every run of the study in `out`, writes summary.md, summary.csv and plots/ (data, gnuplot scripts,
// and PNGs when gnuplot runs), and returns the Markdown text. Runs that did not finish are listed as such.
// `plot_note` gets what happened to the plots (made, or why not).
std::string report_study(const std::string& out, std::string* plot_note);

}  // namespace moe
