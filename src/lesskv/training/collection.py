"""Recording one group of layers' activations: one pass of the model over the windows
writes, for each layer, its Q/K/V, its true output after ``o_proj``, and the policy's
simulated eviction steps and sparse outputs into its :class:`ActivationStore`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lesskv.core import eviction
from lesskv.core import math as math_ops
from lesskv.core.policies import Policy, Slots, keep_mask_from_steps
from lesskv.hf import attention
from lesskv.hf.methods import get_method, layer_setups, observing
from lesskv.hf.modules import attention_modules, attention_scale
from lesskv.training.store import ActivationStore, layer_store


class _StopForward(Exception):
    """Raised after the last recorded layer to skip the rest of the forward pass."""


# Layers whose eviction is simulated together hold at most this many logits (fp32: 4 GiB):
# the H2O simulation is a loop over decoding steps of tiny ops, so running every layer's in
# one batch divides its Python overhead by the number of layers.
SIMULATION_ELEMENTS = 2**30


@torch.no_grad()
def collect_activations(
    model: PreTrainedModel,
    windows: torch.Tensor,
    layers: list[int],
    policy: Policy,
    root: Path,
    rank: int,
    progress: bool = True,
    validation: Collection[int] | None = None,
    upstream: Sequence[nn.Module] | None = None,
    grads: bool = False,
) -> dict[int, ActivationStore]:
    """Run the model once over ``windows`` and record each layer in ``layers``: its post-RoPE
    Q/K/V, its full-attention output after ``o_proj`` (the target), and the policy's sparse
    output; Baseline+'s too for the ``validation`` windows (all by default), the only ones its
    loss is measured on. Windows that every store already holds (an interrupted collection)
    are not run again.

    The model runs full attention (the paper's recipe), or with ``upstream`` kernels LESS in
    every layer, so that each layer is recorded on the inputs it gets at inference, when the
    layers before it are sparse too; its target stays full attention over those inputs. With
    ``grads``, also the NLL's gradient at each output (:func:`_record_grads`)."""
    modules = attention_modules(model)
    n, t = windows.shape
    stores = {layer: layer_store(model, layer, root, n, t, policy, grads) for layer in layers}
    seen: dict[int, tuple[torch.Tensor, ...]] = {}
    scratch: dict[tuple[int, ...], torch.Tensor] = {}  # logits buffers, reused across windows
    current = {"index": 0}
    last_layer = max(layers)

    def record_target(layer: int, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # the gradients' pass (_record_grads) records no target
            return
        stores[layer].write(current["index"], target=output[0])
        if layer == last_layer:
            raise _StopForward  # later layers and the LM head are not needed

    def observe(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        q, scale = math_ops.group_queries(query, key.shape[1]), attention_scale(module)
        seen[module.layer_idx] = (q, key, value, scale)
        stores[module.layer_idx].write(current["index"], query=query[0], key=key[0], value=value[0])
        if upstream is not None:  # the model runs LESS here: full attention is ours to compute
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            full = math_ops.sparse_output(q, key, value, causal, scale)
            record_target(
                module.layer_idx, module.o_proj(full.flatten(1, 2).transpose(1, 2).flatten(2))
            )

    # full attention runs in the model: its o_proj outputs are the targets
    handles = _target_hooks(modules, layers, record_target) if upstream is None else []
    extra = get_method("baseline+").extra_tokens(rank, modules[0].head_dim)
    start = min(store.complete for store in stores.values())  # windows already collected
    bar = tqdm(
        range(start, n),
        initial=start,
        total=n,
        desc="collecting activations",
        unit="seq",
        disable=not progress,
    )
    try:
        with _recording(model, observe, layers, policy, upstream, rank):
            for i in bar:
                current["index"] = i
                with contextlib.suppress(_StopForward):
                    model(input_ids=windows[i : i + 1].to(model.device))
                budgets = [policy.slots(t)]
                if validation is None or i in validation:
                    budgets.append(policy.slots(t, extra))
                for group in _simulation_groups(seen, t):
                    _record_sparse(group, seen, stores, i, policy, budgets, scratch)
                seen.clear()
                if grads:
                    _record_grads(model, windows[i : i + 1], layers, policy, stores, i)
                for store in stores.values():
                    store.mark_complete(i + 1)
    finally:
        for handle in handles:
            handle.remove()
    return stores


def _recording(
    model: PreTrainedModel,
    observe: Callable[..., None],
    layers: list[int],
    policy: Policy,
    upstream: Sequence[nn.Module] | None,
    rank: int,
) -> contextlib.AbstractContextManager:
    """Full attention with ``observe`` on ``layers``, or LESS with ``upstream`` everywhere."""
    running = None if upstream is None else layer_setups(model, "less", policy, upstream, rank)
    return observing(model, observe, layers, running)


def _target_hooks(
    modules: Sequence[nn.Module], layers: list[int], record: Callable[[int, torch.Tensor], None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """``record(layer, output)`` on every forward of each of ``layers``' ``o_proj``."""
    return [
        modules[i].o_proj.register_forward_hook(
            functools.partial(lambda i, module, args, out: record(i, out), i)
        )
        for i in layers
    ]


@torch.enable_grad()
def _record_grads(
    model: PreTrainedModel,
    window: torch.Tensor,
    layers: list[int],
    policy: Policy,
    stores: dict[int, ActivationStore],
    index: int,
) -> None:
    """Store the gradient of ``window``'s summed next-token NLL at each of ``layers``'
    ``o_proj`` outputs, the plain policy running in every layer (the point LESS corrects): what
    ``--loss weighted`` weighs each position's error by (its first-order loss change)."""
    modules = attention_modules(model)
    outputs: dict[int, torch.Tensor] = {}

    def grab(layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        outputs[layer] = output.detach().requires_grad_(True)
        return outputs[layer]

    handles = [modules[i].o_proj.register_forward_hook(functools.partial(grab, i)) for i in layers]
    ids = window.to(model.device)
    try:
        with attention.using_setups(model, layer_setups(model, "baseline", policy)):
            logits = model(input_ids=ids).logits[0, :-1].float()
        torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        stores[layer].write(index, grad=outputs[layer].grad[0])


def _simulation_groups(seen: dict[int, tuple], t: int) -> list[list[int]]:
    """Layers on one device, in groups whose stacked logits stay under SIMULATION_ELEMENTS."""
    groups: dict[torch.device, list[list[int]]] = {}
    for layer, (q, *_rest) in sorted(seen.items()):
        per_layer = q[0].numel() // q.shape[-1] * t
        chunks = groups.setdefault(q.device, [[]])
        if chunks[-1] and (len(chunks[-1]) + 1) * per_layer > SIMULATION_ELEMENTS:
            chunks.append([])
        chunks[-1].append(layer)
    return [chunk for chunks in groups.values() for chunk in chunks]


def _record_sparse(
    group: list[int],
    seen: dict[int, tuple],
    stores: dict[int, ActivationStore],
    index: int,
    policy: Policy,
    budgets: list[Slots],
    scratch: dict[tuple[int, ...], torch.Tensor],
) -> None:
    """Simulate the policy at its budget (and at Baseline+'s, when ``budgets`` has both) for
    every layer of ``group``, then store each layer's sparse outputs and eviction steps."""
    first = seen[group[0]]
    if eviction.fused_applies(policy, *first[:3]):  # layer by layer, no T x T tensor
        simulated = {layer: _fused_records(policy, budgets, *seen[layer]) for layer in group}
    else:
        simulated = _reference_records(group, seen, policy, budgets, scratch)
    for layer, (steps, recorded) in simulated.items():
        flat = {name: tensor[0].flatten(0, 1) for name, tensor in recorded.items()}
        stores[layer].write(index, steps=steps, **flat)


def _fused_records(
    policy: Policy,
    budgets: list[Slots],
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out, lse, steps = eviction.policy_attention(policy, budgets[0], q, key, value, scale)
    recorded = {"sparse_out": out, "lse": lse.squeeze(-1)}
    for plus in budgets[1:]:
        recorded["plus_out"] = eviction.policy_attention(policy, plus, q, key, value, scale)[0]
    return steps[0], recorded


def _reference_records(
    group: list[int],
    seen: dict[int, tuple],
    policy: Policy,
    budgets: list[Slots],
    scratch: dict[tuple[int, ...], torch.Tensor],
) -> dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The reference simulation, every layer of ``group`` at once (stacked on the batch axis,
    which amortises its Python loop over the layers)."""
    first = seen[group[0]][0]
    _, hkv, _, t, _ = first.shape
    logits = _stacked_logits(group, seen, scratch) if policy.uses_attention else None
    steps, *plus_steps = (
        policy.eviction_steps(logits, slots, t, device=first.device).expand(len(group), hkv, t)
        for slots in budgets
    )
    simulated = {}
    for row, layer in enumerate(group):
        q, key, value, scale = seen[layer]
        keep = keep_mask_from_steps(steps[row : row + 1])[:, :, None]
        out, lse = math_ops.sparse_attention(q, key, value, keep, scale)
        recorded = {"sparse_out": out, "lse": lse.squeeze(-1)}
        for plus in plus_steps:
            plus_keep = keep_mask_from_steps(plus[row : row + 1])[:, :, None]
            recorded["plus_out"] = math_ops.sparse_output(q, key, value, plus_keep, scale)
        simulated[layer] = (steps[row], recorded)
    return simulated


def _stacked_logits(
    group: list[int], seen: dict[int, tuple], scratch: dict[tuple[int, ...], torch.Tensor]
) -> torch.Tensor:
    """The causal logits of every layer in ``group``, written into one buffer that is reused
    for every window: stacking fresh tensors would copy, and first touching a new GiB-sized
    allocation costs more page faults than the products themselves."""
    q = seen[group[0]][0]
    shape = (len(group), *q.shape[1:4], q.shape[3])
    if shape not in scratch:
        scratch[shape] = q.new_empty(shape)
    logits = scratch[shape]
    for row, layer in enumerate(group):
        q, key, _, scale = seen[layer]
        math_ops.causal_logits(q, key, scale, out=logits[row : row + 1])
    return logits
