"""Per-layer training of LESS kernels on a frozen model.

1. One pass of the full-attention model over the training windows records, for every layer
   of a group, the post-RoPE Q/K/V, the true attention output after ``o_proj``, and everything
   that does not depend on the kernels: the policy's eviction steps (its whole keep-mask in
   O(T)) and the sparse attention output with its log-sum-exp. Arrays stream to disk
   (fp16 memmaps), so the sequence count is not limited by RAM. Each store marks how many
   windows it holds, so an interrupted collection resumes where it stopped.
2. Each layer of the group then trains on its own: MSE between ``o_proj(LESS output)`` and the
   true output at the positions where something is evicted, Adam with the learning rate
   halved every 10 epochs, best validation checkpoint kept and written atomically; the next
   batch is read from disk while one trains. A rerun skips finished layers, so an interrupted
   run resumes, and ``layers`` lets processes share the work (:mod:`lesskv.distributed` splits
   them across torchrun's ranks).

Why groups: every layer's activations at once outgrow any disk at real sizes (an 8B model at
the paper's 512 windows of 4096 tokens records ~1.8 TiB). Layers are therefore collected in
consecutive groups whose stores fit a byte budget; a group's stores are deleted as soon as its
layers are trained. Each group runs the model over the windows again, up to its last layer
(the per-layer work, simulating the policy and storing, is done once per layer whatever the
groups); the budget never changes the kernels.

This module runs the loop; the pieces live beside it: :mod:`~lesskv.training.collection`
records a group's activations into :mod:`~lesskv.training.store`'s stores,
:mod:`~lesskv.training.losses` holds what a layer minimises, and
:mod:`~lesskv.training.checkpoints` writes each layer's file and assembles the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lesskv.core.budget import DEFAULT_HIDDEN, DEFAULT_RANK, SELECTIONS, STATES
from lesskv.core.forms import KernelShape, StateForm
from lesskv.core.kernels import make_kernels
from lesskv.core.policies import Policy
from lesskv.errors import LessKVError
from lesskv.hf import attention
from lesskv.hf.checkpoint import KernelMeta, LessKernels
from lesskv.hf.modules import attention_modules, attention_scale, policy_layers
from lesskv.training.checkpoints import LAYERS_DIR, assemble, missing_layers, save_layer
from lesskv.training.collection import collect_activations
from lesskv.training.distributed import Worker, decided_by_rank0, shard
from lesskv.training.losses import LOSSES, check_loss, layer_loss
from lesskv.training.run import RECORDING, Claim, claim_output_dir, freeze, snapshot
from lesskv.training.store import (
    ActivationStore,
    check_store_budget,
    default_store_budget,
    layer_store_bytes,
    on_device,
    store_groups,
)


@dataclass
class TrainConfig:
    """The knobs of one training run; a rerun with a different config is refused."""

    model: str
    policy: str
    budget: str
    seq_lens: list[int] = field(default_factory=lambda: [1024])
    sequences: int = 64  # windows of the shortest length (data.length_mix)
    epochs: int = 20
    batch_size: int = 2
    lr: float = 1e-3
    lr_halving_epochs: int = 10
    val_fraction: float = 0.1
    rank: int = DEFAULT_RANK
    hidden: int = DEFAULT_HIDDEN
    dropout: float = 0.3
    seed: int = 0
    data: str = ""
    spread: bool = False  # windows from evenly spaced places of each source, not its start
    state: str = STATES[0]  # the kernels' state form (core.budget.STATES)
    upstream: str = ""  # kernels the layers run while recording (collect_activations)
    loss: str = "mse"  # what each layer's kernels minimise: one of LOSSES
    select: str = SELECTIONS[0]  # keep the best-validation epoch's kernels, or the last's


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """``None`` → all layers; ``"a:b"`` → a..b-1; ``"3"`` → [3]; out of range → error."""
    if spec is None or spec.strip() in ("", ":"):
        return list(range(num_layers))
    try:
        if ":" in spec:
            lo, hi = spec.split(":", 1)
            start, stop = int(lo or 0), int(hi or num_layers)
        else:
            start = int(spec)
            stop = start + 1
    except ValueError:
        raise LessKVError(f"--layers {spec!r} is not 'a:b' or a layer number") from None
    if not 0 <= start < stop <= num_layers:
        raise LessKVError(f"--layers {spec!r} is out of range for a model with {num_layers} layers")
    return list(range(start, stop))


Batch = tuple[ActivationStore, list[int]]  # windows of one store (one length) read together


def _mean_loss(loss: Callable[..., torch.Tensor], o_proj: nn.Module, batches: list[Batch]) -> float:
    """Mean over windows of ``loss(o_proj, batch, budget)``."""
    total, windows = 0.0, 0
    with torch.no_grad():
        for store, batch in loaded(batches, o_proj.weight.device):
            value = loss(o_proj, batch, store.kept)
            size = len(batch["steps"])
            total, windows = total + value.item() * size, windows + size
    return total / windows


def loaded(
    batches: Sequence[Batch], device: torch.device
) -> Iterator[tuple[ActivationStore, dict[str, torch.Tensor]]]:
    """``batches`` in order, each on ``device``; a background thread reads the next one from
    disk (into page-locked memory for a GPU, whose copy then overlaps too) while the caller
    trains on this one. A thread, not DataLoader workers: those would pickle the memmaps
    (numpy pickles their whole contents) or copy the process, for one sequential read."""
    pin = device.type == "cuda"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lesskv-read") as reader:

        def read(k: int) -> Future:
            store, chunk = batches[k]
            return reader.submit(store.gather, chunk, pin)

        pending = read(0) if batches else None
        for k, (store, _) in enumerate(batches):
            host = pending.result()
            if k + 1 < len(batches):
                pending = read(k + 1)
            yield store, on_device(host, device, non_blocking=pin)


def split_windows(n: int, config: TrainConfig) -> tuple[list[int], list[int]]:
    """Validation and training windows of one length, the same for every layer (Baseline+'s
    outputs are collected for the validation windows only). A positive ``val_fraction``
    holds out at least one window (none of a single one); 0 validates on the training
    windows themselves, which measures the fit, not generalisation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_val = max(1, round(n * config.val_fraction)) if n > 1 and config.val_fraction > 0 else 0
    return order[:n_val] or order, order[n_val:] or order


def _batches(stores: list[ActivationStore], windows: list[list[int]], size: int) -> list[Batch]:
    return [
        (store, chunk[i : i + size])
        for store, chunk in zip(stores, windows, strict=True)
        for i in range(0, len(chunk), size)
    ]


def train_layer(
    stores: list[ActivationStore],
    o_proj: nn.Module,
    shape: KernelShape,
    config: TrainConfig,
    layer: int,
    log: Callable[[str], None] = print,
    scale: float | None = None,
) -> tuple[StateForm, dict[str, float]]:
    """Train one layer's kernels on ``o_proj``'s device from its activations at every window
    length (one store each; a batch never mixes lengths); returns the best-validation (or,
    with ``config.select == "last"``, the last) epoch's kernels and their losses. Every
    random draw comes from seeds derived from ``config.seed`` and ``layer`` alone, so a layer
    trains the same whichever process or run trains it."""
    scale = shape.head_dim**-0.5 if scale is None else scale  # the layer's attention scale
    splits = [split_windows(len(store), config) for store in stores]
    val = _batches(stores, [v for v, _ in splits], config.batch_size)
    generator = torch.Generator().manual_seed(config.seed + layer)
    torch.manual_seed(config.seed + layer)
    kernels = make_kernels(shape).to(o_proj.weight.device)
    optimizer = torch.optim.Adam(kernels.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_halving_epochs, gamma=0.5)
    kv = shape.kv_heads
    objective = LOSSES[config.loss]

    def plus_mse(o_proj, batch, budget):
        return layer_loss(None, o_proj, batch, budget, kv, "plus_out")

    def val_objective(o_proj, batch, budget):
        return objective(kernels, o_proj, batch, budget, kv, scale)

    def val_mse(o_proj, batch, budget):
        return layer_loss(kernels, o_proj, batch, budget, kv)

    baseline_plus = _mean_loss(plus_mse, o_proj, val)
    best, best_state = math.inf, None
    for _epoch in range(config.epochs):
        kernels.train()
        shuffled = [[t[j] for j in torch.randperm(len(t), generator=generator)] for _, t in splits]
        train = _batches(stores, shuffled, config.batch_size)
        order = [train[k] for k in torch.randperm(len(train), generator=generator).tolist()]
        for store, batch in loaded(order, o_proj.weight.device):
            loss = objective(kernels, o_proj, batch, store.kept, kv, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        kernels.eval()
        val_loss = _mean_loss(val_objective, o_proj, val)
        if val_loss < best or config.select == "last":
            best, best_state = val_loss, snapshot(kernels)
    kernels.load_state_dict(best_state)
    mse = best if config.loss == "mse" else _mean_loss(val_mse, o_proj, val)
    scored = "val" if config.val_fraction > 0 else "fit"  # held-out windows, or the training ones
    log(f"layer {layer:3d}: {scored} MSE  LESS {mse:.4g} | Baseline+ {baseline_plus:.4g}")
    return kernels.eval(), {"val_loss": mse, "baseline_plus_val_loss": baseline_plus}


def train_kernels(
    model: PreTrainedModel,
    windows: torch.Tensor | Sequence[torch.Tensor],
    policy: Policy,
    config: TrainConfig,
    out_dir: str | Path,
    layers: list[int] | None = None,
    overwrite: bool = False,
    command: str = "",
    progress: bool = True,
    worker: Worker | None = None,
    upstream: Sequence[nn.Module] | None = None,
    store_budget: int | None = None,
    keep_activations: bool = False,
) -> LessKernels | None:
    """Train (or finish training) kernels into ``out_dir``; returns them once all layers exist.
    ``layers``: those to train now (all by default), less the local layers of a mixed model
    (:func:`trainable_layers`). ``windows``: ``(N, T)`` token windows, or one such tensor per
    window length; with ``upstream`` kernels every layer trains on the inputs it sees when all
    run LESS.
    ``store_budget``: bytes of activations on disk at once (default: half the free space
    there), which sizes the groups of layers collected together; it never changes the result.
    ``keep_activations``: leave the recorded activations in ``out_dir/activations`` (another
    run with the same data and policy, its ``activations`` linked there, skips recording).

    Under torchrun (``worker``), the missing layers are split across the ranks: rank 0 alone
    claims ``out_dir`` (which every rank must share), lists what is missing and, after all
    ranks are done, assembles the checkpoint; the other ranks return ``None``. Each rank gets
    an equal share of the store budget (their activations share ``out_dir``).
    """
    out = Path(out_dir)
    windows = [windows] if isinstance(windows, torch.Tensor) else list(windows)
    modules = _trainable_modules(model)
    lead = worker is None or worker.rank == 0
    requested = trainable_layers(model, layers, announce=lead)
    processes = 1 if worker is None else worker.world_size
    budget = (default_store_budget(out) if store_budget is None else store_budget) // processes
    grads = config.loss == "weighted"
    sizes = {layer: layer_store_bytes(model, layer, windows, grads) for layer in requested}
    check_store_budget(sizes, budget, processes)
    meta = _kernel_meta(model, policy, config, command)
    # a rank or width too large for memory, or a loss the form cannot give, fails now, not
    # once the activations are recorded
    with torch.device(modules[requested[0]].o_proj.weight.device):
        check_loss(make_kernels(meta.layer_shape), config.loss)

    def plan() -> tuple[list[int], Claim]:
        claim = claim_output_dir(out, config, overwrite, shared=True)
        return missing_layers(out, requested), claim

    todo, claim = plan() if worker is None else decided_by_rank0(worker, plan)
    mine = todo if worker is None else shard(todo, worker.rank, worker.world_size)
    groups = store_groups({layer: sizes[layer] for layer in mine}, budget)
    # under torchrun every rank writes in the folder: one that fails leaves it to the others
    undone = (
        claim.undone_on_error(f"{LAYERS_DIR}/*") if worker is None else contextlib.nullcontext()
    )
    with undone:
        _train_layers(
            model,
            windows,
            policy,
            config,
            out,
            groups,
            meta,
            progress and lead,
            upstream,
            keep_activations,
        )
    if worker is not None:
        dist.barrier()
        lost = missing_layers(out, todo) if lead else []
        if lost:
            raise LessKVError(
                f"layers {lost} are not in {out} although every rank finished: "
                "--out must be a folder that all nodes share"
            )
    return assemble(out, meta, keep_activations) if lead else None


def _trainable_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The model's attention modules, which must have the ``o_proj`` whose outputs are the
    targets and the loss."""
    modules = attention_modules(attention.enable(model))
    if not hasattr(modules[0], "o_proj"):
        raise LessKVError(
            f"per-layer training reads each attention layer's o_proj, which "
            f"{type(modules[0]).__name__} does not have (Falcon, GPT-NeoX, OPT and GPT-2 name "
            "theirs otherwise): training for this family is not supported yet"
        )
    return modules


def trainable_layers(
    model: PreTrainedModel, layers: list[int] | None, announce: bool = True
) -> list[int]:
    """The layers among ``layers`` (all by default) that get kernels: those where the policy
    runs. The local (sliding-window) layers of a model mixing local and global ones keep
    their own window and have no kernels: a range holding some trains the others (and says
    so, with ``announce``); one holding nothing else is refused."""
    runs = policy_layers(model)
    chosen = [i for i in runs if layers is None or i in layers]
    local = sorted(set(layers or []) - set(runs))
    if not chosen:
        raise LessKVError(
            f"layers {local} are all local (sliding-window) layers, where lesskv's policy does "
            f"not run and LESS has no kernels: choose among layers {runs}"
        )
    if local and announce:
        tqdm.write(f"skipping local (sliding-window) layers {local}: they keep their own window")
    return chosen


def _train_layers(
    model: PreTrainedModel,
    windows: list[torch.Tensor],
    policy: Policy,
    config: TrainConfig,
    out: Path,
    groups: list[list[int]],
    meta: KernelMeta,
    progress: bool,
    upstream: Sequence[nn.Module] | None,
    keep_activations: bool = False,
) -> None:
    """Group by group: collect the group's activations (one pass per window length), then
    train and save each of its layers, deleting its activations once it is saved (unless
    ``keep_activations``)."""
    todo = [layer for group in groups for layer in group]
    if not todo:
        return
    freeze(model)
    modules = attention_modules(model)
    shape = replace(meta.layer_shape, dropout=config.dropout)
    started = time.time()
    bar = tqdm(total=len(todo), desc="training layers", unit="layer", disable=not progress)
    for group in groups:
        by_length = [
            collect_activations(
                model,
                length,
                group,
                policy,
                out / RECORDING,
                config.rank,
                progress,
                set(split_windows(len(length), config)[0]),
                upstream,
                grads=config.loss == "weighted",
            )
            for length in windows
        ]
        for layer in group:
            stores = [stores[layer] for stores in by_length]
            module = modules[layer]
            kernels, losses = train_layer(
                stores, module.o_proj, shape, config, layer, bar.write, attention_scale(module)
            )
            save_layer(out, layer, kernels, losses)
            for store in [] if keep_activations else stores:
                shutil.rmtree(store.dir, ignore_errors=True)
            bar.update()
    bar.write(f"trained {len(todo)} layer(s) in {time.time() - started:.0f} s")


def _kernel_meta(
    model: PreTrainedModel, policy: Policy, config: TrainConfig, command: str
) -> KernelMeta:
    return KernelMeta.for_model(
        model,
        config.model,
        policy=policy.name,
        budget=str(policy.budget),
        rank=config.rank,
        hidden=config.hidden,
        seq_len=max(config.seq_lens),
        state=config.state,
        training_data=config.data,
        command=command,
        training={
            "loss": config.loss,
            "windows": config.sequences,
            "seq_lens": list(config.seq_lens),
            "epochs": config.epochs,
            "lr": config.lr,
            "lr_halving_epochs": config.lr_halving_epochs,
            "batch_size": config.batch_size,
            "dropout": config.dropout,
            "upstream": config.upstream,
        },
    )
