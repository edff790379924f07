"""A training-free summary of the evicted pairs: M merge slots per KV head (ZSMerge/KeepKV style).

The peer LESS must beat at equal memory. Each slot holds the sums of the keys and values it
absorbed and their count ``n``, and attends like one pair with the mean key and value whose
logit is raised by ``log n``: ``exp(q·k̄/√D + log n) = n·exp(q·k̄/√D)``, so a slot carries the
mass of the ``n`` tokens it stands for (exactly, if they share one key). An evicted pair seeds
the first empty slot; once none is empty it joins the slot whose key is most similar (cosine).

The two forms share :meth:`MergeSlots.absorb`, the one assignment rule: the decoding cache calls
it for every pair it evicts; the parallel form (:func:`merge_parallel`) replays a sequence's
evictions through it in the order the cache would see them and reads each query's slots as
prefix sums. Slots are fp32, like LESS's state: M·(2D + 1) numbers per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass
class MergeSlots:
    """The running slots of every KV head: key and value sums ``(B, Hkv, M, D)`` and counts
    ``(B, Hkv, M)``, fp32."""

    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def empty(
        cls, batch: int, kv_heads: int, slots: int, head_dim: int, device: torch.device
    ) -> MergeSlots:
        sums = torch.zeros(batch, kv_heads, slots, head_dim, dtype=torch.float32, device=device)
        return cls(sums, sums.clone(), sums.new_zeros(batch, kv_heads, slots))

    def absorb(self, key: torch.Tensor, value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Merge one pair per head, ``key``/``value`` ``(B, Hkv, D)``, ``weight`` ``(B, Hkv)``
        1 for a real pair and 0 for none (padding, an empty cache slot); returns the slot
        chosen ``(B, Hkv)``."""
        key, value = key.float(), value.float()
        empty = self.counts == 0
        similarity = torch.einsum("bhmd,bhd->bhm", self.keys, key)
        norms = self.keys.norm(dim=-1) * key.norm(dim=-1, keepdim=True)
        cosine = (similarity / norms.clamp_min(torch.finfo(norms.dtype).tiny)).masked_fill(
            empty, NEG_INF
        )
        slot = torch.where(empty.any(-1), empty.byte().argmax(-1), cosine.argmax(-1))
        share = F.one_hot(slot, self.counts.shape[-1]).float() * weight.float().unsqueeze(-1)
        self.counts += share
        self.keys += share.unsqueeze(-1) * key.unsqueeze(-2)
        self.values += share.unsqueeze(-1) * value.unsqueeze(-2)
        return slot

    def attend(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query ``(B, Hkv, G, Tq, D)`` over the current slots: output and lse."""
        return slot_attention(
            q, self.keys.unsqueeze(2), self.values.unsqueeze(2), self.counts.unsqueeze(2), scale
        )

    def select(self, index: torch.Tensor) -> MergeSlots:
        """The rows ``index`` of the batch (beam search reorders, repeats)."""
        return MergeSlots(self.keys[index], self.values[index], self.counts[index])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.counts))


def slot_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over merge slots: sums ``(B, Hkv, T | 1, M, D)`` and counts
    ``(B, Hkv, T | 1, M)`` as seen by each query (or all), queries ``(B, Hkv, G, Tq, D)``.
    Returns the output ``(B, Hkv, G, Tq, D)`` and log-sum-exp ``(B, Hkv, G, Tq, 1)``, both
    fp32; with no slot filled, output 0 and lse -inf."""
    per_slot = counts.clamp_min(1).unsqueeze(-1)
    mean_k, mean_v = keys / per_slot, values / per_slot
    logits = torch.einsum(
        "bhgtd,bhtmd->bhgtm", q.float(), mean_k.expand(-1, -1, q.shape[3], -1, -1)
    )
    logits = logits * scale + counts.log().unsqueeze(2)
    lse = logits.logsumexp(-1, keepdim=True)
    probs = (logits - lse.nan_to_num(neginf=0.0)).exp()
    out = torch.einsum("bhgtm,bhtmd->bhgtd", probs, mean_v.expand(-1, -1, q.shape[3], -1, -1))
    return out, lse


def merge_parallel(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    steps: torch.Tensor,
    slots: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot attention for every query of a sequence at once (teacher forcing).

    ``steps`` ``(B, Hkv, T)`` is the step at which each token is evicted (T: never). The pairs
    go through :meth:`MergeSlots.absorb` in eviction order, as the decoding cache would see
    them; query i reads the slots after every eviction up to its own step.
    """
    b, hkv, t, d = key.shape
    sorted_steps, order = steps.sort(dim=-1, stable=True)
    events = int((sorted_steps < t).sum(-1).max())
    index = order[..., :events, None].expand(-1, -1, -1, d)
    keys, values = key.gather(2, index).float(), value.gather(2, index).float()
    real = (sorted_steps[..., :events] < t).float()
    state = MergeSlots.empty(b, hkv, slots, d, key.device)
    absorbed = [state.absorb(keys[:, :, e], values[:, :, e], real[..., e]) for e in range(events)]
    # no event at all where every pair that left fell out of a sliding window
    chosen = torch.stack(absorbed, 2) if absorbed else order.new_zeros(b, hkv, 0)
    share = F.one_hot(chosen, slots).float() * real.unsqueeze(-1)  # (B, Hkv, E, M)
    # Slots after c evictions, c = 0..E (index 0: all empty).
    counts = F.pad(share.cumsum(2), (0, 0, 1, 0))
    key_sums = F.pad((share.unsqueeze(-1) * keys.unsqueeze(-2)).cumsum(2), (0, 0, 0, 0, 1, 0))
    value_sums = F.pad((share.unsqueeze(-1) * values.unsqueeze(-2)).cumsum(2), (0, 0, 0, 0, 1, 0))
    queries = torch.arange(t, device=steps.device).expand_as(steps).contiguous()
    seen = torch.searchsorted(sorted_steps[..., :events].contiguous(), queries, right=True)
    rows = seen[..., None, None].expand(-1, -1, -1, slots, d)
    return slot_attention(
        q,
        key_sums.gather(2, rows),
        value_sums.gather(2, rows),
        counts.gather(2, seen.unsqueeze(-1).expand(-1, -1, -1, slots)),
        scale,
    )
