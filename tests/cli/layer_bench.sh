#!/usr/bin/env bash
# moe_bench layer end to end on 1 and 3 ranks: every row correct (#wrong 0), positive times, and the
# exchange columns: the layer's forward exchanges (a2a) timed on every rank count, the raw all_to_all of
# the same bytes only where there is someone to exchange with. The table carries the same columns.
#
#   layer_bench.sh MOE_BENCH MPIEXEC
set -u
bench=$(realpath "$1") mpiexec=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
fail() { echo "FAIL: $*"; exit 1; }
shape=(--tokens=64 --hidden=32 --experts=6 --top_k=2 --shared=0,1 --iters=2 --warmup=1)

for n in 1 3; do
  "$mpiexec" -q --oversubscribe -np $n "$bench" layer "${shape[@]}" --format=json > rows$n.json 2> err$n.log ||
    { cat err$n.log rows$n.json; fail "moe_bench layer on $n ranks"; }
  python3 - "$n" <<'PY' || fail "rows on $n ranks"
import json, sys
n = int(sys.argv[1])
rows = [json.loads(l) for l in open(f"rows{n}.json") if l.startswith("{")]
assert [r["shared"] for r in rows] == [0, 1], rows
for r in rows:
    assert r["ranks"] == n and r["wrong"] == 0, r
    # Containment, not a speed ratio, so it holds however loaded the machine: each iteration's exchange
    # phase is a stretch of that iteration's timed interval, so the median over the same iterations is
    # at most the interval's median, and the slowest rank's at most the slowest rank's.
    assert r["time_ms"] > 0 and r["exchange_ms"] > 0 and r["exchange_ms"] <= r["time_ms"], r
    assert (r["raw_a2a_ms"] > 0) == (n > 1), r
PY
done

"$mpiexec" -q --oversubscribe -np 3 "$bench" layer "${shape[@]}" > table.txt 2>&1 || { cat table.txt; fail "table"; }
grep -q 'a2a(ms)  raw(ms)  #wrong' table.txt || { cat table.txt; fail "table header"; }
grep -q '^# Avg ratio: .*all rows correct' table.txt || { cat table.txt; fail "table verdict"; }
echo "layer bench: 1 and 3 ranks, json and table"
