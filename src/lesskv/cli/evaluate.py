"""``lesskv eval``: the quality evaluations, one subcommand (and module) each."""

from __future__ import annotations

import argparse

from lesskv.cli import eval_ppl, eval_summarize, eval_tasks

EVALUATIONS = (eval_ppl, eval_summarize, eval_tasks)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``eval`` group; each evaluation module adds its own subcommand."""
    evaluations = subparsers.add_parser("eval", help="quality evaluations").add_subparsers(
        dest="evaluation", required=True, metavar="EVALUATION"
    )
    for evaluation in EVALUATIONS:
        evaluation.add_parser(evaluations)
