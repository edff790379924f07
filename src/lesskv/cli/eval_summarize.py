"""``lesskv eval summarize``: ROUGE of summaries generated with each method's real cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesskv.cli.common import (
    add_compile_arg,
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
    step_options,
    write_json,
)
from lesskv.core.budget import DEFAULT_RANK
from lesskv.errors import LessKVError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``summarize`` under ``lesskv eval``."""
    summ = subparsers.add_parser(
        "summarize",
        help="ROUGE-1/2/L of generated summaries per method (real eviction)",
        description="Generate summaries with each method's cache and score them with ROUGE. "
        "Budgets are relative to each prompt.",
    )
    add_model_args(summ)
    add_dtype_arg(summ)
    add_device_arg(summ)
    add_compile_arg(summ)
    summ.add_argument(
        "--data",
        default="xsum",
        help="xsum (H2O's 5-shot prompts), cnn, multinews (LongBench), or a jsonl path",
    )
    summ.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding xsum_h2o/, cnn_dailymail/, longbench/ "
        "(default $LESSKV_DATA_DIR or ../shared/data)",
    )
    summ.add_argument("--samples", type=positive_int, default=10)
    add_policy_args(summ, budget="0.1")
    summ.add_argument("--methods", default="full,baseline,baseline+,less")
    add_kernels_arg(summ)
    summ.add_argument("--rank", type=positive_int, default=DEFAULT_RANK)
    summ.add_argument("--max-new-tokens", type=positive_int, default=64)
    add_json_arg(summ)
    summ.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Summarize with every method, print the ROUGE table; the JSON keeps the generations."""
    from lesskv.evaluation.summarization import as_rows, evaluate_summarization, load_examples
    from lesskv.hf.loading import load_model

    methods = parse_methods(args.methods)
    policy = command_policy(args)
    if args.samples < 1:
        raise LessKVError("--samples must be >= 1")
    placement = model_placement(args)
    check_output(args.json, "--json")
    step = step_options(args, placement)
    examples = load_examples(args.data, args.samples, args.data_dir)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args), **placement)
    kernels = None
    if needs_kernels(methods):
        kernels = load_kernels(args.kernels, args.model, model, policy)
    results, generations = evaluate_summarization(
        model,
        tokenizer,
        examples,
        methods,
        policy,
        kernels,
        args.rank,
        args.max_new_tokens,
        step=step,
    )
    rows = as_rows(results)
    print_table(rows, ["method", "policy", "budget", "rouge1", "rouge2", "rougeL", "samples"])
    if args.json is not None:
        write_json(args.json, {"rows": rows, "generations": generations})
