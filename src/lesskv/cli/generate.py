"""``lesskv generate``: stream a continuation with a cache that really evicts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesskv.cli.common import (
    add_compile_arg,
    add_device_arg,
    add_dtype_arg,
    add_kernels_arg,
    add_model_args,
    add_policy_args,
    command_policy,
    float_at_least,
    load_kernels,
    model_dtype,
    model_placement,
    positive_int,
    step_options,
)
from lesskv.errors import LessKVError, short_path

# Below it sampling is greedy decoding in all but name, and far below it (1e-300) the logits
# divided by it overflow to infinity, which sampling cannot draw from.
MIN_TEMPERATURE = 0.01


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``generate``."""
    gen = subparsers.add_parser(
        "generate",
        help="stream a continuation with real eviction (baseline) or LESS",
        description="Generate text with a cache that really evicts: --method baseline keeps "
        "--budget pairs per KV head; --method less adds the learned state (--kernels DIR, or the "
        "shipped kernels of the default model); --method merge adds training-free merge slots "
        "for the evicted pairs; --method full is transformers' own cache. A fractional "
        "--budget is relative to the prompt.",
    )
    add_model_args(gen)
    add_dtype_arg(gen)
    add_device_arg(gen)
    add_compile_arg(gen)
    gen.add_argument(
        "--method", default="less", help="one method (lesskv --help lists them); default less"
    )
    add_policy_args(gen, budget="0.1")
    add_kernels_arg(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--file", type=Path, help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument(
        "--temperature",
        type=float_at_least(MIN_TEMPERATURE),
        default=0.7,
        help=f"sampling temperature, at least {MIN_TEMPERATURE} (default 0.7)",
    )
    gen.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=None,
        help="process the prompt in chunks of N tokens (bounded memory for long prompts)",
    )
    gen.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Stream the text to stdout; the cache's size goes to stderr so stdout stays the text."""
    from lesskv.evaluation.generation import generate_text
    from lesskv.hf.loading import load_model
    from lesskv.hf.methods import get_method, make_cache

    method = get_method(args.method.strip())
    prompt = _read_prompt(args)
    if args.max_new_tokens < 1:
        raise LessKVError("--max-new-tokens must be >= 1")
    placement = model_placement(args)
    step = step_options(args, placement)
    policy = command_policy(args)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args), **placement)
    kernels = (
        load_kernels(args.kernels, args.model, model, policy) if method.needs_kernels else None
    )
    cache = make_cache(model, args.method, policy, kernels, step=step)
    options = {"do_sample": args.sample}
    if args.sample:
        options["temperature"] = args.temperature
    generate_text(
        model,
        tokenizer,
        prompt,
        cache,
        args.max_new_tokens,
        args.prefill_chunk,
        stream=True,
        **options,
    )
    if cache is not None:
        memory = cache.memory_bytes()
        print(
            f"\n[{args.method}: cache holds {memory['kv'] / 2**20:.2f} MiB of K/V"
            f" + {memory['state'] / 2**10:.1f} KiB summarising the evicted pairs]",
            file=sys.stderr,
        )


def _read_prompt(args: argparse.Namespace) -> str:
    """--prompt, or the text of --file with an unreadable file as a one-line error."""
    if args.file is None:
        return args.prompt
    shown = short_path(args.file)
    try:
        return args.file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LessKVError(f"cannot read prompt file {shown}: it is not UTF-8 text") from None
    except OSError as err:
        raise LessKVError(f"cannot read prompt file {shown}: {err.strerror}") from None
