"""``lesskv eval ppl``: token-level perplexity of each method over the same windows."""

from __future__ import annotations

import argparse

from lesskv.cli.common import (
    add_data_args,
    add_device_arg,
    add_dtype_arg,
    add_json_arg,
    add_kernels_arg,
    add_model_args,
    add_policy_args,
    check_output,
    command_policy,
    load_kernels,
    model_dtype,
    model_placement,
    needs_kernels,
    parse_methods,
    positive_int,
    print_table,
    write_json,
)
from lesskv.core.budget import DEFAULT_RANK
from lesskv.errors import LessKVError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``ppl`` under ``lesskv eval``."""
    ppl = subparsers.add_parser(
        "ppl",
        help="token-level perplexity per method over the same windows",
        description="Perplexity of full / baseline / baseline+ / merge / less on non-overlapping "
        "windows of --seq-len tokens; every method sees the same windows. Where the tokenizer "
        "adds BOS (Llama, Gemma, Mistral), each window is BOS and --seq-len - 1 tokens of text, "
        "BOS not scored, as plain transformers and lm-eval score such models.",
    )
    add_model_args(ppl)
    add_dtype_arg(ppl)
    add_device_arg(ppl)
    add_data_args(ppl, default=None)
    ppl.add_argument("--seq-len", type=positive_int, default=1024, help="window length in tokens")
    ppl.add_argument(
        "--windows", type=positive_int, default=None, help="score only the first N windows"
    )
    add_policy_args(ppl)
    ppl.add_argument(
        "--methods",
        default="full,baseline,baseline+",
        help="comma-separated method names (lesskv --help lists them)",
    )
    add_kernels_arg(ppl)
    ppl.add_argument(
        "--transfer",
        action="store_true",
        help="accept --kernels trained for another policy (transfer studies; budgets always "
        "transfer)",
    )
    ppl.add_argument(
        "--rank", type=positive_int, default=DEFAULT_RANK, help="LESS rank R (sizes Baseline+)"
    )
    ppl.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    add_json_arg(ppl)
    ppl.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Check every argument before loading the model, then score and print one row per method."""
    from lesskv.data import load_texts, token_windows
    from lesskv.evaluation.perplexity import against, evaluate_perplexity
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits

    if args.data is None:
        raise LessKVError("--data is required (builtin, a file path, or hf:NAME)")
    methods = parse_methods(args.methods)
    policy = command_policy(args)
    policy.slots(args.seq_len)  # validates the budget against the window before any loading
    if args.windows is not None and args.windows < 1:
        raise LessKVError(f"--windows must be >= 1, got {args.windows}")
    placement = model_placement(args)
    check_output(args.json, "--json")
    texts = load_texts(args.data, field=args.field)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args), **placement)
    check_fits(model, args.seq_len, "--seq-len windows")
    kernels = None
    if needs_kernels(methods):
        less = load_kernels(
            args.kernels, args.model, model, policy, args.seq_len, transfer=args.transfer
        )
        kernels = list(less.layers)
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=args.windows)
    results = evaluate_perplexity(
        model,
        windows,
        methods,
        policy=policy,
        kernels=kernels,
        rank=args.rank,
        batch_size=args.batch_size,
    )
    rows = [r.as_dict() for r in results]
    print_table(rows, ["method", "policy", "budget_tokens", "head_bytes", "ppl", "nll", "tokens"])
    compared = [
        {
            **c,
            "delta_nll": f"{c['delta_nll']:+.4f}",
            "se": f"{c['se']:.4f}",
            "gap_closed": f"{100 * c['gap_closed']:.1f}%",
        }
        for c in against(results)
    ]
    if compared:
        print(
            "\npaired over the windows: delta_nll = mean NLL of the method minus baseline+'s "
            "(± se); gap_closed = its share of the baseline+ -> full gap"
        )
        print_table(compared, ["method", "vs", "delta_nll", "se", "lower_in", "gap_closed"])
    if args.json is not None:
        write_json(args.json, rows)
