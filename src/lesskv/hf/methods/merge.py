"""``merge``: the policy plus training-free merge slots for the evicted pairs, as many as
LESS's state weighs."""

from __future__ import annotations

from typing import ClassVar

from lesskv.core.budget import merge_slots_in_state
from lesskv.hf.methods.base import Method


class Merge(Method):
    name: ClassVar[str] = "merge"
    order: ClassVar[int] = 3
    summary: ClassVar[str] = "the policy plus training-free merge slots (same memory as LESS)"

    def merge_slots(self, rank: int, head_dim: int) -> int:
        return merge_slots_in_state(rank, head_dim)
