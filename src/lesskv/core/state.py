"""LESS's running state while decoding: fade it, fold evicted pairs in, read it.

The decoding cache keeps, per KV head, ``H: (B, Hkv, R, D)`` and ``z: (B, Hkv, R)`` in fp32.
One decoding step of a LESS layer does all of its state work in :func:`decode_step`: about
thirty one-token operations (φ and ψ MLPs, the fade, the fold, the log-space combine) whose
cost is dispatch, not arithmetic. Keeping them in one function lets :class:`Compiled` turn
them into one fused graph; eager and compiled run the same code.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Protocol

import torch

from lesskv.core import math


class StateKernels(Protocol):
    """What the state needs from a layer's kernels (:class:`~lesskv.core.kernels.LayerKernels`)."""

    def phi(self, q: torch.Tensor) -> torch.Tensor: ...
    def psi(self, k: torch.Tensor) -> torch.Tensor: ...
    def decay_rate(self) -> torch.Tensor: ...


def fading(kernels: StateKernels, tokens: torch.Tensor) -> torch.Tensor:
    """``exp(-λ · tokens)`` per KV head: how much a state contribution fades over ``tokens``
    ``(B, Hkv | 1, ...)`` of distance (1 everywhere for the paper's state, λ = 0)."""
    rate = kernels.decay_rate().float()
    return torch.exp(-rate.view(-1, *[1] * (tokens.dim() - 2)) * tokens)


def age(
    kernels: StateKernels, state_h: torch.Tensor, state_z: torch.Tensor, tokens: torch.Tensor
) -> None:
    """The state moves ``tokens`` ``(B,)`` positions on: every absorbed pair fades (in place)."""
    factor = fading(kernels, tokens.float().view(-1, 1))  # (B, Hkv)
    state_h.mul_(factor[..., None, None])
    state_z.mul_(factor[..., None])


def fold(
    kernels: StateKernels,
    state_h: torch.Tensor,
    state_z: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weight: torch.Tensor,
    distance: torch.Tensor,
) -> None:
    """Add ``ψ(k)ᵀ v`` of pairs ``(B, Hkv, N, D)`` to the state (in place), each weighted by
    ``weight`` ``(B, Hkv, N)`` (0 skips a pair) and faded by its ``distance`` to the newest
    token."""
    weight = weight * fading(kernels, distance.float())
    psi = kernels.psi(keys).float() * weight.unsqueeze(-1)
    state_h.add_(torch.einsum("bhnr,bhnd->bhrd", psi, values.float()))
    state_z.add_(psi.sum(2))


def decode_step(
    kernels: StateKernels,
    query: torch.Tensor,
    sparse_out: torch.Tensor,
    lse: torch.Tensor,
    evicted: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    state_h: torch.Tensor,
    state_z: torch.Tensor,
) -> torch.Tensor:
    """A LESS layer's whole state work for one decoding step: the state fades by one token,
    takes the pair the step evicted (``evicted`` = keys, values, weight, distance, as for
    :func:`fold`), and is read with φ(q) ``(B, Hkv, G, 1, D)`` into the sparse output."""
    age(kernels, state_h, state_z, torch.ones(query.shape[0], device=query.device))
    fold(kernels, state_h, state_z, *evicted)
    return math.less_recurrent(sparse_out, lse, kernels.phi(query), state_h, state_z)


def compile_by_default() -> bool:
    """Whether caches compile their decoding step when not told: yes, unless the environment
    sets ``LESSKV_COMPILE=0`` (one switch for a whole process, e.g. a server or a test run)."""
    return os.environ.get("LESSKV_COMPILE", "1") != "0"


class Compiled:
    """``fn`` compiled with ``torch.compile`` on first use, or ``fn`` itself (eager) when
    ``enabled`` is false or compiling fails (no C++ compiler, an unsupported platform): then
    one warning, and eager from there on. Shapes that change (another batch size or model)
    recompile; torch falls back to eager by itself past its recompile limit.

    ``compile_seconds`` adds up the calls with arguments of shapes not seen before, which is
    where compilation happens, so benchmarks can report it apart from the step time.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._seen: set[tuple] = set()
        self.failed = False
        self.compile_seconds = 0.0

    def __call__(self, *args, enabled: bool = True) -> torch.Tensor:
        if not enabled or self.failed:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn)
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
    """Shapes and dtypes of the tensors in ``args`` (nested tuples included)."""
    out = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            out.append((tuple(arg.shape), arg.dtype, arg.device))
        elif isinstance(arg, tuple):
            out.append(_signature(arg))
        else:
            out.append(type(arg))
    return tuple(out)


compiled_decode_step = Compiled(decode_step)
