"""One decoding step of a cache layer, as one function ``torch.compile`` fuses.

A decoding step inserts the new token into the slot of the pair the policy evicts, attends
one new query over the layer's slots (an exact softmax over the valid ones), updates the
policy's scores from those probabilities and, for LESS, does the state work
(:func:`lesskv.core.state.decode_step`). Each part is a few one-token operations whose cost
is not arithmetic: inside a model's decoding step, the model's weights have just streamed
through the CPU caches, and every PyTorch call reloads its code and data first (measured on
SmolLM2: ~0.1 ms for one cold eager op, ~0.4 ms for a cold compiled call). One compiled graph
for the whole step pays that once per layer, for every method alike, so LESS adds only its
kernels' own work to the baseline's step.

The step writes only into the layer's buffers (:class:`SlotBuffers`), in place, and makes no
decision in Python from their contents: the same storage every step, and one graph with no
break, which is what capturing it (a CUDA graph) needs.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from lesskv.core import math
from lesskv.core.forms import State, StateForm
from lesskv.core.policies import Policy, Slots
from lesskv.core.state import decode_step

NEG_INF, POS_INF = float("-inf"), float("inf")


class SlotBuffers(NamedTuple):
    """One cache layer's storage, ``S`` slots per KV head: what a decoding step updates."""

    keys: torch.Tensor  # (B, Hkv, S, D)
    values: torch.Tensor  # (B, Hkv, S, D)
    positions: torch.Tensor  # (B, Hkv, S) real position of each slot's token, -1 if empty
    scores: torch.Tensor  # (B, Hkv, S) fp32, the policy's
    valid: torch.Tensor  # (B, Hkv, S) bool: the slot holds a (non-padding) token
    real_seen: torch.Tensor  # (B,) non-padding tokens seen: the next token's position


# LESS's part of a step: the layer's state form and its running state (updated in place).
LessState = tuple[StateForm, State]
# The pair a step evicted: keys, values (B, Hkv, 1, D), position, weight (B, Hkv, 1) (weight 0:
# the slot held no token).
Evicted = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def unexpired(
    valid: torch.Tensor, positions: torch.Tensor, newest: torch.Tensor, window: int | None
) -> torch.Tensor:
    """``valid`` without the pairs out of a sliding ``window`` ending at ``newest`` ``(B,)``
    (they leave without entering any summary: the model itself no longer sees them)."""
    if window is None:
        return valid
    return valid & (positions > newest.view(-1, 1, 1) - window)


def priority(
    policy: Policy,
    split: Slots,
    scores: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    newest: torch.Tensor,
) -> torch.Tensor:
    """Eviction order (lowest first) when the token at ``newest`` ``(B,)`` arrives: scores
    outside the policy's eligible range become +inf, so they are never evicted; empty slots
    (padding, unfilled) come first; a position-only policy evicts the oldest eligible pair."""
    first, last = policy.eligible(newest.view(-1, 1, 1), split)
    if not policy.uses_attention:
        scores = positions.to(scores.dtype)
    order = scores.masked_fill((positions < first) | (positions > last), POS_INF)
    return order.masked_fill(~valid, NEG_INF)


def insert(
    policy: Policy,
    split: Slots,
    window: int | None,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: SlotBuffers,
) -> Evicted:
    """Write the new pair ``(B, Hkv, 1, D)`` into the slot of the pair the policy evicts (in
    place) and return the evicted pair."""
    newest = slots.real_seen.clone()  # the incoming token's position
    slots.real_seen.add_(1)
    slots.valid.copy_(unexpired(slots.valid, slots.positions, newest, window))
    order = priority(policy, split, slots.scores, slots.positions, slots.valid, newest)
    slot = order.argmin(-1, keepdim=True)
    index = slot.unsqueeze(-1).expand(-1, -1, 1, key.shape[-1])
    evicted = (
        slots.keys.gather(2, index),
        slots.values.gather(2, index),
        slots.positions.gather(-1, slot),
        slots.valid.gather(-1, slot).float(),
    )
    slots.keys.scatter_(2, index, key)
    slots.values.scatter_(2, index, value)
    slots.positions.scatter_(-1, slot, newest.view(-1, 1, 1).expand_as(slot))
    slots.scores.scatter_(-1, slot, 0.0)
    slots.valid.scatter_(-1, slot, True)
    return evicted


def decode_attention(
    policy: Policy,
    query: torch.Tensor,
    slots: SlotBuffers,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query ``(B, Hkv, G, 1, D)`` over the valid slots: the output ``(B, Hkv, G, 1, D)``
    and the log-sum-exp; the policy's scores are updated in place."""
    logits = math.attention_logits(query, slots.keys, scale)
    probs, lse = math.masked_softmax(logits, slots.valid[:, :, None, None, :])
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, slots.values)
    if policy.uses_attention:  # H2O adds in place; TOVA returns new scores
        updated = policy.update_scores(slots.scores, probs.float())
        if updated is not slots.scores:
            slots.scores.copy_(updated)
    return out, lse


def layer_step(
    policy: Policy,
    split: Slots,
    window: int | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: SlotBuffers,
    scale: float,
    less: LessState | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Evicted]:
    """A whole decoding step of one layer: insert the new pair, attend, and for LESS fold the
    evicted pair into the state and read it. Returns the output, the slots' log-sum-exp and
    the evicted pair (for a summary kept outside the step, the merge slots)."""
    evicted = insert(policy, split, window, key, value, slots)
    out, lse = decode_attention(policy, query, slots, scale)
    if less is not None:
        form, state = less
        ev_keys, ev_values, ev_positions, weight = evicted
        distance = (slots.real_seen - 1).view(-1, 1, 1) - ev_positions
        pair = ev_keys, ev_values, weight, distance
        out = decode_step(form, query, out, lse, pair, state)
    return out, lse, evicted


def compile_by_default() -> bool:
    """Whether caches compile their decoding step when not told: yes, unless the environment
    sets ``LESSKV_COMPILE=0`` (one switch for a whole process, e.g. a server or a test run)."""
    return os.environ.get("LESSKV_COMPILE", "1") != "0"


class Compiled:
    """``fn`` compiled with ``torch.compile`` on first use, or ``fn`` itself (eager) when
    ``enabled`` is false or compiling fails (no C++ compiler, an unsupported platform): then
    one warning, and eager from there on. Graphs are compiled for dynamic shapes, so another
    batch size or budget reuses them; another policy, method or dtype compiles its own.

    ``compile_seconds`` adds up the calls whose arguments differ from all earlier ones in what
    compiled code specialises on (:func:`_signature`), which is where compilation happens, so
    benchmarks can report it apart from the step time.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._compiled: Callable | None = None
        self._seen: set[tuple] = set()
        self.failed = False
        self.compile_seconds = 0.0

    def __call__(self, *args, enabled: bool = True):
        if not enabled or self.failed:
            return self.fn(*args)
        if self._compiled is None:  # dynamic shapes from the start: one graph serves every
            # batch size and budget, so a process's policies x methods x dtypes stay within
            # torch's recompile limit (8 per function; past it, torch silently runs eager)
            self._compiled = torch.compile(self.fn, dynamic=True)
        signature = _signature(args)
        start = time.perf_counter()
        try:
            return self._compiled(*args)
        except Exception as error:  # inductor raises many kinds; any of them means eager
            self.failed = True
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"lesskv could not compile its decoding step ({type(error).__name__}: "
                f"{first_line}); decoding runs eager, which is correct but slower "
                "(compile=False, --no-compile or LESSKV_COMPILE=0 skip the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)
        finally:
            if signature not in self._seen:
                self._seen.add(signature)
                self.compile_seconds += time.perf_counter() - start


def _signature(args: tuple) -> tuple:
    """What a dynamic-shape graph specialises on, for ``args`` (nested tuples included): each
    tensor's dtype, device and rank, and which of its sizes are 0 or 1 (other sizes are
    symbolic); numbers as they are; the types of anything else."""
    out = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            sizes = tuple(size if size < 2 else None for size in arg.shape)
            out.append((sizes, arg.dtype, arg.device))
        elif isinstance(arg, tuple):
            out.append(_signature(arg))
        elif isinstance(arg, int | float):
            out.append(arg)
        else:
            out.append(type(arg))
    return tuple(out)


compiled_layer_step = Compiled(layer_step)
