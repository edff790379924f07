"""The recurrent form of LESS: what one attention call does to a :class:`LessLayer`.

A :class:`~lesskv.hf.cache.LessLayer` only stores (slots, scores, LESS's state); this module
owns every step that changes them, and lesskv's attention (:mod:`lesskv.hf.attention`) calls
it with the layer the cache handed over:

* a decoding step (:func:`attend_one`): insert the new token into the slot of the pair the
  policy evicts, attend over the slots, fold the evicted pair into the state; one compiled
  graph (:func:`lesskv.core.decoding.layer_step`);
* a prompt or a chunk (:func:`recurrent_attention`): attend over the slots plus the chunk,
  then :func:`compress` back to the layer's capacity, folding everything dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lesskv.core import math
from lesskv.core.decoding import SlotBuffers, compiled_layer_step, priority, unexpired

if TYPE_CHECKING:
    from lesskv.hf.cache import LessLayer

# Prompt queries are attended a block at a time: the block's logits (batch x query heads x
# rows x keys) stay near this many elements, which bounds prefill memory and keeps each
# elementwise pass in cache (1M elements ran 5x faster than whole 1024-row blocks on CPU).
BLOCK_ELEMENTS = 2**20
# A plain prompt scored by its policy is attended in blocks four times that size: larger
# blocks keep its two matmuls efficient. One layer of SmolLM2 (9 query heads, one thread):
# 2.13 s at 8000 tokens against 2.36 s at 2**21, 2.53 s at 2**20 and 2.18 s at 2**23;
# 0.62 s at 4096 tokens, as at 2**21 (0.69 s at 2**20, 0.76 s at 2**23).
PROBABILITY_BLOCK_ELEMENTS = 2**22


def recurrent_attention(
    layer: LessLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The recurrent LESS attention for one call; returns ``(B, Hkv, G, q, D)``.

    Decoding (one token, already inserted by ``update``): exact softmax over the valid slots
    joined with what the state reads, one compiled step (:func:`attend_one`). A chunk: slots
    are fully visible, the chunk is causal (and padded as transformers' mask says);
    afterwards the layer compresses back to its budget.
    """
    q = math.group_queries(query, key.shape[1])
    if key.shape[2] == layer.capacity:  # decoding
        out, lse = attend_one(layer, q, scale)
        if layer.merge is not None:
            out = math.join_summary(out, lse, layer.merge.attend(q, scale))
        return out
    if layer.seen == 0 and attention_mask is None:
        prompt = _prompt_attention(layer, q, key, value, scale)
        if prompt is not None:
            return prompt
    visible = _chunk_visibility(layer, attention_mask, q.shape[3])
    # The chunk's real (non-padding) tokens; its queries see the state aged to their own
    # positions, counted in real tokens.
    new_valid = visible[:, 0, 0, -1, layer.capacity :].expand(q.shape[0], -1)
    ages = new_valid.long().cumsum(1)
    scores = layer.scores
    scores = torch.cat([scores, scores.new_zeros(*scores.shape[:2], q.shape[3])], -1)
    outputs = []
    rows_per_block = max(1, BLOCK_ELEMENTS // query.shape[:2].numel() // key.shape[2])
    for start in range(0, q.shape[3], rows_per_block):
        end = min(start + rows_per_block, q.shape[3])
        rows = slice(start, end)
        # Causality: chunk tokens after the block's last query are invisible to the block.
        cols = slice(0, key.shape[2] - q.shape[3] + end)
        block_visible = visible[..., rows, cols]
        block_q, block_k, block_v = q[..., rows, :], key[:, :, cols], value[:, :, cols]
        # fused attention for the output; probabilities only for a policy that scores
        out, lse = math.sparse_attention(block_q, block_k, block_v, block_visible, scale)
        if layer.kernels is not None:  # a chunk reads the state before folding its evictions
            summary = layer.kernels.read(layer.state, block_q, ahead=ages[:, rows])
            out = math.join_summary(out, lse, summary)
        elif layer.merge is not None:
            out = math.join_summary(out, lse, layer.merge.attend(block_q, scale))
        outputs.append(out)
        if layer.policy.uses_attention:
            probs = math.probabilities(block_q, block_k, lse, scale, block_visible)
            scores[..., cols] = layer.policy.update_scores(scores[..., cols], probs.float())
    compress(layer, key, value, scores, new_valid)
    return torch.cat(outputs, 3)


def _prompt_attention(
    layer: LessLayer, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """The first call without padding (a plain prompt): the slots are still empty and so is
    any state, so this is causal attention over the chunk alone, and no mask is built.

    A policy that scores needs every probability, so the attention is computed from them,
    one row block at a time over the keys up to the block's last row: the logits, a softmax,
    the output and the policy's column sums; computing the probabilities next to a fused
    kernel would compute every logit twice. A policy that does not score is one fused causal
    call. ``None`` where that call does not apply (the general path takes over)."""
    capacity, t = layer.capacity, q.shape[3]
    chunk_k, chunk_v = key[:, :, capacity:], value[:, :, capacity:]
    scores = layer.scores.new_zeros(*key.shape[:2], capacity + t)
    if layer.policy.uses_attention:
        outputs = []
        rows_per_block = max(1, PROBABILITY_BLOCK_ELEMENTS // q.shape[:3].numel() // t)
        for start in range(0, t, rows_per_block):
            end = min(start + rows_per_block, t)
            logits = math.attention_logits(q[..., start:end, :], chunk_k[:, :, :end], scale)
            rows = end - start  # the block's own keys: causal, a triangle
            future = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu(1)
            logits[..., start:end].masked_fill_(future, math.NEG_INF)
            probs = logits.softmax(-1, dtype=torch.float32)  # fp32 for 16-bit models too
            block_v = chunk_v[:, :, :end].float()
            outputs.append(torch.einsum("bhgqk,bhkd->bhgqd", probs, block_v).to(q.dtype))
            cols = slice(capacity, capacity + end)
            scores[..., cols] = layer.policy.update_scores(scores[..., cols], probs)
        out = torch.cat(outputs, 3)
    else:
        fused = math.causal_attention(q, chunk_k, chunk_v, scale)
        if fused is None:
            return None
        out = fused[0]
    new_valid = torch.ones(q.shape[0], t, dtype=torch.bool, device=q.device)
    compress(layer, key, value, scores, new_valid)
    return out


def _chunk_visibility(
    layer: LessLayer, attention_mask: torch.Tensor | None, q_len: int
) -> torch.Tensor:
    """``(B, Hkv, 1, q, capacity + q)``: valid slots for every query, then the chunk itself."""
    slots = layer.valid[:, :, None, None, :].expand(-1, -1, 1, q_len, -1)
    if layer.window is not None and layer.seen > 0:  # a later chunk: slots out of each query's
        # window are invisible to it (only the first call may be padded, so positions count on)
        newest = layer.real_seen.view(-1, 1, 1, 1, 1) + torch.arange(q_len, device=slots.device)
        in_window = (
            layer.positions[:, :, None, None, :] > newest.view(-1, 1, 1, q_len, 1) - layer.window
        )
        slots = slots & in_window
    if attention_mask is None:
        own = torch.ones(q_len, q_len, dtype=torch.bool, device=slots.device).tril()
        own = own.expand(*slots.shape[:3], q_len, q_len)
    else:
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0
        own = attention_mask[..., -q_len:].unsqueeze(2).expand(-1, slots.shape[1], -1, -1, -1)
    return torch.cat([slots, own], -1)


def _buffers(layer: LessLayer) -> SlotBuffers:
    """The storage a decoding step updates in place."""
    return SlotBuffers(
        layer.keys, layer.values, layer.positions, layer.scores, layer.valid, layer.real_seen
    )


def attend_one(
    layer: LessLayer, query: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoding step: insert the token ``update`` received, attend over the slots, and
    fold and read LESS's state if the layer has one; one compiled graph unless ``compile``
    is off (:func:`lesskv.core.decoding.layer_step`). The output and the slots'
    log-sum-exp; the merge slots take the evicted pair afterwards."""
    key, value = layer.pending
    layer.pending = None
    less = None if layer.kernels is None else (layer.kernels, layer.state)
    split = layer.policy.split(layer.capacity)
    args = layer.policy, split, layer.window, query, key, value, _buffers(layer), scale, less
    step = compiled_layer_step if layer.captured is None else layer.captured
    out, lse, evicted = step(*args, enabled=layer.compile)
    if layer.merge is not None:
        keys, values, positions, weight = evicted
        _merge(layer, keys, values, positions, weight)
    return out, lse


def _evict(
    layer: LessLayer,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    weight: torch.Tensor,
) -> None:
    """Pairs ``(B, Hkv, N, D)`` at ``positions`` ``(B, Hkv, N)`` leave the slots: into the
    LESS state (at their distance to the newest token) or the merge slots, if the layer has
    one (``weight`` 0 skips a pair)."""
    if layer.kernels is not None:
        distance = (layer.real_seen - 1).view(-1, 1, 1) - positions
        layer.kernels.fold(layer.state, keys, values, weight, distance)
    if layer.merge is not None:
        _merge(layer, keys, values, positions, weight)


def _merge(
    layer: LessLayer,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    weight: torch.Tensor,
) -> None:
    """Merge the pairs one by one, oldest first: the order teacher-forced decoding would
    have evicted them in, had the pairs left one per step."""
    real = weight > 0
    order = positions.masked_fill(~real, positions.max() + 1).argsort(dim=-1, stable=True)
    for i in range(int(real.sum(-1).max())):
        index = order[..., i : i + 1]
        pair = index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        layer.merge.absorb(
            keys.gather(2, pair)[:, :, 0],
            values.gather(2, pair)[:, :, 0],
            weight.gather(-1, index)[..., 0],
        )


def compress(
    layer: LessLayer,
    keys: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    new_valid: torch.Tensor,
) -> None:
    """After a chunk: keep the layer's ``capacity`` of slots + chunk tokens, fold the others.

    ``keys/values``: slots then chunk, ``(B, Hkv, capacity + q, D)``; ``scores`` the same
    layout; ``new_valid`` ``(B, q)`` marks the chunk's real (non-padding) tokens.
    """
    b, hkv, _, d = keys.shape
    q = new_valid.shape[1]
    new_positions = layer.real_seen.unsqueeze(1) + new_valid.long().cumsum(1) - 1
    positions = torch.cat([layer.positions, new_positions[:, None].expand(b, hkv, q)], -1)
    valid = torch.cat([layer.valid, new_valid[:, None].expand(b, hkv, q)], -1)
    layer.real_seen.add_(new_valid.long().sum(1))
    newest = layer.real_seen - 1
    valid = unexpired(valid, positions, newest, layer.window)
    if layer.kernels is not None:
        layer.kernels.age(layer.state, new_valid.long().sum(1))
    split = layer.policy.split(layer.capacity)
    order = priority(layer.policy, split, scores, positions, valid, newest)
    kept = order.topk(layer.capacity, dim=-1, sorted=False).indices.sort(-1).values
    dropped = torch.ones_like(valid).scatter_(-1, kept, False) & valid
    _evict(layer, keys, values, positions, dropped.float())
    index = kept.unsqueeze(-1).expand(-1, -1, -1, d)
    # written into the same storage: a decoding step (or a captured graph) finds it there
    layer.keys.copy_(keys.gather(2, index))
    layer.values.copy_(values.gather(2, index))
    layer.positions.copy_(positions.gather(-1, kept))
    layer.valid.copy_(valid.gather(-1, kept))
    layer.scores.copy_(scores.gather(-1, kept))
    layer.seen += q
