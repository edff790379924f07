"""``lesskv analyze``: the paper's figures, residual spectrum (Fig. 3) and attention maps
(Fig. 1), each written as a PNG plus the JSON it was drawn from."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesskv.cli.common import (
    add_data_args,
    add_dtype_arg,
    add_kernels_arg,
    add_model_args,
    add_policy_args,
    load_kernels,
    model_dtype,
    print_table,
)
from lesskv.errors import LessKVError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``analyze`` group with its ``residual`` and ``attention`` subcommands."""
    analyses = subparsers.add_parser(
        "analyze", help="figures: residual spectrum (paper Fig. 3), attention maps (Fig. 1)"
    ).add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    residual = analyses.add_parser(
        "residual",
        help="singular-value energy of attention outputs vs the full-minus-sparse residual",
        description="Per layer and head, the share of energy in the top-1/2/4/8/16 singular "
        "values of the attention output and of the residual (full - sparse) at positions where "
        "the policy has evicted, averaged over --windows windows. Writes residual.png and "
        "residual.json to --out.",
    )
    add_model_args(residual)
    add_dtype_arg(residual)
    add_data_args(residual)
    add_policy_args(residual, budget="0.1")
    residual.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    residual.add_argument("--windows", type=int, default=2, help="windows averaged")
    residual.add_argument("--out", type=Path, required=True, help="output folder")
    residual.set_defaults(run=run)
    attention = analyses.add_parser(
        "attention",
        help="attention maps of full, sparse and LESS-effective attention for one head",
        description="For one text, layer and query head: the full attention map, the sparse "
        "policy's map, and LESS's effective map (kept keys by softmax weight, evicted keys by "
        "phi(q).psi(k)). Writes attention.png and attention.json to --out.",
    )
    add_model_args(attention)
    add_dtype_arg(attention)
    add_data_args(attention)
    attention.add_argument("--text", default=None, help="the text (instead of --data)")
    add_policy_args(attention, budget="0.1")
    attention.add_argument("--seq-len", type=int, default=256, help="tokens of the text used")
    attention.add_argument("--layer", type=int, default=0)
    attention.add_argument("--head", type=int, default=0, help="query head")
    add_kernels_arg(attention)
    attention.add_argument("--out", type=Path, required=True, help="output folder")
    attention.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run the analysis named on the command line."""
    if args.analysis == "residual":
        run_residual(args)
    else:
        run_attention(args)


def run_residual(args: argparse.Namespace) -> None:
    """Average the energy spectra over the windows; print a row per layer, write the figure."""
    from lesskv.analysis.figures import plot_residual_energy, residual_energy
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits

    policy = make_policy(args.policy, args.budget)
    policy.slots(args.seq_len)
    if args.windows < 1:
        raise LessKVError(f"--windows must be >= 1, got {args.windows}")
    texts = load_texts(args.data, field=args.field)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args))
    check_fits(model, args.seq_len, "--seq-len windows")
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=args.windows)
    report = residual_energy(model, windows, policy, model_name=args.model)
    json_path, png_path = report.save(args.out), plot_residual_energy(report, args.out)
    print_table(report.layer_rows(), ["layer", *report.columns()])
    print(f"written: {png_path}, {json_path}")


def run_attention(args: argparse.Namespace) -> None:
    """Draw the maps of one head; without usable kernels the LESS map is left out, not fatal
    (unless --kernels was asked for explicitly)."""
    from lesskv.analysis.figures import attention_maps, plot_attention_maps
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits

    policy = make_policy(args.policy, args.budget)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args))
    check_fits(model, args.seq_len, "the --seq-len tokens of the text")
    if args.text is not None:
        ids = tokenizer(args.text, return_tensors="pt").input_ids[:, : args.seq_len]
    else:
        texts = load_texts(args.data, field=args.field)
        ids = token_windows(tokenizer, texts, args.seq_len, max_windows=1)
    kernels = None
    try:
        less = load_kernels(args.kernels, args.model, model, policy, ids.shape[1])
        kernels = list(less.layers)
    except LessKVError as err:
        if args.kernels is not None:
            raise
        print(f"no LESS map: {err}", file=sys.stderr)
    maps = attention_maps(model, ids, args.layer, args.head, policy, kernels)
    maps.tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    json_path, png_path = maps.save(args.out), plot_attention_maps(maps, args.out)
    print_table(maps.summary_rows(), ["map", "tv_to_full", "mass_on_evicted"])
    print(f"written: {png_path}, {json_path}")
