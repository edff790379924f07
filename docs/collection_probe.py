"""Seconds per window of `lesskv train`'s collection (the model's forward with every layer
recorded, the policy simulated at its budget and at Baseline+'s, the stores written), on the
default model, WikiText-2 windows, H2O and Λ at 10%.

    python docs/collection_probe.py --seq-len 1024 --windows 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lesskv.core.policies import make_policy
from lesskv.data import load_texts, token_windows
from lesskv.hf.loading import load_model
from lesskv.training.collection import collect_activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = load_model()
    texts = load_texts("../shared/data/wikitext-2-raw/wiki.test.raw")
    ids = token_windows(tokenizer, texts, args.seq_len, max_windows=args.windows)
    layers = list(range(model.config.num_hidden_layers))
    with torch.no_grad():
        model(input_ids=ids[:1])  # warm
        start = time.perf_counter()
        model(input_ids=ids[:1])
        forward = time.perf_counter() - start
    for name in ("h2o", "lambda"):
        policy = make_policy(name, 0.1)
        with tempfile.TemporaryDirectory() as folder:
            collect_activations(model, ids[:1], layers, policy, Path(folder) / "warm", 8, False)
            start = time.perf_counter()
            collect_activations(model, ids, layers, policy, Path(folder) / "run", 8, False)
            seconds = (time.perf_counter() - start) / len(ids)
        print(
            f"{name} {args.seq_len}: {seconds:.2f} s per window over {len(ids)} windows "
            f"(the model's own forward: {forward:.2f} s)"
        )


if __name__ == "__main__":
    main()
