"""``lesskv analyze``: the paper's figures, residual spectrum (Fig. 3), the rank-r residual
oracle's perplexity (Fig. 3, right) and attention maps (Fig. 1), each written as a PNG plus the
JSON it was drawn from.

The oracle is its own subcommand rather than an option of ``residual``: it measures perplexity
(whole forward passes, one per rank, next to full/Baseline/Baseline+/LESS) where ``residual``
measures spectra of one full-attention pass, and it takes other options (``--kernels``,
``--batch-size``) and writes other files."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lesskv.cli.common import (
    add_data_args,
    add_dtype_arg,
    add_kernels_arg,
    add_model_args,
    add_policy_args,
    check_output,
    command_policy,
    int_list,
    load_kernels,
    model_dtype,
    non_negative_int,
    positive_int,
    print_table,
)
from lesskv.errors import LessKVError, one_line, short_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``analyze`` group with its ``residual``, ``oracle`` and ``attention``
    subcommands."""
    analyses = subparsers.add_parser(
        "analyze",
        help="figures: residual spectrum and rank-r oracle (paper Fig. 3), attention maps (Fig. 1)",
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
    residual.add_argument(
        "--seq-len", type=positive_int, default=512, help="window length in tokens"
    )
    residual.add_argument("--windows", type=positive_int, default=2, help="windows averaged")
    residual.add_argument("--out", type=Path, required=True, help="output folder")
    residual.set_defaults(run=run)
    add_oracle_parser(analyses)
    add_layers_parser(analyses)
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
    attention.add_argument(
        "--seq-len", type=positive_int, default=256, help="tokens of the text used"
    )
    attention.add_argument("--layer", type=non_negative_int, default=0)
    attention.add_argument("--head", type=non_negative_int, default=0, help="query head")
    add_kernels_arg(attention)
    attention.add_argument("--out", type=Path, required=True, help="output folder")
    attention.set_defaults(run=run)


def add_oracle_parser(analyses: argparse._SubParsersAction) -> None:
    """``analyze oracle``: the data options of ``residual``, plus ranks and kernels."""
    oracle = analyses.add_parser(
        "oracle",
        help="perplexity when every layer adds the rank-r part of its full-minus-sparse residual",
        description="Teacher-forced perplexity on --windows windows when every layer's attention "
        "output is the sparse policy's plus the rank-r truncated SVD of (full - sparse), per "
        "batch row and query head over the window: the best any rank-r correction could do. "
        "Reference lines: full, baseline, baseline+ and, with kernels (--kernels, or the shipped "
        "ones for the default model), less. Writes oracle.png and oracle.json to --out.",
    )
    add_model_args(oracle)
    add_dtype_arg(oracle)
    add_data_args(oracle)
    add_policy_args(oracle, budget="0.1")
    oracle.add_argument("--seq-len", type=positive_int, default=512, help="window length in tokens")
    oracle.add_argument("--windows", type=positive_int, default=2, help="windows scored")
    oracle.add_argument(
        "--ranks",
        type=parse_ranks,
        default="0,1,2,4,8,16",
        help="comma-separated oracle ranks, 0 (the plain policy) to the head dimension (full "
        "attention); default 0,1,2,4,8,16",
    )
    add_kernels_arg(oracle)
    oracle.add_argument(
        "--batch-size", type=positive_int, default=1, help="windows per forward pass"
    )
    oracle.add_argument("--out", type=Path, required=True, help="output folder")
    oracle.set_defaults(run=run)


def add_layers_parser(analyses: argparse._SubParsersAction) -> None:
    """``analyze layers``: where LESS loses, layer by layer."""
    layers = analyses.add_parser(
        "layers",
        help="the per-layer probe: the share of the sparse error LESS (and candidate kernels) "
        "removes beside a rank-r oracle, and LESS in one layer / from one layer on, end to end",
        description="On --windows windows read by a full-attention pass (or see --inputs): "
        "per layer, the error "
        "||O_full - O_sparse||^2 of the plain policy and the share of it that Baseline+, LESS "
        "(the --kernels set and each --candidates set) and the rank --oracle-rank oracle "
        "remove; per kernel set also the share with the true mass of the evicted pairs "
        "(mass_exact) or their true mean value (mean_exact) in place of the state's, and "
        "once the training-free mean-key mass. Then, unless --no-end-to-end, every "
        "--layer-step layers, the mean NLL with one layer changed (the plain policy "
        "elsewhere) to full attention, the oracle, LESS and each candidate, each also as a "
        "share of full attention's change there (*_only_gap: what the loss feels of the "
        "layer's *_removed), and with LESS in that layer and every later one. Writes "
        "layers.png and layers.json to --out.",
    )
    add_model_args(layers)
    add_dtype_arg(layers)
    add_data_args(layers)
    add_policy_args(layers, budget="0.1")
    layers.add_argument(
        "--seq-len", type=positive_int, default=1024, help="window length in tokens"
    )
    layers.add_argument("--windows", type=positive_int, default=4, help="windows scored")
    layers.add_argument(
        "--oracle-rank", type=positive_int, default=8, help="rank of the oracle compared"
    )
    layers.add_argument(
        "--layer-step", type=positive_int, default=1, help="end-to-end rows every this many layers"
    )
    layers.add_argument(
        "--matching",
        action="store_true",
        help="also score attention matching (training-free: the evicted pairs compacted into "
        "pseudo-pairs by NNLS masses and least-squares values, at the state's memory; a bound "
        "that keeps reference queries; slow: a small solve per head every 64 tokens)",
    )
    layers.add_argument(
        "--layers",
        default=None,
        help="probe only these layers, 'a:b' (a..b-1) or one number, as `lesskv train "
        "--layers`; default all",
    )
    layers.add_argument(
        "--inputs",
        choices=("full", "baseline", "less"),
        default="full",
        help="what every layer runs while the shares are measured: full attention (clean "
        "inputs, what training sees; default), or the plain policy / LESS, so each layer is "
        "read on the inputs it gets at inference",
    )
    layers.add_argument(
        "--no-end-to-end",
        dest="end_to_end",
        action="store_false",
        help="skip the NLL passes: one full-attention pass over the windows (the fast probe)",
    )
    add_kernels_arg(layers)
    layers.add_argument(
        "--candidates",
        nargs="+",
        type=parse_candidate,
        default=[],
        metavar="NAME=FOLDER",
        help="kernel sets compared beside --kernels, each a row group NAME: a kernel folder, "
        "or an unfinished `lesskv train` run's folder (the layers it has trained so far)",
    )
    layers.add_argument("--out", type=Path, required=True, help="output folder")
    layers.set_defaults(run=run)


def parse_candidate(text: str) -> tuple[str, Path]:
    """``--candidates NAME=FOLDER`` → ``(NAME, FOLDER)`` (argparse type); a name must be a
    word of its own, since it heads the candidate's columns."""
    name, sep, folder = text.partition("=")
    if not sep or not re.fullmatch(r"[\w.+-]+", name) or not folder:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=FOLDER (NAME: letters, digits, '_', '.', '+', '-')"
        )
    return name, Path(folder)


def candidate_folders(pairs: list[tuple[str, Path]]) -> dict[str, Path]:
    """``--candidates`` by name, refused before any model is loaded when a name repeats or
    is another row group's, or a folder does not exist."""
    from lesskv.analysis.layers import RESERVED

    folders = dict(pairs)
    if len(folders) < len(pairs) or folders.keys() & RESERVED:
        raise LessKVError(
            f"--candidates names must be distinct and none of {', '.join(sorted(RESERVED))}"
        )
    for name, folder in folders.items():
        if not folder.is_dir():
            raise LessKVError(f"--candidates {name}={short_path(folder)}: no such folder")
    return folders


def run(args: argparse.Namespace) -> None:
    """Run the analysis named on the command line, its --out folder checked first: the
    figure and its JSON are written last, after all the work."""
    check_output(args.out, "--out", folder=True)
    if args.analysis == "residual":
        run_residual(args)
    elif args.analysis == "oracle":
        run_oracle(args)
    elif args.analysis == "layers":
        run_layers(args)
    else:
        run_attention(args)


def run_residual(args: argparse.Namespace) -> None:
    """Average the energy spectra over the windows; print a row per layer, write the figure."""
    from lesskv.analysis.figures import plot_residual_energy, residual_energy
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits

    policy = command_policy(args)
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


def parse_ranks(text: str) -> list[int]:
    """``--ranks 0,1,8`` → ``[0, 1, 8]`` (argparse type; sorted, once each); the head
    dimension bounds them once the model is loaded."""
    return sorted(set(int_list(0)(text)))


def run_oracle(args: argparse.Namespace) -> None:
    """Score the references and every rank; without usable kernels the LESS line is left out,
    not fatal (unless --kernels was asked for explicitly)."""
    from lesskv.analysis.oracle import check_ranks, oracle_perplexity, plot_oracle
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits

    ranks = args.ranks
    policy = command_policy(args)
    policy.slots(args.seq_len)
    if args.windows < 1 or args.batch_size < 1:
        raise LessKVError("--windows and --batch-size must be >= 1")
    texts = load_texts(args.data, field=args.field)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args))
    check_fits(model, args.seq_len, "--seq-len windows")
    check_ranks(ranks, model)
    kernels = None
    try:
        kernels = list(load_kernels(args.kernels, args.model, model, policy, args.seq_len).layers)
    except LessKVError as err:
        if args.kernels is not None:
            raise
        print(f"no LESS line: {one_line(err)}", file=sys.stderr)
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=args.windows)
    report = oracle_perplexity(
        model, windows, policy, ranks, kernels, args.batch_size, model_name=args.model
    )
    json_path, png_path = report.save(args.out), plot_oracle(report, args.out)
    print_table(report.rows(), ["method", "rank", "ppl", "nll", "gap_closed"])
    print(f"written: {png_path}, {json_path}")


def run_layers(args: argparse.Namespace) -> None:
    """Score the reference methods (unless --no-end-to-end), then diagnose the chosen layers
    against them, for the shipped or --kernels set and every candidate."""
    from lesskv.analysis.candidates import load_candidate
    from lesskv.analysis.layers import diagnose_layers, plot_layers
    from lesskv.analysis.oracle import check_ranks
    from lesskv.data import load_texts, token_windows
    from lesskv.evaluation.perplexity import evaluate_perplexity
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import attention_modules, check_fits
    from lesskv.training.per_layer import parse_layers

    policy = command_policy(args)
    policy.slots(args.seq_len)
    if min(args.windows, args.oracle_rank, args.layer_step) < 1:
        raise LessKVError("--windows, --oracle-rank and --layer-step must be >= 1")
    folders = candidate_folders(args.candidates)
    texts = load_texts(args.data, field=args.field)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args))
    check_fits(model, args.seq_len, "--seq-len windows")
    check_ranks([args.oracle_rank], model)
    layers = parse_layers(args.layers, len(attention_modules(model)))
    kernels = list(load_kernels(args.kernels, args.model, model, policy, args.seq_len).layers)
    candidates = {name: load_candidate(folder, model, policy) for name, folder in folders.items()}
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=args.windows)
    reference = {}
    if args.end_to_end:
        methods = ["full", "baseline", "baseline+", "less"]
        scored = evaluate_perplexity(model, windows, methods, policy, kernels)
        reference = {row.method: row.nll for row in scored}
    report = diagnose_layers(
        model,
        windows,
        policy,
        kernels,
        reference,
        args.layer_step,
        args.oracle_rank,
        model_name=args.model,
        candidates=candidates,
        layers=layers,
        matching=args.matching,
        inputs=args.inputs,
    )
    report.candidates = {name: str(folder) for name, folder in folders.items()}
    json_path, png_path = report.save(args.out), plot_layers(report, args.out)
    print_table(*report.table())
    print(f"written: {png_path}, {json_path}")


def run_attention(args: argparse.Namespace) -> None:
    """Draw the maps of one head; without usable kernels the LESS map is left out, not fatal
    (unless --kernels was asked for explicitly)."""
    from lesskv.analysis.figures import attention_maps, plot_attention_maps
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits

    policy = command_policy(args)
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
        print(f"no LESS map: {one_line(err)}", file=sys.stderr)
    maps = attention_maps(model, ids, args.layer, args.head, policy, kernels)
    maps.tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    json_path, png_path = maps.save(args.out), plot_attention_maps(maps, args.out)
    print_table(maps.summary_rows(), ["map", "tv_to_full", "mass_on_evicted"])
    print(f"written: {png_path}, {json_path}")
