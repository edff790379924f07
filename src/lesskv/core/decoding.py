"""One decoding step of a cache layer's attention, as one function ``torch.compile`` fuses.

A decoding step attends one new query over the layer's slots: an exact softmax over the valid
slots, the policy's score update from those probabilities, and for LESS the state work
(:func:`lesskv.core.state.decode_step`). Each part is a few one-token operations whose cost is
not arithmetic: inside a model's decoding step, the model's weights have just streamed
through the CPU caches, and every PyTorch call reloads its code and data first (measured on
SmolLM2: ~0.1 ms for one cold eager op, ~0.4 ms for a cold compiled call). One compiled graph
for the whole step pays that once per layer, for every method alike, so LESS adds only its
kernels' own work to the baseline's step.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import torch

from lesskv.core import math
from lesskv.core.policies import Policy
from lesskv.core.state import StateKernels, decode_step

# LESS's part of a step: the layer's kernels, the pair its insert evicted (keys, values,
# weight, distance) and its running state H, z (updated in place).
LessState = tuple[StateKernels, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]


def decode_attention(
    policy: Policy,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    scale: float,
    less: LessState | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query ``(B, Hkv, G, 1, D)`` over the slots ``(B, Hkv, S, D)`` where ``valid``
    ``(B, Hkv, S)``: the output ``(B, Hkv, G, 1, D)`` (with LESS's state, if given) and the
    slots' log-sum-exp. The policy's ``scores`` ``(B, Hkv, S)`` are updated in place."""
    logits = math.attention_logits(query, keys, scale)
    probs, lse = math.masked_softmax(logits, valid[:, :, None, None, :])
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, values)
    if policy.uses_attention:  # H2O adds in place; TOVA returns new scores
        updated = policy.update_scores(scores, probs.float())
        if updated is not scores:
            scores.copy_(updated)
    if less is not None:
        kernels, evicted, state_h, state_z = less
        out = decode_step(kernels, query, out, lse, evicted, state_h, state_z)
    return out, lse


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


compiled_decode_attention = Compiled(decode_attention)
