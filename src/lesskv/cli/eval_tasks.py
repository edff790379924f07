"""``lesskv eval tasks``: lm-evaluation-harness accuracy of each method on the same prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesskv.cli.common import (
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
    non_negative_int,
    parse_methods,
    positive_int,
    print_table,
    write_json,
)
from lesskv.core.budget import DEFAULT_RANK
from lesskv.errors import require


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tasks`` under ``lesskv eval``."""
    tasks = subparsers.add_parser(
        "tasks",
        help="accuracy on lm-eval tasks per method (piqa, rte, arc_easy, ...; few-shot)",
        description="Score lm-evaluation-harness tasks (loglikelihood / multiple choice) with "
        "every method on the same prompts. Budgets are relative to each request's length, so "
        "few-shot prompts are compressed by the same ratio as short ones. Task names are "
        "lm-eval's (online); --data-dir reads local copies of piqa, rte, openbookqa, arc_easy, "
        "arc_challenge and winogrande instead.",
    )
    add_model_args(tasks)
    add_dtype_arg(tasks)
    add_device_arg(tasks)
    tasks.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    tasks.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="offline: folder laid out like ../shared/data (piqa/, rte/, arc/, ...)",
    )
    tasks.add_argument(
        "--num-fewshot", type=non_negative_int, default=None, help="examples per prompt"
    )
    tasks.add_argument(
        "--limit", type=positive_int, default=None, help="score only N documents per task"
    )
    add_policy_args(tasks, budget="0.1")
    tasks.add_argument("--methods", default="full,baseline,baseline+,less")
    add_kernels_arg(tasks)
    tasks.add_argument(
        "--rank", type=positive_int, default=DEFAULT_RANK, help="LESS rank R (sizes Baseline+)"
    )
    tasks.add_argument(
        "--batch-size", type=positive_int, default=8, help="requests per forward pass"
    )
    add_json_arg(tasks)
    tasks.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Score every task with every method and print one row per (task, method)."""

    require("lm_eval", "tasks", "lesskv eval tasks")
    from lesskv.evaluation.tasks import evaluate_tasks, quiet_lm_eval
    from lesskv.hf.loading import load_model

    methods = parse_methods(args.methods)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    policy = command_policy(args)
    placement = model_placement(args)
    check_output(args.json, "--json")
    quiet_lm_eval()
    model, tokenizer = load_model(args.model, dtype=model_dtype(args), **placement)
    kernels = None
    if needs_kernels(methods):
        kernels = list(load_kernels(args.kernels, args.model, model, policy).layers)
    results = evaluate_tasks(
        model,
        tokenizer,
        tasks,
        methods,
        policy=policy,
        kernels=kernels,
        rank=args.rank,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
    )
    rows = [r.as_dict() for r in results]
    columns = "task method policy budget num_fewshot acc acc_norm samples mean_tokens mean_kept"
    print_table(rows, columns.split())
    if args.json is not None:
        write_json(args.json, rows)
