"""Teacher-forced scoring time per window: full attention vs the sparse policy and LESS in
their parallel form (the policy's eviction simulated over the whole window), on the default
model with its shipped kernels; methods alternated per round so load hits all alike.

    OMP_NUM_THREADS=1 python docs/teacher_forced_probe.py --seq-len 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lesskv.core.policies import make_policy
from lesskv.data import load_texts, token_windows
from lesskv.hf.checkpoint import DEFAULT_MODEL, resolve_kernels
from lesskv.hf.loading import load_model
from lesskv.hf.methods import using_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", default="h2o")
    args = parser.parse_args()
    model, tokenizer = load_model()
    texts = load_texts("../shared/data/wikitext-2-raw/wiki.test.raw")
    ids = token_windows(tokenizer, texts, args.seq_len, max_windows=1)
    policy = make_policy(args.policy, 0.1)
    kernels = resolve_kernels(None, DEFAULT_MODEL, model, policy, args.seq_len).layers
    times: dict[str, list[float]] = {"full": [], "baseline": [], "less": []}
    for _ in range(args.rounds):
        for method in times:
            options = {} if method == "full" else {"policy": policy}
            if method == "less":
                options["kernels"] = kernels
            with using_method(model, method, **options), torch.no_grad():
                start = time.perf_counter()
                model(input_ids=ids)
                times[method].append(time.perf_counter() - start)
    full = statistics.median(times["full"])
    for method, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"{args.policy} {args.seq_len}: {method:8s} {median:6.2f} s = {median / full:.2f}x full"
        )


if __name__ == "__main__":
    main()
