#!/usr/bin/env bash
# launch/moe study end to end (moe_study run): a compare study of two tiny models runs each under mpirun,
# marks it done and reports it; a second invocation keeps what finished; a run that fails is reported and
# the others go on (exit code 1); a SIGINT to the study stops the running job after a final checkpoint
# (exit code 130) and the same command then resumes it.
#
#   study.sh CASE BUILD_DIR        CASE: runs | stop
set -u
case_name=$1 build=$(realpath "$2")
launch=$(realpath "$(dirname "${BASH_SOURCE[0]}")/../../launch/moe")
export MOE_BUILD_DIR=$build
work=$(mktemp -d)
trap 'pkill -9 -f "$work/" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
fail() { echo "FAIL ($case_name): $*"; exit 1; }

cat > tiny.yaml <<YAML
model: {hidden: 32, layers: 2, seq_len: 32, heads: 4}
moe: {num_experts: 4, top_k: 2, ffn_hidden: 32, capacity_factor: 1.25}
train: {steps: 6, batch_size: 8, lr: 0.01, warmup_steps: 2, log_every: 1000}
data: {source: synthetic}
YAML

case $case_name in
  runs)
    cat > study.yaml <<YAML
kind: compare
ranks: 2
models:
  moe: {config: tiny.yaml}
  dense: {config: tiny.yaml, set: {moe.num_experts: 0}}
YAML
    "$launch" study compare study.yaml --out out >run1.out 2>run1.err || { cat run1.err; fail "the study failed"; }
    for run in moe dense; do
      [[ -f out/$run/done ]] || fail "$run not marked done"
      [[ $(wc -l <out/$run/metrics.jsonl) -eq 6 ]] || fail "$run: not 6 step lines"
      grep -qE "^\| $run +\| done +\| 2 " out/summary.md || { cat out/summary.md; fail "$run not done in the report"; }
    done
    "$launch" study compare study.yaml --out out >run2.out 2>run2.err || { cat run2.err; fail "the second study failed"; }
    [[ $(grep -c "finished before, kept" run2.err) -eq 2 ]] || { cat run2.err; fail "finished runs ran again"; }
    # a third model that fails at run time (its token file does not exist): reported, the others kept
    cat >> study.yaml <<YAML
  broken: {config: tiny.yaml, set: {data.source: file, data.path: $work/none.bin}}
YAML
    rc=0
    "$launch" study compare study.yaml --out out >run3.out 2>run3.err || rc=$?
    ((rc == 1)) || { cat run3.err; fail "exit code $rc with a failed run, expected 1"; }
    grep -q "study: broken failed (exit code [0-9]*), see out/broken/log.txt" run3.err || { cat run3.err; fail "no failure line"; }
    grep -q "error: 1 of 3 study runs failed" run3.err || { cat run3.err; fail "no summary of the failures"; }
    grep -q "none.bin" out/broken/log.txt || fail "the failed run's log does not say why"
    grep -qE "^\| broken +\| not run" out/summary.md || { cat out/summary.md; fail "the failed run is not in the report"; }
    echo "study: two runs done and kept, a failed one reported" ;;
  stop)
    cat > study.yaml <<YAML
kind: compare
ranks: 2
models:
  long: {config: tiny.yaml, set: {train.steps: 3000}}
YAML
    "$launch" study compare study.yaml --out out >stop.out 2>stop.err &
    pid=$!
    for _ in $(seq 1 600); do  # until the job has logged a few steps (60 s at most)
      [[ $(cat out/long/metrics.jsonl 2>/dev/null | wc -l) -ge 3 ]] && break
      sleep 0.1
    done
    [[ $(wc -l <out/long/metrics.jsonl) -ge 3 ]] || { cat stop.err; fail "the run did not start"; }
    kill -INT "$pid"
    rc=0
    wait "$pid" || rc=$?
    ((rc == 130)) || { cat stop.err; fail "exit code $rc after SIGINT, expected 130"; }
    grep -q "study: stopped during long; run the same command again to continue" stop.err || { cat stop.err; fail "no stop line"; }
    grep -qE "stopped by a signal \(SIG[A-Z0-9]+\) after step [0-9]+: final checkpoint" stop.out || { cat stop.out; fail "no final checkpoint"; }
    [[ ! -f out/long/done ]] || fail "a stopped run is marked done"
    steps=$(wc -l <out/long/metrics.jsonl)
    "$launch" study compare study.yaml --out out >again.out 2>again.err || { cat again.err; fail "the resumed study failed"; }
    grep -q "resumed from out/long/checkpoints/step_" again.out || { cat again.out; fail "the run did not resume"; }
    [[ -f out/long/done && $(wc -l <out/long/metrics.jsonl) -eq 3000 ]] || fail "the resumed run did not finish"
    echo "study: stopped by SIGINT after $steps steps, resumed and finished" ;;
  *) fail "unknown case" ;;
esac
