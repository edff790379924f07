"""Prefill time of full attention vs a LessCache (H2O and Λ at 10%) on the default model:
one real-text prompt per context, methods alternated per round so load hits all alike.

    OMP_NUM_THREADS=1 python docs/prefill_probe.py --contexts 4096,8000 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from lesskv.core.policies import make_policy
from lesskv.data import load_texts, token_windows
from lesskv.hf.cache import LessCache
from lesskv.hf.compat import cache_argument
from lesskv.hf.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="4096,8000")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = load_model()
    texts = load_texts("../shared/data/pg19/10146.txt")
    for context in [int(c) for c in args.contexts.split(",")]:
        ids = token_windows(tokenizer, texts, context, max_windows=1)
        times: dict[str, list[float]] = {"full": [], "h2o": [], "lambda": []}
        for _ in range(args.rounds):
            for method in times:
                if method == "full":
                    model.set_attn_implementation("sdpa")
                    cache = DynamicCache(config=model.config)
                else:
                    cache = LessCache(model, make_policy(method, 0.1))
                start = time.perf_counter()
                with torch.no_grad():
                    model(input_ids=ids, logits_to_keep=1, **cache_argument(model, cache))
                times[method].append(time.perf_counter() - start)
        full = statistics.median(times["full"])
        for method, seconds in times.items():
            median = statistics.median(seconds)
            ratio = median / full
            print(f"context {context}: {method:6s} prefill {median:6.1f} s = {ratio:.2f}x full")


if __name__ == "__main__":
    main()
