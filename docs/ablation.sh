#!/usr/bin/env bash
# Issue #29's ablation: each lever alone on one base recipe, then combined. Every row trains
# a kernel set under runs/ablation/<policy>-<row> and scores it on the same 12 WikiText windows
# (runs/ablation/<policy>-<row>.json); the reference rows (full, Baseline+, the shipped set)
# come from one run, runs/ablation/<policy>-reference.json. Resumable: `lesskv train` and
# `lesskv finetune` resume an interrupted run, and a row whose JSON exists is skipped.
#   POLICY (default h2o), ROWS (default: all, in order; a later row may start from an earlier
#   one's kernels). Wall times go to runs/ablation/<policy>-times.tsv.
#   usage: POLICY=h2o ROWS="mse upstream" bash docs/ablation.sh
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-1}
policy=${POLICY:-h2o}
dir=runs/ablation
mkdir -p "$dir"
c4=../shared/data/c4/c4_en_train_first1000.jsonl
# The base recipe: 24 C4 windows of 1024 tokens, 6 epochs, batch 1, lr 3e-3, hidden 128, rank 8.
base=(--policy "$policy" --budget 0.1 --data "$c4" --seq-len 1024 --sequences 24 --epochs 6
      --batch-size 1 --lr 3e-3)
tune=(--policy "$policy" --budget 0.1 --data "$c4" --seq-len 1024 --sequences 32
      --val-sequences 4 --val-every 16 --lr 2e-3)

timed() {  # timed ROW COMMAND...: run it, append its wall time
  local row=$1 start=$SECONDS
  shift
  "$@"
  printf '%s\t%s s\t%s\n' "$row" $((SECONDS - start)) "$*" >>"$dir/$policy-times.tsv"
}

score() {  # score ROW METHODS [--kernels DIR]: 12 WikiText windows of 1024 tokens
  local row=$1 methods=$2
  shift 2
  [[ -f "$dir/$policy-$row.json" ]] && return
  timed "eval $row" lesskv eval ppl --data ../shared/data/wikitext-2-raw/wiki.test.raw \
    --seq-len 1024 --windows 12 --policy "$policy" --budget 0.1 --methods "$methods" "$@" \
    --json "$dir/$policy-$row.json"
}

row() {  # the kernels and the score of one row
  local out=$dir/$policy-$1
  case $1 in
    reference) score reference full,baseline+,less ;;
    mse) timed mse lesskv train "${base[@]}" --out "$out" ;;
    kl) timed kl lesskv train "${base[@]}" --loss kl --out "$out" ;;
    mse+kl) timed mse+kl lesskv train "${base[@]}" --loss mse+kl --out "$out" ;;
    hidden512) timed hidden512 lesskv train "${base[@]}" --hidden 512 --out "$out" ;;
    data4x) timed data4x lesskv train "${base[@]}" --sequences 96 --out "$out" ;;
    upstream) timed upstream lesskv train "${base[@]}" --upstream "$dir/$policy-mse" --out "$out" ;;
    finetune) timed finetune lesskv finetune "${tune[@]}" --kernels "$dir/$policy-mse" --out "$out" ;;
    upstream+finetune)
      timed upstream+finetune lesskv finetune "${tune[@]}" --kernels "$dir/$policy-upstream" --out "$out" ;;
    *) echo "ablation.sh: unknown row $1" >&2; exit 2 ;;
  esac
  [[ $1 == reference ]] || score "$1" less --kernels "$out"
}

for r in ${ROWS:-reference mse kl mse+kl upstream finetune upstream+finetune hidden512 data4x}; do
  row "$r"
done
