#!/usr/bin/env bash
# Long-context perplexity on the two local PG-19 books: the first 2 windows of 4096 tokens of
# each, H2O and Λ at 10% (410 pairs per head), all four methods. LESS uses the shipped kernels,
# trained on 1024-token windows: the budget is a fraction, so they run at 4x the context as-is.
set -euo pipefail
mkdir -p runs/pg19
for book in 10146 10321; do
  for policy in h2o lambda; do
    lesskv eval ppl --data "../shared/data/pg19/$book.txt" --seq-len 4096 --windows 2 \
      --policy "$policy" --budget 0.1 --methods "${METHODS:-full,baseline,baseline+,less}" \
      --json "runs/pg19/$policy-$book.json"
  done
done
