"""Sparse KV policies: which pairs a head keeps once its budget is full.

A policy is a small scoring rule over one shared keep/evict mechanism:

* every step the newest token enters the cache; if the cache then holds more than the budget,
  the *eligible* pair with the lowest score is evicted and never returns;
* the ``recent`` newest tokens and the first ``sinks`` tokens are never eligible;
* after attending, the policy updates its scores from that step's attention probabilities
  (H2O accumulates them; position-only policies ignore them).

The parallel face, :meth:`Policy.keep_mask`, simulates that decoding loop for a whole
sequence at once (every query row gets the set the cache would hold at that step), so
teacher-forced evaluation and training see exactly what real decoding sees.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from lesskv.core.budget import Budget, policy_name
from lesskv.errors import LessKVError

T = TypeVar("T", int, torch.Tensor)


@dataclass(frozen=True)
class Slots:
    """A budget resolved to token counts: ``total`` kept pairs, of which some are protected."""

    total: int
    sinks: int
    recent: int


@dataclass(frozen=True)
class Policy(ABC):
    budget: Budget
    name: ClassVar[str]
    uses_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.budget, Budget):  # a plain number, checked; text is parsed
            object.__setattr__(self, "budget", Budget(self.budget))  # once, by make_policy

    def split(self, total: int) -> Slots:
        """How a budget of ``total`` pairs divides into protected sinks and recent tokens."""
        raise NotImplementedError

    def slots(self, seq_len: int, extra: int = 0) -> Slots:
        """The budget for a sequence of ``seq_len`` tokens, plus ``extra`` pairs (Baseline+)."""
        return self.split(self.budget.tokens(seq_len) + extra)

    def eligible(self, newest: T, slots: Slots) -> tuple[int, T]:
        """The one eviction rule: when the token at position ``newest`` arrives, the pair to
        evict is the lowest-scoring one at positions ``first..last`` (inclusive); the first
        ``sinks`` and the ``recent`` newest tokens are never evicted. The teacher-forced
        simulation slices this range, the decoding cache masks by it (``newest`` a tensor)."""
        return slots.sinks, newest - slots.recent

    def update_scores(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """New scores ``(B, Hkv, T)`` after queries with attention ``probs``
        ``(B, Hkv, G, n_queries, T)`` (G query heads share the KV head's kept set)."""
        return scores

    def keep_mask(self, logits: torch.Tensor | None, slots: Slots, seq_len: int) -> torch.Tensor:
        """Boolean ``(B, Hkv, T, T)``: row i holds the keys the cache keeps at decoding step i."""
        return keep_mask_from_steps(self.eviction_steps(logits, slots, seq_len))

    @torch.no_grad()
    def eviction_steps(
        self,
        logits: torch.Tensor | None,
        slots: Slots,
        seq_len: int,
        window: int | None = None,
        *,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """The decoding step at which each token leaves the kept set, ``(B, Hkv, T)`` (T:
        never), on the logits' device, or on ``device`` (default CPU) without logits.

        This is the whole keep-mask in O(T) memory: token j is kept at step i iff
        ``j <= i < steps[j]`` (training stores these instead of T x T masks).
        ``logits`` are the scaled, causally masked (-inf above the diagonal) attention logits
        grouped by KV head, ``(B, Hkv, G, T, T)``; the query heads of a group share one kept
        set, so their probabilities are summed into its scores (GQA). Position-only policies
        need no logits.

        With a sliding ``window`` (every layer of Mistral-like models), token j also leaves
        when it falls out of the window, at step ``j + window``, which frees its place: no
        pair is evicted at that step. :func:`state_steps` tells such expiries from evictions.
        """
        b, hkv = (1, 1) if logits is None else logits.shape[:2]
        device = device if logits is None else logits.device
        t, total = seq_len, slots.total
        positions = torch.arange(t, device=device)
        if window is not None and window <= total:  # the window alone decides
            return (positions + window).clamp(max=t).expand(b, hkv, t).clone()
        steps = torch.full((b, hkv, t), t, dtype=torch.long, device=device)
        if total >= t:
            return steps
        assert logits is not None or not self.uses_attention, f"{self.name} needs logits"
        # Until the cache is full every query sees everything before it.
        scores = torch.zeros(b, hkv, t, device=device)
        if self.uses_attention:
            scores = self.update_scores(scores, logits[..., :total, :].softmax(-1))
            # Additive mask of evicted keys (-inf); future keys are already -inf.
            evicted = logits.new_zeros(b, hkv, 1, 1, t)
            evicted_flat, rows = evicted.view(b, hkv, t), logits.split(1, dim=-2)
        # ~920 steps of one-token ops per 1024-token layer: each op saved is ~5% of the loop
        with _one_thread():
            for step in range(total, t):  # token ``step`` enters, one pair leaves
                first, last = self.eligible(step, slots)
                # the lowest score in range; position-only policies: the oldest there
                idx = scores[..., first : last + 1].argmin(-1, keepdim=True)
                if first:
                    idx += first
                if window is not None and step >= window:  # the window's oldest goes first
                    gone = step - window
                    idx = torch.where(steps[..., gone : gone + 1] == t, gone, idx)
                steps.scatter_(-1, idx, step)
                scores.scatter_(-1, idx, float("inf"))  # never chosen again
                if self.uses_attention:
                    evicted_flat.scatter_(-1, idx, float("-inf"))
                    scores = self.update_scores(scores, (rows[step] + evicted).softmax(-1))
        return steps


@dataclass(frozen=True)
class H2O(Policy):
    """Heavy-Hitter Oracle: recent tokens plus those with the most accumulated attention."""

    name: ClassVar[str] = "h2o"
    heavy_ratio: float = 0.5

    def split(self, total: int) -> Slots:
        heavy = int(total * self.heavy_ratio)
        return Slots(total=total, sinks=0, recent=max(1, total - heavy))

    def update_scores(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return scores.add_(probs.sum((-3, -2)))


@dataclass(frozen=True)
class LambdaShape(Policy):
    """Λ-shaped / StreamingLLM: the first ``sinks`` tokens ("attention sinks") plus recent ones."""

    name: ClassVar[str] = "lambda"
    uses_attention: ClassVar[bool] = False
    sinks: int = 4

    def split(self, total: int) -> Slots:
        if total <= self.sinks:
            raise LessKVError(
                f"a Λ budget of {total} tokens leaves no room for recent tokens beside "
                f"{self.sinks} sinks: use a budget larger than {self.sinks}"
            )
        return Slots(total=total, sinks=self.sinks, recent=total - self.sinks)

    @torch.no_grad()
    def eviction_steps(
        self,
        logits: torch.Tensor | None,
        slots: Slots,
        seq_len: int,
        window: int | None = None,
        *,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Closed form of the shared simulation: token j leaves when it falls out of the
        recent window, at step ``j + recent`` (once the budget is full), unless it is a sink.
        A sliding window shorter than the sequence takes the shared simulation."""
        if window is not None and window < seq_len:
            return super().eviction_steps(logits, slots, seq_len, window, device=device)
        pos = torch.arange(seq_len, device=logits.device if logits is not None else device)
        steps = (pos + slots.recent).clamp(min=slots.total)
        steps = torch.where(pos < slots.sinks, seq_len, steps).clamp(max=seq_len)
        shape = (logits.shape[0], logits.shape[1]) if logits is not None else (1, 1)
        return steps.expand(*shape, seq_len)


@dataclass(frozen=True)
class TOVA(Policy):
    """Token Omission Via Attention (Oren et al., 2024): the pairs the *latest* query attends
    to most, nothing accumulated; the newest token is kept (no query has scored it yet)."""

    name: ClassVar[str] = "tova"

    def split(self, total: int) -> Slots:
        return Slots(total=total, sinks=0, recent=1)

    def update_scores(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        latest = probs[..., -1, :].sum(-2)  # the last query's attention, summed over the group
        return torch.where(scores == float("inf"), scores, latest)  # evicted stays evicted


def state_steps(steps: torch.Tensor, window: int | None) -> torch.Tensor:
    """The step at which each token enters a summary of the evicted pairs (LESS's state,
    merge slots): when the policy evicted it, never (T) when it left by falling out of a
    sliding ``window``, since the model itself no longer sees such a token."""
    if window is None:
        return steps
    positions = torch.arange(steps.shape[-1], device=steps.device)
    return torch.where(steps >= positions + window, steps.shape[-1], steps)


def keep_mask_from_steps(steps: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, T)`` eviction steps → boolean keep-mask ``(B, Hkv, T, T)``."""
    t = steps.shape[-1]
    pos = torch.arange(t, device=steps.device)
    query, key = pos[:, None], pos[None, :]
    return (key <= query) & (query < steps.unsqueeze(-2))


@contextmanager
def _one_thread() -> Iterator[None]:
    """The eviction loop runs many tiny ops; thread hand-offs would cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (H2O, LambdaShape, TOVA)}


def make_policy(name: str, budget: Budget | str | float, **options) -> Policy:
    """Build a policy by name (``h2o``, ``lambda``, ``tova``): the API's edge, where a budget
    given as text (``"10%"``) is parsed; the CLI's argparse hands over a parsed Budget."""
    return POLICIES[policy_name(name)](Budget.parse(budget), **options)
