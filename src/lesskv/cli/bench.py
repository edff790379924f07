"""``lesskv bench``: decode speed and cache memory of full, baseline and LESS, per context
length and batch size, plus how many sequences fit a memory budget."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lesskv.cli.common import (
    add_compile_arg,
    add_data_args,
    add_device_arg,
    add_dtype_arg,
    add_json_arg,
    add_kernels_arg,
    add_model_args,
    add_policy_args,
    check_output,
    command_policy,
    int_list,
    load_kernels,
    model_dtype,
    model_placement,
    positive_float,
    positive_int,
    print_table,
    step_options,
    write_json,
)
from lesskv.errors import LessKVError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from lesskv.core.policies import Policy
    from lesskv.hf.checkpoint import LessKernels

TIMING_COLUMNS = [
    "method",
    "context",
    "batch",
    "budget_tokens",
    "prefill_s",
    "decode_ms_per_token",
    "decode_ms_p90",
    "decode_tokens_per_s",
    "compile_s",
    "cache_MiB",
    "peak_rss_MiB",
]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench``."""
    bench = subparsers.add_parser(
        "bench",
        help="decode speed and cache memory: full vs baseline vs less, per context and batch",
        description="Prefill a batch of real-text prompts of each --contexts length, then time "
        "--new-tokens greedy decoding steps one by one, for every method and batch size; the "
        "methods decode round robin (each its own cache), so the step-time ratios between "
        "them, printed with their spread, hold on a noisy machine. "
        "Prints a Markdown table and how many sequences fit --memory-budget-gib of cache.",
    )
    add_model_args(bench)
    add_dtype_arg(bench)
    add_policy_args(bench, budget="0.1")
    add_kernels_arg(bench)
    add_compile_arg(bench)
    bench.add_argument(
        "--contexts",
        type=int_list(2),
        default="1024,2048,4096,8000",
        help="comma-separated prompt lengths",
    )
    bench.add_argument(
        "--batch-sizes", type=int_list(1), default="1,4,8", help="comma-separated batch sizes"
    )
    bench.add_argument("--methods", default="full,baseline,less", help="full, baseline, less")
    bench.add_argument("--new-tokens", type=positive_int, default=64, help="decoding steps timed")
    bench.add_argument(
        "--shared-prefill",
        action="store_true",
        help="prefill one prompt per grid point and repeat its cache across the batch "
        "(decode timings unchanged; makes long-context batches affordable on CPU)",
    )
    add_device_arg(bench)
    add_data_args(bench)
    add_json_arg(bench)
    bench.add_argument("--plot", type=Path, default=None, help="write a PNG of the results")
    bench.add_argument(
        "--memory-budget-gib",
        type=positive_float,
        default=4.0,
        help="cache memory for the max-batch comparison (default 4 GiB)",
    )
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Check the grid, load once, time every grid point, then report the memory fit."""
    from lesskv.data import load_texts
    from lesskv.evaluation.bench import check_contexts, run_benchmark
    from lesskv.hf.loading import load_model

    contexts, batch_sizes = args.contexts, args.batch_sizes
    methods = _check_args(args)
    _check_outputs(args)
    placement = model_placement(args)
    step = step_options(args, placement)
    policy = command_policy(args)
    for context in contexts:
        policy.slots(context)  # validates the budget before any loading
    texts = load_texts(args.data, field=args.field)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args), **placement)
    check_contexts(model, contexts, args.new_tokens)
    kernels = None
    if "less" in methods:
        kernels = load_kernels(args.kernels, args.model, model, policy).to(model.device)
    rows = run_benchmark(
        model,
        tokenizer,
        contexts=contexts,
        batch_sizes=batch_sizes,
        methods=methods,
        policy=policy,
        kernels=kernels,
        new_tokens=args.new_tokens,
        prompt_texts=texts,
        shared_prefill=args.shared_prefill,
        step=step,
    )
    print(
        f"{args.model} on {rows[0].device}, {policy.name} budget {policy.budget}, "
        f"{args.new_tokens} decoding steps timed one by one"
    )
    _report_timings(args, rows)
    _report_memory_fit(args, model, max(contexts), methods, policy, kernels)


def _check_args(args: argparse.Namespace) -> list[str]:
    """The methods to run, after refusing bad numbers before anything is loaded."""
    from lesskv.evaluation.bench import BENCH_METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if not methods or unknown:
        raise LessKVError(
            f"unknown method(s) {unknown or args.methods!r}: bench runs {', '.join(BENCH_METHODS)}"
        )
    if args.new_tokens < 1:
        raise LessKVError("--new-tokens must be >= 1")
    if args.memory_budget_gib <= 0:
        raise LessKVError("--memory-budget-gib must be > 0")
    return methods


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --plot, refused before any work rather than after it; a figure's format
    too (the plot's suffix)."""
    check_output(args.json, "--json")
    check_output(args.plot, "--plot")
    if args.plot is not None:
        from lesskv.analysis.plots import figure_format

        figure_format(args.plot)


def _report_timings(args: argparse.Namespace, rows: list) -> None:
    """The timing table in MiB (the JSON keeps bytes), then the JSON and plot if asked for."""
    from lesskv.analysis.plots import plot_benchmark

    dicts = [r.as_dict() for r in rows]
    shown = [
        {
            **d,
            "cache_MiB": d["cache_bytes"] / 2**20,
            "peak_rss_MiB": (d["peak_rss_bytes"] or 0) / 2**20,
        }
        for d in dicts
    ]
    print_table(shown, TIMING_COLUMNS)
    print("\nDecode step time ratios, paired round by round (median and 25th-75th percentile):")
    print_table(_ratios(rows), ["context", "batch", "ratio", "median", "p25", "p75"])
    if args.json is not None:
        write_json(args.json, dicts)
    if args.plot is not None:
        print(f"plot written to {plot_benchmark(rows, args.plot)}")


PAIRS = (("less", "baseline"), ("less", "full"), ("baseline", "full"))


def _ratios(rows: list) -> list[dict[str, object]]:
    """Every pair of :data:`PAIRS` that ran at a grid point, as one table row."""
    from lesskv.evaluation.bench import paired_ratio

    by = {(r.method, r.context, r.batch): r for r in rows}
    table = []
    for name, context, batch in by:
        for numerator, denominator in PAIRS:
            if name == numerator and (denominator, context, batch) in by:
                median, low, high = paired_ratio(
                    by[name, context, batch], by[denominator, context, batch]
                )
                table.append(
                    {
                        "context": context,
                        "batch": batch,
                        "ratio": f"{numerator}/{denominator}",
                        "median": median,
                        "p25": low,
                        "p75": high,
                    }
                )
    return table


def _report_memory_fit(
    args: argparse.Namespace,
    model: PreTrainedModel,
    context: int,
    methods: list[str],
    policy: Policy,
    kernels: LessKernels | None,
) -> None:
    """How many sequences of the longest context each method fits in --memory-budget-gib."""
    from lesskv.evaluation.bench import max_batch_for_memory

    budget_bytes = int(args.memory_budget_gib * 2**30)
    fits = [
        max_batch_for_memory(
            model,
            context,
            budget_bytes,
            method,
            policy,
            kernels.meta.rank if kernels is not None else None,
            new_tokens=args.new_tokens,
        )
        for method in methods
    ]
    print(
        f"\nSequences whose cache fits {args.memory_budget_gib:g} GiB at context {context} "
        f"(+{args.new_tokens} new tokens; K/V and LESS state only, weights excluded):"
    )
    print_table(
        [{**f, "MiB_per_sequence": f["bytes_per_sequence"] / 2**20} for f in fits],
        ["method", "context", "tokens_held", "MiB_per_sequence", "max_batch"],
    )
