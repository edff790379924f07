"""Soak: a long greedy generation through a LessCache with memory sampled along the way.

A tiny random Llama-shaped model (GQA, 2 layers) with LESS kernels decodes ``--tokens`` tokens
one by one after a short prompt; every ``--every`` tokens the process's resident memory and the
bytes the cache holds are recorded. Real eviction means both stay flat after warm-up: the cache
holds the budget plus a fixed state whatever the length. Writes a JSON of the samples and a PNG
of the curve, and exits 1 if the memory grew.

    python docs/soak.py --tokens 50000 --out runs/soak    # ~3 min here, one thread
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lesskv.core.policies import make_policy
from lesskv.hf.cache import LessCache
from lesskv.hf.checkpoint import KernelMeta, LessKernels
from lesskv.hf.compat import cache_argument

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_kernels  # noqa: E402  (the tests' tiny random kernels)

PAGE = 4096
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # the soak model's cache geometry (hidden 96 / 6 heads)
# Flat means: after warm-up, resident memory moves by less than this, and the cache not at all.
RSS_SLACK_BYTES = 16 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def full_cache_bytes(tokens: int) -> int:
    """What transformers' full cache would hold for ``tokens`` tokens (fp32 K and V)."""
    return tokens * LAYERS * 2 * KV_HEADS * HEAD_DIM * 4


def soak(tokens: int, every: int, budget: int = 64, seed: int = 0) -> list[dict]:
    """Decode ``tokens`` tokens greedily; one sample of memory every ``every`` tokens."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=6,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=tokens + 64,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    meta = KernelMeta.for_model(model, "tiny", policy="h2o", budget=str(budget), rank=4)
    kernels = LessKernels(meta, tiny_kernels(model, seed)).eval()
    cache = LessCache(model, make_policy("h2o", budget), kernels=kernels)
    samples = []
    start = time.perf_counter()
    with torch.no_grad():
        prompt = torch.randint(1, 97, (1, 32))
        out = model(input_ids=prompt, use_cache=True, **cache_argument(model, cache))
        for step in range(tokens):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, use_cache=True, **cache_argument(model, cache))
            if step % every == 0 or step == tokens - 1:
                memory = cache.memory_bytes()
                samples.append(
                    {
                        "tokens": cache.get_seq_length(),
                        "rss_bytes": rss_bytes(),
                        "cache_bytes": memory["kv"] + memory["state"],
                        "full_cache_bytes": full_cache_bytes(cache.get_seq_length()),
                        "seconds": time.perf_counter() - start,
                    }
                )
    return samples


def is_flat(samples: list[dict], warmup: float = 0.1) -> tuple[bool, str]:
    """Whether memory stayed flat after the first ``warmup`` share of the samples."""
    steady = samples[int(len(samples) * warmup) :]
    rss = [s["rss_bytes"] for s in steady]
    cache = {s["cache_bytes"] for s in steady}
    growth = max(rss) - min(rss)
    flat = growth < RSS_SLACK_BYTES and len(cache) == 1
    return flat, f"after warm-up: RSS moved {growth / 2**20:.2f} MiB, cache sizes {sorted(cache)}"


def plot(samples: list[dict], path: Path) -> None:
    """RSS on the left; on the right (log scale) the LessCache's bytes beside what a full
    cache would hold by then."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [s["tokens"] for s in samples]
    fig, rss_axis = plt.subplots(figsize=(7.5, 3.8))
    rss = [s["rss_bytes"] / 2**20 for s in samples]
    rss_axis.plot(tokens, rss, color="C0", linewidth=2)
    rss_axis.set_xlabel("tokens decoded")
    rss_axis.set_ylabel("process RSS (MiB)", color="C0")
    rss_axis.set_ylim(0, max(rss) * 1.25)
    bytes_axis = rss_axis.twinx()
    bytes_axis.plot(
        tokens, [s["cache_bytes"] / 2**10 for s in samples], color="C1", label="LessCache"
    )
    full = [full_cache_bytes(t) / 2**10 for t in tokens]
    bytes_axis.plot(tokens, full, color="C1", linestyle="--", label="a full cache, same tokens")
    bytes_axis.set_yscale("log")
    bytes_axis.set_ylabel("cache KiB (log)", color="C1")
    bytes_axis.legend(loc="center right")
    rss_axis.set_title("Soak: H2O + LESS, 64 pairs per head, real eviction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = parser.parse_args()
    samples = soak(args.tokens, args.every)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(samples, indent=1) + "\n")
    plot(samples, args.out / "soak.png")
    flat, summary = is_flat(samples)
    print(f"{args.tokens} tokens in {samples[-1]['seconds']:.0f} s; {summary}")
    sys.exit(0 if flat else 1)


if __name__ == "__main__":
    main()
