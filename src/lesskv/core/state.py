"""LESS's running state while decoding: fade it, fold evicted pairs in, read it.

The decoding cache keeps, per KV head, ``H: (B, Hkv, R, D)`` and ``z: (B, Hkv, R)`` in fp32.
One decoding step of a LESS layer does all of its state work in :func:`decode_step`: about
thirty one-token operations (φ and ψ MLPs, the fade, the fold, the log-space combine) whose
cost is dispatch, not arithmetic. :mod:`lesskv.core.decoding` runs it inside the layer's
decoding attention, one compiled graph; eager and compiled run the same code.
"""

from __future__ import annotations

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
