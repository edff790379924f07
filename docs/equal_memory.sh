#!/usr/bin/env bash
# The equal-memory table (RESULTS §10): every way to spend LESS's state memory, on the same
# windows, in one run per cell. WikiText-2 test (24 x 1024) and both PG-19 books (1 x 4096),
# H2O / Λ / TOVA at 10% and H2O at 5%, methods baseline, baseline+, merge, less (+ full once
# per data set). TOVA has no shipped kernels: its LESS row runs the H2O set (--transfer).
# CELLS (default all) picks cells by name; one JSON per cell under runs/equal/, then
# `python docs/equal_memory_table.py` prints the Markdown table.
set -euo pipefail
mkdir -p runs/equal
h2o_kernels=src/lesskv/pretrained/smollm2-135m-h2o-0.1
wiki=../shared/data/wikitext-2-raw/wiki.test.raw
run() {  # name, data, seq_len, windows, policy, budget, methods, extra args...
  local name=$1 data=$2 seq_len=$3 windows=$4 policy=$5 budget=$6 methods=$7
  shift 7
  if [[ -n "${CELLS:-}" && " $CELLS " != *" $name "* ]]; then return; fi
  lesskv eval ppl --data "$data" --seq-len "$seq_len" --windows "$windows" --policy "$policy" \
    --budget "$budget" --methods "$methods" --json "runs/equal/$name.json" "$@"
}
policies=(h2o lambda tova)
transfer() {  # TOVA's LESS row borrows the H2O kernels
  if [[ $1 == tova ]]; then echo --kernels "$h2o_kernels" --transfer; fi
}
methods() {  # full once per data set
  if [[ $1 == h2o ]]; then echo full,baseline,baseline+,merge,less; else echo baseline,baseline+,merge,less; fi
}
for policy in "${policies[@]}"; do
  # shellcheck disable=SC2046  # transfer prints nothing or three words
  run "wiki-$policy-0.1" "$wiki" 1024 24 "$policy" 0.1 "$(methods "$policy")" $(transfer "$policy")
done
run wiki-h2o-0.05 "$wiki" 1024 24 h2o 0.05 baseline,baseline+,merge,less
for book in 10146 10321; do
  for policy in "${policies[@]}"; do
    # shellcheck disable=SC2046
    run "pg19-$book-$policy-0.1" "../shared/data/pg19/$book.txt" 4096 1 "$policy" 0.1 \
      "$(methods "$policy")" $(transfer "$policy")
  done
done
