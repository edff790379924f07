"""Budgets, the low-rank state's size, and lesskv's defaults (each defined here only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lesskv.errors import LessKVError

DEFAULT_RANK = 8  # R: the paper's rank; one head's state then weighs ~4 KV pairs (D = 64)
DEFAULT_HIDDEN = 128  # hidden width of the φ/ψ MLPs (ablation in RESULTS.md)
DEFAULT_MODEL = "smollm2-135m"  # the built-in model, loaded offline from PyPI
# The built-in models (each loaded offline from a PyPI package, lesskv.hf.loading) and the other
# names each answers to; the canonical name is also the prefix of its shipped kernel sets.
BUILTIN_MODELS = {
    DEFAULT_MODEL: ("smollm2-135m-instruct",),
    "gemma3-270m": ("gemma-3-270m",),
}
# The forms of LESS's state (lesskv.core.forms, built by name in lesskv.core.kernels): the
# paper's low-rank state with a learned decay with distance (the default), the paper's, where
# every evicted pair weighs the same forever, or learned slots read through the layer's softmax.
STATES = ("decay", "paper", "slots")
# Which epoch's kernels a training run keeps: the best on its validation windows, or the last.
SELECTIONS = ("best", "last")
# The sparse policies (lesskv.core.policies.POLICIES), named here so that help texts need no torch.
POLICY_NAMES = ("h2o", "lambda", "tova")
# The largest count, size or index lesskv accepts: torch's int64, which every tensor shape and
# index fits; a larger number overflows deep inside a run rather than where it was given.
MAX_COUNT = 2**63 - 1


def policy_name(name: str) -> str:
    """A policy's canonical name (``"Λ"`` and any case accepted), or one clear error."""
    key = name.strip().lower().replace("λ", "lambda")
    if key not in POLICY_NAMES:
        raise LessKVError(f"unknown policy {name!r}: choose one of {', '.join(POLICY_NAMES)}")
    return key


def builtin_model(name: str) -> str | None:
    """The canonical name of the built-in model ``name`` names (any case), else None."""
    key = name.strip().lower()
    for canonical, aliases in BUILTIN_MODELS.items():
        if key == canonical or key in aliases:
            return canonical
    return None


@dataclass(frozen=True)
class Budget:
    """How many KV pairs a policy may keep per KV head.

    An integer ``>= 1`` is a token count; a value in ``(0, 1)`` is a fraction of the sequence
    the policy sees (a window for perplexity, a prompt for generation), resolved late because
    only the caller knows that length.
    """

    value: float

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LessKVError(f"budget must be a number, got {v!r}")
        if v <= 0:
            raise LessKVError(f"budget must be > 0 (a token count >= 1 or a fraction < 1), got {v}")
        if v >= 1 and v != int(v):
            raise LessKVError(
                f"budget {v} is ambiguous: use a whole token count (>= 1) or a fraction in (0, 1)"
            )
        if v > MAX_COUNT:
            raise LessKVError(f"budget must be at most {MAX_COUNT} tokens")  # not v: 300 digits

    @classmethod
    def parse(cls, text: str | float | int | Budget) -> Budget:
        """Accept ``"102"``, ``"0.1"``, ``"10%"``, numbers, or a Budget."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, str):
            raw = text.strip()
            try:
                value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
            except ValueError:
                raise LessKVError(f"budget {text!r} is not a number or a percentage") from None
            if not math.isfinite(value):  # inf, nan, 1e400: no token count is infinite
                raise LessKVError(f"budget {text!r} is not a finite number")
            if raw.endswith("%") and value >= 1:
                raise LessKVError(f"budget {text!r} is 100% or more: nothing would be evicted")
            return cls(int(value) if value >= 1 and value == int(value) else value)
        return cls(text)

    @property
    def is_fraction(self) -> bool:
        return self.value < 1

    def tokens(self, seq_len: int) -> int:
        """The token count for a sequence of ``seq_len`` tokens (fractions rounded, >= 1)."""
        if self.is_fraction:
            return max(1, round(self.value * seq_len))
        return int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}" if self.is_fraction else str(int(self.value))


def state_size_in_tokens(rank: int, head_dim: int) -> int:
    """KV pairs that weigh as much as one head's LESS state (H: R x D, z: R).

    Baseline+ gets this many extra pairs so it is compared with LESS at equal memory
    (R = 8, D = 64: 520 numbers vs 128 per pair -> 4 pairs).
    """
    return max(1, round(rank * (head_dim + 1) / (2 * head_dim)))


def merge_slots_in_state(rank: int, head_dim: int) -> int:
    """Merge slots (fp32 key sum, value sum and count: 2D + 1 numbers) that fit in one head's
    LESS state (R·D + R fp32 numbers): R = 8, D = 64 -> 520 // 129 = 4 slots."""
    slots = rank * (head_dim + 1) // (2 * head_dim + 1)
    if slots < 1:
        raise LessKVError(
            f"a rank-{rank} state ({rank * (head_dim + 1) * 4} bytes per head) holds no merge "
            f"slot ({(2 * head_dim + 1) * 4} bytes): use rank >= 2 for the merge method"
        )
    return slots
