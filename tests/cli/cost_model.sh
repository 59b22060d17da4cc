#!/usr/bin/env bash
# The cost model end to end: moe_bench calibrate on 1 and 3 ranks adds one entry each to a constants
# file; moe_study predict prints a row per rank count with a positive step time that grows with the
# tokens per rank; bad input (no constants, a damaged constants file, a batch that does not divide, a
# study directory without runs) is one clear error line and a non-zero exit.
#
#   cost_model.sh MOE_BENCH MOE_STUDY MPIEXEC SOURCE_DIR
set -u
bench=$(realpath "$1") study=$(realpath "$2") mpiexec=$3 src=$(realpath "$4")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
fail() { echo "FAIL: $*"; exit 1; }

for n in 1 3; do
  "$mpiexec" -q --oversubscribe -np $n "$bench" calibrate --out=k.json --quick=1 --iters=2 > cal$n.log 2>&1 ||
    { cat cal$n.log; fail "calibrate on $n ranks"; }
done
python3 - <<'PY' || fail "constants file"
import json
k = json.load(open("k.json"))
assert [n["ranks"] for n in k["nodes"]] == [1, 3], k["nodes"]
for n in k["nodes"]:
    assert len(n["gemm"]["seconds"]) == 27 and min(n["gemm"]["seconds"]) > 0
    for f in ("stream_bytes_per_s", "softmax_elems_per_s", "swiglu_elems_per_s", "adamw_params_per_s", "step_efficiency"):
        assert n[f] > 0, f
assert k["nodes"][1]["all_to_all"]["bytes_per_s"] < 1e20, "3 ranks: a fitted all_to_all"
PY

for b in 4 8; do
  "$study" predict "$src/configs/gpt-moe.yaml" --constants=k.json --ranks=1,3 --batch-per-rank=$b --format=csv \
    > p$b.csv 2> p.err || { cat p.err; fail "predict"; }
done
python3 - <<'PY' || fail "predict table"
import csv
small, big = (list(csv.DictReader(open(f"p{b}.csv"))) for b in (4, 8))
assert [r["ranks"] for r in small] == ["1", "3"] and [r["ep"] for r in small] == ["1", "1"], small
for s, b in zip(small, big):
    assert float(s["step ms"]) > 0 and int(b["tokens/rank"]) == 2 * int(s["tokens/rank"])
    assert float(b["step ms"]) > 1.5 * float(s["step ms"]), f"twice the tokens per rank: {b['step ms']} vs {s['step ms']}"
PY

expect_error() {  # expect_error TEXT COMMAND...: exit non-zero, one error line containing TEXT
  local text=$1
  shift
  "$@" > out.txt 2> err.txt && fail "$* succeeded"
  [[ $(grep -c "error:" err.txt) -eq 1 ]] || { cat err.txt; fail "$*: not one error line"; }
  grep -qF "$text" err.txt || { cat err.txt; fail "$*: no '$text'"; }
}
expect_error "no cost constants" "$study" predict "$src/configs/gpt-moe.yaml"
expect_error "train.batch_size" "$study" predict "$src/configs/gpt-moe.yaml" --constants=k.json --ranks=3
echo '{"nodes": [{"ranks": 1, "gemm": {"flops_per_s": 1e9}}]}' > bad.json
expect_error "missing field 'stream_bytes_per_s'" "$study" predict "$src/configs/gpt-moe.yaml" --constants=bad.json
mkdir empty
expect_error "no finished training runs" "$study" validate empty --constants=k.json
echo "cost model: ok"
