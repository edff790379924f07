"""LESS's learned feature maps φ (per query head) and ψ (per KV head), one set per layer.

Both are two-layer GELU MLPs whose outputs are made non-negative, so φ(q)·ψ(k) behaves like an
(unnormalised) attention weight. ψ starts scaled by 1e-4, so an untrained layer is the plain
sparse policy and training only ever adds what eviction lost. Heads are batched as a leading
weight dimension (einsum), never as a Python loop.

The state comes in two forms. The paper's weighs every evicted pair the same forever, so at
several times the training length it has absorbed far more mass than it learned to expect.
The default adds a learned decay rate λ per KV head: a pair ``d`` tokens behind the query
weighs ``exp(-λ d)`` times its kernel weight, as real attention to distant tokens fades; the
state stays O(1) (it decays by ``exp(-λ)`` per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lesskv.core.budget import DEFAULT_HIDDEN, DEFAULT_RANK, STATES
from lesskv.errors import LessKVError

SCALE_INIT = 1e-4
DECAY_INIT = math.log(2) / 1024  # a half-life of 1024 tokens before training


@dataclass(frozen=True)
class KernelShape:
    """Everything that fixes one layer's kernel parameters: their shapes and the state form."""

    query_heads: int
    kv_heads: int
    head_dim: int
    rank: int = DEFAULT_RANK
    hidden: int = DEFAULT_HIDDEN
    dropout: float = 0.3
    state: str = STATES[0]

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise LessKVError(f"unknown kernel state {self.state!r}: choose from {STATES}")


def _per_head_weight(heads: int, fan_in: int, fan_out: int) -> nn.Parameter:
    """nn.Linear's default initialisation, one independent matrix per head."""
    bound = 1.0 / fan_in**0.5
    return nn.Parameter(torch.empty(heads, fan_in, fan_out).uniform_(-bound, bound))


class HeadMLP(nn.Module):
    """``gelu(dropout(gelu(x W1)) W2)`` with separate weights per head; x: (..., heads, T, D)."""

    def __init__(self, heads: int, dim: int, hidden: int, rank: int, dropout: float) -> None:
        super().__init__()
        self.w1 = _per_head_weight(heads, dim, hidden)
        self.w2 = _per_head_weight(heads, hidden, rank)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features in the kernels' dtype (fp32 kernels serve a bf16 model: they are tiny).
        Broadcast matmul, not einsum: 3x less overhead on the one-token decoding path."""
        return F.gelu(self.dropout(F.gelu(x.to(self.w1.dtype) @ self.w1)) @ self.w2)


class LayerKernels(nn.Module):
    """φ and ψ of one attention layer, in the grouped layout of :mod:`lesskv.core.math`."""

    def __init__(self, shape: KernelShape) -> None:
        super().__init__()
        self.shape = shape
        d, k, r = shape.head_dim, shape.hidden, shape.rank
        self.phi_mlp = HeadMLP(shape.query_heads, d, k, r, shape.dropout)
        self.psi_mlp = HeadMLP(shape.kv_heads, d, k, r, shape.dropout)
        self.psi_mix = _per_head_weight(shape.kv_heads, r, r)
        self.psi_scale = nn.Parameter(torch.full((shape.kv_heads, r), SCALE_INIT))
        self.psi_mix_scale = nn.Parameter(torch.full((shape.kv_heads, r), SCALE_INIT))
        # λ = decay²: no sign constraint to enforce, and its gradient vanishes at 0, so the
        # paper's form (0) stays exactly that under any training.
        rate = DECAY_INIT if shape.state == "decay" else 0.0
        self.decay = nn.Parameter(torch.full((shape.kv_heads,), math.sqrt(rate)))

    def decay_rate(self) -> torch.Tensor:
        """λ >= 0 per KV head ``(Hkv,)``; all zeros for the paper's state."""
        return self.decay.square()

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, G, T, D)`` queries → ``(B, Hkv, G, T, R)`` non-negative features."""
        b, hkv, g, t, d = q.shape
        return self.phi_mlp(q.reshape(b, hkv * g, t, d)).abs().view(b, hkv, g, t, -1)

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, T, D)`` keys → ``(B, Hkv, T, R)`` non-negative features."""
        u = self.psi_scale.abs().unsqueeze(-2) * self.psi_mlp(k)
        mixed = u @ self.psi_mix
        return (u + mixed * self.psi_mix_scale.unsqueeze(-2)).abs()
