"""``less``: the policy plus the learned low-rank state that absorbs every evicted pair."""

from __future__ import annotations

from typing import ClassVar

from lesskv.hf.attention import LayerSetup
from lesskv.hf.cache import LessCache
from lesskv.hf.methods.base import PAIR_SUMMARY_BYTES, Method


class Less(Method):
    name: ClassVar[str] = "less"
    order: ClassVar[int] = 4
    summary: ClassVar[str] = "the policy plus the learned low-rank state (needs kernels)"
    needs_kernels: ClassVar[bool] = True

    def state_bytes(self, rank: int, head_dim: int) -> int:
        return rank * (head_dim + 1) * PAIR_SUMMARY_BYTES  # H (R x D) and z (R)

    def layer_setup(self, policy, module, kernels, rank: int) -> LayerSetup:
        return LayerSetup(policy=policy, kernels=kernels)

    def cache(self, model, policy, kernels, rank: int, options: dict):
        return LessCache(model, policy, kernels=kernels, **options)
