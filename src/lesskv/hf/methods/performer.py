"""``performer``: the paper's H2O+Performer baseline. It is LESS's state with random positive
features (Performer's FAVOR+) in place of learned kernels, and no training. At the same memory
as LESS, it shows what learning the kernels buys."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lesskv.core.forms.lowrank import LowRankForm
from lesskv.hf.attention import LayerSetup
from lesskv.hf.cache import LessCache
from lesskv.hf.checkpoint import KernelMeta, LessKernels
from lesskv.hf.methods.base import PAIR_SUMMARY_BYTES, Method
from lesskv.hf.modules import attention_modules, attention_scale


class RandomFeatures(LowRankForm):
    """``φ(x) = exp(x·W − |x|²/2) / √R`` with ``x = q·√scale`` (keys alike) and ``W ~ N(0, I)``
    per KV head, fixed by ``seed``. ``φ(q)·ψ(k)`` is then an unbiased estimate of
    ``exp(q·k·scale)``, the weight each evicted pair had in attention. The state does not
    fade (the paper's form)."""

    def __init__(self, kv_heads: int, head_dim: int, rank: int, scale: float, seed: int) -> None:
        super().__init__(kv_heads, head_dim, rank)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(kv_heads, head_dim, rank, generator=generator))
        self.root = scale**0.5

    def _features(self, x: torch.Tensor, pattern: str) -> torch.Tensor:
        x = x.float() * self.root
        projected = torch.einsum(pattern, x, self.w)
        return torch.exp(projected - x.square().sum(-1, keepdim=True) / 2) / self.rank**0.5

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        return self._features(q, "bhgtd,hdr->bhgtr")

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        return self._features(k, "bhtd,hdr->bhtr")

    def decay_rate(self) -> torch.Tensor:
        return self.w.new_zeros(self.w.shape[0])


def random_features(module: nn.Module, rank: int) -> RandomFeatures:
    """Layer ``module``'s features: seeded by its index, so both forms draw the same ones."""
    heads = module.config.num_attention_heads // module.num_key_value_groups
    features = RandomFeatures(
        heads, module.head_dim, rank, attention_scale(module), module.layer_idx
    )
    return features.to(next(module.parameters()).device)


class Performer(Method):
    name: ClassVar[str] = "performer"
    order: ClassVar[int] = 5
    summary: ClassVar[str] = "the policy plus LESS's state with random features (no training)"

    def state_bytes(self, rank: int, head_dim: int) -> int:
        return rank * (head_dim + 1) * PAIR_SUMMARY_BYTES  # LESS's H (R x D) and z (R)

    def layer_setup(self, policy, module, kernels, rank: int) -> LayerSetup:
        return LayerSetup(policy=policy, kernels=random_features(module, rank))

    def cache(self, model, policy, kernels, rank: int, options: dict) -> LessCache:
        meta = KernelMeta.for_model(
            model, "performer", policy=policy.name, budget=str(policy.budget), rank=rank
        )
        modules = attention_modules(model)
        layers = [random_features(module, rank) for module in modules]
        return LessCache(model, policy, kernels=LessKernels(meta, layers), **options)
