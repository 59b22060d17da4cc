#!/usr/bin/env bash
# The checkpoint tools end to end through launch/moe (docs/ARCHITECTURE.md "Checkpoints"):
#
#   checkpoint_tools.sh tools BUILD_DIR   reshard + resume, export, import + eval, upcycle + eval, and the
#                                         errors each refuses with
#   checkpoint_tools.sh torch BUILD_DIR   tools/export_loss.py on an export computes the validation loss the
#                                         training run logged (exit 77, skipped, without python3 + torch)
set -u
case_name=$1 build=$(realpath "$2")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(realpath "$here/../..")
launch=$root/launch/moe
export MOE_BUILD_DIR=$build OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

fail() { echo "FAIL ($case_name): $*"; exit 1; }
# Runs launch/moe and fails unless it exits 0.
ok() { "$launch" "$@" > out.txt 2>&1 || { cat out.txt; fail "launch/moe $* exited non-zero"; }; }
# Runs launch/moe, which must fail with an error line containing $1.
refused() {
  local want=$1
  shift
  if "$launch" "$@" > out.txt 2>&1; then cat out.txt; fail "launch/moe $* succeeded"; fi
  grep -q -- "$want" out.txt || { cat out.txt; fail "launch/moe $* did not say '$want'"; }
  echo "refused as expected: $(grep -m1 'error' out.txt)"
}
# The validation loss `launch/moe eval` prints for a checkpoint ("model <nats> <bits>").
eval_loss() { "$launch" eval "$@" 2>&1 | awk '$1 == "model" { print $2 }'; }

python=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" > /dev/null && "$p" -c "import torch" 2> /dev/null; then python=$p; break; fi
done
if [[ $case_name == torch && -z $python ]]; then
  echo "SKIPPED: no python3 with torch here (tools/export_loss.py needs it)"
  exit 77
fi
if [[ $case_name == tools ]] && command -v python3 > /dev/null; then  # the loader at least compiles
  python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' "$root/tools/export_loss.py" 2> out.txt ||
    { cat out.txt; fail "tools/export_loss.py does not parse"; }
fi

"$build/moe_data" synthetic val.bin 4097 7 64 > /dev/null || fail "no validation file"
cat > run.yaml <<YAML
model: {hidden: 32, layers: 2, heads: 2, seq_len: 16, vocab_size: 64}
train: {batch_size: 16, log_every: 1000, eval_tokens: 0}
data: {source: synthetic, val_path: $work/val.bin}
YAML
common=("$work/run.yaml")
moe=(--moe.num_experts=4 --moe.top_k=2 --moe.ffn_hidden=32 --moe.num_shared_experts=1 --moe.group_size=16)

# An MoE run on 4 ranks (ep 4) whose last step is evaluated: the reference every tool is checked against.
ok run -n 4 "${common[@]}" "${moe[@]}" --parallel.ep=4 --train.steps=6 --train.eval_every=6 \
   --train.checkpoint_dir="$work/ck" --train.checkpoint_every=6 --train.metrics_path="$work/metrics.jsonl"
logged=$(grep -o '"val_loss":[^,]*' metrics.jsonl | tail -1 | cut -d: -f2)
[[ -n $logged ]] || fail "no val_loss in the metrics"

if [[ $case_name == torch ]]; then
  ok export ck --out "$work/ex"
  ok export ck --out "$work/ex16" --dtype bf16
  for pair in "ex:1e-5" "ex16:2e-2"; do
    dir=${pair%%:*} tol=${pair##*:}
    got=$("$python" "$root/tools/export_loss.py" "$work/$dir" val.bin) || fail "export_loss.py failed on $dir"
    echo "$dir: $got (training logged $logged)"
    loss=$(awk '{ print $2 }' <<< "$got")
    awk -v a="$loss" -v b="$logged" -v t="$tol" 'BEGIN { d = (a - b) / b; if (d < 0) d = -d; exit !(d <= t) }' ||
      fail "$dir: PyTorch loss $loss vs logged $logged: relative difference above $tol"
  done
  echo "PASS ($case_name)"
  exit 0
fi

# reshard: ep 4 -> 2, resumed on 2 ranks; the index names the new files
ok reshard ck --ep 2 --out "$work/r2"
grep -q '"layers.1.moe.experts.3.w_up":"rank_00001.safetensors"' r2/step_00000006/model.safetensors.index.json ||
  fail "the resharded index does not put expert 3 in rank_00001"
ok run -n 2 "${common[@]}" "${moe[@]}" --parallel.ep=2 --train.steps=8 --train.resume="$work/r2/step_00000006"
refused "ep 3 does not divide moe.num_experts 4" reshard ck --ep 3 --out "$work/r3"
refused "already holds checkpoints" reshard ck --ep 2 --out "$work/r2"

# export + import: the imported checkpoint evaluates like the original, on another number of ranks
ok export ck --out "$work/ex"
[[ -s ex/model.safetensors && -s ex/config.json ]] || fail "export wrote no model.safetensors / config.json"
refused "already holds an export" export ck --out "$work/ex"
ok import ex --out "$work/im"
want=$(eval_loss ck -n 2) got=$(eval_loss im -n 3)
[[ -n $want && $want == "$got" ]] || fail "imported checkpoint evaluates to '$got', the original to '$want'"
echo "eval: original $want, imported $got"

# upcycle: a dense run, then an MoE model from it that starts at the dense loss (copies, dropless)
ok run -n 2 "${common[@]}" --moe.num_experts=0 --model.ffn_hidden=64 --train.steps=4 \
   --train.checkpoint_dir="$work/dense" --train.checkpoint_every=4
cat > moe.yaml <<YAML
model: {hidden: 32, layers: 2, heads: 2, seq_len: 16, vocab_size: 64, ffn_hidden: 64}
moe: {num_experts: 4, top_k: 2, ffn_hidden: 64, capacity_factor: 0}
train: {batch_size: 16, eval_tokens: 0}
data: {source: synthetic, val_path: $work/val.bin}
YAML
ok upcycle dense --config moe.yaml --out "$work/up"
want=$(eval_loss dense -n 2) got=$(eval_loss up -n 2)
[[ -n $want && $want == "$got" ]] || fail "upcycled model evaluates to '$got', the dense one to '$want'"
echo "upcycle: dense $want, upcycled $got"
refused "upcycling starts from a dense checkpoint" upcycle ck --config moe.yaml --out "$work/up2"
refused "moe.expert_type" upcycle dense --config moe.yaml --moe.expert_type=gelu --out "$work/up3"
refused "launch/moe upcycle" run -n 2 "${common[@]}" "${moe[@]}" --parallel.ep=2 --train.steps=6 \
   --model.ffn_hidden=64 --train.resume="$work/dense/step_00000004"
echo "PASS ($case_name)"
