"""Kernel hidden-size ablation per layer: which first-layer width suits head_dim 64?

Collects the default model's activations once (H2O 10% of 1024-token C4 windows, the shipped
kernels' recipe: 24 windows, 8 epochs, batch 1, lr 3e-3), trains each listed layer's kernels
at every hidden size on the same data, and prints validation MSE of the ``o_proj`` output,
LESS vs Baseline+ (rank 8).

    OMP_NUM_THREADS=1 python docs/hidden_ablation.py [--layers 4,14,24] [--hidden 32,64,128,256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lesskv.core.budget import DEFAULT_MODEL
from lesskv.core.policies import make_policy
from lesskv.data import load_texts, token_windows
from lesskv.hf import attention
from lesskv.hf.checkpoint import KernelMeta
from lesskv.hf.loading import load_model
from lesskv.hf.modules import attention_modules
from lesskv.training.collection import collect_activations
from lesskv.training.per_layer import TrainConfig, train_layer
from lesskv.training.run import freeze

DATA = "../shared/data/c4/c4_en_train_first1000.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,14,24")
    parser.add_argument("--hidden", default="32,64,128,256")
    parser.add_argument("--data", default=DATA)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    hiddens = [int(x) for x in args.hidden.split(",")]
    started = time.time()
    model, tokenizer = load_model(DEFAULT_MODEL)
    policy = make_policy("h2o", 0.1)
    config = TrainConfig(
        DEFAULT_MODEL, "h2o", "0.1", sequences=24, epochs=8, batch_size=1, lr=3e-3, data=args.data
    )
    windows = token_windows(
        tokenizer, load_texts(args.data), config.seq_lens[0], max_windows=config.sequences
    )
    modules = attention_modules(attention.enable(model))
    freeze(model)
    base_shape = KernelMeta.for_model(model, DEFAULT_MODEL, policy="h2o", budget="0.1").layer_shape
    rows = []
    with tempfile.TemporaryDirectory() as root:
        stores = collect_activations(model, windows, layers, policy, Path(root), config.rank)
        for layer in layers:
            for hidden in hiddens:
                shape = replace(base_shape, hidden=hidden, dropout=config.dropout)
                _, losses = train_layer(
                    [stores[layer]], modules[layer].o_proj, shape, config, layer
                )
                ratio = losses["val_loss"] / losses["baseline_plus_val_loss"]
                rows.append(
                    (layer, hidden, losses["val_loss"], losses["baseline_plus_val_loss"], ratio)
                )
    print("\n| layer | hidden | LESS val MSE | Baseline+ | LESS / Baseline+ |")
    print("|---|---|---|---|---|")
    for layer, hidden, less, plus, ratio in rows:
        print(f"| {layer} | {hidden} | {less:.4g} | {plus:.4g} | {ratio:.2f} |")
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
