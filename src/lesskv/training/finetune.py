"""End-to-end fine-tuning of every layer's LESS kernels on the frozen model.

Per-layer training (:mod:`lesskv.train`) fits each layer on inputs from the full-attention
model, but at inference every upstream layer is sparse too, so the per-layer errors compound
(docs/RESULTS.md §2). This stage starts from per-layer kernels and trains all layers at once
through the same parallel form that evaluation uses, on what users care about: the KL
divergence from the full model's next-token distribution to the LESS model's, at the
positions where something has been evicted. The LLM stays frozen. Kernels run without
dropout here, so the end-to-end signal is not drowned by thirty layers of noise.

The learning rate follows a cosine from ``lr`` down to zero over the run, so the last steps
refine instead of jumping around the minimum (a constant rate stalled in earlier runs,
docs/RESULTS.md §2). Windows may have several lengths, one length per step, so the kernels
that win validation are the ones that hold at every length.

A state file (kernels, optimizer, step, best validation) is written atomically after every
step, so an interrupted run resumes where it stopped and ends with the same kernels.

With ``checkpointing``, each decoder layer keeps only its input for the backward pass and runs
again there, so a step holds the activations of one layer at a time instead of every layer's,
for about one more forward pass; the gradients are the same.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from lesskv.core.policies import Policy, make_policy
from lesskv.errors import LessKVError, one_line, short_path
from lesskv.hf.checkpoint import LessKernels, atomic_write
from lesskv.hf.methods import using_method
from lesskv.training.run import claim_output_dir, freeze, snapshot

STATE_FILE = "finetune_state.pt"
HISTORY_FILE = "finetune_history.json"  # the training loss of every step
# On by default: memory is what limits fine-tuning's window length; SmolLM2-135M, one step at
# 1024 tokens on a CPU: peak RSS 4.6 GiB without, 2.5 GiB with, for ~10-30 % more time.
CHECKPOINTING = True


@dataclass
class FinetuneConfig:
    """The knobs of one fine-tuning run; a rerun with a different config is refused."""

    model: str
    base_kernels: str
    data: str
    seq_lens: list[int] = field(default_factory=lambda: [1024])
    sequences: int = 32
    val_sequences: int = 4
    epochs: int = 1
    lr: float = 1e-3
    val_every: int = 16
    seed: int = 0


def next_token_kl(
    model: PreTrainedModel, ids: torch.Tensor, policy: Policy, kernels: LessKernels
) -> torch.Tensor:
    """Mean KL(full ‖ LESS) of the next-token distributions over the positions from the
    budget on (before it nothing is evicted and LESS equals full attention exactly)."""
    start = policy.slots(ids.shape[1]).total
    # No cache: nothing decodes afterwards, and a checkpointed layer run again in the backward
    # pass would find its own keys already cached.
    with torch.no_grad(), using_method(model, "full"):
        teacher = model(input_ids=ids, use_cache=False).logits[:, start:].float().log_softmax(-1)
    with using_method(model, "less", policy=policy, kernels=kernels):
        student = model(input_ids=ids, use_cache=False).logits[:, start:].float().log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()


@torch.no_grad()
def validation_kl(
    model: PreTrainedModel, windows: Sequence[torch.Tensor], policy: Policy, kernels: LessKernels
) -> float:
    """Mean next-token KL over the validation windows (one window per forward pass)."""
    losses = [next_token_kl(model, w[None], policy, kernels).item() for w in windows]
    return sum(losses) / len(losses)


def finetune_kernels(
    model: PreTrainedModel,
    kernels: LessKernels,
    windows: Sequence[torch.Tensor],
    val_windows: Sequence[torch.Tensor],
    config: FinetuneConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    command: str = "",
    progress: bool = True,
    checkpointing: bool = CHECKPOINTING,
) -> LessKernels:
    """Fine-tune ``kernels`` (in place) on ``windows`` (1-D token windows, lengths may differ);
    writes and returns the kernels with the best validation KL (the starting kernels count,
    so this never makes them worse). ``checkpointing`` trades a forward pass per step for
    memory (see the module's docstring) and changes nothing else, so it is not part of
    ``config``: a resumed run may switch it."""
    if len(windows) == 0 or len(val_windows) == 0:
        raise LessKVError("fine-tuning needs at least one training and one validation window")
    layers = decoder_layers(model) if checkpointing else []
    kernels.check_compatible(model)
    policy = make_policy(kernels.meta.policy, kernels.meta.budget)
    out = Path(out_dir)
    claim = claim_output_dir(out, config, overwrite)
    with claim.undone_on_error(STATE_FILE):  # a first step that fails leaves nothing
        state = _tune(model, kernels, windows, val_windows, policy, config, out, layers, progress)
    return _save_tuned(kernels, state, config, command, out)


def _tune(
    model: PreTrainedModel,
    kernels: LessKernels,
    windows: Sequence[torch.Tensor],
    val_windows: Sequence[torch.Tensor],
    policy: Policy,
    config: FinetuneConfig,
    out: Path,
    layers: list[nn.Module],
    progress: bool,
) -> dict:
    """The steps not yet taken, the state written after each; returns the last state."""
    freeze(model)
    kernels.eval().requires_grad_(True)
    optimizer = torch.optim.Adam(kernels.parameters(), lr=config.lr)
    total = config.epochs * len(windows)
    state = _load_state(out / STATE_FILE)
    if state is None:
        before = validation_kl(model, val_windows, policy, kernels)
        state = {"step": 0, "before": before, "best": before, "best_step": 0, "history": []}
        state["best_kernels"] = snapshot(kernels)
    else:
        kernels.load_state_dict(state["kernels"])
        optimizer.load_state_dict(state["optimizer"])
    bar = tqdm(
        range(state["step"], total),
        initial=state["step"],
        total=total,
        desc="fine-tuning",
        unit="step",
        disable=not progress,
    )
    for step in bar:
        epoch, i = divmod(step, len(windows))
        generator = torch.Generator().manual_seed(config.seed + epoch)
        order = torch.randperm(len(windows), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.lr, step, total)
        with checkpointed(layers):
            loss = next_token_kl(model, windows[order[i]][None], policy, kernels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["history"].append(loss.item())
        bar.set_postfix(kl=f"{loss.item():.4f}", best_val=f"{state['best']:.4f}")
        if (step + 1) % config.val_every == 0 or step + 1 == total:
            val = validation_kl(model, val_windows, policy, kernels)
            bar.write(f"step {step + 1}: validation KL {val:.4f} (start {state['before']:.4f})")
            if val < state["best"]:
                state.update(best=val, best_step=step + 1, best_kernels=snapshot(kernels))
        state.update(step=step + 1, kernels=kernels.state_dict(), optimizer=optimizer.state_dict())
        atomic_write(out / STATE_FILE, lambda p: torch.save(state, p))
    return state


def _save_tuned(
    kernels: LessKernels, state: dict, config: FinetuneConfig, command: str, out: Path
) -> LessKernels:
    """The best kernels of the run, with what it did in their metadata, written to ``out``."""
    kernels.load_state_dict(state["best_kernels"])
    finetune = {
        "base_kernels": config.base_kernels,
        "data": config.data,
        "steps": state["step"],
        "best_step": state["best_step"],
        "val_kl_before": state["before"],
        "val_kl_after": state["best"],
    }
    commands = "\n".join(c for c in (kernels.meta.command, command) if c)
    kernels.meta = replace(kernels.meta, command=commands, finetune=finetune)
    kernels.requires_grad_(False).save_pretrained(out)
    history = json.dumps(state["history"]) + "\n"
    atomic_write(out / HISTORY_FILE, lambda p: Path(p).write_text(history))
    return kernels


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The layers :func:`checkpointed` wraps: the blocks transformers itself would checkpoint
    (refused, before any work, for a model without them)."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise LessKVError(
            f"{type(model).__name__} has no decoder layers to checkpoint: pass --no-checkpointing"
        )
    return layers


@contextmanager
def checkpointed(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, each of ``layers`` keeps only its inputs for the backward pass, which
    runs the layer again; afterwards every layer is as it was.

    torch's checkpoint around each layer's ``forward``, not transformers' switch: that one
    checkpoints only in training mode, which would also turn on the frozen model's dropout
    (and leaves a hook on the embeddings). The model's and the layers' modes never change."""
    originals = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's hooks
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)
    try:
        yield
    finally:
        for layer, original in zip(layers, originals, strict=True):
            if original is None:
                del layer.forward
            else:
                layer.forward = original


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # no backward to run it again for (the teacher's pass)
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_as_in_forward, **kwargs)


def _as_in_forward() -> tuple[AbstractContextManager, AbstractContextManager]:
    """checkpoint's ``context_fn``: the recompute runs in the context variables the forward
    saw. The methods' setups live in context variables, and the backward runs outside
    :func:`using_method`'s block, in another thread on a GPU: without this the recompute
    would be full attention."""
    return nullcontext(), _entered(contextvars.copy_context())


@contextmanager
def _entered(context: contextvars.Context) -> Iterator[None]:
    """Set every variable of ``context`` for the block, then put them back."""
    tokens = [(var, var.set(value)) for var, value in context.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """The rate at ``step`` of ``total``: ``lr`` at the start, half way at the middle, ~0 at
    the end; a function of the step alone, so a resumed run follows the same curve."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / total))


def _load_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise LessKVError(
            f"{short_path(path)} is corrupt ({one_line(err, 120)}); delete it to restart "
            "fine-tuning"
        ) from None
