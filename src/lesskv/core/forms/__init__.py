"""State forms: how one layer summarises, per KV head, the pairs its policy evicts.

LESS keeps the policy's pairs exactly and everything it evicts in a small fp32 state. What that
state holds, how an evicted pair is written into it and how a query reads it is the state's
*form*; the rest of lesskv (the decoding cache, the compiled decoding step, the parallel
attention, training and checkpoints) sees a form only through :class:`StateForm`, so a new form
is one module here and one name in :data:`lesskv.core.budget.STATES`.

Every form answers a query with the evicted pairs' softmax-weighted mean value and the log of
their attention mass (the exp-sum of their logits), and
:func:`lesskv.core.math.join_attention` joins that to the kept pairs' attention in log space:
one softmax over both sets, whatever the form.

The forms (:func:`lesskv.core.kernels.make_kernels` builds the one a :class:`KernelShape` names):

* :mod:`~lesskv.core.forms.lowrank`: the paper's state ``H = Σ ψ(k)ᵀv``, ``z = Σ ψ(k)`` read
  with ``φ(q)``; ``decay`` (the default) fades each pair with its distance, ``paper`` does not;
* :mod:`~lesskv.core.forms.slots`: ``slots``, a few learned clusters of keys and values read
  through the layer's own softmax with an explicit log-mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from lesskv.core.budget import DEFAULT_HIDDEN, DEFAULT_RANK, STATES
from lesskv.errors import LessKVError

# A layer's running state: fp32 tensors whose first two dimensions are (batch, KV heads), so
# a cache can select, reorder and repeat batch rows without knowing the form.
State = tuple[torch.Tensor, ...]
FP32_BYTES = 4
# The initial fade rate λ of a form that fades: a half-life of 1024 tokens before training.
DECAY_INIT = math.log(2) / 1024


@dataclass(frozen=True)
class KernelShape:
    """Everything that fixes one layer's form and its parameters' shapes. ``rank`` sizes the
    state's memory (a rank-R state is R·(D + 1) fp32 numbers per KV head, and every form stays
    within that), ``hidden`` the width of the low-rank form's feature maps."""

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


class StateForm(Protocol):
    """One layer's learned state form (an ``nn.Module`` holding its parameters).

    Shapes: queries are grouped by KV head ``(B, Hkv, G, T, D)``, keys and values
    ``(B, Hkv, T, D)``; every ``(out, lse)`` is ``(B, Hkv, G, T, D)`` and ``(B, Hkv, G, T, 1)``
    in fp32, with output 0 and lse -inf where the state holds nothing.
    """

    def empty(self, batch: int, device: torch.device) -> State:
        """The state of ``batch`` sequences before anything is evicted (the form knows its KV
        head count: its parameters are per head)."""
        ...

    def fold(
        self,
        state: State,
        keys: torch.Tensor,
        values: torch.Tensor,
        weight: torch.Tensor,
        distance: torch.Tensor,
    ) -> None:
        """Write evicted pairs ``(B, Hkv, N, D)`` into ``state`` in place, each weighted by
        ``weight`` ``(B, Hkv, N)`` (0: no pair, padding) and ``distance`` ``(B, Hkv, N)``
        tokens behind the newest token."""
        ...

    def age(self, state: State, tokens: torch.Tensor) -> None:
        """The state moves ``tokens`` ``(B,)`` positions on, in place (a form that does not fade
        leaves it as it is)."""
        ...

    def read(
        self, state: State, query: torch.Tensor, ahead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The state's ``(out, lse)`` for ``query``, each query ``ahead`` ``(B, T)`` tokens
        after the state's last :meth:`age` (a prompt chunk's queries; None: 0)."""
        ...

    def parallel(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher-forced form: every query's ``(out, lse)`` at once, the state of query
        ``i`` holding each pair ``j`` with ``steps[j] <= i`` (``steps`` ``(B, Hkv, T)``: the
        step each pair is evicted at, T for never), as a decoding cache would have folded
        them; no ``T x T`` tensor (:func:`lesskv.core.math.prefix_states`)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of one KV head's state (what a cache holds per sequence and head)."""
        ...


def fading(rate: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``exp(-λ · tokens)`` for rates ``(Hkv,)`` over ``tokens`` ``(B, Hkv | 1, ...)`` of
    distance: how much a pair's contribution has faded (1 everywhere for λ = 0)."""
    return torch.exp(-rate.float().view(-1, *[1] * (tokens.dim() - 2)) * tokens)


def per_head_weight(heads: int, fan_in: int, fan_out: int) -> nn.Parameter:
    """nn.Linear's default initialisation, one independent matrix per head."""
    bound = 1.0 / fan_in**0.5
    return nn.Parameter(torch.empty(heads, fan_in, fan_out).uniform_(-bound, bound))
