"""The paper's state: ``H = Σ ψ(k)ᵀ v`` (R×D) and ``z = Σ ψ(k)`` (R) per KV head, read with φ.

A query's evicted pairs weigh ``φ(q)·ψ(k)`` each, so the state claims their attention mass
``φ(q)·z`` and mean value ``φ(q)·H / φ(q)·z`` (:func:`lesskv.core.math.state_summary`).
:class:`LowRankForm` is that state for any non-negative feature maps; :class:`LayerKernels`
learns them: φ (per query head) and ψ (per KV head) are two-layer GELU MLPs whose outputs are
made non-negative, so φ(q)·ψ(k) behaves like an (unnormalised) attention weight. ψ starts
scaled by 1e-4, so an untrained layer is the plain sparse policy and training only ever adds
what eviction lost. Heads are batched as a leading weight dimension, never a Python loop.

It comes in two forms. The paper's (``paper``) weighs every evicted pair the same forever, so
at several times the training length it has absorbed far more mass than it learned to expect.
``decay`` adds a learned rate λ per KV head: a pair ``d`` tokens behind the query weighs
``exp(-λ d)`` times its kernel weight, as real attention to distant tokens fades; the state
stays O(1) (it decays by ``exp(-λ)`` per token).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from lesskv.core import math as less_math
from lesskv.core.forms import (
    DECAY_INIT,
    FP32_BYTES,
    KernelShape,
    State,
    fading,
    per_head_weight,
)

SCALE_INIT = 1e-4


class LowRankForm(nn.Module, ABC):
    """The state ``(H, z)`` of rank ``rank`` for feature maps φ, ψ >= 0 and fade rates λ that a
    subclass defines (learned: :class:`LayerKernels`; random: the ``performer`` method's)."""

    def __init__(self, kv_heads: int, head_dim: int, rank: int) -> None:
        super().__init__()
        self.kv_heads, self.head_dim, self.rank = kv_heads, head_dim, rank

    @abstractmethod
    def phi(self, q: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, G, T, D)`` queries → ``(B, Hkv, G, T, R)`` non-negative features."""

    @abstractmethod
    def psi(self, k: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, T, D)`` keys → ``(B, Hkv, T, R)`` non-negative features."""

    @abstractmethod
    def decay_rate(self) -> torch.Tensor:
        """λ >= 0 per KV head ``(Hkv,)``; all zeros where the state does not fade."""

    def empty(self, batch: int, device: torch.device) -> State:
        h = torch.zeros(
            batch, self.kv_heads, self.rank, self.head_dim, dtype=torch.float32, device=device
        )
        return h, h.new_zeros(batch, self.kv_heads, self.rank)

    def age(self, state: State, tokens: torch.Tensor) -> None:
        state_h, state_z = state
        factor = fading(self.decay_rate(), tokens.float().view(-1, 1))  # (B, Hkv)
        state_h.mul_(factor[..., None, None])
        state_z.mul_(factor[..., None])

    def fold(
        self,
        state: State,
        keys: torch.Tensor,
        values: torch.Tensor,
        weight: torch.Tensor,
        distance: torch.Tensor,
    ) -> None:
        """``H += ψ(k)ᵀ v``, ``z += ψ(k)`` for each pair, weighted and faded."""
        state_h, state_z = state
        weight = weight * fading(self.decay_rate(), distance.float())
        psi = self.psi(keys).float() * weight.unsqueeze(-1)
        state_h.add_(torch.einsum("bhnr,bhnd->bhrd", psi, values.float()))
        state_z.add_(psi.sum(2))

    def read(
        self, state: State, query: torch.Tensor, ahead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        phi = self.phi(query)
        if ahead is not None:
            phi = phi * fading(self.decay_rate(), ahead[:, None, None, :, None].float())
        return less_math.state_summary(*less_math.lowrank_recurrent(phi.float(), *state))

    def parallel(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        phi_q = self.phi(query)  # before ψ: training draws φ's dropout first
        psi_k = self.psi(keys)
        num, den = less_math.lowrank_parallel(
            phi_q, psi_k, values.to(psi_k.dtype), steps, self.decay_rate()
        )
        return less_math.state_summary(num, den)

    @property
    def nbytes(self) -> int:
        return self.rank * (self.head_dim + 1) * FP32_BYTES


class HeadMLP(nn.Module):
    """``gelu(dropout(gelu(x W1)) W2)`` with separate weights per head; x: (..., heads, T, D)."""

    def __init__(self, heads: int, dim: int, hidden: int, rank: int, dropout: float) -> None:
        super().__init__()
        self.w1 = per_head_weight(heads, dim, hidden)
        self.w2 = per_head_weight(heads, hidden, rank)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features in the kernels' dtype (fp32 kernels serve a bf16 model: they are tiny).
        Broadcast matmul, not einsum: 3x less overhead on the one-token decoding path."""
        return F.gelu(self.dropout(F.gelu(x.to(self.w1.dtype) @ self.w1)) @ self.w2)


class LayerKernels(LowRankForm):
    """Learned φ and ψ of one attention layer (the ``decay`` and ``paper`` forms), in the
    grouped layout of :mod:`lesskv.core.math`."""

    def __init__(self, shape: KernelShape) -> None:
        super().__init__(shape.kv_heads, shape.head_dim, shape.rank)
        self.shape = shape
        d, k, r = shape.head_dim, shape.hidden, shape.rank
        self.phi_mlp = HeadMLP(shape.query_heads, d, k, r, shape.dropout)
        self.psi_mlp = HeadMLP(shape.kv_heads, d, k, r, shape.dropout)
        self.psi_mix = per_head_weight(shape.kv_heads, r, r)
        self.psi_scale = nn.Parameter(torch.full((shape.kv_heads, r), SCALE_INIT))
        self.psi_mix_scale = nn.Parameter(torch.full((shape.kv_heads, r), SCALE_INIT))
        # λ = decay²: no sign constraint to enforce, and its gradient vanishes at 0, so the
        # paper's form (0) stays exactly that under any training.
        rate = DECAY_INIT if shape.state == "decay" else 0.0
        self.decay = nn.Parameter(torch.full((shape.kv_heads,), math.sqrt(rate)))

    def decay_rate(self) -> torch.Tensor:
        return self.decay.square()

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        b, hkv, g, t, d = q.shape
        return self.phi_mlp(q.reshape(b, hkv * g, t, d)).abs().view(b, hkv, g, t, -1)

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        u = self.psi_scale.abs().unsqueeze(-2) * self.psi_mlp(k)
        mixed = u @ self.psi_mix
        return (u + mixed * self.psi_mix_scale.unsqueeze(-2)).abs()
