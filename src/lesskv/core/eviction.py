"""Teacher-forced sparse attention without ``T x T`` tensors, with the policy's eviction loop in
compiled code.

:meth:`Policy.eviction_steps` simulates decoding one Python step per token over the whole
``(B, Hkv, G, T, T)`` logits, then the sparse attention masks them again: three passes over the
largest tensors of a layer, plus ~T small ops. Here queries are taken a block of rows at a time:

1. the block's logits ``(B, Hkv, G, rows, keys up to the block's last row)`` (one matmul);
2. a compiled loop over the block's rows, per KV head: token ``i`` enters and, once the budget
   is full, the lowest-scoring eligible pair leaves (its step is ``i``); row ``i`` is then
   normalised in place over the keys still kept (its softmax, and its log-sum-exp), and the
   policy's scores take the new probabilities;
3. the block's output, probabilities @ values (one matmul).

So the memory is ``O(rows x T)`` and every logit is touched a constant number of times. The
eviction rule, the scoring rules and their order are those of :class:`~lesskv.core.policies.Policy`
(``eligible``, ``update_scores``): tests hold the two to identical steps for every policy. The
loop is compiled by numba; where numba or the fused conditions are missing (another device,
autograd, 16-bit logits, a sliding window, padding), :func:`fused_applies` says no and callers
take the reference path.
"""

from __future__ import annotations

import math as pymath

import torch

from lesskv.core.policies import Policy, Slots

try:  # numba compiles the loop; without it callers take the reference path
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; a platform may lack wheels
    njit, prange = None, range

# The rows of one block hold about this many logits (batch x query heads x rows x keys): large
# enough for efficient matmuls, small enough to stay in cache-friendly sizes.
BLOCK_ELEMENTS = 2**22
# How each policy's scores take a row's probabilities, in the compiled loop: position-only
# policies (no scores) evict by their closed-form steps, given to the loop.
RULES = {"h2o": 1, "tova": 2}


def fused_applies(policy: Policy, *tensors: torch.Tensor, window: int | None = None) -> bool:
    """Whether :func:`policy_attention` serves this call: float32 on the CPU, no autograd, no
    sliding window, a policy whose rule the compiled loop knows, numba installed."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (
        window is None
        and not needs_grad
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and (policy.name in RULES or not policy.uses_attention)
        and njit is not None
    )


@torch.no_grad()
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
    :meth:`Policy.eviction_steps` and a masked softmax give them."""
    b, hkv, g, t, d = q.shape
    n = b * hkv
    rule = RULES.get(policy.name, 0)
    if rule:
        steps = torch.full((n, t), t, dtype=torch.long)
    else:  # position-only: the closed form
        steps = policy.eviction_steps(None, slots, t).expand(b, hkv, t).reshape(n, t).clone()
    scores = torch.zeros(n, t, dtype=torch.float32)
    lse = torch.empty(n, g, t, dtype=torch.float32)
    out = torch.empty(n, g, t, d, dtype=torch.float32)
    q_scaled = (q * scale).reshape(n, g, t, d)
    keys, values = key.reshape(n, t, d), value.reshape(n, t, d)
    rows = max(1, BLOCK_ELEMENTS // (n * g * t))
    first, recent = policy.eligible(0, slots)[0], slots.recent
    for start in range(0, t, rows):
        end = min(t, start + rows)
        logits = torch.matmul(q_scaled[:, :, start:end], keys[:, None, :end].mT)
        arrays = (logits.numpy(), steps.numpy(), scores.numpy(), lse.numpy())
        _KERNEL(*arrays, start, slots.total, first, recent, rule)
        out[:, :, start:end] = torch.matmul(logits, values[:, None, :end])
    return (
        out.view(b, hkv, g, t, d),
        lse.view(b, hkv, g, t, 1),
        steps.view(b, hkv, t),
    )


def _evict_and_normalise(logits, steps, scores, lse, start, total, first, recent, rule):
    """The compiled loop (numba, in place). ``logits: (N, G, rows, keys)`` for queries
    ``start..start+rows-1``; ``steps``/``scores: (N, T)``; ``lse: (N, G, T)``. ``rule``: 0 the
    steps are given (position-only policies), 1 H2O (scores accumulate every row's
    probabilities), 2 TOVA (scores are the latest row's). Afterwards row ``i`` of ``logits``
    holds the probabilities over the keys kept at step ``i`` (0 elsewhere)."""
    n_heads, groups, rows, keys = logits.shape
    t = steps.shape[1]
    for n in prange(n_heads):
        for r in range(rows):
            i = start + r
            if rule != 0 and i >= total:  # token i entered a full cache: one pair leaves
                last = i - recent
                best = first
                for j in range(first + 1, last + 1):
                    if scores[n, j] < scores[n, best]:
                        best = j
                steps[n, best] = i
                scores[n, best] = pymath.inf  # never chosen again
            for g in range(groups):
                top = -pymath.inf
                for j in range(i + 1):
                    if steps[n, j] > i and logits[n, g, r, j] > top:
                        top = logits[n, g, r, j]
                total_weight = 0.0
                for j in range(i + 1):
                    if steps[n, j] > i:
                        weight = pymath.exp(logits[n, g, r, j] - top)
                        logits[n, g, r, j] = weight
                        total_weight += weight
                    else:
                        logits[n, g, r, j] = 0.0
                for j in range(i + 1, keys):
                    logits[n, g, r, j] = 0.0
                inverse = 1.0 / total_weight
                for j in range(i + 1):
                    logits[n, g, r, j] *= inverse
                lse[n, g, i] = top + pymath.log(total_weight)
            if rule == 1:
                for j in range(i + 1):
                    for g in range(groups):
                        scores[n, j] += logits[n, g, r, j]
            elif rule == 2:
                for j in range(t):
                    if scores[n, j] != pymath.inf:
                        latest = 0.0
                        if j <= i:
                            for g in range(groups):
                                latest += logits[n, g, r, j]
                        scores[n, j] = latest


# Compiled on first call (about a second), then read from numba's on-disk cache.
_KERNEL = (
    None if njit is None else njit(parallel=True, cache=True, nogil=True)(_evict_and_normalise)
)
