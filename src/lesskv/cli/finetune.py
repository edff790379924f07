"""``lesskv finetune``: tune trained kernels end to end on the next-token distributions."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesskv.cli.common import (
    add_data_args,
    add_device_arg,
    add_dtype_arg,
    add_kernels_arg,
    add_model_args,
    add_policy_args,
    check_evicts,
    check_output,
    check_training_args,
    command_policy,
    kernels_folder,
    load_kernels,
    model_dtype,
    model_placement,
    non_negative_int,
    positive_float,
    positive_int,
    window_lengths,
)
from lesskv.errors import LessKVError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``finetune``."""
    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune trained kernels end to end on the next-token loss",
        description="Start from per-layer kernels (`lesskv train`, or the shipped ones for "
        "--policy/--budget) and train every layer's kernels at once, the model frozen, to "
        "minimise KL(full model || LESS model) of the next-token distributions on --data. "
        "The kernels with the best validation KL are written to --out (the starting ones "
        "count); an interrupted run resumes from its last step.",
    )
    add_model_args(finetune)
    add_device_arg(finetune)
    add_dtype_arg(finetune)
    add_kernels_arg(finetune)
    add_policy_args(finetune, budget="0.1")
    add_data_args(finetune, default=None)
    finetune.add_argument("--sequences", type=positive_int, default=32, help="training windows")
    finetune.add_argument(
        "--val-sequences",
        type=positive_int,
        default=4,
        help="validation windows (after the training ones)",
    )
    finetune.add_argument(
        "--seq-len",
        type=window_lengths,
        default=[1024],
        help="window length in tokens, or several (1024,2048): the shortest gets --sequences "
        "windows (and --val-sequences), every other length as many tokens; one length per step",
    )
    finetune.add_argument("--epochs", type=positive_int, default=1)
    finetune.add_argument(
        "--lr", type=positive_float, default=1e-3, help="starting learning rate (cosine decay to 0)"
    )
    finetune.add_argument(
        "--val-every",
        type=positive_int,
        default=16,
        help="steps between validations (and at the end)",
    )
    finetune.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each decoder layer again in the backward pass instead of keeping its "
        "activations (default on; same gradients): on SmolLM2 at 1024 tokens a step's peak "
        "memory falls from 4.6 to 2.5 GiB for about a quarter more time",
    )
    finetune.add_argument("--seed", type=non_negative_int, default=0)
    finetune.add_argument("--out", type=Path, required=True, help="output kernel folder")
    finetune.add_argument(
        "--overwrite", action="store_true", help="replace another run's kernels in --out"
    )
    finetune.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Tune the starting kernels (whatever policy they were trained for: the policy only picks
    the shipped set) and report the validation KL before and after."""
    from lesskv.data import length_mix, load_texts
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits
    from lesskv.training.finetune import FinetuneConfig, finetune_kernels

    check_training_args(args, "sequences", "val_sequences", "epochs", "val_every")
    placement = model_placement(args)
    policy = command_policy(args)
    check_evicts(policy, args.seq_len)
    check_output(args.out, "--out", folder=True)
    model, tokenizer = load_model(args.model, dtype=model_dtype(args), **placement)
    check_fits(model, max(args.seq_len), "--seq-len windows")
    base = kernels_folder(args.kernels, args.model, policy)
    kernels = load_kernels(base, args.model, model, policy, transfer=True)
    texts = load_texts(args.data, field=args.field)
    mix = length_mix(tokenizer, texts, args.seq_len, args.sequences + args.val_sequences)
    train, val = _split(mix, args.val_sequences / (args.sequences + args.val_sequences))
    config = FinetuneConfig(
        model=args.model,
        base_kernels=str(base),
        data=args.data,
        seq_lens=args.seq_len,
        sequences=len(train),
        val_sequences=len(val),
        epochs=args.epochs,
        lr=args.lr,
        val_every=args.val_every,
        seed=args.seed,
    )
    tuned = finetune_kernels(
        model,
        kernels,
        train,
        val,
        config,
        args.out,
        args.overwrite,
        args.command_line,
        checkpointing=args.checkpointing,
    )
    info = tuned.meta.finetune
    print(
        f"validation KL {info['val_kl_before']:.4f} -> {info['val_kl_after']:.4f} "
        f"(best at step {info['best_step']}); kernels written to {args.out}"
    )


def _split(mix: list, val_share: float) -> tuple[list, list]:
    """Hold out the last ``val_share`` of each length's windows (at least one, at most half;
    a length with a single window only trains), so validation covers every length."""
    train, val = [], []
    for windows in mix:
        n_val = min(max(1, round(len(windows) * val_share)), len(windows) // 2)
        train += list(windows[: len(windows) - n_val])
        val += list(windows[len(windows) - n_val :])
    if not val:
        raise LessKVError("--data holds too little text for a training and a validation window")
    return train, val
