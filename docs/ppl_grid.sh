#!/usr/bin/env bash
# Issue 2's reference grid: WikiText-2 raw test, first 12 windows of 1024 tokens.
set -e
mkdir -p runs
D=../shared/data/wikitext-2-raw/wiki.test.raw
for spec in "h2o 0.05" "h2o 0.1" "h2o 0.2" "lambda 0.1" "lambda 0.2"; do
  set -- $spec
  .venv/bin/lesskv eval ppl --data $D --seq-len 1024 --windows 12 --policy $1 --budget $2 \
    --methods baseline --json runs/grid-$1-$2.json 2>/dev/null
done
.venv/bin/lesskv eval ppl --data $D --seq-len 1024 --windows 12 --budget 0.1 --methods full --json runs/grid-full.json 2>/dev/null
