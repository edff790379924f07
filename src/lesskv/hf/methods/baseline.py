"""``baseline``: the sparse policy alone, keeping its budget of pairs per KV head."""

from __future__ import annotations

from typing import ClassVar

from lesskv.hf.methods.base import Method


class Baseline(Method):
    name: ClassVar[str] = "baseline"
    order: ClassVar[int] = 1
    summary: ClassVar[str] = "the sparse policy alone, keeping BUDGET pairs per KV head"
