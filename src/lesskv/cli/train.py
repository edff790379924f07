"""``lesskv train``: fit LESS kernels, layer by layer, for a model, policy and budget; under
torchrun the layers are split across processes."""

from __future__ import annotations

import argparse
import re
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from lesskv.cli.common import (
    add_data_args,
    add_device_arg,
    add_dtype_arg,
    add_model_args,
    add_policy_args,
    check_evicts,
    check_output,
    check_training_args,
    command_policy,
    model_dtype,
    model_placement,
    non_negative_int,
    positive_float,
    positive_int,
    share,
    window_lengths,
)
from lesskv.core.budget import DEFAULT_HIDDEN, DEFAULT_RANK, MAX_COUNT, SELECTIONS, STATES
from lesskv.errors import LessKVError

if TYPE_CHECKING:  # the command imports the heavy modules only once it knows what it runs
    from lesskv.core.policies import Policy
    from lesskv.training.distributed import Worker


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``."""
    train = subparsers.add_parser(
        "train",
        help="train LESS kernels for a model, policy and budget",
        description="Record the frozen model's attention on --data, then fit each layer's "
        "kernels to what eviction loses. Reruns resume; --layers splits work across processes, "
        "and `torchrun --nproc-per-node N -m lesskv train ...` splits the layers across N "
        "processes (GPUs, or CPU processes without CUDA) and across nodes.",
    )
    add_model_args(train)
    add_device_arg(train)
    add_dtype_arg(train)
    add_policy_args(train)
    add_data_args(train, default=None, several=True)
    train.add_argument(
        "--sequences",
        type=positive_int,
        default=64,
        help="training windows of the shortest --seq-len (each longer length gets as many "
        "tokens in fewer windows)",
    )
    train.add_argument(
        "--seq-len",
        type=window_lengths,
        default=[1024],
        help="window length in tokens, or several comma-separated (e.g. 1024,2048,4096): "
        "a mix of lengths teaches the state to stay calibrated at any length",
    )
    train.add_argument(
        "--spread",
        action="store_true",
        help="cut each source's windows from evenly spaced places through all of its text "
        "(tokenised whole) instead of one after another from its start: a corpus of books "
        "then gives windows of every book",
    )
    train.add_argument("--epochs", type=positive_int, default=20)
    train.add_argument("--batch-size", type=positive_int, default=2)
    train.add_argument("--lr", type=positive_float, default=1e-3)
    add_kernel_options(train)
    add_selection_options(train)
    train.add_argument(
        "--upstream",
        type=Path,
        default=None,
        metavar="KERNELS",
        help="kernels (for this model and policy) that every layer runs while the activations "
        "are recorded, so each layer learns from the inputs it gets at inference, with the "
        "layers before it sparse too: a second round after a first `lesskv train`",
    )
    train.add_argument("--layers", default=None, help="train only layers a:b (resumable)")
    train.add_argument(
        "--store-budget",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="disk the recorded activations may fill at once, e.g. 20GB, 500MiB or a byte "
        "count (default: half the free space where --out is): layers are collected in groups "
        "that fit, one more forward pass per group; any budget trains the same kernels",
    )
    train.add_argument(
        "--keep-activations",
        action="store_true",
        help="keep the recorded activations in OUT/activations once each layer is trained "
        "(instead of deleting them): another run on the same data, policy and layers whose "
        "--out holds a copy or hard links of them (cp -al) skips recording, e.g. to train "
        "another --kernel form on one recording",
    )
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--out", type=Path, required=True, help="output kernel folder")
    train.add_argument(
        "--overwrite", action="store_true", help="replace another run's kernels in --out"
    )
    train.add_argument(
        "--distributed",
        action="store_true",
        help="split the layers across torchrun's processes (implied when torchrun starts more "
        "than one); --out must be shared by all of them",
    )
    train.set_defaults(run=run)


def add_kernel_options(train: argparse.ArgumentParser) -> None:
    """What the kernels are and what they learn: rank, width, state form and loss."""
    train.add_argument("--rank", type=positive_int, default=DEFAULT_RANK, help="LESS rank R")
    train.add_argument(
        "--hidden", type=positive_int, default=DEFAULT_HIDDEN, help="kernel MLP hidden size"
    )
    train.add_argument(
        "--kernel",
        choices=STATES,
        default=STATES[0],
        help="the state's form: 'decay' (default) learns how fast each head's evicted pairs "
        "fade with distance, which keeps LESS calibrated far beyond the training length; "
        "'paper' is the paper's state, every evicted pair weighing the same forever; 'slots' "
        "(ours, not the paper's) soft-clusters the evicted pairs into a few mean keys and values "
        "read through the layer's own softmax with a learned log-mass",
    )
    train.add_argument(
        "--loss",
        choices=("mse", "kl", "mse+kl", "weighted"),
        default="mse",
        help="what each layer's kernels minimise: the output MSE (the paper's), the KL between "
        "the true attention weights and LESS's implied ones, both (the share of the plain "
        "policy's output error left, plus the KL), or 'weighted' (ours): each position's "
        "output error as the next-token loss feels it, through the NLL's gradient with the "
        "plain policy running, plus a tenth of the MSE; its recording runs each window once "
        "more, forward and backward, and stores the gradients",
    )


def add_selection_options(train: argparse.ArgumentParser) -> None:
    """How the kernels are regularised and which epoch's are kept: what large data allows
    (and what measuring a state's capacity needs: --val-fraction 0 --select last --dropout 0
    fits the windows themselves)."""
    train.add_argument(
        "--val-fraction",
        type=share,
        default=0.1,
        help="share of each length's windows held out to choose the epoch and report the loss "
        "(default 0.1, at least one window); 0 trains on every window and reports the loss on "
        "the training windows",
    )
    train.add_argument(
        "--select",
        choices=SELECTIONS,
        default=SELECTIONS[0],
        help="which epoch's kernels to keep: the best on the validation windows (default) or "
        "the last",
    )
    train.add_argument(
        "--lr-halving",
        type=positive_int,
        default=10,
        metavar="EPOCHS",
        help="halve the learning rate every this many epochs (default 10; long runs on a few "
        "windows need more)",
    )
    train.add_argument(
        "--dropout",
        type=share,
        default=0.3,
        help="dropout inside the kernel MLPs while training (default 0.3)",
    )


UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
UNITS |= {f"{unit}i": 2 ** (10 * power) for power, unit in enumerate("kmgt", 1)}


def byte_size(text: str) -> int:
    """``--store-budget 20GB`` → bytes (argparse type): a byte count, or a number with a unit,
    kB MB GB TB (powers of 1000) or KiB MiB GiB TiB (of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: a byte count or a number with a unit (500MB, 20GiB)"
        )
    size = int(Decimal(match[1]) * UNITS[match[2] or ""])
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be at least one byte")
    if size > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be at most {MAX_COUNT} bytes")
    return size


def run(args: argparse.Namespace) -> None:
    """Check the arguments and read the data before any process group or model exists."""
    from lesskv.data import load_texts
    from lesskv.training import distributed

    check_training_args(args, "sequences", "epochs", "batch_size", "rank", "hidden")
    placement = model_placement(args)  # a device this machine lacks stops here, before any work
    launched = args.distributed or distributed.launched_by_torchrun()
    if launched and args.device_map is not None:
        raise LessKVError(
            "--device-map cannot be used under torchrun: each process takes its own GPU"
        )
    policy = command_policy(args)
    check_evicts(policy, args.seq_len)
    check_output(args.out, "--out", folder=True)
    texts = [load_texts(source, field=args.field) for source in args.data]
    if launched:
        with distributed.process_group() as worker:
            _train(args, policy, texts, {"device": str(worker.device)}, worker)
    else:
        _train(args, policy, texts, placement, None)


def _train(
    args: argparse.Namespace,
    policy: Policy,
    texts: list[list[str]],
    placement: dict[str, object],
    worker: Worker | None,
) -> None:
    """Load, train, report; ``placement`` is :func:`load_model`'s ``device`` or ``device_map``,
    ``worker`` this process's place in a torchrun job, if any (its own device, then, instead of
    ``--device``)."""
    from lesskv.data import source_mix
    from lesskv.hf.loading import load_model
    from lesskv.hf.modules import check_fits
    from lesskv.training.per_layer import TrainConfig, parse_layers, train_kernels

    model, tokenizer = load_model(args.model, dtype=model_dtype(args), **placement)
    check_fits(model, max(args.seq_len), "--seq-len windows")
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    windows = source_mix(tokenizer, texts, args.seq_len, args.sequences, args.spread)
    config = TrainConfig(
        model=args.model,
        policy=policy.name,
        budget=str(policy.budget),
        seq_lens=args.seq_len,
        sequences=args.sequences,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        hidden=args.hidden,
        seed=args.seed,
        data=" + ".join(args.data),
        spread=args.spread,
        state=args.kernel,
        upstream=str(args.upstream or ""),
        loss=args.loss,
        val_fraction=args.val_fraction,
        select=args.select,
        lr_halving_epochs=args.lr_halving,
        dropout=args.dropout,
    )
    upstream = None
    if args.upstream is not None:
        from lesskv.hf.checkpoint import LessKernels

        upstream = list(LessKernels.from_pretrained(args.upstream, model, policy.name).layers)
    kernels = train_kernels(
        model,
        windows,
        policy,
        config,
        args.out,
        layers=layers,
        overwrite=args.overwrite,
        command=args.command_line,
        worker=worker,
        upstream=upstream,
        store_budget=args.store_budget,
        keep_activations=args.keep_activations,
    )
    if worker is not None and worker.rank != 0:
        return
    if kernels is None:
        print(
            f"layers {args.layers} done; rerun without --layers (or finish the others) "
            f"to assemble {args.out}"
        )
    else:
        from lesskv.analysis.plots import plot_layer_losses

        figure = plot_layer_losses(kernels.meta, args.out / "val_loss.png")
        print(f"kernels written to {args.out}; per-layer losses plotted in {figure}")
