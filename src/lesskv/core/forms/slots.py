"""The ``slots`` form: a few learned soft clusters of evicted pairs per KV head, read through
the layer's own softmax with an explicit log-mass.

An evicted pair ``k, v`` joins the ``S`` slots of its KV head by a learned soft assignment
``a(k) = softmax_S(k·W_a + b_a)``; slot ``s`` sums ``a_s·k``, ``a_s·v`` and ``a_s`` (its share
of pairs, ``n_s``). A query reads slot ``s`` as one pair with the slot's mean key ``k̄_s`` and
mean value ``v̄_s`` whose logit carries the slot's mass:

    ℓ_s(q) = τ·q·k̄_s + log n_s + β_s(q),    (out, lse) = (softmax_s(ℓ)·v̄, logsumexp_s ℓ)

With ``β = 0`` and ``τ`` the layer's scale that is exactly the mass of ``n_s`` pairs sharing
the key ``k̄_s``; real keys spread, and ``E exp(x) >= exp(E x)``, so the learned bias
``β_s(q) = q·W_β + b_β`` (per query head, starting at 0) accounts for what the mean key misses,
and ``τ`` (per query head, starting at ``1/√D``) is learned too. Unlike the low-rank form the
state's mass is the layer's own softmax weight of a key, not a learned kernel, and an untrained
layer is a soft merge of the evicted pairs (the ``merge`` method's estimate), not the plain
policy. Pairs fade with their distance at a learned rate per KV head, as in the ``decay`` form.

``S`` is the most slots a rank-R state's memory holds (``R·(D + 1)`` fp32 numbers per KV head;
R = 8, D = 64: 4 slots of ``2D + 1`` numbers, 516 of 520).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lesskv.core.budget import merge_slots_in_state
from lesskv.core.forms import (
    DECAY_INIT,
    FP32_BYTES,
    KernelShape,
    State,
    fading,
    per_head_weight,
)
from lesskv.core.math import NEG_INF, prefix_states

# A slot holding less than this mass of pairs is empty: its logit would be below log(1e-18) =
# -41 anyway, and the mass's square, which the mean's gradient divides by, stays a normal float.
MASS_FLOOR = 1e-18


class SlotsForm(nn.Module):
    """One layer's slots: the assignment (per KV head), the read's scale and bias (per query
    head) and the fade rate; the state is one fp32 tensor ``(B, Hkv, S, 2D + 1)`` of key sums,
    value sums and masses."""

    def __init__(self, shape: KernelShape) -> None:
        super().__init__()
        self.shape = shape
        hq, hkv, d = shape.query_heads, shape.kv_heads, shape.head_dim
        self.slots = merge_slots_in_state(shape.rank, d)
        self.assign = per_head_weight(hkv, d, self.slots)  # random: slots must differ
        self.assign_bias = nn.Parameter(torch.zeros(hkv, self.slots))
        self.read_scale = nn.Parameter(torch.full((hq,), d**-0.5))
        self.read_bias = nn.Parameter(torch.zeros(hq, d, self.slots))
        self.read_offset = nn.Parameter(torch.zeros(hq, self.slots))
        self.decay = nn.Parameter(torch.full((hkv,), math.sqrt(DECAY_INIT)))  # λ = decay²

    def decay_rate(self) -> torch.Tensor:
        """λ >= 0 per KV head ``(Hkv,)``."""
        return self.decay.square()

    def assignment(self, keys: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, N, D)`` keys → ``(B, Hkv, N, S)`` shares, summing to 1 per pair."""
        return torch.softmax(keys.float() @ self.assign + self.assign_bias.unsqueeze(-2), -1)

    def empty(self, batch: int, device: torch.device) -> State:
        size = (batch, self.shape.kv_heads, self.slots, 2 * self.shape.head_dim + 1)
        return (torch.zeros(size, dtype=torch.float32, device=device),)

    def age(self, state: State, tokens: torch.Tensor) -> None:
        (sums,) = state
        sums.mul_(fading(self.decay_rate(), tokens.float().view(-1, 1))[..., None, None])

    def fold(
        self,
        state: State,
        keys: torch.Tensor,
        values: torch.Tensor,
        weight: torch.Tensor,
        distance: torch.Tensor,
    ) -> None:
        (sums,) = state
        weight = weight * fading(self.decay_rate(), distance.float())
        share = self.assignment(keys) * weight.unsqueeze(-1)
        sums.add_(torch.einsum("bhns,bhnp->bhsp", share, _payload(keys, values)))

    def read(
        self, state: State, query: torch.Tensor, ahead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fade = None
        if ahead is not None:
            fade = fading(self.decay_rate(), ahead[:, None, None, :, None].float())
        return self._summary(query, state[0].unsqueeze(2), fade)

    def parallel(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def read(
            states: torch.Tensor, rows: slice, fade: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self._summary(query[..., rows, :], states, fade)

        share, payload = self.assignment(keys), _payload(keys, values)
        out, lse = prefix_states(share, payload, steps, read, self.decay_rate())
        return out, lse

    def _summary(
        self, query: torch.Tensor, sums: torch.Tensor, fade: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``(B, Hkv, G, T, D)`` over slots ``(B, Hkv, T | 1, S, 2D + 1)`` that fade by
        ``fade`` (broadcast to ``(B, Hkv, G, T, 1)``) on to them: ``(out, lse)`` in fp32; an
        empty slot (mass <= MASS_FLOOR) takes no part, and with none filled the output is 0
        and the lse -inf."""
        _, hkv, g, _, d = query.shape
        mass = sums[..., -1]  # (B, Hkv, T | 1, S)
        filled = mass > MASS_FLOOR
        per_slot = torch.where(filled, mass, 1.0).unsqueeze(-1)  # no 0/0, not even backwards
        mean_key, mean_value = sums[..., :d] / per_slot, sums[..., d : 2 * d] / per_slot
        q = query.float()
        # per position, its G query heads against the slots' mean keys: (B, Hkv, T, G, S)
        logits = (q.transpose(2, 3) @ mean_key.transpose(-1, -2)).transpose(2, 3)
        logits = logits * self.read_scale.view(hkv, g, 1, 1)
        bias = q @ self.read_bias.view(hkv, g, d, -1) + self.read_offset.view(hkv, g, 1, -1)
        logits = logits + bias + per_slot.squeeze(-1).log().unsqueeze(2)
        if fade is not None:
            logits = logits + fade.log()
        logits = logits.masked_fill(~filled.unsqueeze(2), NEG_INF)
        lse = logits.logsumexp(-1, keepdim=True)
        probs = (logits - lse.nan_to_num(neginf=0.0)).exp()
        out = (probs.transpose(2, 3) @ mean_value).transpose(2, 3)
        return out, lse

    @property
    def nbytes(self) -> int:
        return self.slots * (2 * self.shape.head_dim + 1) * FP32_BYTES


def _payload(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What each pair adds to the slots it joins: ``[k, v, 1]`` ``(B, Hkv, N, 2D + 1)``."""
    one = keys.new_ones(*keys.shape[:-1], 1, dtype=torch.float32)
    return torch.cat([keys.float(), values.float(), one], -1)
