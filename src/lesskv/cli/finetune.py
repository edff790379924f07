"""``lesskv finetune``: tune trained kernels end to end on the next-token distributions."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesskv.cli.common import (
    add_data_args,
    add_kernels_arg,
    add_model_args,
    add_policy_args,
    check_training_args,
    kernels_folder,
    load_kernels,
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
    add_kernels_arg(finetune)
    add_policy_args(finetune, budget="0.1")
    add_data_args(finetune, default=None)
    finetune.add_argument("--sequences", type=int, default=32, help="training windows")
    finetune.add_argument(
        "--val-sequences", type=int, default=4, help="validation windows (after the training ones)"
    )
    finetune.add_argument("--seq-len", type=int, default=1024, help="window length in tokens")
    finetune.add_argument("--epochs", type=int, default=1)
    finetune.add_argument("--lr", type=float, default=1e-3)
    finetune.add_argument(
        "--val-every", type=int, default=16, help="steps between validations (and at the end)"
    )
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", type=Path, required=True, help="output kernel folder")
    finetune.add_argument(
        "--overwrite", action="store_true", help="replace another run's kernels in --out"
    )
    finetune.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Tune the starting kernels (whatever policy they were trained for: the policy only picks
    the shipped set) and report the validation KL before and after."""
    from lesskv.core.policies import make_policy
    from lesskv.data import load_texts, token_windows
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits
    from lesskv.training.finetune import FinetuneConfig, finetune_kernels

    check_training_args(args, "sequences", "val_sequences", "epochs", "val_every")
    model, tokenizer = load_model(args.model)
    check_fits(model, args.seq_len, "--seq-len windows")
    policy = make_policy(args.policy, args.budget)
    base = kernels_folder(args.kernels, args.model, policy)
    kernels = load_kernels(base, args.model, model, policy, transfer=True)
    wanted = args.sequences + args.val_sequences
    texts = load_texts(args.data, field=args.field)
    windows = token_windows(tokenizer, texts, args.seq_len, max_windows=wanted)
    if len(windows) < 2:
        raise LessKVError(f"--data holds {len(windows)} window(s) of {args.seq_len} tokens; need 2")
    n_val = min(args.val_sequences, len(windows) // 2)
    config = FinetuneConfig(
        model=args.model,
        base_kernels=str(base),
        data=args.data,
        seq_len=args.seq_len,
        sequences=len(windows) - n_val,
        val_sequences=n_val,
        epochs=args.epochs,
        lr=args.lr,
        val_every=args.val_every,
        seed=args.seed,
    )
    train, val = windows[:-n_val], windows[-n_val:]
    tuned = finetune_kernels(
        model, kernels, train, val, config, args.out, args.overwrite, args.command_line
    )
    info = tuned.meta.finetune
    print(
        f"validation KL {info['val_kl_before']:.4f} -> {info['val_kl_after']:.4f} "
        f"(best at step {info['best_step']}); kernels written to {args.out}"
    )
