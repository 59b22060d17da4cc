#!/usr/bin/env bash
# Fault injection: a job is killed, stopped, signalled, doubled or starved of disk, and must end the way
# docs/ARCHITECTURE.md "Errors" promises: every process gone within seconds, one line naming what
# happened, no checkpoint lost or half-loaded, and a resume that continues bit for bit.
#
#   faults.sh CASE BUILD_DIR
#
# Cases: kill_rank kill_mpirun sigterm sigstop kill_during_save restart two_jobs disk_full. Exit 77: skipped.
#
# How long a fault may take to end a job follows from the deadline, not from the machine's speed:
# runtime.comm_timeout_s = T (set in run.yaml) and the stagger docs/ARCHITECTURE.md "A dead or stuck
# peer" documents (ranks give up 0.25 s apart in world-rank order, at most 2 s). A rank left waiting on a
# dead or stopped peer enters a collective within a step of the fault (milliseconds here; a save of this
# model takes well under T), gives up T + its stagger later and aborts the job; mpirun usually ends it
# sooner, as it sees a rank die at once. On a loaded machine (2 cores, 4 ranks, builds beside) the abort
# and the teardown get another T. So every process is gone within 2T + 2 s of a fault, and a stopped
# rank ends the job within the same bound. T = 10 s leaves healthy waits (a save's fsyncs on a busy disk)
# far from the deadline.
set -u
case_name=$1 build=$(realpath "$2")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
launch=$(realpath "$here/../../launch/moe")
export MOE_BUILD_DIR=$build OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
work=$(mktemp -d)
cleanup() {
  pkill -9 -f "$work/" 2>/dev/null
  mountpoint -q "$work/full" 2>/dev/null && umount "$work/full"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
cd "$work"
timeout_s=10 stagger_s=2
gone_within=$((2 * timeout_s + stagger_s))

fail() { echo "FAIL ($case_name): $*"; exit 1; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
# The processes of this test's jobs (their command lines name $work): the ranks and mpirun.
ranks() { pgrep -f "^$build/moe_train $work/"; }
mpirun_pid() { pgrep -f "^mpirun .*$work/" | head -1; }
alive() { [[ -n $(ranks) || -n $(mpirun_pid) ]]; }
# Waits until no process of the job is left; fails after $1 seconds.
expect_gone_within() {
  local limit=$1 t0
  t0=$(now)
  while alive; do
    (($(echo "$(since "$t0") > $limit" | bc))) && fail "processes still running $limit s later: $(pgrep -af "$work/" | head -3)"
    sleep 0.1
  done
  echo "every process gone $(since "$t0") s after the fault"
}
# Prints the first line of file $1 that matches the extended regex $2 once there is one; returns 1 (saying
# why on stderr) when process $3 (the job's launch/moe) ends without it, or after 60 s.
wait_for_line() {
  local t0 line
  t0=$(now)
  until line=$(grep -E -m1 "$2" "$1" 2>/dev/null); do
    if ! kill -0 "$3" 2>/dev/null; then
      line=$(grep -E -m1 "$2" "$1" 2>/dev/null) && break
      echo "the job ended without printing '$2'" >&2
      return 1
    fi
    (($(echo "$(since "$t0") > 60" | bc))) && { echo "no line '$2' within 60 s" >&2; return 1; }
    sleep 0.05
  done
  echo "$line"
}
# Waits until the metrics file has at least $1 lines (the job is training); fails after 60 s.
wait_for_steps() {
  local t0
  t0=$(now)
  local n=0
  while ((n < $1)); do
    n=$(grep -c '"loss"' metrics.jsonl 2>/dev/null)
    n=${n:-0}
    (($(echo "$(since "$t0") > 60" | bc))) && fail "the job did not reach step $1 within 60 s"
    sleep 0.05
  done
}
# step, loss, ce of every step line: what a bit-exact resume must reproduce.
curve() { grep -o '^{"step":[0-9]*,"loss":[^,]*,"ce":[^,]*' "$1"; }

cat > run.yaml <<YAML
parallel: {ep: 4}
model: {hidden: 32, layers: 2, seq_len: 32, heads: 4}
moe: {num_experts: 4, top_k: 2, ffn_hidden: 32, num_shared_experts: 1, capacity_factor: 1.25, group_size: 256}
runtime: {comm_timeout_s: $timeout_s}
train: {steps: 120, batch_size: 32, lr: 0.01, warmup_steps: 5, log_every: 1000, checkpoint_dir: $work/ck,
        checkpoint_every: 5, metrics_path: $work/metrics.jsonl, keep_checkpoints: 2}
data: {source: synthetic}
YAML
config=$work/run.yaml
job() { "$launch" run "$config" -n 4 "$@"; }  # in the background: "$launch" run ... & (so that $! is it)

reference() {  # the uninterrupted run's curve, in reference.jsonl
  job --train.checkpoint_dir= --train.metrics_path="$work/reference.jsonl" >ref.out 2>ref.err || fail "reference run failed"
}
resume_matches_reference() {
  local rc=0
  job --train.resume=auto >resume.out 2>resume.err || rc=$?
  ((rc == 0)) || { cat resume.err; fail "the resumed run exited with $rc"; }
  grep -q "resumed from" resume.out || fail "the second run did not resume"
  diff <(curve reference.jsonl) <(curve metrics.jsonl) >/dev/null || fail "the resumed run differs from the uninterrupted one"
  echo "resumed at $(grep -o 'resumed from [^ ]*' resume.out), the curve matches the uninterrupted run bit for bit"
}

case $case_name in
  kill_rank)  # kill -9 of one rank
    reference
    "$launch" run "$config" -n 4 >job.out 2>job.err &
    wait_for_steps 30
    victim=$(ranks | sed -n 3p)
    kill -9 "$victim"
    expect_gone_within "$gone_within"
    wait
    grep -E "moe: rank [0-9]+ on host .* died: killed by signal 9" job.err || { cat job.err; fail "the dead rank is not named"; }
    resume_matches_reference ;;
  kill_mpirun)  # kill -9 of mpirun itself
    reference
    "$launch" run "$config" -n 4 >job.out 2>job.err &
    wait_for_steps 30
    kill -9 "$(mpirun_pid)"
    expect_gone_within "$gone_within"
    wait
    resume_matches_reference ;;
  sigterm)  # a scheduler's SIGTERM: final checkpoint, exit 143, resume bit for bit
    reference
    "$launch" run "$config" -n 4 >job.out 2>job.err &
    pid=$!
    wait_for_steps 30
    t0=$(now)
    kill -TERM "$pid"
    rc=0
    wait "$pid" || rc=$?
    echo "exit code $rc $(since "$t0") s after SIGTERM"
    ((rc == 143)) || { cat job.err; fail "exit code $rc, expected 143 (stopped by SIGTERM)"; }
    grep -E "stopped by a signal .* final checkpoint" job.out || fail "no final-checkpoint line"
    expect_gone_within "$gone_within"
    resume_matches_reference ;;
  sigstop)  # one rank stopped: the others give up after runtime.comm_timeout_s, naming the operation
    "$launch" run "$config" -n 4 --train.steps=100000 >job.out 2>job.err &
    wait_for_steps 20
    kill -STOP "$(ranks | sed -n 2p)"
    t0=$(now)
    rc=0
    wait || rc=$?
    elapsed=$(since "$t0")
    echo "job ended $elapsed s after SIGSTOP"
    (($(echo "$elapsed < $gone_within" | bc))) ||
      fail "took $elapsed s, more than 2 x the $timeout_s s timeout + the $stagger_s s stagger"
    [[ $(grep -c "error:" job.err) -eq 1 ]] || { cat job.err; fail "expected one error line"; }
    # the stop may come during a step or during one of the checkpoints saved every 5 steps
    grep -E "error: mpi [a-z_]+ on the [a-z]+ group .* during (step [0-9]+|the checkpoint of step [0-9]+)" job.err ||
      { cat job.err; fail "the line does not name the operation, group and step"; }
    expect_gone_within "$gone_within" ;;
  kill_during_save)  # kill -9 inside a save: the test hook holds the save of step 10 open between the rank
    # files and the manifest (train/checkpoint.cc), the kill lands there, the resume takes step 5
    reference
    MOE_TEST_PAUSE_IN_SAVE=10:$((6 * timeout_s)) "$launch" run "$config" -n 4 >job.out 2>job.err &
    pid=$!
    marker=$(wait_for_line job.out "^moe test hook: pid [0-9]+ pauses .* in the save of step 10," "$pid") ||
      { cat job.out job.err; fail "the save of step 10 never paused: the test hook was not reached"; }
    saver=$(sed -E 's/^moe test hook: pid ([0-9]+) .*/\1/' <<<"$marker")
    # Inside the save: every rank's file is written, the index and the manifest are not, latest is step 5.
    step=ck/step_00000010
    [[ $(ls $step/rank_*.safetensors 2>/dev/null | wc -l) -eq 4 ]] || { ls -la $step; fail "the rank files are not all written"; }
    [[ ! -e $step/manifest.json && ! -e $step/model.safetensors.index.json ]] || fail "the paused save already vouches for its files"
    [[ $(<ck/latest) == step_00000005 ]] || fail "latest names $(<ck/latest), not step_00000005"
    kill -9 "$saver"
    expect_gone_within "$gone_within"
    wait
    grep -E "moe: rank 0 on host .* died: killed by signal 9" job.err || { cat job.err; fail "rank 0 is not named as killed"; }
    ! grep -q "error:" job.err || { cat job.err; fail "the job ended by an error, not by the kill inside the save"; }
    [[ ! -e $step/manifest.json && $(<ck/latest) == step_00000005 ]] || fail "the killed save was completed"
    resume_matches_reference
    grep -q "resumed from .*step_00000005" resume.out || fail "the resume did not take step 5, the newest complete checkpoint"
    echo "killed inside the save of step 10 (rank files written, no manifest); resumed from step 5" ;;
  restart)  # --max-restarts relaunches a job whose rank died; --elastic resumes on the ranks still there
    echo 4 > available
    MOE_AVAILABLE_RANKS=$work/available "$launch" run "$config" -n 4 --max-restarts 2 --elastic \
      >job.out 2>job.err &
    pid=$!
    wait_for_steps 30
    echo 2 > available  # a node is gone: two ranks left
    kill -9 "$(ranks | sed -n 2p)"
    rc=0
    wait "$pid" || rc=$?
    ((rc == 0)) || { cat job.err; fail "exit code $rc after the restart"; }
    grep -q "restart 1 of 2" job.err || { cat job.err; fail "no restart"; }
    grep -q -- "--elastic: 2 ranks available" job.err || { cat job.err; fail "the restart did not shrink to 2 ranks"; }
    grep -q "moe_train: 2 ranks, ep 2" job.out || fail "the restart did not run on 2 ranks with ep 2"
    grep -E '"event":"resume".*"lost_steps":[0-9]+' metrics.events.jsonl || fail "no resume event in the events file"
    [[ $(curve metrics.jsonl | tail -1) == '{"step":120,'* ]] || fail "the restarted run did not reach step 120"
    [[ $(curve metrics.jsonl | wc -l) -eq 120 ]] || fail "the metrics do not hold each step once"
    [[ $(wc -l < metrics.jsonl) -eq 120 ]] || fail "the metrics file holds more than its 120 step lines"
    echo "restarted on 2 ranks after the kill; $(grep -o '"lost_steps":[0-9]*' metrics.events.jsonl) redone" ;;
  two_jobs)  # a second job on the same checkpoint directory refuses
    "$launch" run "$config" -n 4 --train.steps=100000 >a.out 2>a.err &
    wait_for_steps 10
    rc=0
    job --train.steps=5 --train.resume=auto --train.metrics_path= >b.out 2>b.err || rc=$?
    ((rc != 0)) || fail "the second job ran"
    grep -E "error: .*ck: in use by another job \(pid [0-9]+ on .*\)" b.err || { cat b.err; fail "no clear refusal"; }
    [[ $(grep -c "error:" b.err) -eq 1 ]] || fail "expected one error line"
    kill -USR1 "$(mpirun_pid)"  # the first job stops after a checkpoint
    wait
    rc=0
    job --train.steps=5 >c.out 2>c.err || rc=$?
    grep -E "already holds checkpoints .*--train.resume=auto.*--train.overwrite=true" c.err ||
      { cat c.err; fail "a fresh run into a directory with checkpoints did not refuse"; } ;;
  disk_full)  # the checkpoint directory on a 1 MiB tmpfs: a clear error, and latest stays complete
    mkdir full
    mount -t tmpfs -o size=1m tmpfs full 2>/dev/null || { echo "skipped: cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)"; exit 77; }
    rc=0
    job --train.checkpoint_dir="$work/full/ck" --train.checkpoint_every=1 --model.hidden=64 >job.out 2>job.err || rc=$?
    ((rc != 0)) || fail "the run did not notice the full disk"
    grep -E "error: .*(No space left on device|cannot write)" job.err || { cat job.err; fail "no clear disk-full line"; }
    [[ $(grep -c "error:" job.err) -eq 1 ]] || fail "expected one error line"
    if [[ -f full/ck/latest ]]; then
      job --train.checkpoint_dir="$work/full/ck" --train.resume=auto --train.steps=1 --model.hidden=64 >r.out 2>r.err
      grep -q "resumed from\|nothing left\|no checkpoint" r.out r.err || { cat r.err; fail "latest does not load after the disk filled"; }
    fi ;;
  *) echo "unknown case $case_name"; exit 1 ;;
esac
echo "ok ($case_name)"
