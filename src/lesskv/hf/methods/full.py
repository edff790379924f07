"""``full``: the model's own attention over every past token."""

from __future__ import annotations

from typing import ClassVar

from lesskv.hf.methods.base import Method


class Full(Method):
    name: ClassVar[str] = "full"
    order: ClassVar[int] = 0
    summary: ClassVar[str] = "the model's own attention over every past token"
    sparse: ClassVar[bool] = False

    def kept_tokens(self, policy, seq_len: int, head_dim: int, rank: int) -> int:
        return seq_len

    def layer_setup(self, policy, module, kernels, rank: int):
        return None  # no setup: full attention

    def cache(self, model, policy, kernels, rank: int, options: dict):
        return None  # transformers' own cache
