"""Does lesskv's full-attention perplexity equal plain transformers' on the same windows?

For a tokenizer that puts BOS before every text (Gemma, Llama), lesskv's windows are BOS plus
``seq_len - 1`` text tokens (lesskv.data). This script scores the same text three ways and prints
each perplexity: lesskv's ``full`` row, plain transformers (the model as loaded, never switched
to lesskv's attention) on windows it builds itself with BOS, and the same without BOS.

    python docs/bos_check.py --model gemma3-270m --data ../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AutoModelForCausalLM

from lesskv.core.budget import builtin_model
from lesskv.data import load_texts, token_windows
from lesskv.evaluation.perplexity import evaluate_perplexity
from lesskv.hf.loading import cache_dir, load_model


@torch.no_grad()
def transformers_ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """transformers' own loss (the mean over every predicted token), nothing of lesskv's."""
    return math.exp(model(input_ids=windows, labels=windows).loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()

    texts = load_texts(args.data)
    model, tokenizer = load_model(args.model)
    lesskv_windows = token_windows(tokenizer, texts, args.seq_len, max_windows=args.windows)
    (full,) = evaluate_perplexity(
        model, lesskv_windows, ["full"], batch_size=args.windows, progress=False
    )  # batched as the reference below, so that only the attention path differs

    # Built independently of lesskv.data: the tokenizer's own encoding of the joined text.
    ids = tokenizer("\n\n".join(texts)[: 40 * args.seq_len * args.windows]).input_ids
    bos = tokenizer.bos_token_id
    text = [i for i in ids if i != bos]
    n = args.seq_len - 1
    plain_bos = torch.tensor([[bos, *text[w * n : (w + 1) * n]] for w in range(args.windows)])
    plain = torch.tensor(
        [text[w * args.seq_len : (w + 1) * args.seq_len] for w in range(args.windows)]
    )
    print(f"{args.model}: {args.windows} windows x {args.seq_len} tokens of {args.data}")
    print(
        f"tokenizer adds BOS: {ids[0] == bos}; lesskv's windows start with BOS: "
        f"{bool((lesskv_windows[:, 0] == bos).all())}; same token ids as built here: "
        f"{torch.equal(lesskv_windows, plain_bos)}"
    )
    builtin = builtin_model(args.model)
    source = cache_dir() / builtin if builtin else args.model
    reference = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa").eval()
    print(f"lesskv full                     ppl {full.ppl:.4f}")
    print(f"plain transformers, with BOS    ppl {transformers_ppl(reference, plain_bos):.4f}")
    print(f"plain transformers, without BOS ppl {transformers_ppl(reference, plain):.4f}")


if __name__ == "__main__":
    main()
