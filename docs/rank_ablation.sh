#!/usr/bin/env bash
# Rank ablation (paper Fig. 7) per layer: LESS vs Baseline+ given the same memory for each R,
# H2O 10% of 1024-token C4 windows, the shipped kernels' training recipe, layers 4, 14 and 24.
# Each run logs "layer L: val MSE LESS x | Baseline+ y" (Baseline+ gets R/2 extra pairs).
set -euo pipefail
for rank in 4 8 16; do
  for layer in 4 14 24; do
    lesskv train --policy h2o --budget 0.1 --data ../shared/data/c4/c4_en_train_first1000.jsonl \
      --sequences 24 --epochs 8 --rank "$rank" --layers "$layer" --out "runs/rank-$rank-layer-$layer"
  done
done
