#!/usr/bin/env bash
# Transfer matrix: the shipped kernels (trained at H2O 10% and Λ 10% of 1024-token C4 windows)
# evaluated at other policies and budgets, WikiText-2 raw test, first 12 windows of 1024 tokens.
# Rows go to runs/transfer/*.json; baselines for the same windows come from docs/ppl_grid.sh.
set -euo pipefail
kernels=$(python -c "from lesskv.hf.checkpoint import PRETRAINED; print(PRETRAINED)")
data=../shared/data/wikitext-2-raw/wiki.test.raw
mkdir -p runs/transfer
for trained in h2o lambda; do
  for target in h2o:0.05 h2o:0.1 h2o:0.2 lambda:0.1; do
    policy=${target%%:*}; budget=${target##*:}
    lesskv eval ppl --data "$data" --seq-len 1024 --windows 12 --policy "$policy" --budget "$budget" \
      --methods less --kernels "$kernels/smollm2-135m-$trained-0.1" --transfer \
      --json "runs/transfer/$trained-on-$policy-$budget.json"
  done
done
for target in h2o:0.05 h2o:0.1 h2o:0.2 lambda:0.1; do
  policy=${target%%:*}; budget=${target##*:}
  lesskv eval ppl --data "$data" --seq-len 1024 --windows 12 --policy "$policy" --budget "$budget" \
    --methods baseline+ --json "runs/transfer/baseline+-$policy-$budget.json"
done
