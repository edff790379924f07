#!/usr/bin/env bash
# LESS against Baseline+ beyond the 1024-token windows of WikiText: both local PG-19 books at
# 2048 and 4096 tokens (2 windows each) and at 8000 tokens (1 window each), budget 10%.
# POLICIES (default "h2o lambda"); KERNELS_h2o / KERNELS_lambda pick kernel folders (default:
# the shipped sets); METHODS (default baseline+,less); CELLS (default "2048:2 4096:2 8000:1",
# length:windows). One JSON per cell under runs/long/.
set -euo pipefail
mkdir -p runs/long
for policy in ${POLICIES:-h2o lambda}; do
  kernels_var="KERNELS_$policy"
  kernels=${!kernels_var:+--kernels ${!kernels_var}}
  for book in 10146 10321; do
    for cell in ${CELLS:-2048:2 4096:2 8000:1}; do
      seq_len=${cell%:*} windows=${cell#*:}
      # shellcheck disable=SC2086  # $kernels is empty or two words
      lesskv eval ppl --data "../shared/data/pg19/$book.txt" --seq-len "$seq_len" \
        --windows "$windows" --policy "$policy" --budget 0.1 \
        --methods "${METHODS:-baseline+,less}" $kernels \
        --json "runs/long/$policy-$book-$seq_len.json"
    done
  done
done
