"""Teacher-forced sparse attention without ``T x T`` tensors, with the policy's eviction loop in
compiled code.

:meth:`Policy.eviction_steps` simulates decoding one Python step per token over the whole
``(B, Hkv, G, T, T)`` logits, then the sparse attention masks them again: three passes over the
largest tensors of a layer, plus ~T small ops. Here queries are taken a block of rows at a time:

1. the block's logits ``(B, Hkv, G, rows, columns)``, one matmul per KV head, where the columns
   are the pairs the cache held when the block began (at most the budget) and the block's own
   tokens: a query never sees a pair evicted before its block;
2. a loop over the block's rows, per KV head, over the pairs the cache holds: token ``i``
   enters and, once the budget is full, the lowest-scoring eligible pair leaves (its step is
   ``i``); row ``i``'s softmax over the kept pairs (and its log-sum-exp) is written, and the
   policy's scores take those probabilities. Position-only policies (Λ) know their steps in
   closed form: off the CPU a block's softmax is then one masked pass (on the CPU numba's loop
   measured 2-3x faster than that pass, so it serves them too);
3. the output, probabilities @ values: one matmul per KV head.

So memory and matmuls are ``O(T x (budget + rows))`` and the loop ``O(T x budget)``, on any
device; the inputs may be 16-bit (the work is fp32). On the CPU numba compiles the loop, with
the eviction rule and scoring rules of :class:`~lesskv.core.policies.Policy` (``eligible``,
``update_scores``) written out; elsewhere the loop is the decoding cache's own slot eviction
(:func:`~lesskv.core.decoding.priority`), one row at a time, compiled by torch. Tests hold
both to identical steps for every policy. A sliding window, padding or float64 inputs take the
reference path (:func:`fused_applies` says no).
"""

from __future__ import annotations

import numpy as np
import torch

from lesskv.core import math
from lesskv.core.decoding import Compiled, compile_by_default, priority
from lesskv.core.policies import H2O, TOVA, Policy, Slots

try:  # numba compiles the CPU loop; without it the torch loop runs there too
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; a platform may lack wheels
    njit, prange = None, range

# Rows per block: each block's matmuls also cover its own rows x rows triangle, so fewer rows
# waste less, more rows cost fewer calls (128 measured best on one SmolLM2 layer at 1024, 4096
# and 8000 tokens, against 32, 64 and 256); a block holds at most BLOCK_ELEMENTS logits.
BLOCK_ROWS = 128
BLOCK_ELEMENTS = 2**22
# How each policy's scores take a row's probabilities in the compiled loop (its update_scores):
# 1 accumulate (H2O), 2 the latest row's (TOVA); position-only policies (0) give their steps.
RULES: dict[type[Policy], int] = {H2O: 1, TOVA: 2}


def fused_applies(policy: Policy, *tensors: torch.Tensor, window: int | None = None) -> bool:
    """Whether :func:`policy_attention` serves this call: no sliding window, 32- or 16-bit
    floats, and a policy that scores by a rule the loops know or by position alone."""
    return (
        window is None
        and all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)
        and (type(policy) in RULES or not policy.uses_attention)
    )


def policy_attention(
    policy: Policy,
    slots: Slots,
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse causal attention under ``policy`` for queries ``q: (B, Hkv, G, T, D)`` over
    their own keys/values ``(B, Hkv, T, D)``: the output ``(B, Hkv, G, T, D)``, its
    log-sum-exp ``(B, Hkv, G, T, 1)`` and the eviction steps ``(B, Hkv, T)``, as
    :meth:`Policy.eviction_steps` and a masked softmax give them. Differentiable in ``q``,
    ``key`` and ``value`` (output and log-sum-exp): the backward pass recomputes each block,
    so nothing of size ``T x T`` is kept for it either."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, key, value)):
        return _Differentiable.apply(q, key, value, scale, policy, slots)
    with torch.no_grad():
        return _simulate(policy, slots, q, key, value, scale)[:3]


Blocks = list[tuple[int, int, torch.Tensor]]  # (first row, end row, columns' positions (N, c))


def _simulate(
    policy: Policy,
    slots: Slots,
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Blocks]:
    """:func:`policy_attention`'s forward pass (fp32 whatever the inputs' dtype), and each
    block's key positions."""
    b, hkv, g, t, d = q.shape
    n, device = b * hkv, q.device
    rule = RULES.get(type(policy), 0)
    if rule:
        steps = torch.full((n, t), t, dtype=torch.long, device=device)
    else:  # position-only: the closed form
        steps = policy.eviction_steps(None, slots, t, device=device)
        steps = steps.expand(b, hkv, t).reshape(n, t).clone()
    if _numba_serves(device):  # one compiled loop for every policy (measured fastest here)
        loop = _NumbaLoop(policy, n, slots)
    elif rule:
        loop = _TorchLoop(policy, b, hkv, t, slots, device)
    else:  # each block's keep-mask from the steps: one masked pass, no loop
        loop = _GivenSteps(steps, slots.total)
    lse = torch.empty(n, g, t, dtype=torch.float32, device=device)
    out = torch.empty(n, g, t, d, dtype=torch.float32, device=device)
    q_scaled = (q.float() * scale).reshape(n, g, t, d)
    keys, values = key.float().reshape(n, t, d), value.float().reshape(n, t, d)
    blocks = []
    for start, end in _row_blocks(n * g, t, slots.total):
        # A block's queries see only what the cache held when it began and the block itself.
        block = torch.arange(start, end, device=device).expand(n, -1)
        columns = torch.cat([loop.held(start), block], 1)
        blocks.append((start, end, columns))
        _, block_q, block_k, block_v = _block(q_scaled, keys, values, start, end, columns)
        logits = torch.bmm(block_q, block_k.mT).view(n, g, end - start, -1)
        probs = loop.weigh(logits, steps, lse, start, columns)
        rows_out = torch.bmm(probs.view(n, g * (end - start), -1), block_v)
        out[:, :, start:end] = rows_out.view(n, g, end - start, d)
    shaped = out.view(b, hkv, g, t, d), lse.view(b, hkv, g, t, 1), steps.view(b, hkv, t)
    return *shaped, blocks


def _numba_serves(device: torch.device) -> bool:
    """The compiled CPU loop runs where it can; elsewhere (a GPU) the torch loop does."""
    return device.type == "cpu" and _KERNEL is not None


def _kept(columns: torch.Tensor, steps: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Which of a block's ``columns`` each of its queries sees, ``(N, 1, rows, columns)``:
    key j is visible to query i iff ``j <= i < steps[j]``."""
    query = torch.arange(start, end, device=columns.device).view(1, 1, -1, 1)
    step = steps.gather(1, columns)[:, None, None]
    return (columns[:, None, None] <= query) & (step > query)


class _GivenSteps:
    """Position-only policies: the steps are known, so a block's softmax is one masked pass."""

    def __init__(self, steps: torch.Tensor, total: int) -> None:
        self.steps, self.total = steps, total

    def held(self, start: int) -> torch.Tensor:
        """The positions kept when token ``start`` arrives, oldest first ``(N, min(start,
        total))``: every head holds as many."""
        kept = self.steps[:, :start] >= start
        positions = torch.arange(start, device=kept.device).expand_as(kept)
        return positions[kept].view(kept.shape[0], -1)

    def weigh(self, logits, steps, lse, start, columns) -> torch.Tensor:
        end = start + logits.shape[2]
        probs, block_lse = math.masked_softmax(logits, _kept(columns, steps, start, end))
        lse[:, :, start:end] = block_lse.squeeze(-1)
        return probs


class _NumbaLoop:
    """Scoring policies on the CPU, in the compiled loop: the cache's positions, oldest
    first, their scores and their columns in the current block, ``(N, budget + the entering
    token)``."""

    def __init__(self, policy: Policy, n: int, slots: Slots) -> None:
        self.rule, self.total = RULES.get(type(policy), 0), slots.total
        self.first, self.recent = policy.eligible(0, slots)[0], slots.recent
        self.positions = torch.empty(n, slots.total + 1, dtype=torch.long)
        self.scores = torch.empty(n, slots.total + 1, dtype=torch.float32)
        self.cols = torch.empty(n, slots.total + 1, dtype=torch.long)

    def held(self, start: int) -> torch.Tensor:
        return self.positions[:, : min(start, self.total)]

    def weigh(self, logits, steps, lse, start, columns) -> torch.Tensor:
        probs = torch.zeros_like(logits)
        arrays = (logits, probs, steps, self.positions, self.scores, self.cols, lse)
        count, total = min(start, self.total), self.total
        _KERNEL(
            *(a.numpy() for a in arrays), start, count, total, self.first, self.recent, self.rule
        )
        return probs


class _TorchLoop:
    """Scoring policies on any device: the decoding cache's own eviction (slots,
    :func:`~lesskv.core.decoding.priority`, the policy's ``update_scores``) driven one row at
    a time over the block's logits. Slots fill in order, so when a block begins its first
    ``min(start, budget)`` slots are the cache's content and their columns."""

    def __init__(self, policy: Policy, b: int, hkv: int, t: int, slots: Slots, device) -> None:
        self.policy, self.split = policy, slots
        shape = (b, hkv, slots.total)
        self.positions = torch.full(shape, -1, dtype=torch.long, device=device)
        self.scores = torch.zeros(shape, dtype=torch.float32, device=device)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=device)
        self.cols = torch.zeros(shape, dtype=torch.long, device=device)
        self.tokens = torch.arange(t, device=device)
        self.compiled = _compiles(torch.device(device))

    def held(self, start: int) -> torch.Tensor:
        count = min(start, self.split.total)
        return self.positions[..., :count].flatten(0, 1)

    def weigh(self, logits, steps, lse, start, columns) -> torch.Tensor:
        b, hkv, total = self.positions.shape
        n, g, rows, width = logits.shape
        # held pairs: their order among the block's columns; empty slots: column 0, unread
        self.cols.copy_(torch.arange(total, device=logits.device) * self.valid)
        logits = logits.view(b, hkv, g, rows, width)
        probs = torch.zeros_like(logits)
        steps, lse = steps.view(b, hkv, -1), lse.view(b, hkv, g, -1)
        buffers = (self.positions, self.scores, self.valid, self.cols)
        first_column = columns.shape[1] - rows
        for r in range(rows):
            i = start + r
            row = (logits[..., r, :], probs[..., r, :], lse[..., i], steps)
            newest = self.tokens[i].expand(b)
            column = self.tokens[first_column + r]
            _row_step(
                self.policy, self.split, *row, *buffers, newest, column, enabled=self.compiled
            )
        return probs.view(n, g, rows, width)


def _compiles(device: torch.device) -> bool:
    """The row loop is compiled on accelerators, where each eager op is a kernel launch; on
    the CPU it runs only without numba, eager."""
    return device.type != "cpu" and compile_by_default()


def _evict_row(
    policy: Policy,
    split: Slots,
    logits: torch.Tensor,
    probs: torch.Tensor,
    lse: torch.Tensor,
    steps: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    cols: torch.Tensor,
    newest: torch.Tensor,
    column: torch.Tensor,
) -> None:
    """One row of :class:`_TorchLoop`, in place: token ``newest`` ``(B,)`` takes the slot the
    policy evicts (its pair's step becomes ``newest``) and ``column`` in the block; its query
    rows ``logits`` ``(B, Hkv, G, columns)`` are softmaxed over the slots into ``probs`` and
    ``lse`` ``(B, Hkv, G)``, and the policy's scores take those probabilities."""
    order = priority(policy, split, scores, positions, valid, newest)
    slot = order.argmin(-1, keepdim=True)
    left = positions.gather(-1, slot).clamp(min=0)
    now = newest.view(-1, 1, 1).expand_as(slot)
    steps.scatter_(-1, left, torch.where(valid.gather(-1, slot), now, steps.gather(-1, left)))
    positions.scatter_(-1, slot, now)
    scores.scatter_(-1, slot, 0.0)
    valid.scatter_(-1, slot, True)
    cols.scatter_(-1, slot, column.expand_as(slot))
    index = cols.unsqueeze(2).expand(-1, -1, logits.shape[2], -1)
    row_probs, row_lse = math.masked_softmax(logits.gather(-1, index), valid.unsqueeze(2))
    probs.scatter_add_(-1, index, row_probs)
    lse.copy_(row_lse.squeeze(-1))
    updated = policy.update_scores(scores, row_probs.unsqueeze(-2))
    if updated is not scores:  # TOVA returns new scores
        scores.copy_(updated)


_row_step = Compiled(_evict_row)


def _row_blocks(heads: int, t: int, budget: int) -> list[tuple[int, int]]:
    rows = max(1, min(BLOCK_ROWS, BLOCK_ELEMENTS // (heads * (budget + BLOCK_ROWS))))
    return [(start, min(t, start + rows)) for start in range(0, t, rows)]


def _block(
    q_scaled: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    end: int,
    columns: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's gather index ``(N, c, D)``, its queries ``(N, G * rows, D)`` (one matmul
    per KV head) and the keys and values of its ``columns``, ``(N, c, D)``."""
    n, g, _, d = q_scaled.shape
    index = columns.unsqueeze(-1).expand(-1, -1, d)
    block_q = q_scaled[:, :, start:end].reshape(n, g * (end - start), d)
    return index, block_q, keys.gather(1, index), values.gather(1, index)


class _Differentiable(torch.autograd.Function):
    """:func:`policy_attention` for training: the steps do not depend on the inputs' values
    in a differentiable way (they are discrete), so the gradient is attention's over the kept
    keys, recomputed block by block (flash attention's backward, with the log-sum-exp's own
    gradient added: LESS's combination uses it)."""

    @staticmethod
    def forward(ctx, q, key, value, scale, policy, slots):
        out, lse, steps, blocks = _simulate(policy, slots, q, key, value, scale)
        ctx.save_for_backward(q, key, value, out, lse, steps)
        ctx.blocks, ctx.scale = blocks, scale
        ctx.mark_non_differentiable(steps)
        return out, lse, steps

    @staticmethod
    def backward(ctx, d_out, d_lse, _):
        q, key, value, out, lse, steps = ctx.saved_tensors
        b, hkv, g, t, d = q.shape
        n, scale = b * hkv, ctx.scale
        q_scaled = (q * scale).reshape(n, g, t, d)
        keys, values = key.reshape(n, t, d), value.reshape(n, t, d)
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        d_out, out = d_out.reshape(n, g, t, d), out.reshape(n, g, t, d)
        d_lse, lse, steps = d_lse.reshape(n, g, t), lse.reshape(n, g, t), steps.reshape(n, t)
        d_q = torch.zeros_like(q_scaled)
        d_k, d_v = torch.zeros_like(keys), torch.zeros_like(values)
        for start, end, columns in ctx.blocks:
            rows = end - start
            index, block_q, block_k, block_v = _block(q_scaled, keys, values, start, end, columns)
            kept = _kept(columns, steps, start, end)
            logits = torch.bmm(block_q, block_k.mT).view(n, g, rows, -1)
            probs = (logits - lse[:, :, start:end, None]).exp_().masked_fill_(~kept, 0.0)
            grad_out = d_out[:, :, start:end].reshape(n, g * rows, d)
            flat_probs = probs.view(n, g * rows, -1)
            d_v.scatter_add_(1, index, torch.bmm(flat_probs.mT, grad_out))
            d_probs = torch.bmm(grad_out, block_v.mT).view(n, g, rows, -1)
            delta = (d_out[:, :, start:end] * out[:, :, start:end]).sum(-1, keepdim=True)
            d_logits = probs * (d_probs - delta + d_lse[:, :, start:end, None])
            flat = d_logits.view(n, g * rows, -1)
            d_q[:, :, start:end] = torch.bmm(flat, block_k).view(n, g, rows, d)
            d_k.scatter_add_(1, index, torch.bmm(flat.mT, block_q))
        shape = (b, hkv, t, d)
        return (d_q * scale).view(q.shape), d_k.view(shape), d_v.view(shape), None, None, None


def _evict_and_weigh(
    logits,
    probs,
    steps,
    held,
    held_scores,
    held_cols,
    lse,
    start,
    count,
    total,
    first,
    recent,
    rule,
):
    """The compiled loop (numba, in place), per KV head ``n``, over one block of queries
    ``start..start+rows-1``. ``logits``/``probs: (N, G, rows, count + rows)``: columns are the
    ``count`` positions the cache held at the block's start (``held[:, :count]``, oldest
    first), then the block's own tokens. ``steps: (N, T)``; ``held``, ``held_scores``,
    ``held_cols: (N, total + 1)``: the cache's positions, their scores and their columns;
    ``lse: (N, G, T)``. ``rule``: 0 the steps are given (position-only policies), 1 H2O
    (scores accumulate every row's probabilities), 2 TOVA (scores are the latest row's).
    Writes each row's probabilities at its held keys' columns of ``probs`` (the rest stays 0)
    and its log-sum-exp."""
    n_heads, groups, rows, _ = logits.shape
    for n in prange(n_heads):
        weights = np.empty(total + 1, dtype=np.float32)  # one row's, at the held keys
        row_sum = np.empty(total + 1, dtype=np.float32)  # its probabilities summed over G
        held_cols[n, :count] = np.arange(count)
        size = count
        for r in range(rows):
            i = start + r
            held[n, size], held_scores[n, size], held_cols[n, size] = i, 0.0, count + r
            size += 1  # token i entered
            if rule == 0:  # drop what the given steps evict now
                kept = 0
                for a in range(size):
                    if steps[n, held[n, a]] > i:
                        held[n, kept], held_scores[n, kept] = held[n, a], held_scores[n, a]
                        held_cols[n, kept] = held_cols[n, a]
                        kept += 1
                size = kept
            elif size > total:  # a full cache: the lowest score in the eligible range leaves
                last, victim, lowest = i - recent, -1, np.inf
                for a in range(size):
                    j = held[n, a]
                    if j > last:
                        break
                    if j >= first and held_scores[n, a] < lowest:  # the oldest of equals
                        victim, lowest = a, held_scores[n, a]
                steps[n, held[n, victim]] = i
                for a in range(victim, size - 1):
                    held[n, a], held_scores[n, a] = held[n, a + 1], held_scores[n, a + 1]
                    held_cols[n, a] = held_cols[n, a + 1]
                size -= 1
            row_sum[:size] = 0.0
            for g in range(groups):
                row, out_row = logits[n, g, r], probs[n, g, r]
                top = np.float32(-np.inf)  # float32 throughout: exp costs half of float64's
                for a in range(size):
                    weights[a] = row[held_cols[n, a]]
                    top = max(top, weights[a])
                weight_sum = np.float32(0.0)
                for a in range(size):
                    weights[a] = np.exp(weights[a] - top)
                    weight_sum += weights[a]
                lse[n, g, i] = top + np.log(weight_sum)
                inverse = np.float32(1.0) / weight_sum
                for a in range(size):
                    probability = weights[a] * inverse
                    out_row[held_cols[n, a]] = probability
                    row_sum[a] += probability
            if rule == 1:
                for a in range(size):
                    held_scores[n, a] += row_sum[a]
            elif rule == 2:
                for a in range(size):
                    held_scores[n, a] = row_sum[a]


# Compiled on first call (about a second), then read from numba's on-disk cache.
_KERNEL = None if njit is None else njit(parallel=True, cache=True, nogil=True)(_evict_and_weigh)
