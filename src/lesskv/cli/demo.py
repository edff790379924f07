"""``lesskv demo``: full vs H2O vs Λ perplexity on the built-in model and text, explained,
then a continuation generated with real eviction and the shipped LESS kernels."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING

from lesskv.cli.common import load_kernels, positive_int, print_table

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lesskv.hf.checkpoint import LessKernels

EXPLANATION = """
full: every past token is attended (the reference, lowest perplexity).
baseline h2o: each KV head keeps 102 pairs (10%): the 51 most recent tokens plus the
  51 that received the most attention so far; the rest is evicted for good.
baseline lambda: each KV head keeps 4 'attention sink' tokens plus the 98 most recent.
baseline+: the same policy with 4 more pairs per head, as much memory as LESS's state.
less: the policy plus the learned rank-8 state that absorbs every evicted pair, so
  evicted tokens still count. Lower perplexity than baseline+ at equal memory is the
  point of LESS."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    demo = subparsers.add_parser(
        "demo", help="full vs H2O vs Λ perplexity on the built-in model and text, explained"
    )
    demo.add_argument("--windows", type=positive_int, default=2, help="1024-token windows to score")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Score every method at a 10% budget (LESS where kernels ship), explain the table, then
    show LESS generating."""
    from lesskv.core.budget import DEFAULT_MODEL
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.evaluation.perplexity import evaluate_perplexity
    from lesskv.hf.checkpoint import available
    from lesskv.hf.loading import load_model

    print(f"Loading {DEFAULT_MODEL} (the first run converts and caches the weights)...")
    model, tokenizer = load_model(DEFAULT_MODEL)
    windows = token_windows(tokenizer, load_texts("builtin"), 1024, max_windows=args.windows)
    rows = evaluate_perplexity(model, windows, ["full"])
    shipped = {}
    for name in ("h2o", "lambda"):
        policy = make_policy(name, 0.1)
        methods = ["baseline", "baseline+"]
        if f"{DEFAULT_MODEL}-{name}-0.1" in available():
            shipped[name] = load_kernels(None, DEFAULT_MODEL, model, policy)
            methods.append("less")
        layers = list(shipped[name].layers) if name in shipped else None
        rows += evaluate_perplexity(model, windows, methods, policy=policy, kernels=layers)
    print(f"\nPerplexity on {len(windows)} windows of 1024 tokens of Python's documentation:")
    print_table([r.as_dict() for r in rows], ["method", "policy", "budget_tokens", "ppl"])
    print(EXPLANATION)
    if "h2o" in shipped:
        _show_generation(model, tokenizer, shipped["h2o"], load_texts("builtin")[0][:1500])


def _show_generation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, kernels: LessKernels, prompt: str
) -> None:
    """Continue ``prompt`` with H2O at 10% plus LESS and print the text as text, indented
    under a heading, followed by what the cache held."""
    from lesskv.core.policies import make_policy
    from lesskv.evaluation.generation import generate_text
    from lesskv.hf.cache import LessCache

    print("\nGreedy continuation with real eviction (H2O 10% of the prompt) + LESS state:")
    # 40 tokens do not repay compiling the decoding step (seconds, on a CPU)
    cache = LessCache(model, make_policy("h2o", 0.1), kernels=kernels, compile=False)
    text = generate_text(model, tokenizer, prompt, cache, max_new_tokens=40)
    memory = cache.memory_bytes()
    print("  the prompt ends:")
    print(textwrap.indent("..." + prompt[-200:].rstrip(), "    "))
    print("  the model continues:")
    print(textwrap.indent(text.strip("\n"), "    "))
    print(
        f"  cache: {memory['kv'] / 2**20:.2f} MiB of K/V + {memory['state'] / 2**10:.0f} KiB "
        f"of LESS state for {cache.get_seq_length()} tokens seen"
    )
