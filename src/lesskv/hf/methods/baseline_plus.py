"""``baseline+``: the policy with extra pairs weighing as much as LESS's state, the
equal-memory comparison."""

from __future__ import annotations

from typing import ClassVar

from lesskv.core.budget import state_size_in_tokens
from lesskv.hf.methods.base import Method


class BaselinePlus(Method):
    name: ClassVar[str] = "baseline+"
    order: ClassVar[int] = 2
    summary: ClassVar[str] = "the policy with extra pairs weighing as much as LESS's state"

    def extra_tokens(self, rank: int, head_dim: int) -> int:
        return state_size_in_tokens(rank, head_dim)
